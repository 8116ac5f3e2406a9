"""The examples run and find what they should."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name, *argv):
    """Run an example as a user would (float32 defaults; the fixture restores float64)."""
    torch.set_default_dtype(torch.float32)
    sys.argv = [name, *map(str, argv)]
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.mark.parametrize("n", [300, 5000])
def test_jelly_beans(n, capsys, tmp_path):
    run("jelly_beans.py", "-n", n, "--plot", tmp_path / "beans.png")
    out = capsys.readouterr().out
    assert "converged" in out and (tmp_path / "beans.png").exists()
    accuracy = float(out.split("beans sorted into their true flavour:")[1].split("%")[0])
    assert accuracy > 90
    weights = [float(line.split()[1]) for line in out.splitlines() if line.startswith(("cherry", "lime", "lemon"))]
    assert abs(sum(weights) - 1) < 0.01  # one fitted component per flavour


def test_digits(capsys, tmp_path):
    run("digits.py", "-k", 10, "-n", 500, "--restarts", 1, "--plot", tmp_path / "digits.png")
    out = capsys.readouterr().out
    assert "templates: closed form (BernoulliRule" in out and (tmp_path / "digits.png").exists()
    assert float(out.split("named after their digit:")[1].split("%")[0]) > 50


def test_poisson_mixture(capsys, tmp_path):
    run("poisson_mixture.py", "-n", 1500, "--max-k", 4, "--plot", tmp_path / "counts.png")
    assert "BIC chooses K = 3 kinds of hour" in capsys.readouterr().out
    assert (tmp_path / "counts.png").exists()


def test_experts(capsys, tmp_path):
    run("experts.py", "-n", 400, "--experts", 3, "--plot", tmp_path / "experts.png")
    out = capsys.readouterr().out
    assert (tmp_path / "experts.png").exists()
    assert float(out.split("test RMSE")[1].split()[0]) < 0.45


def test_missing_values(capsys):
    run("missing_values.py", "--missing", 0.3)
    out = capsys.readouterr().out
    assert "converged after" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) == 12
    for row in rows:  # mean (standard error) with holes, and the complete data's mean
        mean, se, full = float(row[-3]), float(row[-2].strip("()")), float(row[-1])
        assert 0 < se < 0.2 and abs(mean - full) < 4 * se
    assert float(out.split("cluster of their species:")[1].split("%")[0]) > 85


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_prints_help_with_a_text_for_every_flag(name):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]
    lines = proc.stdout.split("options:")[1].splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        same = line.strip().split("  ", 1)  # argparse puts the text after two spaces, or below
        below = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("-") else ""
        assert (same[1].strip() if len(same) > 1 else below), f"{name}: no help text for {line.strip()}"


def test_svi_vs_em(capsys, tmp_path):
    run("svi_vs_em.py", "-n", 500, "--svi-steps", 300, "--lr", 0.05, "--plot", tmp_path / "svi.png")
    out = capsys.readouterr().out
    assert out.startswith("EM :") and "SVI:" in out and (tmp_path / "svi.png").exists()


def test_sprinkler(capsys):
    run("sprinkler.py", "-n", 5000)
    out = capsys.readouterr().out
    assert "converged" in out and "wet: closed form" in out
    wet = out.split("wet grass")[1].split("]")[0].strip(" [").split(",")
    assert abs(float(wet[1]) - 0.9) < 0.05 and abs(float(wet[3]) - 0.99) < 0.02


def test_casino(capsys, tmp_path):
    run("casino.py", "--rolls", 2000, "--plot", tmp_path / "casino.png")
    out = capsys.readouterr().out
    assert (tmp_path / "casino.png").exists()
    assert "converged" in out
    six = float(out.split("  loaded [")[2].split("]")[0].split(",")[5])
    accuracy = float(out.split("called right by the posterior:")[1].split("%")[0])
    assert six > 0.4 and accuracy > 75


def _fitted_means(out):
    return sorted(tuple(round(float(v)) for v in line.split("mean")[1].split()) for line in out.splitlines() if "mean" in line)


@pytest.mark.slow
def test_data_parallel_in_one_process_and_under_torchrun(capsys):
    run("data_parallel.py", "-n", 8000, "--batch-size", 3000)
    one = capsys.readouterr().out
    assert "1 process(es)" in one and "converged" in one
    assert _fitted_means(one) == [(0, 0, 0), (0, 0, 5), (0, 5, 0), (5, 0, 0)]
    # The README's command, with 2 gloo processes on loopback.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(EXAMPLES / "data_parallel.py"), "-n", "8000", "--batch-size", "3000"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert _fitted_means(proc.stdout) == _fitted_means(one)
    loss = lambda out: float(out.split("loss ")[1].split()[0])  # noqa: E731
    assert loss(proc.stdout) == pytest.approx(loss(one), rel=1e-6)
