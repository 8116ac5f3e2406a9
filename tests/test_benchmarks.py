"""The GPU benchmark's quick CPU mode runs and prints its table."""

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
