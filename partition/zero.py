"""ZeRO stage 1 as a graph rewrite over data parallelism: the gradients are reduce-scattered
from one flat buffer, each rank updates only its 1/world_size block of the flattened
parameters with its block of the optimizer state (the only optimizer state it keeps), and
the updated blocks are all-gathered into whole parameters. Imports graph, ops and partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shardgrad.graph.ir import DTYPE_SHORT, Graph, Node, ShapeError, const, leaf
from shardgrad.ops.collective import allgather, pack, reduce_scatter, shard, unpack
from shardgrad.ops.registry import apply, itemsize
from shardgrad.partition.data_parallel import (
    DEFAULT_BUCKET_BYTES,
    DataParallel,
    bucketed,
    check_step,
    contiguous_source,
    data_parallel,
)
from shardgrad.partition.plan import Plan

STATE = "optim/zero/"   # a rank's optimizer-state block for key k is the state optim/zero/<k>


@dataclass(frozen=True)
class Layout:
    """How the updated parameters lie in the flat buffer ZeRO shards (``graph.meta["zero"]``):
    ``params`` in order, each (name, offset, shape); ``numel`` elements in all, padded to
    ``world_size * shard`` with zeros (an update leaves zeros zero: SGD and Adam do); rank r
    owns elements [r * shard, (r + 1) * shard). ``keys`` are the optimizer-state keys."""

    world_size: int
    dtype: str
    numel: int
    shard: int
    params: tuple[tuple[str, int, tuple[int, ...]], ...]
    keys: tuple[str, ...]

    @property
    def padded(self) -> int:
        return self.shard * self.world_size

    def state_bytes(self) -> int:
        """Optimizer-state bytes one rank keeps."""
        return len(self.keys) * self.shard * itemsize(self.dtype)

    def describe(self, deterministic: bool) -> list[str]:
        """The lines a zero1 plan prints: the gradients' flat buffer and how it is reduced,
        each rank's update and state, the allgather."""
        block, whole = (self.shard * itemsize(self.dtype), self.padded * itemsize(self.dtype))
        how = ("summed along the fixed tree, each rank keeps its block (shard)" if deterministic
               else "reduce_scatter")
        return [f"  gradients: {DTYPE_SHORT.get(self.dtype, self.dtype)} {whole:,} B "
                f"({self.numel:,} elements of {len(self.params)} parameters), {how}: "
                f"{block:,} B a rank",
                f"  update: each rank its block of {self.shard:,} elements; optimizer state "
                f"{self.state_bytes():,} B a rank ({', '.join(self.keys) or 'none'})",
                f"  allgather: {block:,} B from each rank, {whole:,} B of parameters"]

    def as_meta(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "dtype": self.dtype, "numel": self.numel,
                "shard": self.shard, "keys": list(self.keys),
                "params": [[n, o, list(s)] for n, o, s in self.params]}

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Layout:
        return cls(meta["world_size"], meta["dtype"], meta["numel"], meta["shard"],
                   tuple((n, o, tuple(s)) for n, o, s in meta["params"]), tuple(meta["keys"]))


class ZeroPlan(Plan):
    """A zero1 plan; it prints its graph's Layout (``graph.meta["zero"]``) after the buckets."""

    def __str__(self) -> str:
        layout = Layout.of(self.graph.meta["zero"])
        return "\n".join([super().__str__(),
                          *layout.describe(self.options["mode"] == "deterministic")])


@dataclass(frozen=True)
class Zero1(DataParallel):
    """The data-parallel step transform with ZeRO stage 1 (``zero1``); ``overlap`` is not
    used (the gradients go in one reduce_scatter)."""

    def plan(self, graph: Graph) -> Plan:
        return zero1(graph, self.world_size, self.bucket_bytes, self.deterministic, self.chunks,
                     self.group)


def zero1(graph: Graph, world_size: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
          deterministic: bool = False, chunks: int = 4, group: str = "world") -> Plan:
    """The plan that runs the training-step ``graph`` (from ``trace_step``) as data
    parallelism on ``world_size`` ranks with ZeRO stage 1.

    The loss and batch statistics are averaged as ``data_parallel`` averages them (buckets).
    The gradients of the updated parameters are packed into one flat buffer, scaled by
    1/world_size and reduce-scattered: rank r receives block r of their mean. In
    deterministic mode they are first summed along ``data_parallel``'s fixed tree (so the
    bits do not depend on world_size) and each rank takes its block without communicating.
    Rank r then runs the optimizer's update once, elementwise, on block r of the flattened
    parameters, gradients and optimizer state (states ``optim/zero/<key>``, one block each,
    replacing the per-parameter ``optim/<param>/<key>``), and an allgather of the updated
    blocks gives every rank the whole parameters (outputs ``param/<p>`` as before). The
    ``grad/<p>`` outputs are dropped: no rank holds a whole averaged gradient.

    The update must be the same elementwise rule for every parameter, reading only the
    parameter, its gradient, its state and scalars (lr, the step count, constants): SGD,
    Adam, AdamW, RMSprop and Adagrad are; gradient clipping (a norm over every gradient)
    and fp16 loss scaling are not, and raise ShapeError.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    check_step(graph)
    options: dict[str, Any] = {"mode": "deterministic" if deterministic else "allreduce",
                               "group": group, "zero": 1}
    if deterministic:
        base = data_parallel(graph, world_size, deterministic=True, chunks=chunks, group=group)
        options["chunks"] = chunks
        reduced, buckets = base.graph, []
    else:
        options["bucket_bytes"] = bucket_bytes
        reduced, buckets = bucketed(graph, world_size, bucket_bytes, False, group, grads=False)
    return ZeroPlan("zero1", world_size, _sharded(reduced, world_size, group, deterministic),
                buckets, options)


def _sharded(graph: Graph, n: int, group: str, reduced: bool) -> Graph:
    params = [p for p in graph.meta["params"] if f"param/{p}" in graph.outputs]
    if not params:
        raise ShapeError("zero=1 found no parameter that the step updates")
    leaf_of = {x.name: x for x in graph.params}
    state_of = {x.name: x for x in graph.states}
    dtypes = {leaf_of[p].dtype for p in params}
    if len(dtypes) > 1:
        raise ShapeError(f"zero=1 flattens the parameters into one buffer, so they need one "
                         f"dtype; these have {sorted(dtypes)}")
    dtype = dtypes.pop()
    keys = tuple(k[len(f"state/optim/{params[0]}/"):] for k in graph.outputs
                 if k.startswith(f"state/optim/{params[0]}/"))

    def roles(p: str) -> dict[int, tuple]:
        out = {leaf_of[p].id: ("param",), graph.outputs[f"grad/{p}"].id: ("grad",)}
        for k in keys:
            if f"optim/{p}/{k}" not in state_of:
                raise ShapeError(f"zero=1: the update of {p} has no state optim/{p}/{k}, which "
                                 f"{params[0]}'s has: the parameters need one update rule")
            out[state_of[f"optim/{p}/{k}"].id] = ("state", k)
        return out

    template = _signature(graph, params[0], roles(params[0]), keys)
    for p in params[1:]:
        if _signature(graph, p, roles(p), keys) != template:
            raise ShapeError(f"zero=1 runs one update rule over the flattened parameters, but "
                             f"the update of {p} differs from that of {params[0]}")

    layout, offset = [], 0
    for p in params:
        layout.append((p, offset, tuple(leaf_of[p].shape)))
        offset += leaf_of[p].size
    numel, m = offset, -(-offset // n)
    pad = m * n - numel
    zeros = [apply("broadcast_to", const(0, dtype=dtype), shape=(pad,))] if pad else []

    grads, users = [], graph.users()
    for p in params:
        g = graph.outputs[f"grad/{p}"]
        src, axes = contiguous_source(g, users) if not reduced else (g, None)
        grads.append(src if axes is None else g)   # packed in the parameter's own layout
    if reduced:
        g_block = shard(pack(grads + zeros), n, group)
    else:
        g_block = reduce_scatter(pack(grads + zeros, scale=1.0 / n), n, group)
    p_block = shard(pack([leaf_of[p] for p in params] + zeros), n, group)
    s_blocks = {k: leaf("state", (m,), dtype, name=STATE + k) for k in keys}

    p0 = params[0]
    mapping = {leaf_of[p0].id: p_block, graph.outputs[f"grad/{p0}"].id: g_block}
    mapping.update({state_of[f"optim/{p0}/{k}"].id: s_blocks[k] for k in keys})
    memo: dict[int, Node] = {}
    new_p = _reapply(graph.outputs[f"param/{p0}"], mapping, memo)
    gathered = allgather(new_p, n, group)

    outputs = {k: v for k, v in graph.outputs.items() if not k.startswith("grad/")
               and not any(k == f"param/{p}" or k.startswith(f"state/optim/{p}/")
                           for p in params)}
    for p, off, shape in layout:
        outputs[f"param/{p}"] = unpack(gathered, off, shape)
    for k in keys:
        outputs[f"state/{STATE}{k}"] = _reapply(graph.outputs[f"state/optim/{p0}/{k}"],
                                                mapping, memo)
    sharded = {f"optim/{p}/{k}" for p in params for k in keys}
    meta = dict(graph.meta, zero=Layout(n, dtype, numel, m, tuple(layout), keys).as_meta())
    meta["states"] = [s for s in graph.meta.get("states", []) if s not in sharded] + [
        STATE + k for k in keys]
    return Graph(outputs, meta=meta)


def _signature(graph: Graph, p: str, roles: dict[int, tuple], keys: tuple[str, ...]) -> tuple:
    """The update of ``p`` with its parameter, gradient and state replaced by their roles:
    equal for two parameters exactly when one elementwise rule updates both."""
    memo: dict[int, Any] = {}

    def canon(node: Node) -> Any:
        if node.id in roles:
            return roles[node.id]
        if node.id not in memo:
            if node.shape != ():
                raise ShapeError(
                    f"zero=1 shards the optimizer update, which must read only the parameter, "
                    f"its gradient, its state and scalars; the update of {p} also reads "
                    f"{node.op} of shape {node.shape} (at {node.where}): gradient clipping "
                    f"and fp16 loss scaling are not supported with zero=1")
            if node.op == "const":
                v = np.asarray(node.attrs["value"])
                memo[node.id] = ("const", str(v.dtype), v.tobytes())
            elif not node.inputs:
                memo[node.id] = (node.op, node.name)
            else:
                memo[node.id] = (node.op, _attrs(node), tuple(canon(x) for x in node.inputs))
        return memo[node.id]

    def update(node: Node) -> Any:   # like canon, but the update's own nodes are not scalars
        if node.id in roles or node.shape == () or not node.inputs:
            return canon(node)
        if node.id not in memo:
            memo[node.id] = (node.op, _attrs(node), tuple(update(x) for x in node.inputs))
        return memo[node.id]

    return (update(graph.outputs[f"param/{p}"]),) + tuple(
        update(graph.outputs[f"state/optim/{p}/{k}"]) for k in keys)


def _attrs(node: Node) -> str:
    return repr(sorted((k, v) for k, v in node.attrs.items() if k != "value"))


def _reapply(node: Node, mapping: dict[int, Node], memo: dict[int, Node]) -> Node:
    """``node`` rebuilt on ``mapping``'s replacements (shapes inferred anew), or ``node``
    itself where nothing it reads was replaced (the shared scalars)."""
    if node.id in mapping:
        return mapping[node.id]
    if node.id not in memo:
        ins = [_reapply(x, mapping, memo) for x in node.inputs]
        if all(a is b for a, b in zip(ins, node.inputs, strict=True)):
            memo[node.id] = node
        else:
            memo[node.id] = apply(node.op, *ins, **node.attrs)
    return memo[node.id]


__all__ = ["STATE", "Layout", "Zero1", "ZeroPlan", "zero1"]
