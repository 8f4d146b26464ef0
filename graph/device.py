"""Where a value lives: the device spec (``"cpu" | "cuda" | "cuda:N"``), the array module of a
value (numpy, or cupy imported only when a GPU array or a GPU is asked for), and moving
arrays between host and GPU. Eager tensors use it; runtime.device adds the process-level
choices (which GPU a rank takes, making it current). Imports nothing from shardgrad.
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
    """``kind`` is "cpu" or "cuda"; ``index`` the GPU ordinal (None: the current GPU, or the
    one chosen per rank, see runtime.device.select). ``str(Device)`` is the spec it parses
    from; a Device compares equal to its spec string."""

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

    @property
    def type(self) -> str:
        """"cpu" or "cuda", as torch.device.type."""
        return self.kind

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            try:
                other = Device.parse(other)
            except DeviceError:
                return False
        return isinstance(other, Device) and (self.kind, self.index) == (other.kind,
                                                                          other.index)

    def __hash__(self) -> int:
        return hash((self.kind, self.index))

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


CPU = Device("cpu")


def _cupy():
    try:
        import cupy
    except ImportError as e:
        if importlib.util.find_spec("cupy") is None:
            raise DeviceError("CuPy is not installed: pip install -e '.[gpu]'") from None
        raise DeviceError(f"CuPy failed to import: {e}") from None
    return cupy


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (anything exposing ``__cuda_array_interface__``), without
    importing CuPy."""
    return hasattr(x, "__cuda_array_interface__")


def device_of(x: Any) -> Device:
    """The device holding array ``x``: ``cuda:N`` for a CuPy array on GPU N, else the CPU."""
    return Device("cuda", int(x.device.id)) if is_device_array(x) else CPU


def array_module(x: Any):
    """numpy or cupy, whichever ``x`` belongs to."""
    return _cupy() if is_device_array(x) else np


def xp_for(device: str | Device = "cpu"):
    """The array module for ``device``: numpy for the CPU, cupy for a GPU (imported now, not
    before). Does not make the GPU current: see runtime.device.use."""
    return _cupy() if Device.parse(device).is_cuda else np


def to_device(x: Any, device: str | Device, dtype: Any = None):
    """``x`` on ``device``: a NumPy array for the CPU, a CuPy array for CUDA (on GPU N for
    ``cuda:N``, on the current GPU for ``cuda``). An array already there is returned as is,
    not copied."""
    dev = Device.parse(device)
    if not dev.is_cuda:
        return to_host(x) if dtype is None else np.asarray(to_host(x), dtype=dtype)
    cupy = _cupy()
    if dev.index is None or (is_device_array(x) and device_of(x) == dev):
        return cupy.asarray(x, dtype=dtype)
    with cupy.cuda.Device(dev.index):
        if is_device_array(x):   # on another GPU: copy it over (peer to peer where it can)
            return x.copy() if dtype is None else x.astype(dtype)
        return cupy.asarray(x, dtype=dtype)


def copy_of(x: Any):
    """A copy of an array (NumPy, CuPy, a torch tensor or nested lists) that shares no memory
    with it, where it lives: what load_state_dict writes, so the caller's arrays and the
    tensors loaded from them never change one another."""
    return x.copy() if is_device_array(x) else np.array(x, copy=True)


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


__all__ = ["CPU", "Device", "DeviceError", "array_module", "device_of", "is_device_array",
           "to_device", "to_host", "xp_for"]
