"""Devices: which one a process computes on (``"cpu" | "cuda" | "cuda:N"``), its array module
(numpy, or cupy imported only when a GPU is asked for), and moving arrays to and from it.

Side effects (CUDA calls) live here, in runtime/. Imports nothing from shardgrad but
runtime.config (for the local rank, read from the launcher's environment variables there).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device that cannot be used: a malformed spec, no CuPy, no GPU, an index past the
    devices present. The message names the spec and what is available."""


@dataclass(frozen=True)
class Device:
    """``kind`` is "cpu" or "cuda"; ``index`` the GPU ordinal (None: chosen per rank, see
    ``select``). ``str(Device)`` is the spec it parses from."""

    kind: str
    index: int | None = None

    @classmethod
    def parse(cls, spec: str | Device) -> Device:
        """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (case and surrounding blanks ignored)."""
        if isinstance(spec, Device):
            return spec
        m = _SPEC.match(str(spec).strip().lower())
        if m is None:
            raise DeviceError(f"device {spec!r}: expected 'cpu', 'cuda' or 'cuda:N' "
                              f"(N a GPU index, e.g. 'cuda:0')")
        kind, index = m.group(1), m.group(2)
        if kind == "cpu" and index is not None:
            raise DeviceError(f"device {spec!r}: 'cpu' takes no index")
        return cls(kind, None if index is None else int(index))

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def select(spec: str | Device, local_rank: int | None = None,
           device_count: int | None = None) -> Device:
    """The concrete device this process uses (pure: no CUDA call).

    ``"cpu"`` stays CPU. ``"cuda"`` takes GPU ``local_rank % device_count``: under mpirun each
    rank on a node takes the GPU of its local rank; under Ray, which hands each worker one GPU
    through CUDA_VISIBLE_DEVICES, ``device_count`` is 1 and every worker takes its GPU 0.
    ``"cuda:N"`` takes GPU N. Raises DeviceError when no GPU is visible or N is past them.
    """
    dev = Device.parse(spec)
    if not dev.is_cuda:
        return dev
    if device_count is not None and device_count < 1:
        raise DeviceError("no CUDA device is visible (check the driver and "
                          "CUDA_VISIBLE_DEVICES)")
    if dev.index is None:
        if local_rank is not None and local_rank < 0:
            raise DeviceError(f"local rank {local_rank} is negative")
        index = (local_rank or 0) % (device_count or 1)
        return Device("cuda", index)
    if device_count is not None and dev.index >= device_count:
        raise DeviceError(f"{str(dev)!r} is not among the {device_count} CUDA device(s) "
                          f"visible (cuda:0 .. cuda:{device_count - 1})")
    return dev


def _cupy():
    try:
        import cupy
    except ImportError as e:
        if importlib.util.find_spec("cupy") is None:
            raise DeviceError("CuPy is not installed: pip install -e '.[gpu]'") from None
        raise DeviceError(f"CuPy failed to import: {e}") from None
    return cupy


def device_count() -> int:
    """How many CUDA devices this process sees (0 without CuPy, a driver or a GPU)."""
    try:
        return int(_cupy().cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean zero
        return 0


def cuda_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    return device_count() > 0


def resolve(spec: str | Device = "cpu", local_rank: int | None = None) -> Device:
    """``select`` with the facts of this process: its local rank (from the launcher's
    environment, read by runtime.config) and the CUDA devices it sees. A DeviceError says
    whether CuPy is missing, fails to import, or sees no such GPU."""
    dev = Device.parse(spec)
    if not dev.is_cuda:
        return dev
    _cupy()
    if local_rank is None and dev.index is None:
        from shardgrad.runtime import config
        read = getattr(config, "local_rank", None)   # the launcher's variables, read there
        local_rank = read() if read is not None else None
    return select(dev, local_rank, device_count())


def xp_for(device: str | Device = "cpu"):
    """The array module for ``device``: numpy for the CPU, cupy for a GPU (imported now, not
    before). Does not make the GPU current: see ``use``."""
    return _cupy() if Device.parse(device).is_cuda else np


def use(device: str | Device):
    """Make ``device`` current for this thread (CuPy allocates and launches there); returns
    the CuPy Device (a context manager), or None for the CPU."""
    dev = Device.parse(device)
    if not dev.is_cuda:
        return None
    cuda_dev = _cupy().cuda.Device(dev.index or 0)
    cuda_dev.use()
    return cuda_dev


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (anything exposing ``__cuda_array_interface__``), without
    importing CuPy."""
    return hasattr(x, "__cuda_array_interface__")


def to_device(x: Any, device: str | Device, dtype: Any = None):
    """``x`` on ``device``: a NumPy array for the CPU, a CuPy array on the current GPU for
    CUDA (an array already there is returned as is, not copied)."""
    dev = Device.parse(device)
    if not dev.is_cuda:
        return to_host(x) if dtype is None else np.asarray(to_host(x), dtype=dtype)
    return _cupy().asarray(x, dtype=dtype)


def to_host(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` as a NumPy array; a CuPy array is copied back (into ``out`` if given, which may
    be pinned memory for an asynchronous-capable copy). Blocks until the copy is done."""
    if is_device_array(x):
        return x.get(out=out)
    arr = np.asarray(x)
    if out is not None:
        np.copyto(out, arr)
        return out
    return arr


def synchronize(device: str | Device | None = None) -> None:
    """Wait for all work queued on the current GPU (no-op for the CPU)."""
    if device is not None and not Device.parse(device).is_cuda:
        return
    cupy = _cupy()
    cupy.cuda.get_current_stream().synchronize()


def array_module(x: Any):
    """numpy or cupy, whichever ``x`` belongs to."""
    return _cupy() if is_device_array(x) else np


__all__ = ["Device", "DeviceError", "array_module", "cuda_available", "device_count",
           "is_device_array", "resolve", "select", "synchronize", "to_device", "to_host",
           "use", "xp_for"]
