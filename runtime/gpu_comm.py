"""GPU buffers through a Communicator. ``GPUCommunicator`` wraps any Communicator (MPI, threads,
single process): before a device buffer goes out it synchronizes the CUDA stream, then hands
the buffer itself to a CUDA-aware MPI, or else stages it through pinned host memory (copy
out, communicate, copy back). ``NCCLCommunicator`` runs device collectives on NCCL
(cupy.cuda.nccl; the unique id is broadcast over the wrapped Communicator). Host (NumPy)
buffers pass straight through either. ``make_gpu_comm`` picks one from the config.

Side effects (CUDA, MPI) live here, in runtime/. Imports runtime (comm, device).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from shardgrad.runtime.comm import CommError, Communicator, Request
from shardgrad.runtime.device import is_device_array, xp_for

MODES = ("host", "direct", "stage", "nccl")


def transfer_mode(on_device: bool, cuda_aware: bool, backend: str = "mpi") -> str:
    """How one buffer crosses: ``host`` (a NumPy buffer: hand it over as it is), ``nccl``
    (a device buffer on NCCL), ``direct`` (a device buffer to a CUDA-aware MPI, which reads
    GPU memory itself) or ``stage`` (copy to pinned host memory and back)."""
    if backend not in ("mpi", "nccl"):
        raise ValueError(f"backend must be 'mpi' or 'nccl', not {backend!r}")
    if not on_device:
        return "host"
    if backend == "nccl":
        return "nccl"
    return "direct" if cuda_aware else "stage"


def cuda_aware_setting(setting: str | bool, probe: bool | None) -> bool:
    """Whether to hand device buffers to MPI directly: ``setting`` "on" / "off" decide;
    "auto" trusts the MPI library's own answer ``probe`` (None, when it gives none, means
    no: staging is always correct, a wrong "direct" crashes)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_aware must be 'auto', 'on' or 'off', not {setting!r}")
    return setting == "on" or (setting == "auto" and bool(probe))


def _loaded_libmpi() -> list[str]:
    """Paths of the MPI libraries mapped into this process (after mpi4py loaded one)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libmpi" in line and ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def probe_cuda_aware_mpi() -> bool | None:
    """The MPI library's answer to MPIX_Query_cuda_support() (Open MPI, MPICH >= 4), or None
    where the library has no such call or no MPI is loaded. mpi4py does not expose it."""
    try:
        from mpi4py import MPI  # noqa: F401 - loads and initializes the MPI library
    except ImportError:
        return None
    for path in _loaded_libmpi():
        try:
            fn = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return bool(fn())
    return None


class GPUCommunicator(Communicator):
    """``inner`` with device buffers: stream synchronized first, then passed directly when
    ``cuda_aware`` else staged through pinned host buffers (one per size, reused). Every
    collective still blocks until the result is in ``buf`` (the copy back is synchronized).
    ``xp`` is the array module (cupy; tests pass a stand-in)."""

    def __init__(self, inner: Communicator, cuda_aware: bool = False, xp=None):
        self.inner, self.cuda_aware = inner, bool(cuda_aware)
        self.rank, self.world_size = inner.rank, inner.world_size
        self._xp = xp
        self._pinned: dict[tuple[str, int], Any] = {}
        self.staged_bytes = 0

    @property
    def xp(self):
        if self._xp is None:
            self._xp = xp_for("cuda")        # CuPy (or what stands for it in tests)
        return self._xp

    def mode(self, buf) -> str:
        return transfer_mode(is_device_array(buf), self.cuda_aware)

    def _sync(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def _host(self, buf, role: str) -> np.ndarray:
        """A pinned host array shaped like ``buf`` (one cached allocation per role and size)."""
        key = (role, buf.nbytes)
        if key not in self._pinned:
            self._pinned[key] = self.xp.cuda.alloc_pinned_memory(max(buf.nbytes, 1))
        arr = np.frombuffer(self._pinned[key], np.dtype(buf.dtype), buf.size)
        return arr.reshape(buf.shape)

    def _out(self, buf, role: str = "a") -> np.ndarray:
        host = self._host(buf, role)
        buf.get(out=host)
        self.staged_bytes += buf.nbytes
        return host

    def _back(self, buf, host) -> None:
        buf.set(host)
        self._sync()

    def _staged(self, buf, call) -> Any:
        mode = self.mode(buf)
        if mode == "host":
            return call(buf)
        self._sync()
        if mode == "direct":
            call(buf)
            return buf
        host = self._out(buf)
        call(host)
        self._back(buf, host)
        return buf

    def allreduce_(self, buf, op="sum"):
        return self._staged(buf, lambda b: self.inner.allreduce_(b, op))

    def iallreduce_(self, buf, op="sum") -> Request:
        if self.mode(buf) == "host":
            return self.inner.iallreduce_(buf, op)
        self.allreduce_(buf, op)
        return Request()

    def bcast_(self, buf, root=0):
        return self._staged(buf, lambda b: self.inner.bcast_(b, root))

    def bcast_obj(self, obj, root=0):
        return self.inner.bcast_obj(obj, root)

    def allgather_obj(self, obj):
        return self.inner.allgather_obj(obj)

    def allgather_(self, x, out):
        mode = self.mode(out)
        if mode == "host" and not is_device_array(x):
            return self.inner.allgather_(x, out)
        self._sync()
        if mode == "direct":
            self.inner.allgather_(x, out)
            return out
        hx = self._out(x, "x") if is_device_array(x) else x
        hout = self._host(out, "out") if is_device_array(out) else out
        self.inner.allgather_(hx, hout)
        if is_device_array(out):
            self._back(out, hout)
        return out

    def reduce_scatter_(self, x, out, op="sum"):
        mode = self.mode(out)
        if mode == "host" and not is_device_array(x):
            return self.inner.reduce_scatter_(x, out, op)
        self._sync()
        if mode == "direct":
            self.inner.reduce_scatter_(x, out, op)
            return out
        hx = self._out(x, "x") if is_device_array(x) else x
        hout = self._host(out, "out") if is_device_array(out) else out
        self.inner.reduce_scatter_(hx, hout, op)
        if is_device_array(out):
            self._back(out, hout)
        return out

    def send(self, buf, dest, tag=0):
        if self.mode(buf) == "host":
            return self.inner.send(buf, dest, tag)
        self._sync()
        if self.mode(buf) == "direct":
            return self.inner.send(buf, dest, tag)
        return self.inner.send(self._out(buf, "send"), dest, tag)

    def isend(self, buf, dest, tag=0) -> Request:
        mode = self.mode(buf)
        if mode == "host":
            return self.inner.isend(buf, dest, tag)
        self._sync()
        if mode == "direct":
            return self.inner.isend(buf, dest, tag)
        # a host copy of its own (not the cached pinned one, which the next send of this size
        # reuses) that the request keeps alive until it is waited on
        host = np.empty(buf.shape, buf.dtype)
        buf.get(out=host)
        self.staged_bytes += buf.nbytes
        return self.inner.isend(host, dest, tag)

    def recv_(self, buf, source, tag=0):
        mode = self.mode(buf)
        if mode == "host":
            return self.inner.recv_(buf, source, tag)
        self._sync()
        if mode == "direct":
            self.inner.recv_(buf, source, tag)
            return buf
        host = self._host(buf, "recv")
        self.inner.recv_(host, source, tag)
        self._back(buf, host)
        return buf

    def barrier(self) -> None:
        self.inner.barrier()

    def split(self, color, key):
        return GPUCommunicator(self.inner.split(color, key), self.cuda_aware, self._xp)

    def abort(self, code=1):
        self.inner.abort(code)


class NCCLCommunicator(GPUCommunicator):
    """Device buffers on NCCL, one communicator over the ranks of ``inner`` (which carries
    the unique id and every host buffer and object). Calls block until the result is in
    ``buf`` (the stream is synchronized after each NCCL call)."""

    def __init__(self, inner: Communicator, xp=None):
        super().__init__(inner, cuda_aware=False, xp=xp)
        from cupy.cuda import nccl
        self.nccl = nccl
        uid = nccl.get_unique_id() if inner.rank == 0 else None
        uid = inner.bcast_obj(uid, 0)
        self.comm = nccl.NcclCommunicator(inner.world_size, uid, inner.rank)
        self.ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        self.dtypes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
                       "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32,
                       "int64": nccl.NCCL_INT64, "uint8": nccl.NCCL_UINT8,
                       "int8": nccl.NCCL_INT8}

    def mode(self, buf) -> str:
        return transfer_mode(is_device_array(buf), False, "nccl")

    def _call(self, what: str, fn, *args) -> None:
        stream = self.xp.cuda.get_current_stream()
        try:
            fn(*args, stream.ptr)
            stream.synchronize()
        except Exception as e:  # noqa: BLE001 - every NCCL failure is a CommError here
            raise CommError(f"NCCL {what} on rank {self.rank} failed: {e}") from e

    def _dtype(self, buf) -> int:
        try:
            return self.dtypes[str(buf.dtype)]
        except KeyError:
            raise CommError(f"NCCL has no type for {buf.dtype}") from None

    def allreduce_(self, buf, op="sum"):
        if self.mode(buf) == "host":
            return self.inner.allreduce_(buf, op)
        ptr = buf.data.ptr
        self._call("allreduce", self.comm.allReduce, ptr, ptr, buf.size, self._dtype(buf),
                   self.ops[op])
        return buf

    def bcast_(self, buf, root=0):
        if self.mode(buf) == "host":
            return self.inner.bcast_(buf, root)
        self._call("bcast", self.comm.bcast, buf.data.ptr, buf.size, self._dtype(buf), root)
        return buf

    def allgather_(self, x, out):
        if not is_device_array(out):
            return super().allgather_(x, out)
        self._call("allgather", self.comm.allGather, x.data.ptr, out.data.ptr, x.size,
                   self._dtype(x))
        return out

    def reduce_scatter_(self, x, out, op="sum"):
        if not (is_device_array(x) and is_device_array(out)):
            return super().reduce_scatter_(x, out, op)
        self._call("reduce_scatter", self.comm.reduceScatter, x.data.ptr, out.data.ptr,
                   out.size, self._dtype(x), self.ops[op])
        return out

    def send(self, buf, dest, tag=0):
        if self.mode(buf) == "host":
            return self.inner.send(buf, dest, tag)
        self._call("send", self.comm.send, buf.data.ptr, buf.size, self._dtype(buf), dest)

    def isend(self, buf, dest, tag=0) -> Request:
        # NCCL matches sends by order, not tag: blocking, as Communicator's default
        self.send(buf, dest, tag)
        return Request()

    def recv_(self, buf, source, tag=0):
        if self.mode(buf) == "host":
            return self.inner.recv_(buf, source, tag)
        self._call("recv", self.comm.recv, buf.data.ptr, buf.size, self._dtype(buf), source)
        return buf

    def split(self, color, key):
        return NCCLCommunicator(self.inner.split(color, key), self._xp)


def make_gpu_comm(inner: Communicator, backend: str = "mpi", cuda_aware: str | bool = "auto",
                  probe: bool | None = None) -> GPUCommunicator:
    """The GPU-capable Communicator over ``inner`` for config ``device.comm`` (``backend``:
    "mpi" or "nccl") and ``device.cuda_aware_mpi`` (``cuda_aware``: "auto" | "on" | "off";
    "auto" asks the loaded MPI library unless ``probe`` gives its answer)."""
    transfer_mode(True, False, backend)
    if backend == "nccl":
        return NCCLCommunicator(inner)
    if cuda_aware == "auto" and probe is None and inner.world_size > 1:
        probe = probe_cuda_aware_mpi()
    return GPUCommunicator(inner, cuda_aware_setting(cuda_aware, probe))


__all__ = ["GPUCommunicator", "MODES", "NCCLCommunicator", "cuda_aware_setting",
           "make_gpu_comm", "probe_cuda_aware_mpi", "transfer_mode"]
