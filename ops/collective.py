"""Communication ops: allreduce (blocking, or start/wait), allgather, reduce_scatter, shard
(a rank's block, no communication), send/recv, and data parallelism's bucket helpers (pack,
unpack, batch_chunk). Kernels find their Communicator in a binding made by whoever runs the
graph (``with bind(comm): executor.run(feeds)``), so a graph holds names, never closures.
Imports only ops.registry and graph.ir; a communicator is anything with runtime.comm's methods.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np

from shardgrad.graph.ir import Node, ShapeError, const
from shardgrad.ops.registry import OpDef, apply, itemsize, register

REDUCE_OPS = ("sum", "max", "min")


class Binding:
    """The communicators a running graph may use, by group name ("world" and any others,
    e.g. "dp" and "pp" of a mesh), and the requests that non-blocking ops left pending."""

    def __init__(self, groups: dict[str, Any]):
        self.groups = groups
        self.pending: dict[int, Any] = {}
        self.sending: list[tuple[Any, Any]] = []   # isend's (request, buffer) until waited on

    def wait_sends(self) -> None:
        """Wait for every ``isend`` started under this binding (each buffer stays referenced,
        and so unwritten, until its send is done)."""
        while self.sending:
            request, _ = self.sending.pop(0)
            request.wait()


_BINDING: ContextVar[Binding | None] = ContextVar("shardgrad_collective_binding", default=None)


@contextlib.contextmanager
def bind(comm: Any, **groups: Any) -> Iterator[Binding]:
    """Inside, collective kernels use ``comm`` for group "world" and ``groups[name]`` for the
    group called ``name``. The binding is per thread (a ContextVar), so N in-process ranks on
    N threads each bind their own communicator."""
    token = _BINDING.set(Binding({"world": comm, **groups}))
    try:
        yield _BINDING.get()
    finally:
        _BINDING.reset(token)


def communicator(group: str, op: str) -> Any:
    binding = _BINDING.get()
    if binding is None:
        raise RuntimeError(
            f"{op} needs a communicator and none is bound: run the graph inside "
            f"`with shardgrad.ops.collective.bind(comm):` (runtime.dp.bound does it for you)")
    if group not in binding.groups:
        raise RuntimeError(f"{op} uses group {group!r}, but only {sorted(binding.groups)} are "
                           f"bound")
    return binding.groups[group]


def _comm_cost(node: Node) -> tuple[float, float]:
    return 0.0, float(2 * sum(x.size * itemsize(x.dtype) for x in node.inputs))


def _writable_copy(xp, x):
    return xp.array(x, copy=True, order="C")


# ---- allreduce ----------------------------------------------------------------------------------
# inplace=True lets the kernel reduce into its input's buffer. Only a partitioner may set it,
# and only on a value it created for this node alone (a fresh pack): no other node sees it.

def _allreduce_infer(x, op="sum", group="world", inplace=False, **_):
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
    return x


def _allreduce_fwd(xp, x, op="sum", group="world", inplace=False):
    buf = x if inplace else _writable_copy(xp, x)
    return communicator(group, "allreduce").allreduce_(buf, op)


def _allreduce_vjp(g, x, out, op="sum", group="world", inplace=False):
    if op != "sum":
        raise ShapeError(f"allreduce(op={op!r}) has no gradient rule; only op='sum' does")
    return (allreduce(g, "sum", group),)  # y_r = sum_s x_s => dx_r = sum_s g_s: self-adjoint


register(OpDef("allreduce", infer=_allreduce_infer, forward=_allreduce_fwd, vjp=_allreduce_vjp,
               jvp=lambda ts, x, out, op="sum", group="world", inplace=False:
               None if ts[0] is None else allreduce(ts[0], op, group), cost=_comm_cost,
               effectful=True))


def allreduce(x: Node, op: str = "sum", group: str = "world", inplace: bool = False) -> Node:
    """The elementwise ``op`` ("sum" | "max" | "min") of ``x`` over every rank of ``group``."""
    return apply("allreduce", x, op=op, group=group, inplace=inplace)


# Non-blocking allreduce: start issues the reduction and returns the buffer it is reducing
# into; wait (the buffer's only user) blocks until it is done. ``tag`` pairs them.

def _start_fwd(xp, x, op="sum", group="world", tag=0, inplace=False):
    buf = x if inplace else _writable_copy(xp, x)
    request = communicator(group, "allreduce_start").iallreduce_(buf, op)
    _BINDING.get().pending[tag] = request
    return buf


def _wait_fwd(xp, x, tag=0):
    binding = _BINDING.get()
    if binding is None or tag not in binding.pending:
        raise RuntimeError(f"allreduce_wait(tag={tag}) has no pending allreduce_start")
    binding.pending.pop(tag).wait()
    return x


register(OpDef("allreduce_start", infer=_allreduce_infer, forward=_start_fwd,
               vjp=lambda g, x, out, op="sum", group="world", tag=0, inplace=False:
               _allreduce_vjp(g, x, out, op, group),  # start+wait is allreduce: see above
               cost=_comm_cost, effectful=True))
register(OpDef("allreduce_wait", infer=lambda x, **_: x, forward=_wait_fwd,
               vjp=lambda g, x, out, tag=0: (g,),  # wait is the identity on values
               cost=lambda node: (0.0, 0.0), effectful=True))


# ---- allgather / reduce_scatter (along axis 0; world_size fixes the shapes) ---------------------

def _allgather_infer(x, world_size, group="world", **_):
    if not x[0]:
        raise ValueError("allgather needs at least one dimension (it stacks along axis 0)")
    return (x[0][0] * world_size,) + tuple(x[0][1:]), x[1]


def _allgather_fwd(xp, x, world_size, group="world"):
    comm = communicator(group, "allgather")
    _check_size(comm, world_size, "allgather")
    out = xp.empty((x.shape[0] * world_size,) + x.shape[1:], x.dtype)
    return comm.allgather_(xp.ascontiguousarray(x), out)


def _reduce_scatter_infer(x, world_size, group="world", **_):
    if not x[0] or x[0][0] % world_size:
        raise ValueError(f"axis 0 of {tuple(x[0])} is not divisible by world_size {world_size}")
    return (x[0][0] // world_size,) + tuple(x[0][1:]), x[1]


def _reduce_scatter_fwd(xp, x, world_size, group="world"):
    comm = communicator(group, "reduce_scatter")
    _check_size(comm, world_size, "reduce_scatter")
    out = xp.empty((x.shape[0] // world_size,) + x.shape[1:], x.dtype)
    return comm.reduce_scatter_(xp.ascontiguousarray(x), out, "sum")


def _check_size(comm, world_size: int, op: str) -> None:
    if comm.world_size != world_size:
        raise RuntimeError(f"{op} was built for {world_size} ranks but runs on a group of "
                           f"{comm.world_size}")


register(OpDef("allgather", infer=_allgather_infer, forward=_allgather_fwd,
               vjp=lambda g, x, out, world_size, group="world":
               (reduce_scatter(g, world_size, group),),  # y = [x_0;..;x_N-1] => dx_r = sum_s g_s[r]
               cost=_comm_cost, effectful=True))
register(OpDef("reduce_scatter", infer=_reduce_scatter_infer, forward=_reduce_scatter_fwd,
               vjp=lambda g, x, out, world_size, group="world":
               (allgather(g, world_size, group),),  # y_r = sum_s x_s[r] => dx_s = [g_0;..;g_N-1]
               cost=_comm_cost, effectful=True))


# shard: this rank's block of a value every rank holds whole (ZeRO's parameter shard). No
# communication: the rank is read from the group's communicator, so every rank runs one graph.

def _shard_fwd(xp, x, world_size, group="world"):
    comm = communicator(group, "shard")
    _check_size(comm, world_size, "shard")
    m = x.shape[0] // world_size
    return x[comm.rank * m:(comm.rank + 1) * m]


# Not differentiable (its adjoint, g in block rank and zeros elsewhere, is never needed: it
# only feeds optimizer updates). Effectful: its value depends on the rank, not only its input.
register(OpDef("shard", infer=_reduce_scatter_infer, forward=_shard_fwd,
               cost=lambda node: (0.0, 0.0), effectful=True))


def allgather(x: Node, world_size: int, group: str = "world") -> Node:
    """Every rank's ``x`` stacked along axis 0, in rank order."""
    return apply("allgather", x, world_size=int(world_size), group=group)


def reduce_scatter(x: Node, world_size: int, group: str = "world") -> Node:
    """Block ``rank`` (of ``world_size`` equal blocks along axis 0) of the sum over ranks."""
    return apply("reduce_scatter", x, world_size=int(world_size), group=group)


def shard(x: Node, world_size: int, group: str = "world") -> Node:
    """Block ``rank`` (of ``world_size`` equal blocks along axis 0) of this rank's ``x``."""
    return apply("shard", x, world_size=int(world_size), group=group)


# ---- send / recv --------------------------------------------------------------------------------
# A send yields a token (an empty array): keep it among the graph's outputs or feed it to a recv
# so the send is not dead code. A recv takes a token that orders it after that node.

def _send_fwd(xp, x, dest, tag=0, group="world"):
    communicator(group, "send").send(xp.ascontiguousarray(x), dest, tag)
    return xp.empty((0,), x.dtype)


def _isend_fwd(xp, x, dest, tag=0, group="world"):
    buf = xp.ascontiguousarray(x)
    _BINDING.get().sending.append((communicator(group, "isend").isend(buf, dest, tag), buf))
    return xp.empty((0,), x.dtype)


def _recv_infer(token, shape, dtype, source, tag=0, group="world"):
    if tuple(token[0]) != (0,):
        raise ValueError(f"recv's first input must be a token (shape (0,)), got {tuple(token[0])}")
    return tuple(shape), dtype


def _recv_fwd(xp, token, shape, dtype, source, tag=0, group="world"):
    return communicator(group, "recv").recv_(xp.empty(shape, dtype), source, tag)


register(OpDef("send", infer=lambda x, dest, tag=0, group="world": ((0,), x[1]), forward=_send_fwd,
               vjp=lambda g, x, out, dest, tag=0, group="world":
               (recv(g, x.shape, x.dtype, dest, tag, group),),  # adjoint of sending: receiving dx
               cost=_comm_cost, effectful=True))
# isend: send without waiting; the binding's wait_sends() completes it (x must not be written
# until then: a partitioner feeds it only values no other node writes).
register(OpDef("isend", infer=lambda x, dest, tag=0, group="world": ((0,), x[1]),
               forward=_isend_fwd,
               vjp=lambda g, x, out, dest, tag=0, group="world":
               (recv(g, x.shape, x.dtype, dest, tag, group),),  # as send's: receiving dx
               cost=_comm_cost, effectful=True))
register(OpDef("recv", infer=_recv_infer, forward=_recv_fwd,
               vjp=lambda g, token, out, shape, dtype, source, tag=0, group="world":
               (send(g, source, tag, group),),  # adjoint of receiving: sending dx back
               cost=lambda node: (0.0, float(2 * node.size * itemsize(node.dtype))),
               effectful=True))


def token(dtype: str = "float32") -> Node:
    """An empty array that orders a recv (nothing travels in it)."""
    return const(np.empty((0,), dtype))


def send(x: Node, dest: int, tag: int = 0, group: str = "world") -> Node:
    """Send ``x`` to rank ``dest`` of ``group``; returns a token."""
    return apply("send", x, dest=int(dest), tag=int(tag), group=group)


def isend(x: Node, dest: int, tag: int = 0, group: str = "world") -> Node:
    """Start sending ``x`` to rank ``dest`` of ``group``; returns a token. The send completes
    at the binding's ``wait_sends()``."""
    return apply("isend", x, dest=int(dest), tag=int(tag), group=group)


def recv(after: Node, shape: Sequence[int], dtype: str, source: int, tag: int = 0,
         group: str = "world") -> Node:
    """Receive an array of ``shape`` and ``dtype`` from rank ``source``, after token ``after``."""
    return apply("recv", after, shape=tuple(int(s) for s in shape), dtype=str(np.dtype(dtype)),
                 source=int(source), tag=int(tag), group=group)


# ---- buckets: pack many arrays into one flat buffer, unpack views of it -------------------------

def _pack_infer(*xs, scale=1.0, **_):
    if not xs:
        raise ValueError("pack needs at least one input")
    dtypes = {d for _, d in xs}
    if len(dtypes) > 1:
        raise TypeError(f"pack needs one dtype, got {sorted(dtypes)}")
    return (int(sum(int(np.prod(s, dtype=np.int64)) for s, _ in xs)),), xs[0][1]


def _pack_fwd(xp, *xs, scale=1.0):
    sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in xs]
    out = xp.empty(sum(sizes), xs[0].dtype)
    start = 0
    for x, n in zip(xs, sizes, strict=True):
        view = out[start:start + n].reshape(np.shape(x))
        if scale == 1.0:
            view[...] = x
        else:
            xp.multiply(x, view.dtype.type(scale), out=view)  # scaling costs no extra pass
        start += n
    return out


def _pack_vjp(g, *xs_out, scale=1.0):
    xs, out, start = xs_out[:-1], xs_out[-1], 0
    gxs = []
    for x in xs:  # y = scale * [x_1; ..; x_n] flattened => dx_i = scale * g[slice_i]
        gx = unpack(g, start, x.shape)
        gxs.append(gx if scale == 1.0 else gx * const(scale, dtype=out.dtype))
        start += x.size
    return tuple(gxs)


register(OpDef("pack", infer=_pack_infer, forward=_pack_fwd, vjp=_pack_vjp,
               cost=lambda node: (0.0, float(2 * node.size * itemsize(node.dtype)))))


def pack(xs: Sequence[Node], scale: float = 1.0) -> Node:
    """One flat buffer holding ``scale * x`` for each of ``xs``, raveled and concatenated."""
    return apply("pack", *xs, scale=float(scale))


def _unpack_infer(flat, offset, shape, **_):
    size = int(np.prod(shape, dtype=np.int64))
    if len(flat[0]) != 1 or not 0 <= offset <= offset + size <= flat[0][0]:
        raise ValueError(f"[{offset}:{offset + size}] is not inside a flat buffer of "
                         f"{tuple(flat[0])}")
    return tuple(shape), flat[1]


def _unpack_vjp(g, flat, out, offset, shape):
    parts = [g]  # y = flat[offset:offset+size] => dflat = g in that slice, zeros elsewhere
    if offset:
        parts.insert(0, apply("broadcast_to", const(0, dtype=g.dtype), shape=(offset,)))
    rest = flat.size - offset - g.size
    if rest:
        parts.append(apply("broadcast_to", const(0, dtype=g.dtype), shape=(rest,)))
    return (pack(parts),)


register(OpDef("unpack", infer=_unpack_infer,
               forward=lambda xp, flat, offset, shape:
               flat[offset:offset + math.prod(shape)].reshape(shape),
               vjp=_unpack_vjp, cost=lambda node: (0.0, 0.0), view="part"))


def unpack(flat: Node, offset: int, shape: Sequence[int]) -> Node:
    """The view ``flat[offset:offset + prod(shape)].reshape(shape)``."""
    return apply("unpack", flat, offset=int(offset), shape=tuple(int(s) for s in shape))


def _chunk_infer(x, index, count, **_):
    if not x[0] or x[0][0] % count or not 0 <= index < count:
        raise ValueError(f"cannot take chunk {index} of {count} along axis 0 of {tuple(x[0])}")
    return (x[0][0] // count,) + tuple(x[0][1:]), x[1]


# Not differentiable: it only ever slices data inputs. The copy makes each chunk C-contiguous,
# so its kernels take the same BLAS paths whatever the stride it was taken with.
register(OpDef("batch_chunk", infer=_chunk_infer,
               forward=lambda xp, x, index, count: xp.ascontiguousarray(x[index::count]),
               cost=lambda node: (0.0, float(2 * node.size * itemsize(node.dtype)))))


def batch_chunk(x: Node, index: int, count: int) -> Node:
    """Rows ``index, index + count, ...`` of ``x`` (a contiguous copy)."""
    return apply("batch_chunk", x, index=int(index), count=int(count))
