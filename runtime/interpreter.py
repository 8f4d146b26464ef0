"""The reference executor: walks a Graph node by node on an array module (numpy or cupy),
frees each value after its last use, and re-raises failures with the node, op, source line
and rank attached. It defines the semantics every other executor is tested against.

Imports graph and ops; the only side effects are the kernels it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph.ir import Graph, Node, fmt_type
from shardgrad.ops.registry import kernel_for
from shardgrad.runtime import trace


class ExecutionError(RuntimeError):
    """A kernel failed. The message says which node, op, source line, shard and rank."""

    def __init__(self, msg: str, node: Node | None = None, rank: int | None = None):
        super().__init__(msg)
        self.node, self.rank = node, rank


def describe(graph: Graph, node: Node) -> str:
    names = graph.names()
    args = ", ".join(names.get(x.id, "?") for x in node.inputs)
    return f"{names[node.id]} = {node.op}({args}) : {fmt_type(node.shape, node.dtype)}"


def leaf_value(xp, node: Node, feeds: Mapping[Any, Any]):
    if node.op == "const":
        return xp.asarray(node.attrs["value"])
    for key in (node, node.name):
        if key in feeds:
            value = feeds[key]
            break
    else:
        raise ExecutionError(f"no value fed for {node.op} {node.name!r} "
                             f"({fmt_type(node.shape, node.dtype)})", node)
    if tuple(value.shape) != node.shape or str(value.dtype) != node.dtype:
        raise ExecutionError(
            f"{node.op} {node.name!r} expects {fmt_type(node.shape, node.dtype)}, got "
            f"{fmt_type(value.shape, str(value.dtype))}", node)
    return value


class Interpreter:
    """Runs ``graph`` on ``xp``. Build once; call ``run`` every step.

    ``run(feeds)`` takes leaf values keyed by leaf name (or Node) and returns the outputs by
    name. Values not needed later are dropped as soon as their last user has run.
    """

    def __init__(self, graph: Graph, xp=np, rank: int | None = None, shard: str | None = None):
        self.graph, self.xp, self.rank, self.shard = graph, xp, rank, shard
        self.kernels = [None if not n.inputs else kernel_for(n, "cpu") for n in graph.nodes]
        last: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            for x in n.inputs:
                last[x.id] = i
        keep = {n.id for n in graph.outputs.values()}
        self.free_after: list[list[int]] = [[] for _ in graph.nodes]
        for nid, i in last.items():
            if nid not in keep:
                self.free_after[i].append(nid)

    def run(self, feeds: Mapping[Any, Any], known: Mapping[int, Any] | None = None
            ) -> dict[str, Any]:
        xp, env, tracer = self.xp, dict(known or {}), trace.current()
        for i, n in enumerate(self.graph.nodes):
            if n.id in env:
                pass
            elif not n.inputs:
                env[n.id] = leaf_value(xp, n, feeds)
            else:
                try:
                    start = tracer and tracer.clock()
                    env[n.id] = self.kernels[i](xp, *[env[x.id] for x in n.inputs], **n.attrs)
                    if tracer:
                        tracer.node(self.graph, n, start)
                except Exception as e:  # noqa: BLE001 - re-raised with the node attached
                    where = f" on rank {self.rank}" if self.rank is not None else ""
                    shard = f" in shard {self.shard}" if self.shard else ""
                    raise ExecutionError(
                        f"while executing {describe(self.graph, n)} (from {n.where}){shard}"
                        f"{where}: {type(e).__name__}: {e}", n, self.rank) from e
            for nid in self.free_after[i]:
                env.pop(nid, None)
        return {k: env[v.id] for k, v in self.graph.outputs.items()}


def run(graph: Graph, feeds: Mapping[Any, Any] | None = None, xp=np) -> dict[str, Any]:
    """Run ``graph`` once with the reference interpreter."""
    return Interpreter(graph, xp).run(feeds or {})
