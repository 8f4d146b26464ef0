"""``sg.distributed`` from a user's own script: the same file alone and under real
``mpirun -n 2`` gives the same losses (float64), an uncaught exception on one rank aborts the
job with ``rank R failed``, and in one process the step equals ``compile_step``.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, mpi_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits_ddp.py"
ENV = mpi_env()


def under_mpirun(test):
    """A real-mpirun test, bounded in time."""
    for mark in (pytest.mark.mpi, pytest.mark.timeout(120),
                 pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")):
        test = mark(test)
    return test


F = sg.nn.functional


def run(argv, timeout=100):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT)


@under_mpirun
@pytest.mark.parametrize("zero", [0, 1])
def test_the_script_under_mpirun_gives_the_single_process_result(zero):
    args = [str(EXAMPLE), "--dtype", "float64", "--epochs", "2"]
    alone = run([sys.executable, *args])
    two = run([*MPIRUN, "-n", "2", sys.executable, *args, "--zero", str(zero)])
    assert alone.returncode == 0, alone.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(alone.stdout), json.loads(two.stdout)   # rank 0 alone prints
    assert (a["world_size"], b["world_size"]) == (1, 2)
    np.testing.assert_allclose(b["epoch_loss"], a["epoch_loss"], rtol=1e-12)
    assert b["test_accuracy"] == a["test_accuracy"]


FAILING = """
import numpy as np
import shardgrad as sg

comm = sg.distributed.init()
sg.manual_seed(0)
model = sg.nn.Linear(4, 3)
step = sg.distributed.data_parallel_step(model, sg.nn.functional.cross_entropy,
                                         sg.optim.SGD(model.parameters(), lr=0.1))
x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int64)
for i in range(1000):
    if i == 3 and comm.rank == 1:
        raise RuntimeError("boom at step 3")
    step(x, y)
"""


@under_mpirun
def test_an_uncaught_exception_on_one_rank_aborts_the_job(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    t0 = time.monotonic()
    r = run([*MPIRUN, "-n", "2", sys.executable, str(script)], timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank 1 failed: RuntimeError: boom at step 3" in r.stderr
    assert took < 30, f"the job took {took:.1f} s to stop"


def small_model():
    sg.manual_seed(0)
    return sg.nn.Sequential(sg.nn.Linear(8, 16), sg.nn.BatchNorm1d(16), sg.nn.ReLU(),
                            sg.nn.Linear(16, 3))


def test_one_process_step_equals_compile_step():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 8)).astype(np.float32), rng.integers(0, 3, 16)
    losses = {}
    for kind in ("compile_step", "data_parallel_step", "deterministic"):
        model = small_model()
        opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "compile_step":
            step = sg.compile_step(model, F.cross_entropy, opt)
        else:
            step = sg.distributed.data_parallel_step(model, F.cross_entropy, opt,
                                                     deterministic=kind == "deterministic",
                                                     chunks=1)
        losses[kind] = [step(x, y) for _ in range(3)]
    assert losses["data_parallel_step"] == losses["compile_step"]
    np.testing.assert_allclose(losses["deterministic"], losses["compile_step"], rtol=1e-6)
    assert sg.distributed.world_size() == 1 and sg.distributed.rank() == 0


def test_bad_options_name_the_option():
    model = small_model()
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"bucket_mb = 0: must be > 0"):
        sg.distributed.data_parallel_step(model, F.cross_entropy, opt, bucket_mb=0)
    with pytest.raises(ValueError, match=r"chunks = 0 must be a positive multiple"):
        sg.distributed.data_parallel_step(model, F.cross_entropy, opt, deterministic=True,
                                          chunks=0)
    with pytest.raises(ValueError, match=r"zero = 2: must be 0 \(off\) or 1"):
        sg.distributed.data_parallel_step(model, F.cross_entropy, opt, zero=2)
    # as the CLI's parallel.zero = 1 with parallel.overlap = true: refused, not ignored
    with pytest.raises(ValueError, match=r"^overlap = True and zero = 1: zero = 1 replaces"):
        sg.distributed.data_parallel_step(model, F.cross_entropy, opt, zero=1, overlap=True)
    # a model without parameters: TrainStep's error, not a bare StopIteration
    with pytest.raises(ValueError, match=r"Identity has no parameters to train"):
        sg.distributed.data_parallel_step(sg.nn.Identity(), F.cross_entropy, opt)
