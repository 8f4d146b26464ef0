"""The Communicator over MPI (mpi4py): in-place collectives on NumPy buffers, a collective
timeout, and abort. Importing this module initializes MPI, so import it only in processes
started by mpirun/mpiexec. Imports runtime.comm and runtime.config (MPI's defaults).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np

from shardgrad.runtime.comm import CommError, Communicator, Request
from shardgrad.runtime.config import set_mpi_defaults

set_mpi_defaults()
from mpi4py import MPI  # noqa: E402 - MPI reads its parameters when it starts, here

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


class _Progress:
    """Each rank's heartbeat and whether it waits in a communication call, in a small
    memory-mapped file its peers on the same host read directly (/dev/shm): reading needs no
    call on the other rank, so a stopped or stuck rank can be told from one that waits.
    Slots: heartbeat (monotonic ns, set by the watchdog's tick), waiting (1 inside a guarded
    call), since (ns of the last entry or exit), pid. Not an MPI shared window: under the Ray
    launcher's one-daemon-per-rank hosts on one machine, making one hung."""

    FIELDS = 4

    def __init__(self):
        world = MPI.COMM_WORLD
        self.rank, self.size = world.Get_rank(), world.Get_size()
        job = world.bcast(uuid.uuid4().hex if self.rank == 0 else None, 0)
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.dir = os.path.join(base, f"shardgrad-progress-{job}")
        os.makedirs(self.dir, exist_ok=True)
        self.mine = self._map(self.rank, create=True)
        now = time.monotonic_ns()
        self.mine[:] = (now, 0, now, os.getpid())
        atexit.register(self._remove)
        world.Barrier()   # every slot written before anyone reads one

    def _map(self, rank: int, create: bool = False) -> np.ndarray | None:
        path = os.path.join(self.dir, str(rank))
        try:
            if create:
                with open(path, "wb") as f:
                    f.write(bytes(8 * self.FIELDS))
            return np.memmap(path, np.int64, "r+" if create else "r", shape=(self.FIELDS,))
        except (OSError, ValueError):   # not on this host (or not yet there)
            return None

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.dir, str(self.rank)))
            os.rmdir(self.dir)   # the last rank out removes the directory

    def beat(self) -> None:
        self.mine[0] = time.monotonic_ns()

    def waiting(self, flag: bool) -> None:
        self.mine[2] = time.monotonic_ns()
        self.mine[1] = int(flag)

    def findings(self, stale_s: float) -> tuple[list[int], list[str]]:
        """The ranks that keep this one waiting and why: no heartbeat for ``stale_s`` (stopped,
        or stuck without releasing the GIL), or running outside any communication call."""
        now, hung, notes, unknown = time.monotonic_ns(), [], [], 0
        for r in range(self.size):
            slot = self._map(r) if r != self.rank else None
            if slot is None:
                unknown += r != self.rank
                continue
            beat, waiting, since, pid = (int(v) for v in slot)
            if (now - beat) / 1e9 > stale_s:
                hung.append(r)
                notes.append(f"rank {r} hangs: no heartbeat from its pid {pid} for "
                             f"{(now - beat) / 1e9:.1f} s (stopped, or stuck without releasing "
                             f"Python's GIL)")
            elif not waiting:
                hung.append(r)
                notes.append(f"rank {r} hangs: running but in no communication call for "
                             f"{(now - since) / 1e9:.1f} s")
        if unknown:
            notes.append(f"{unknown} rank(s) on other hosts cannot be checked from here")
        elif not notes:
            notes.append("every other rank waits in a communication call: they called "
                         "different ones")
        return hung, notes


class _Watchdog:
    """A daemon thread that aborts the job when a blocking collective outlives its deadline,
    naming the ranks it waited for (``_Progress``).

    Blocking MPI calls cannot be interrupted from Python, and the non-blocking ones that can
    be polled cost 2.5-6x here (Iallreduce + Test of 2.7 MB on 2 ranks: 1.2-1.4 ms against
    0.5 ms for Allreduce), so blocking calls run under this watch instead: entering and
    leaving one costs two attribute writes and two stores to shared memory.
    """

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.deadline: float | None = None
        self.what, self.limit = "", timeout_s
        self.tick = min(1.0, self.timeout_s / 4)
        self.progress = _Progress()
        threading.Thread(target=self._watch, name="shardgrad-comm-watchdog", daemon=True).start()

    def _watch(self) -> None:
        stale_s = max(3 * self.tick, 1.0)  # a live rank beats every tick: 3 missed is a hang
        while True:
            last = time.monotonic()
            time.sleep(self.tick)
            self.progress.beat()
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                if time.monotonic() - last > stale_s:   # this rank was stopped, not its peers
                    notes = [f"rank {self.rank} hangs: it was itself stopped (or starved) for "
                             f"{time.monotonic() - last:.1f} s"]
                else:
                    notes = self.progress.findings(stale_s)[1]
                err = CommError(f"{self.what} on rank {self.rank} did not complete within "
                                f"{self.limit:g} s (parallel.timeout_s): {'; '.join(notes)}; "
                                f"aborting the job")
                print(f"rank {self.rank} failed: CommError: {err}", file=sys.stderr, flush=True)
                MPI.COMM_WORLD.Abort(1)
                os._exit(1)


class _MPIRequest(Request):
    def __init__(self, request: MPI.Request, what: str, rank: int, timeout_s: float | None):
        self.request, self.what, self.rank, self.timeout_s = request, what, rank, timeout_s

    def wait(self) -> None:
        if self.timeout_s is None:
            self.request.Wait()
            return
        deadline = time.monotonic() + self.timeout_s
        dog = MPICommunicator._watchdog
        if dog is not None:
            dog.progress.waiting(True)
        try:
            while not self.request.Test():
                if time.monotonic() > deadline:
                    notes = ([] if dog is None else
                             dog.progress.findings(max(3 * dog.tick, 1.0))[1])
                    raise CommError(f"{self.what} on rank {self.rank} did not complete within "
                                    f"{self.timeout_s:g} s (parallel.timeout_s)"
                                    + "".join(f"; {n}" for n in notes))
                time.sleep(0)
        finally:
            if dog is not None:
                dog.progress.waiting(False)


class _SendRequest(Request):
    """An ``Isend``: holds its buffer until done; ``wait`` blocks under the watchdog, as a
    blocking send would (an unmatched send past parallel.timeout_s aborts the job)."""

    def __init__(self, comm: MPICommunicator, request: MPI.Request, what: str, buf: Any):
        self.comm, self.request, self.what, self.buf = comm, request, what, buf

    def wait(self) -> None:
        if self.buf is not None:
            self.comm._guarded(self.what, self.request.Wait)
            self.buf = None


class MPICommunicator(Communicator):
    """``comm`` (default MPI.COMM_WORLD) as a Communicator.

    Array collectives are in place on C-contiguous NumPy buffers (``MPI.IN_PLACE``), with no
    pickling. With ``timeout_s``, a blocking collective that has not completed after that
    many seconds prints ``rank R failed: CommError: <op> ...`` and aborts the whole job
    (every rank exits non-zero), as does an ``isend`` request's ``wait``; ``iallreduce_``
    requests raise CommError from ``wait``.
    """

    _watchdog: _Watchdog | None = None

    def __init__(self, comm: Any = None, timeout_s: float | None = None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout_s = timeout_s or None
        if self.timeout_s is not None and MPICommunicator._watchdog is None:
            MPICommunicator._watchdog = _Watchdog(MPI.COMM_WORLD.Get_rank(), self.timeout_s)

    def _guarded(self, what: str, call, *args) -> Any:
        dog = MPICommunicator._watchdog if self.timeout_s is not None else None
        if dog is None:
            return call(*args)
        dog.what, dog.limit = what, self.timeout_s
        dog.deadline = time.monotonic() + self.timeout_s
        dog.progress.waiting(True)
        try:
            return call(*args)
        finally:
            dog.deadline = None
            dog.progress.waiting(False)

    def allreduce_(self, buf, op="sum"):
        self._guarded(f"allreduce({op}) of {buf.nbytes} bytes", self.comm.Allreduce,
                      MPI.IN_PLACE, buf, _OPS[op])
        return buf

    def iallreduce_(self, buf, op="sum"):
        what = f"allreduce({op}) of {buf.nbytes} bytes"
        return _MPIRequest(self.comm.Iallreduce(MPI.IN_PLACE, buf, _OPS[op]), what, self.rank,
                           self.timeout_s)

    def bcast_(self, buf, root=0):
        self._guarded(f"bcast of {buf.nbytes} bytes from rank {root}", self.comm.Bcast, buf,
                      root)
        return buf

    def bcast_obj(self, obj, root=0):
        return self._guarded(f"bcast_obj from rank {root}", self.comm.bcast, obj, root)

    def allgather_obj(self, obj):
        return self._guarded("allgather_obj", self.comm.allgather, obj)

    def allgather_(self, x, out):
        self._guarded(f"allgather of {x.nbytes} bytes", self.comm.Allgather, x, out)
        return out

    def reduce_scatter_(self, x, out, op="sum"):
        self._guarded(f"reduce_scatter({op}) of {x.nbytes} bytes", self.comm.Reduce_scatter_block,
                      x, out, _OPS[op])
        return out

    def send(self, buf, dest, tag=0):
        self._guarded(f"send of {buf.nbytes} bytes to rank {dest}", self.comm.Send, buf, dest,
                      tag)

    def isend(self, buf, dest, tag=0):
        return _SendRequest(self, self.comm.Isend(buf, dest, tag),
                            f"send of {buf.nbytes} bytes to rank {dest}", buf)

    def recv_(self, buf, source, tag=0):
        self._guarded(f"recv of {buf.nbytes} bytes from rank {source}", self.comm.Recv, buf,
                      source, tag)
        return buf

    def barrier(self) -> None:
        self._guarded("barrier", self.comm.Barrier)

    def split(self, color, key):
        return MPICommunicator(self.comm.Split(color, key), self.timeout_s)

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(code)
