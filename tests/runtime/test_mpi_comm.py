"""MPICommunicator under a real mpirun: every collective and point-to-point call, and the
collective timeout turning a hang into a job-wide abort that names the op and the rank."""

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]


CALLS = """
import numpy as np
from shardgrad.runtime.mpi import MPICommunicator

c = MPICommunicator(timeout_s=20)
r, n = c.rank, c.world_size
b = np.full(4, r + 1.0)
assert c.allreduce_(b) is b and (b == n * (n + 1) / 2).all(), b
b = np.full(2, float(r)); c.allreduce_(b, "max"); assert (b == n - 1).all()
b = np.full(3, float(r)); c.bcast_(b, root=1); assert (b == 1).all()
out = np.empty((2 * n, 2))
c.allgather_(np.full((2, 2), float(r)), out); assert (out[::2, 0] == np.arange(n)).all()
x = np.arange(3.0 * n) * (r + 1); blk = np.empty(3); x0 = x.copy()
assert c.reduce_scatter_(x, blk) is blk and (x == x0).all()
assert (blk == np.arange(3.0 * r, 3.0 * r + 3) * n * (n + 1) / 2).all(), blk
if r == 0:
    c.send(np.arange(5.0), 1, tag=7)
elif r == 1:
    assert (c.recv_(np.empty(5), 0, tag=7) == np.arange(5)).all()
s = c.split(r % 2, -r)
assert s.world_size == (n + 1 - r % 2) // 2 and s.rank == (s.world_size - 1 - r // 2)
b = np.ones(10); c.iallreduce_(b).wait(); assert (b == n).all()
assert c.allgather_obj(r) == list(range(n)) and c.bcast_obj(r, root=n - 1) == n - 1
c.barrier()
print("ok", r, flush=True)
"""

HANG = """
import time
import numpy as np
from shardgrad.runtime.mpi import MPICommunicator

c = MPICommunicator(timeout_s=2)
if c.rank == 1:
    time.sleep(120)
c.allreduce_(np.ones(8))
"""


def mpirun(tmp_path, code, n, timeout):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(code))
    t = time.perf_counter()
    proc = subprocess.run(MPIRUN + ["-n", str(n), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t


@pytest.mark.parametrize("n", [2, 3])
def test_every_call_of_the_communicator_works_on_real_ranks(tmp_path, n):
    proc, _ = mpirun(tmp_path, CALLS, n, 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(proc.stdout.split("\n")[:-1]) == [f"ok {r}" for r in range(n)]


def test_a_collective_that_times_out_aborts_every_rank_and_names_the_op(tmp_path):
    proc, seconds = mpirun(tmp_path, HANG, 2, 60)
    assert proc.returncode != 0
    assert ("rank 0 failed: CommError: allreduce(sum) of 64 bytes on rank 0 did not complete "
            "within 2 s (parallel.timeout_s)") in proc.stderr, proc.stderr
    assert seconds < 30
