"""Pipelines with ``device.type = "cuda"`` under real ``mpirun``, on the CuPy stand-in
(host_cupy; host_cuda runs the CUDA kernels): pp = 2 and dp = 2 x pp = 2, the ranks
sharing GPU 0, each stage's programs on the GPU executor and its sends, receives and
allreduce through the GPU communicator (gradient clipping's too), end within 1e-10
(float64) of the CPU pipeline.
The same run on a real GPU is bench/gpu_check.sh's business. Each run bounded by a timeout.
"""

import importlib.util
import json
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

SETS = ["train.epochs=1", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
        'train.dtype="float64"', "parallel.microbatches=2", "train.log_every=1000"]


def worker(out: str, sets: list[str]) -> None:
    """One rank: the CPU pipeline, then the same run on the stand-in GPU; rank 0 writes both
    runs' final parameters and which executors and communicators ran."""
    sys.path.insert(0, str(Path(__file__).parent))
    import host_cuda
    import host_cupy

    from shardgrad.ops import gpu as gpu_ops
    from shardgrad.runtime import device as D
    from shardgrad.runtime import gpu_comm, world
    from shardgrad.runtime import train as tr
    from shardgrad.runtime.config import load_config
    from shardgrad.runtime.gpu import GPUExecutor

    comm = world.start(60.0)
    mlp = str(ROOT / "examples" / "digits_mlp.toml")
    tr.train(load_config(mlp, sets), f"{out}/cpu", comm=comm)
    cupy = host_cupy.module()
    D.base._cupy = lambda: cupy
    gpu_ops.launch = host_cuda.HostLauncher()
    runs, comms = [], []
    run, make = GPUExecutor.run, gpu_comm.make_gpu_comm
    GPUExecutor.run = lambda self, feeds: runs.append(self.rank) or run(self, feeds)
    gpu_comm.make_gpu_comm = lambda *a: comms.append(a[1:]) or make(*a)
    tr.train(load_config(mlp, [*sets, 'device.type="cuda"', 'device.cuda_aware_mpi="off"']),
             f"{out}/gpu", comm=comm)
    seen = comm.allgather_obj((sorted(set(runs)), comms))
    if comm.rank == 0:
        with open(f"{out}/seen.json", "w") as f:
            json.dump(seen, f)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dp,pp,extra", [(1, 2, []), (2, 2, []),
                                         (1, 2, ["train.grad_clip=0.05"])])
def test_cuda_pipeline_equals_the_cpu_pipeline(dp, pp, extra, tmp_path):
    # with grad_clip each stage's update allreduces its sum of squares over the stages
    sets = [*SETS, f"parallel.dp={dp}", f"parallel.pp={pp}", *extra]
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(dp * pp), sys.executable,
           __file__, "--worker", str(tmp_path), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**__import__("os").environ, "SHARDGRAD_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert [r for r, _ in seen] == [[r] for r in range(dp * pp)]   # every stage on the GPU
    assert all(c == [["mpi", "off"]] for _, c in seen)             # through the GPU comm
    cpu = safetensors.numpy.load_file(tmp_path / "cpu" / "final.safetensors")
    gpu = safetensors.numpy.load_file(tmp_path / "gpu" / "final.safetensors")
    assert sorted(cpu) == sorted(gpu)
    for k, v in cpu.items():
        np.testing.assert_allclose(gpu[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
