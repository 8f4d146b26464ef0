"""N ranks in one process, one thread each: a Communicator for tests of distributed graphs
without processes (data parallel, pipelines). Reductions add in rank order, so every rank
gets bit-identical results. Imports runtime.comm only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from shardgrad.runtime.comm import CommError, Communicator

_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class ThreadGroup:
    """What the ranks of one group share: a barrier (its timeout bounds every collective),
    the exchange slots, the point-to-point queues and the sub-groups made by ``split``."""

    def __init__(self, world_size: int, timeout_s: float = 30.0):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[Any] = [None] * world_size
        self.queues: dict[tuple[int, int, int], queue.Queue] = {}
        self.children: dict[tuple[int, int], ThreadGroup] = {}
        self.lock = threading.Lock()

    def communicators(self) -> list[ThreadCommunicator]:
        return [ThreadCommunicator(self, r) for r in range(self.world_size)]


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a ThreadGroup. A peer that raises (see ``run_ranks``) or calls
    ``abort`` breaks the barrier, so the others get CommError instead of waiting."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self._splits = 0

    def _sync(self, op: str) -> None:
        try:
            self.group.barrier.wait()
        except threading.BrokenBarrierError:
            raise CommError(f"{op} on rank {self.rank}: a peer failed or did not arrive within "
                            f"{self.group.timeout_s} s") from None

    def _exchange(self, obj: Any, op: str) -> list[Any]:
        self.group.slots[self.rank] = obj
        self._sync(op)
        out = list(self.group.slots)
        self._sync(op)
        return out

    def allreduce_(self, buf, op="sum"):
        parts = self._exchange(np.array(buf, copy=True), "allreduce")
        total = parts[0].copy()
        for p in parts[1:]:
            _REDUCE[op](total, p, out=total)
        buf[...] = total
        return buf

    def bcast_(self, buf, root=0):
        buf[...] = self._exchange(np.array(buf, copy=True), "bcast")[root]
        return buf

    def bcast_obj(self, obj, root=0):
        return self._exchange(obj, "bcast_obj")[root]

    def allgather_obj(self, obj):
        return self._exchange(obj, "allgather_obj")

    def allgather_(self, x, out):
        parts = self._exchange(np.array(x, copy=True), "allgather")
        m = len(x)
        for r, part in enumerate(parts):
            out[r * m:(r + 1) * m] = part
        return out

    def reduce_scatter_(self, x, out, op="sum"):
        m = len(out)
        block = slice(self.rank * m, (self.rank + 1) * m)
        parts = self._exchange(np.array(x, copy=True), "reduce_scatter")
        total = parts[0][block].copy()
        for p in parts[1:]:
            _REDUCE[op](total, p[block], out=total)
        out[...] = total
        return out

    def _queue(self, source: int, dest: int, tag: int) -> queue.Queue:
        with self.group.lock:
            return self.group.queues.setdefault((source, dest, tag), queue.Queue())

    def send(self, buf, dest, tag=0):
        self._queue(self.rank, dest, tag).put(np.array(buf, copy=True))

    def recv_(self, buf, source, tag=0):
        try:
            buf[...] = self._queue(source, self.rank, tag).get(timeout=self.group.timeout_s)
        except queue.Empty:
            raise CommError(f"recv on rank {self.rank} from rank {source} (tag {tag}): nothing "
                            f"arrived within {self.group.timeout_s} s") from None
        return buf

    def split(self, color, key):
        seq, self._splits = self._splits, self._splits + 1
        pairs = self.allgather_obj((color, key))
        members = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        with self.group.lock:
            child = self.group.children.setdefault(
                (seq, color), ThreadGroup(len(members), self.group.timeout_s))
        return ThreadCommunicator(child, [r for _, r in members].index(self.rank))

    def abort(self, code=1):
        self.group.barrier.abort()
        raise SystemExit(code)


def run_ranks(world_size: int, fn: Callable[[ThreadCommunicator], Any],
              timeout_s: float = 30.0) -> list[Any]:
    """``fn(comm)`` on ``world_size`` threads, one per rank; the results in rank order. If a
    rank raises, the others' collectives fail fast and the first error is re-raised here."""
    comms = ThreadGroup(world_size, timeout_s).communicators()
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def body(comm: ThreadCommunicator) -> None:
        try:
            results[comm.rank] = fn(comm)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors.append((comm.rank, e))
            comm.group.barrier.abort()

    threads = [threading.Thread(target=body, args=(c,), daemon=True) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 2)
    if any(t.is_alive() for t in threads):
        raise CommError(f"ranks still running after {timeout_s * 2} s")
    if errors:
        rank, err = min(errors, key=lambda e: isinstance(e[1], CommError))
        raise RuntimeError(f"rank {rank} failed: {type(err).__name__}: {err}") from err
    return results
