"""A stand-in for the cupy module on machines without a GPU: NumPy under the name "cupy", so
the GPU executor takes its GPU path (ops.gpu.kernel picks the hand-written CUDA kernels by the
module's name) while runtime.host_cuda runs those kernels on the host, plus the few
``cupy.cuda`` calls the runtime makes (one visible device, no-op synchronization).
"""

from __future__ import annotations

import types

import numpy as np


class _Device:
    def __init__(self, index: int = 0):
        self.id = index

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def module(devices: int = 1) -> types.ModuleType:
    """A fresh module named "cupy" holding NumPy's namespace and a ``cuda`` namespace that
    reports ``devices`` GPUs."""
    cupy = types.ModuleType("cupy")
    cupy.__dict__.update({k: v for k, v in vars(np).items() if not k.startswith("__")})
    cupy.random, cupy.linalg = np.random, np.linalg      # NumPy loads these lazily
    stream = types.SimpleNamespace(synchronize=lambda: None)
    cupy.cuda = types.SimpleNamespace(
        Device=_Device, get_current_stream=lambda: stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: devices))
    return cupy


__all__ = ["module"]
