"""Devices for a process: which GPU a rank computes on (``"cpu" | "cuda" | "cuda:N"``, the
local rank's GPU under mpirun and Ray), making it current, and waiting for it. What a value's
device is and moving arrays (also used by eager tensors) is graph.device, re-exported here.

Side effects (CUDA calls) live here, in runtime/. Imports graph.device, and runtime.config (for
the local rank, read from the launcher's environment variables there).
"""

from __future__ import annotations

import ctypes
import os
import sys

from shardgrad.graph.device import (
    CPU,
    Device,
    DeviceError,
    array_module,
    device_of,
    is_device_array,
    to_device,
    to_host,
    xp_for,
)


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


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_count() -> int:
    """How many CUDA devices this process sees (0 without CuPy, a driver or a GPU)."""
    try:
        return int(xp_for("cuda").cuda.runtime.getDeviceCount())
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
    xp_for(dev)                     # DeviceError when CuPy is missing or broken
    if local_rank is None and dev.index is None:
        from shardgrad.runtime import config
        read = getattr(config, "local_rank", None)   # the launcher's variables, read there
        local_rank = read() if read is not None else None
    return select(dev, local_rank, device_count())


def use(device: str | Device):
    """Make ``device`` current for this thread (CuPy allocates and launches there); returns
    the CuPy Device (a context manager), or None for the CPU."""
    dev = Device.parse(device)
    if not dev.is_cuda:
        return None
    cuda_dev = xp_for(dev).cuda.Device(dev.index or 0)
    cuda_dev.use()
    return cuda_dev


def synchronize(device: str | Device | None = None) -> None:
    """Wait for all work queued on the current GPU (no-op for the CPU)."""
    if device is not None and not Device.parse(device).is_cuda:
        return
    cupy = xp_for("cuda")
    cupy.cuda.get_current_stream().synchronize()


__all__ = ["CPU", "Device", "DeviceError", "array_module", "cores", "cuda_available",
           "device_count", "device_of", "is_device_array", "resolve", "select", "synchronize",
           "to_device", "to_host", "use", "xp_for"]


# glibc's malloc serves a block over 128 KB by mmap and unmaps it when freed, and trims the
# heap's free top beyond 128 KB, so each eager op's array of a 128x512 float32 MLP (256 KB to
# 1.6 MB) was a fresh mapping whose pages faulted in: 10.8-11.8 ms a step against 6.9-7.5 ms
# with the thresholds below (CPU time, bench/bench_step.py --benches eager, same machine).
# Arrays up to 32 MB then come from the heap, and up to 64 MB of freed memory stays there
# for the next step, as torch's and NumPy users' caching allocators keep theirs.
MALLOC_THRESHOLDS = {-3: 32 << 20, -1: 64 << 20}    # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds to MALLOC_THRESHOLDS (once, for the process), unless
    SHARDGRAD_MALLOC=0 or the user tuned malloc themselves (MALLOC_*_ / GLIBC_TUNABLES);
    False where there is no glibc (macOS, musl) or it is turned off."""
    from shardgrad.runtime.config import env

    if not sys.platform.startswith("linux") or env("SHARDGRAD_MALLOC", "1") in ("0", "no"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_THRESHOLDS.items())
