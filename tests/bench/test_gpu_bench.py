"""bench/gpu_bench.py's parts run on host_cupy's stand-in (``--stand-in``: CuPy replaced, the
CUDA kernels run on the host), as one checks the script before taking it to a GPU: each
prints its JSON with no error. What they time here is no GPU's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import host_cuda  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.hostcc, pytest.mark.timeout(150),
              pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")]


def bench(*args):
    """The JSON line ``bench/gpu_bench.py --stand-in ARGS`` prints last."""
    done = subprocess.run([sys.executable, "bench/gpu_bench.py", "--stand-in", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_fused_part_feeds_device_arrays():
    """It failed with `a NumPy array given to cupy`: the stand-in's ``cupy.random`` was
    NumPy's, whose draws are host arrays (CuPy's are on the device)."""
    res = bench("--part", "fused")
    assert res["elements"] == 1 << 16     # scaled down: 2**26 took over 200 s on the host
    assert res["expression"].startswith("fused[65536](")
    assert res["rel_err"] < 1e-6 and res["fused_ms"] > 0 and res["copy_ms"] > 0


def test_the_env_and_steps_parts_run():
    assert bench("--part", "env")["cupy"] == "stand-in (tests/runtime/host_cupy)"
    res = bench("--part", "steps", "--cases", "mlp512-b128", "--steps", "2",
                "--no-torch-compile")
    case = res["cases"]["mlp512-b128"]
    assert "error" not in case and case["shardgrad_ms"] > 0, case
