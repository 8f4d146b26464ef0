"""Pipelines with ``device.type = "cuda"`` under real ``mpirun``, on the CuPy stand-in
(host_cupy; host_cuda runs the CUDA kernels): pp = 2 and dp = 2 x pp = 2, the ranks
sharing GPU 0, each stage's programs on the GPU executor and its sends, receives and
allreduce through the GPU communicator (gradient clipping's too), end within 1e-10
(float64) of the CPU pipeline.
The same run on a real GPU is bench/gpu_check.sh's business. Each run bounded by a timeout.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from blobs import NEEDS_MPI  # noqa: E402
from stand_in_runs import assert_same_params, cpu_then_stand_in, run_workers  # noqa: E402

pytestmark = NEEDS_MPI

SETS = ["train.epochs=1", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
        'train.dtype="float64"', "parallel.microbatches=2", "train.log_every=1000"]


def worker(out: str, sets: list[str]) -> None:
    """One rank: the CPU pipeline, then the same run on the stand-in GPU; rank 0 writes
    which executors and communicators ran."""
    import host_cupy

    from shardgrad.runtime import gpu_comm

    def spy(runs):
        comms = []
        make = gpu_comm.make_gpu_comm
        gpu_comm.make_gpu_comm = lambda *a: comms.append(a[1:]) or make(*a)
        return lambda summary: (sorted(set(runs)), comms)

    cpu_then_stand_in(out, sets, host_cupy.module(), spy)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dp,pp,extra", [(1, 2, []), (2, 2, []),
                                         (1, 2, ["train.grad_clip=0.05"])])
def test_cuda_pipeline_equals_the_cpu_pipeline(dp, pp, extra, tmp_path):
    # with grad_clip each stage's update allreduces its sum of squares over the stages
    sets = [*SETS, f"parallel.dp={dp}", f"parallel.pp={pp}", *extra]
    seen = run_workers(__file__, dp * pp, tmp_path, sets)
    assert [r for r, _ in seen] == [[r] for r in range(dp * pp)]   # every stage on the GPU
    assert all(c == [["mpi", "off"]] for _, c in seen)             # through the GPU comm
    assert_same_params(tmp_path)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
