"""bench/bench_blas.py runs as docs/performance.md runs it (without torch here): a JSON line
for NumPy's OpenBLAS and one for the scipy-openblas64 wheel's, each GEMM timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardgrad.runtime import native

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.hostcc, pytest.mark.timeout(120),   # .ci/run: fails, not skips
              pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")]


def test_each_library_times_every_gemm(tmp_path):
    out = tmp_path / "blas.jsonl"
    done = subprocess.run([sys.executable, "bench/bench_blas.py", "--reps", "3", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["blas"] for line in lines] == ["numpy", "wheel"]
    for line in lines:
        times = [v for k, v in line.items() if k.startswith(("fwd", "dx", "dW"))]
        assert len(times) == 5 and all(t > 0 for t in times), line
