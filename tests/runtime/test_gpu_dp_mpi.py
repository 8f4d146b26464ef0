"""Data parallelism on compile_step's GPU step under real ``mpirun -n 2``, on the CuPy
stand-in (host_cupy's device arrays; host_cuda runs the CUDA kernels), the ranks sharing
GPU 0: each rank keeps its state on the device (runtime.gpu_step), computes its gradients
and loss into one flat buffer and allreduces it a bucket at a time through the GPU
communicator (staged through pinned host memory), and the run ends within 1e-10 (float64)
of the CPU data-parallel run. The same run on a real GPU is bench/gpu_check.sh's business.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

MPIRUN = shutil.which("mpirun")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
                       reason="needs mpi4py and mpirun (pip install -e .[mpi])"),
]

# 1242 float64 parameters and the loss: 3 buckets of at most 512 elements (4096 bytes)
SETS = ["train.epochs=1", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
        'train.dtype="float64"', "train.log_every=1000", "parallel.dp=2",
        f"parallel.bucket_mb={4096 / 2**20}"]


def worker(out: str, sets: list[str]) -> None:
    """One rank: the CPU data-parallel run, then the same run on the stand-in GPU; rank 0
    writes what ran (the GPU step's path, its executors' ranks, the allreduces by size)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import host_cuda
    import host_cupy

    from shardgrad.ops import gpu as gpu_ops
    from shardgrad.runtime import device as D
    from shardgrad.runtime import gpu_comm, world
    from shardgrad.runtime import train as tr
    from shardgrad.runtime.config import load_config
    from shardgrad.runtime.gpu import GPUExecutor
    from shardgrad.runtime.step import TrainStep

    comm = world.start(60.0)
    mlp = str(ROOT / "examples" / "digits_mlp.toml")
    tr.train(load_config(mlp, sets), f"{out}/cpu", comm=comm)
    cupy = host_cupy.device_module()
    D.base._cupy = lambda: cupy
    gpu_ops.launch = host_cuda.HostLauncher()
    runs, sizes, paths = [], [], []
    run, allreduce = GPUExecutor.run, gpu_comm.GPUCommunicator.allreduce_
    GPUExecutor.run = lambda self, feeds: runs.append(self.rank) or run(self, feeds)
    gpu_comm.GPUCommunicator.allreduce_ = lambda self, buf, op="sum": (
        sizes.append(int(buf.size)) or allreduce(self, buf, op))
    to_host = TrainStep.to_host
    TrainStep.to_host = lambda self: paths.append(self.stats()["path"]) or to_host(self)
    summary = tr.train(load_config(mlp, [*sets, 'device.type="cuda"',
                                         'device.cuda_aware_mpi="off"']), f"{out}/gpu", comm=comm)
    seen = comm.allgather_obj((sorted(set(map(str, runs))), len(runs), sizes, paths,
                               summary["steps"]))
    if comm.rank == 0:
        with open(f"{out}/seen.json", "w") as f:
            json.dump(seen, f)


@pytest.mark.timeout(300)
def test_gpu_data_parallel_equals_the_cpu_run(tmp_path):
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
           __file__, "--worker", str(tmp_path), *SETS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "SHARDGRAD_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    for ranks, n_runs, sizes, paths, steps in seen:
        assert ranks == ["None"] and n_runs == steps > 0   # compile_step's own GPU path
        assert paths and set(paths) == {"flat-sgd"}
        # per step: the batch norm's synchronised statistics (16 features: mean and variance
        # forward, their gradients backward, in the graph), then the flat buffer (1242
        # gradients and the loss) in 3 buckets: one allreduce a bucket, not a parameter (the
        # run ends with one more, of the summary)
        assert sizes[:7 * steps] == ([16] * 4 + [512, 512, 219]) * steps
    cpu = safetensors.numpy.load_file(tmp_path / "cpu" / "final.safetensors")
    gpu = safetensors.numpy.load_file(tmp_path / "gpu" / "final.safetensors")
    assert sorted(cpu) == sorted(gpu)
    for k, v in cpu.items():
        np.testing.assert_allclose(gpu[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    cpu_m = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").open()]
    gpu_m = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").open()]
    losses = lambda m: [r["train_loss"] for r in m if "train_loss" in r]
    np.testing.assert_allclose(losses(gpu_m), losses(cpu_m), rtol=1e-10)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
