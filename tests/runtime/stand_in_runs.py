"""The digits MLP trained on the CPU, then again on the CuPy stand-in, under real ``mpirun``:
the worker and the checks test_gpu_dp_mpi and test_pipeline_device share. A test module's
``--worker`` entry (``run_workers`` starts ``python test_x.py --worker OUT SETS...``) calls
``cpu_then_stand_in`` with what its ranks record of the stand-in run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from blobs import MPIRUN

MLP = str(Path(__file__).resolve().parents[2] / "examples" / "digits_mlp.toml")
ON_GPU = ['device.type="cuda"', 'device.cuda_aware_mpi="off"']


def cpu_then_stand_in(out: str, sets: list[str], cupy: Any,
                      spy: Callable[[list], Callable[[dict], Any]]) -> None:
    """One rank: the run with ``sets`` on the CPU into OUT/cpu; then ``cupy`` installed
    (host_cupy.install), the GPU executor's runs recorded by rank, ``spy(runs)`` (patches
    what the test watches and returns what reads it, given the run's summary), and the same
    run on the stand-in GPU into OUT/gpu. Rank 0 writes every rank's reading to OUT/seen.json.
    """
    import host_cupy

    from shardgrad.runtime import train as tr
    from shardgrad.runtime import world
    from shardgrad.runtime.config import load_config
    from shardgrad.runtime.gpu import GPUExecutor

    comm = world.start(60.0)
    tr.train(load_config(MLP, sets), f"{out}/cpu", comm=comm)
    host_cupy.install(cupy)
    runs: list = []
    run = GPUExecutor.run
    GPUExecutor.run = lambda self, feeds: runs.append(self.rank) or run(self, feeds)
    read = spy(runs)
    summary = tr.train(load_config(MLP, [*sets, *ON_GPU]), f"{out}/gpu", comm=comm)
    seen = comm.allgather_obj(read(summary))
    if comm.rank == 0:
        with open(f"{out}/seen.json", "w") as f:
            json.dump(seen, f)


def run_workers(script: str, ranks: int, out: Path, sets: list[str]) -> list:
    """``script --worker OUT SETS...`` on ``ranks`` ranks (280 s at most); what each rank
    read (OUT/seen.json)."""
    cmd = [*MPIRUN, "-n", str(ranks), sys.executable, script, "--worker", str(out), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "SHARDGRAD_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "seen.json").read_text())


def assert_same_params(out: Path) -> None:
    """The stand-in run's final parameters are the CPU run's, within 1e-10 (float64)."""
    cpu = safetensors.numpy.load_file(out / "cpu" / "final.safetensors")
    gpu = safetensors.numpy.load_file(out / "gpu" / "final.safetensors")
    assert sorted(cpu) == sorted(gpu)
    for k, v in cpu.items():
        np.testing.assert_allclose(gpu[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


__all__ = ["MLP", "assert_same_params", "cpu_then_stand_in", "run_workers"]
