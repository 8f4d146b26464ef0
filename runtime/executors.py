"""The one place an executor is chosen: by name (the config's ``train.executor``) and by the
device the step runs on. runtime.train, runtime.step (and so runtime.distributed) ask here.

An executor is ``make(graph) -> runnable`` with ``run(feeds) -> outputs by name``; every one
is a backend of the executor core (graph.walk). Imports runtime (compiled, interpreter, gpu,
device).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from shardgrad.graph.ir import Graph
from shardgrad.runtime import compiled
from shardgrad.runtime import device as dev
from shardgrad.runtime.gpu import GPUExecutor
from shardgrad.runtime.interpreter import Interpreter

Executor = Callable[[Graph], Any]   # graph -> object with .run(feeds) -> dict of outputs

# CPU executors by config name: "compiled" (the default: graph passes, planned buffers, out=
# kernels) and "interpreter" (the reference).
EXECUTORS: dict[str, Executor] = {
    "interpreter": Interpreter,
    "compiled": compiled.compile,
}


def choose_executor(name: str = "compiled", device: str | dev.Device = "cpu",
                    rank: int | None = None) -> Executor:
    """The executor for a step on ``device``: runtime.gpu's GPUExecutor on a CUDA device
    ("cuda": the current one), else the CPU executor ``name`` (a key of EXECUTORS). ``rank``
    is named in the GPU executor's errors."""
    where = device if isinstance(device, dev.Device) else dev.Device.parse(device)
    if where.is_cuda:
        return functools.partial(GPUExecutor, device=where, rank=rank)
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}: expected one of {sorted(EXECUTORS)}")
    return EXECUTORS[name]


__all__ = ["EXECUTORS", "Executor", "choose_executor"]
