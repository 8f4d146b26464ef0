"""``device.type`` in training, on the CPU: the config key, the errors when CuPy or the GPU is
missing, and the wiring (the step on the GPU executor, its state back on the host for
evaluation and checkpoints, device buffers through gpu_comm on several ranks) with host_cupy
standing in for cupy and host_cuda running the CUDA kernels. The same run on a real
GPU is bench/gpu_check.sh's business.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).parent))
import host_cupy  # noqa: E402

import shardgrad as sg  # noqa: E402
from shardgrad.graph import device as base  # noqa: E402
from shardgrad.runtime import device as D  # noqa: E402
from shardgrad.runtime import gpu_comm  # noqa: E402
from shardgrad.runtime import train as tr  # noqa: E402
from shardgrad.runtime.config import ConfigError, load_config  # noqa: E402
from shardgrad.runtime.gpu import GPUExecutor  # noqa: E402
from shardgrad.runtime.step import TrainStep  # noqa: E402
from shardgrad.runtime.threadcomm import run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "examples" / "digits_mlp.toml")
SMALL = ["train.epochs=1", "train.batch_size=128", "model.hidden=[16]", "device.threads=1"]

pytestmark = pytest.mark.timeout(120)


def config(*sets):
    return load_config(MLP, SMALL + list(sets))


@pytest.fixture
def host_gpu(monkeypatch):
    """CuPy "installed" with ``host_gpu.devices`` GPUs; returns the ranks of the GPU
    executor's runs."""
    host_cupy.install(host_cupy.module(), monkeypatch)
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    runs = []
    run = GPUExecutor.run
    monkeypatch.setattr(GPUExecutor, "run", lambda self, feeds: runs.append(self.rank) or run(
        self, feeds))
    return runs


def test_the_key_takes_cpu_cuda_and_cuda_n():
    assert config('device.type="cuda:3"')["device"]["type"] == "cuda:3"
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x"):
        with pytest.raises(ConfigError, match=r"device.type = .*: must be 'cpu', 'cuda'"):
            config(f'device.type="{bad}"')


def test_cuda_without_cupy_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # any import of cupy now fails
    with pytest.raises(ConfigError) as e:
        tr.train(config('device.type="cuda"'), None)
    assert str(e.value) == ("device.type = 'cuda' but CuPy is not installed: "
                            "pip install -e '.[gpu]'")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cli_exits_2_with_that_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shardgrad", "train", MLP, "--out",
                        str(tmp_path / "run"), "--set", 'device.type="cuda"'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "SHARDGRAD_PROGRESS": "0"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("shardgrad train: error: device.type = 'cuda' but CuPy is not "
                                "installed: pip install -e '.[gpu]'")


def test_missing_gpus_and_pipelines_are_config_errors(host_gpu, monkeypatch):
    with pytest.raises(ConfigError, match=r"'cuda:1' but 'cuda:1' is not among the 1 CUDA"):
        tr.train(config('device.type="cuda:1"'), None)
    with pytest.raises(ConfigError, match="device.comm = 'nccl' carries data parallelism only"):
        tr.train(config('device.type="cuda"', "parallel.pp=2", 'device.comm="nccl"'), None)
    monkeypatch.setattr(base, "_cupy", lambda: host_cupy.module(devices=0))
    with pytest.raises(ConfigError, match="'cuda' but no CUDA device is visible"):
        tr.train(config('device.type="cuda"'), None)
    assert not host_gpu


def test_cuda_training_runs_the_step_on_the_gpu_executor(host_gpu, tmp_path, monkeypatch):
    cupy = host_cupy.device_module()          # arrays that say they are on the GPU
    monkeypatch.setattr(base, "_cupy", lambda: cupy)
    pulls = []
    to_host = TrainStep.to_host
    monkeypatch.setattr(TrainStep, "to_host", lambda self: pulls.append(1) or to_host(self))
    cpu = tr.train(config("train.epochs=2"), None)
    out = tmp_path / "run"
    gpu = tr.train(config("train.epochs=2", 'device.type="cuda"'), str(out))
    # one process: compile_step's own GPU path (runtime.gpu_step), its executor rank-less
    assert host_gpu == [None] * gpu["steps"] and gpu["steps"] == cpu["steps"] == 22
    assert len(pulls) == 4                 # once an epoch in each run, before evaluating
    assert abs(gpu["train_loss"] - cpu["train_loss"]) <= 1e-4 * abs(cpu["train_loss"])
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 0.01
    final = safetensors.numpy.load_file(out / "final.safetensors")
    ckpt = safetensors.numpy.load_file(out / "checkpoints" / "epoch_2.safetensors")
    for k, v in final.items():
        np.testing.assert_array_equal(ckpt[k], v)
    assert {k for k in ckpt if k.startswith("optim.")}, "optimizer state is checkpointed"


def test_data_parallel_cuda_wraps_the_communicator(host_gpu, monkeypatch):
    cupy = host_cupy.device_module()          # arrays that say they are on the GPU
    monkeypatch.setattr(base, "_cupy", lambda: cupy)
    made = []
    make = gpu_comm.make_gpu_comm
    monkeypatch.setattr(gpu_comm, "make_gpu_comm", lambda inner, backend, aware: made.append(
        (inner.rank, backend, aware)) or make(inner, backend, aware))
    c = config("parallel.dp=2", 'device.type="cuda"', 'device.cuda_aware_mpi="off"')
    summaries = run_ranks(2, lambda comm: tr.train(c, None, comm=comm), timeout_s=60)
    assert sorted(made) == [(0, "mpi", "off"), (1, "mpi", "off")]
    # each rank on compile_step's own GPU path (runtime.gpu_step: its executor rank-less), the
    # flat gradient buffer allreduced through the GPU communicator
    assert host_gpu == [None] * (2 * summaries[0]["steps"])
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    c = config("parallel.dp=2")
    (cpu, _) = run_ranks(2, lambda comm: tr.train(c, None, comm=comm), timeout_s=60)
    assert abs(summaries[0]["train_loss"] - cpu["train_loss"]) <= 1e-4 * cpu["train_loss"]


def test_zero1_on_the_gpu_equals_the_cpu_run(host_gpu, monkeypatch):
    cupy = host_cupy.device_module()          # arrays that say they are on the GPU
    monkeypatch.setattr(base, "_cupy", lambda: cupy)
    sets = ("parallel.dp=2", "parallel.zero=1", 'train.dtype="float64"')
    c = config(*sets, 'device.type="cuda"', 'device.cuda_aware_mpi="off"')
    gpu = run_ranks(2, lambda comm: tr.train(c, None, comm=comm), timeout_s=60)
    # ZeRO-1 runs the host-feeds step on the GPU executor (ranked), not the resident one
    assert sorted(host_gpu) == sorted([0, 1] * gpu[0]["steps"])
    (cpu, _) = run_ranks(2, lambda comm: tr.train(config(*sets), None, comm=comm),
                         timeout_s=60)
    assert abs(gpu[0]["train_loss"] - cpu["train_loss"]) <= 1e-10 * cpu["train_loss"]
    assert gpu[0]["optimizer_state_bytes_per_rank"] == cpu["optimizer_state_bytes_per_rank"]


class _OnDevice(np.ndarray):
    """A stand-in device array: NumPy that claims to live on a GPU."""

    __cuda_array_interface__ = {}

    def get(self, out=None):
        return np.array(self)


def test_to_host_brings_device_state_back():
    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(3, 2))
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = sg.compile_step(model, sg.functional.cross_entropy, opt)
    step(np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    want = {k: v.copy() for k, v in model.state_dict().items()}
    tensors = [p for _, p in model.named_parameters()] + [v for st in opt.state
                                                          for v in st.values()]
    for t in tensors:
        t._set_leaf(np.asarray(t.data).view(_OnDevice))
    assert all(D.is_device_array(t.data) for t in tensors)
    step.to_host()
    assert not any(D.is_device_array(t.data) for t in tensors)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, want[k])
