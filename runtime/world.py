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
import os
import signal
import sys
import threading
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
        _hold_job_stderr()
        _WORLD[0] = _bounded_start(timeout_s or None, start_timeout_s)
        _watch_signals()
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


def first_to_report() -> bool:
    """Whether this rank is the first of its job on this host to report a bad-input error
    (exit 2): every rank meets the same bad config or data, and one line says it. The mark
    is a file in the launcher's session directory (``PMIX_SERVER_TMPDIR``), which Open MPI
    removes with the job; without one, every rank reports."""
    folder = os.environ.get("PMIX_SERVER_TMPDIR", "")
    if mpi_world_size() is None or not os.path.isdir(folder):
        return True
    try:
        os.close(os.open(_error_mark(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


_JOB_STDERR: list[int | None] = [None]


def _hold_job_stderr() -> None:
    """Open the launcher's stderr now (``/proc/PARENT/fd/2``, Linux, when the parent is Open
    MPI's prterun or prted), for ``say_to_job``: after a signal the launcher may be gone."""
    parent = os.getppid()
    with contextlib.suppress(OSError):
        with open(f"/proc/{parent}/comm") as f:
            if f.read().strip() not in ("prterun", "prted", "mpirun", "mpiexec"):
                return
        _JOB_STDERR[0] = os.open(f"/proc/{parent}/fd/2", os.O_WRONLY | os.O_APPEND)


def say_to_job(line: str) -> None:
    """Write ``line`` where the job's launcher writes its own errors: once mpirun (prterun)
    is signalled it stops forwarding the ranks' output before it signals them, so a rank's
    last words go straight to the launcher's stderr, held open since ``start``; else (not
    Linux, not Open MPI) to this process's stderr."""
    fd = _JOB_STDERR[0]
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, (line + "\n").encode())
            return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _error_mark() -> str:
    """The file whose existence says a rank of this job reported a bad-input error."""
    return os.path.join(os.environ.get("PMIX_SERVER_TMPDIR", ""), "shardgrad-error")


_SAID = threading.Lock()   # taken by the first line saying this rank was terminated


def say_terminated(sig: int) -> None:
    """Say once, on the launcher's stderr, that this MPI rank was terminated by ``sig``;
    nothing when a peer's bad-input error ended the job (prterun's SIGTERM is its echo, and
    that error is the job's one line), nor when the C handler (``_say_from_handler``) said
    it already."""
    comm = _WORLD[0]
    reported = bool(os.environ.get("PMIX_SERVER_TMPDIR")) and os.path.exists(_error_mark())
    if comm is not None and not reported and not _said_by_handler() and _SAID.acquire(
            blocking=False):
        say_to_job(_terminated_line(comm.rank, sig))


def _terminated_line(rank: int, sig: int) -> str:
    return f"rank {rank} was terminated by {signal.Signals(sig).name}"


_HANDLER: list = []         # runtime/signals.c's library, once its handler is installed


def _said_by_handler() -> bool:
    return bool(_HANDLER) and bool(_HANDLER[0].sg_said_on_signal())


def _say_from_handler(rank: int, sigs) -> None:
    """Have the signal handler itself say ``rank R was terminated by SIG`` (runtime/signals.c,
    before Python's handler runs): no thread needs a core or the GIL within the ~0.2 s
    prterun leaves the ranks. For each signal Python handles (the CLI's handler), where a C
    compiler builds the small library; the watcher thread says it otherwise."""
    import ctypes

    from shardgrad.runtime import native
    sigs = [s for s in sigs if callable(signal.getsignal(s))]
    lib = native.signals() if sigs else None
    if lib is None:
        return
    fd = _JOB_STDERR[0] if _JOB_STDERR[0] is not None else 2
    mark = _error_mark() if os.environ.get("PMIX_SERVER_TMPDIR") else ""
    say = lib.sg_say_on_signal
    say.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
    say.restype = ctypes.c_int
    installed = [say(int(s), fd, (_terminated_line(rank, s) + "\n").encode(),
                     mark.encode()) == 0 for s in sigs]       # each signal, not the first
    if any(installed):
        _HANDLER[:] = [lib]


def _watch_signals() -> None:
    """Say ``rank R was terminated by SIG`` the moment SIGTERM or SIGHUP arrives, from a
    thread: the Python handler runs only when the main thread leaves a blocking MPI call,
    and prterun, signalled itself, kills the ranks about 0.2 s after it passed the signal
    on. Python's C handler writes each signal's number to the wakeup pipe even then."""
    if threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
        return

    def watch():
        while data := os.read(read, 64):
            for sig in data:
                if sig in (signal.SIGTERM, signal.SIGHUP):
                    say_terminated(sig)

    threading.Thread(target=watch, name="shardgrad-signals", daemon=True).start()
    comm = _WORLD[0]
    if comm is not None:
        _say_from_handler(comm.rank, (signal.SIGTERM, signal.SIGHUP))


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
