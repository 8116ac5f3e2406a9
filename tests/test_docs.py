"""The Sphinx documentation builds without warnings (broken docstrings fail here)."""

import subprocess
import sys
from pathlib import Path

import pyro
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "api.html").exists()


def code_blocks(path):
    """The Python code blocks of a page, in order: ```python fences in Markdown; in
    reStructuredText, ``.. code-block:: python`` and literal blocks after a paragraph ending
    in ``::``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if path.suffix == ".md":
            if line.strip() == "```python":
                j = lines.index("```", i + 1)
                blocks.append("\n".join(lines[i + 1 : j]))
                i = j
        elif line.strip() == ".. code-block:: python" or (
            line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        ):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            body = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                body.append(lines[j])
                j += 1
            body = [b for b in body if not b.strip().startswith(":")]  # directive options
            width = min(len(b) - len(b.lstrip()) for b in body if b.strip())
            blocks.append("\n".join(b[width:] for b in body))
            i = j - 1
        i += 1
    return blocks


PAGES = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.rst"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_runs(page):
    """Each page's code blocks run in order, in one namespace, as a reader would paste them."""
    pyro.clear_param_store()
    namespace = {"__name__": "docs"}
    for block in code_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
