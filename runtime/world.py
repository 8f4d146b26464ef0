"""The World: how a process joins a job. ``start`` starts MPI when an MPI launcher started
the process (bounded by a start timeout) or makes the single-process communicator, and
installs the hook that aborts every rank when one fails; ``device_comm`` builds the
communicator for the step's device (host MPI, or on a GPU: staging, CUDA-aware MPI or NCCL)
and ``mesh`` the dp x pp groups. The CLI and ``sg.distributed`` both start here.
Imports runtime (comm, config, mpi, gpu_comm, pipeline).
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
from collections.abc import Callable

from shardgrad.runtime import gpu_comm
from shardgrad.runtime.comm import Communicator, SingleProcess
from shardgrad.runtime.config import ConfigError, mpi_world_size
from shardgrad.runtime.device import Device
from shardgrad.runtime.pipeline import Mesh

_WORLD: list[Communicator | None] = [None]


def start(timeout_s: float | None = 300.0, start_timeout_s: float = 0.0,
          exit_code: Callable[[BaseException], int] | None = None) -> Communicator:
    """This process's world communicator: MPI's world (made on the first call: MPI starts
    once per process) when an MPI launcher started the process, with ``timeout_s`` as the
    collective timeout (0 or None: none) and ``start_timeout_s`` bounding MPI's start (0:
    unbounded); else a single process. Under MPI an uncaught exception then prints ``rank R
    failed: ...`` and aborts every rank with ``exit_code(exception)`` (default 1, 130 for an
    interrupt)."""
    if _WORLD[0] is None:
        if mpi_world_size() is None:
            return SingleProcess()
        _WORLD[0] = _bounded_start(timeout_s or None, start_timeout_s)
        _abort_on_uncaught(_WORLD[0], exit_code or _exit_code)
    return _WORLD[0]


def _bounded_start(timeout_s: float | None, start_timeout_s: float) -> Communicator:
    if start_timeout_s:
        # MPI's start waits for every rank while holding the GIL, so no Python thread can end
        # the wait for a rank that never starts: faulthandler's C thread prints "Timeout" and
        # where it waited (_start_mpi), and exits; mpirun then ends the job. It needs a real
        # stderr (a file descriptor): without one, the start is not bounded.
        with contextlib.suppress(ValueError, OSError, AttributeError):
            faulthandler.dump_traceback_later(start_timeout_s, exit=True)
    try:
        return _start_mpi(timeout_s)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _start_mpi(timeout_s: float | None) -> Communicator:
    try:
        from shardgrad.runtime.mpi import MPICommunicator  # initializes MPI: only under mpirun
    except ImportError as e:
        raise ConfigError(f"an MPI launcher started this process but {e.name or 'mpi4py'} "
                          f"cannot be imported ({e}): pip install -e '.[mpi]'") from None
    return MPICommunicator(timeout_s=timeout_s)


def _exit_code(e: BaseException) -> int:
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def fail(comm: Communicator, e: BaseException, code: int) -> None:
    """This rank failed with ``e``: say so on stderr and stop every rank of ``comm`` with
    exit ``code`` (its peers would otherwise wait for it). Nothing for a single process."""
    if comm.world_size == 1:
        return
    cause = ("interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt)
             else f"{type(e).__name__}: {e}")
    print(f"rank {comm.rank} failed: {cause}", file=sys.stderr, flush=True)
    comm.abort(code)


def _abort_on_uncaught(comm: Communicator, exit_code: Callable[[BaseException], int]) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        fail(comm, value, exit_code(value))

    sys.excepthook = hook


def device_comm(comm: Communicator, device: str = "cpu", backend: str = "mpi",
                cuda_aware: str | bool = "auto") -> Communicator:
    """The communicator a step on ``device`` uses over ``comm``: ``comm`` itself on the CPU
    or for one rank; on a GPU the one carrying device buffers (``backend`` "mpi": staged
    through pinned host memory or CUDA-aware MPI as ``cuda_aware`` says; "nccl")."""
    if not Device.parse(device).is_cuda or comm.world_size == 1:
        return comm
    return gpu_comm.make_gpu_comm(comm, backend, cuda_aware)


def mesh(comm: Communicator, dp: int, pp: int) -> Mesh:
    """This rank's place in a dp x pp mesh over ``comm`` and its pipeline and data-parallel
    groups (``comm.split``)."""
    return Mesh.of(comm, dp, pp)


__all__ = ["device_comm", "fail", "mesh", "start"]
