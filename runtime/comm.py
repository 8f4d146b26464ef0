"""Communicators: how ranks exchange arrays. The abstract class's docstrings are the spec;
``SingleProcess`` serves local runs and tests, ``runtime.mpi.MPICommunicator`` real runs.

Side effects live here (runtime/). Imports nothing from shardgrad above runtime.
"""

from __future__ import annotations

import abc
from typing import Any


class Communicator(abc.ABC):
    """A group of ``world_size`` processes, this one being ``rank`` (0-based).

    Every collective must be called by every rank of the group in the same order with arrays
    of the same shape and dtype; each call blocks until the result is ready on this rank, or
    raises ``CommError`` (timeout, a peer failed) instead of hanging.
    """

    rank: int = 0
    world_size: int = 1

    @abc.abstractmethod
    def allreduce_(self, buf: Any, op: str = "sum") -> Any:
        """Reduce ``buf`` over all ranks in place (``op``: "sum" | "max" | "min"); returns
        ``buf``, which then holds the same values on every rank."""

    @abc.abstractmethod
    def bcast_(self, buf: Any, root: int = 0) -> Any:
        """Overwrite ``buf`` in place with ``root``'s values; returns ``buf``."""

    @abc.abstractmethod
    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        """``root``'s picklable ``obj`` (small control data only, never closures)."""

    @abc.abstractmethod
    def allgather_obj(self, obj: Any) -> list[Any]:
        """The list of every rank's ``obj``, in rank order."""

    @abc.abstractmethod
    def send(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Send ``buf`` to rank ``dest`` (point-to-point, matched by ``tag``)."""

    @abc.abstractmethod
    def recv_(self, buf: Any, source: int, tag: int = 0) -> Any:
        """Receive into ``buf`` from rank ``source``; returns ``buf``."""

    def allgather_(self, x: Any, out: Any) -> Any:
        """Every rank's ``x`` (the same shape on all ranks) stacked along axis 0 into ``out``,
        in rank order; returns ``out``. This default pickles through ``allgather_obj``."""
        m = len(x)
        for r, part in enumerate(self.allgather_obj(x)):
            out[r * m:(r + 1) * m] = part
        return out

    def reduce_scatter_(self, x: Any, out: Any, op: str = "sum") -> Any:
        """Block ``rank`` of the elementwise ``op`` over all ranks of ``x`` into ``out``:
        ``x`` holds ``world_size`` equal blocks of ``len(out)`` rows along axis 0 (the same
        shape on all ranks); returns ``out``. ``x`` is left unchanged. This default reduces a
        copy of the whole of ``x`` (allreduce) and keeps its block."""
        m = len(out)
        whole = self.allreduce_(x.copy(), op)
        out[...] = whole[self.rank * m:(self.rank + 1) * m]
        return out

    def isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Start ``send(buf, dest, tag)`` and return its Request; ``buf`` must stay alive and
        unwritten until ``wait()`` returns. A receive matches it as it matches ``send``. This
        default sends at once (blocking) and returns a done Request."""
        self.send(buf, dest, tag)
        return Request()

    def iallreduce_(self, buf: Any, op: str = "sum") -> Request:
        """Start ``allreduce_(buf, op)`` and return its Request; ``buf`` must not be read or
        written until ``wait()`` returns. This default completes it at once."""
        self.allreduce_(buf, op)
        return Request()

    def barrier(self) -> None:
        """Block until every rank has reached the barrier."""
        self.allgather_obj(None)

    def split(self, color: int, key: int) -> Communicator:
        """A sub-group of the ranks that pass the same ``color``, ordered by ``key``."""
        raise NotImplementedError(f"{type(self).__name__} cannot split")

    def abort(self, code: int = 1) -> None:
        """Stop every rank of the job now (used when this rank fails)."""
        raise SystemExit(code)


class CommError(RuntimeError):
    """A collective could not complete: a peer died, timed out or failed."""


class Request:
    """A started non-blocking operation; ``wait()`` blocks until it is done (raising
    CommError on a timeout or a failed peer). This one is already done."""

    def wait(self) -> None:
        return None


class SingleProcess(Communicator):
    """The group of one: collectives are identities, point-to-point is an error."""

    def allreduce_(self, buf, op="sum"):
        return buf

    def bcast_(self, buf, root=0):
        return buf

    def bcast_obj(self, obj, root=0):
        return obj

    def allgather_obj(self, obj):
        return [obj]

    def send(self, buf, dest, tag=0):
        raise CommError("send() in a single-process run: there is no other rank")

    def recv_(self, buf, source, tag=0):
        raise CommError("recv() in a single-process run: there is no other rank")

    def split(self, color, key):
        return self
