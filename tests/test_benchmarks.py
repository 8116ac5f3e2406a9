"""The benchmark scripts that tests can afford run and print their tables."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_gpu_benchmark_quick_mode():
    proc = subprocess.run([sys.executable, "bench_gpu.py", "--quick", "--repeat", "1"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " vs " in line]
    assert [r.split(" vs ")[1].split()[0] for r in rows] == ["scikit-learn", "hmmlearn"]
    for row in rows:
        pyro_em, peer, ratio = map(float, row.split()[-3:])
        assert pyro_em > 0 and peer > 0 and abs(ratio - pyro_em / peer) < 2e-3 * ratio


@pytest.mark.slow
def test_small_problems_benchmark_runs_and_both_reach_the_same_optimum():
    proc = subprocess.run([sys.executable, "bench_small.py", "--repeat", "1"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("iris", "earthquake"))]
    assert len(rows) == 2 and all(row.count("x)") == 4 for row in rows)  # (four figures each)
    likelihoods = [line for line in proc.stdout.splitlines() if "log-likelihood peer / pyro_em" in line]
    assert len(likelihoods) == 2
    for row in likelihoods:
        peer, ours = row.split()[-3], row.split()[-1]
        assert peer == ours  # the same log-likelihood to 4 decimals


@pytest.mark.slow
def test_streaming_benchmark_runs_with_the_losses_of_python():
    """(The script asserts that the step programs' losses equal the model's Python's.)"""
    proc = subprocess.run([sys.executable, "bench_streaming.py", "--n", "2000", "--batch", "200", "--epochs", "3",
                           "--capture"],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("fit_batches", "OnlineEM"))]
    assert [r[0] for r in rows] == ["fit_batches", "OnlineEM"]
    assert rows[1][-1] == "captured"  # (OnlineEM: one program, captured within three epochs)


def test_a_script_writes_its_table_into_the_docs(tmp_path, capsys):
    """``--docs``: what a script prints becomes its block of the performance page, added the
    first time and replaced the next, with the command, the day and the machine."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _timing import docs_table
    finally:
        sys.path.remove(str(BENCHMARKS))
    page = tmp_path / "performance.rst"
    page.write_text("Performance\n\n.. end of the latest runs\n\nHistory\n")
    for ratio in ("0.50", "0.25"):
        with docs_table("bench_x", True, page):
            print(f"pyro_em / peer   {ratio}")
    text = page.read_text()
    assert capsys.readouterr().out.count("pyro_em / peer") == 2  # (printed as usual too)
    assert text.count(".. begin bench_x") == 1 and "    pyro_em / peer   0.25" in text and "0.50" not in text
    assert text.index(".. end bench_x") < text.index(".. end of the latest runs") < text.index("History")
    assert "torch " in text and "threads" in text
