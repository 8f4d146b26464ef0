"""DeviceStep: a training-step Graph run by the GPU executor with its parameters and optimizer
state resident on the device between steps, the trajectory tests and bench/gpu_bench.py
compare against the reference (the package's own GPU step is runtime.gpu_step, behind
compile_step). Test support: imports shardgrad.runtime.gpu.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph.ir import Graph
from shardgrad.runtime.device import Device
from shardgrad.runtime.gpu import GPUExecutor


class DeviceStep:
    """A training-step Graph (graph.trace.trace_step's leaves and outputs) run on one GPU
    with its parameters and states resident there.

    ``params`` / ``states`` map leaf names to arrays (copied to the device once). Each call
    ``step(x, y, lr, t)`` feeds a batch (host or device arrays), runs forward, backward and
    update, swaps the new parameters and states in, and returns the loss as a 0-d device
    array. The step's one host sync is cross_entropy's check that every label is in range.
    """

    def __init__(self, graph: Graph, params: Mapping[str, Any], states: Mapping[str, Any],
                 device: str | Device = "cuda", fuse: bool = True, xp=None):
        self.exe = GPUExecutor(graph, device, fuse=fuse, xp=xp)
        self.xp = self.exe.xp
        self.params = {k: self.xp.array(v) for k, v in params.items()}
        self.states = {k: self.xp.array(v) for k, v in states.items()}
        self.dtype = np.dtype(str(next(iter(self.params.values())).dtype))

    def __call__(self, x, y, lr: float, t: float):
        out = self.exe.run({"x": x, "y": y, "lr": np.asarray(lr, self.dtype),
                            "t": np.asarray(t, self.dtype), **self.params, **self.states})
        for k in self.params:
            self.params[k] = out[f"param/{k}"]
        for k in self.states:
            if f"state/{k}" in out:
                self.states[k] = out[f"state/{k}"]
        return out["loss"]
