"""Data parallelism on compile_step's GPU step under real ``mpirun -n 2``, on the CuPy
stand-in (host_cupy's device arrays; host_cuda runs the CUDA kernels), the ranks sharing
GPU 0: each rank keeps its state on the device (runtime.gpu_step), computes its gradients
and loss into one flat buffer and allreduces it a bucket at a time through the GPU
communicator (staged through pinned host memory), and the run ends within 1e-10 (float64)
of the CPU data-parallel run. The same run on a real GPU is bench/gpu_check.sh's business.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from blobs import NEEDS_MPI  # noqa: E402
from stand_in_runs import assert_same_params, cpu_then_stand_in, run_workers  # noqa: E402

pytestmark = NEEDS_MPI

# 1242 float64 parameters and the loss: 3 buckets of at most 512 elements (4096 bytes)
SETS = ["train.epochs=1", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
        'train.dtype="float64"', "train.log_every=1000", "parallel.dp=2",
        f"parallel.bucket_mb={4096 / 2**20}"]


def worker(out: str, sets: list[str]) -> None:
    """One rank: the CPU data-parallel run, then the same run on the stand-in GPU; rank 0
    writes what ran (the GPU step's path, its executors' ranks, the allreduces by size)."""
    import host_cupy

    from shardgrad.runtime import gpu_comm
    from shardgrad.runtime.step import TrainStep

    def spy(runs):
        sizes, paths = [], []
        allreduce = gpu_comm.GPUCommunicator.allreduce_
        gpu_comm.GPUCommunicator.allreduce_ = lambda self, buf, op="sum": (
            sizes.append(int(buf.size)) or allreduce(self, buf, op))
        to_host = TrainStep.to_host
        TrainStep.to_host = lambda self: paths.append(self.stats()["path"]) or to_host(self)
        return lambda summary: (sorted(set(map(str, runs))), len(runs), sizes, paths,
                                summary["steps"])

    cpu_then_stand_in(out, sets, host_cupy.device_module(), spy)


@pytest.mark.timeout(300)
def test_gpu_data_parallel_equals_the_cpu_run(tmp_path):
    seen = run_workers(__file__, 2, tmp_path, SETS)
    for ranks, n_runs, sizes, paths, steps in seen:
        assert ranks == ["None"] and n_runs == steps > 0   # compile_step's own GPU path
        assert paths and set(paths) == {"flat-sgd"}
        # per step: the batch norm's synchronised statistics (16 features: mean and variance
        # forward, their gradients backward, in the graph), then the flat buffer (1242
        # gradients and the loss) in 3 buckets: one allreduce a bucket, not a parameter (the
        # run ends with one more, of the summary)
        assert sizes[:7 * steps] == ([16] * 4 + [512, 512, 219]) * steps
    assert_same_params(tmp_path)
    cpu_m = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").open()]
    gpu_m = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").open()]
    losses = lambda m: [r["train_loss"] for r in m if "train_loss" in r]
    np.testing.assert_allclose(losses(gpu_m), losses(cpu_m), rtol=1e-10)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
