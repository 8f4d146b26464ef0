"""The one mechanism graph passes share: rebuild a graph with some nodes replaced.

Imports graph.ir only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shardgrad.graph.ir import Graph, Node


def replace(graph: Graph, mapping: Mapping[int, Node],
            rebuild: Callable[[Node, tuple[Node, ...]], Node] | None = None) -> Graph:
    """A new graph where each node whose id is in ``mapping`` is replaced by the given node,
    and every node downstream is rebuilt on its new inputs (``rebuild(old, new_inputs)``;
    by default a copy with the same op, attrs, type and source line). Outputs and meta
    follow. The input graph is not touched."""
    new: dict[int, Node] = dict(mapping)

    def default(n: Node, ins: tuple[Node, ...]) -> Node:
        return Node(n.op, ins, n.attrs, n.shape, n.dtype, n.where)

    make = rebuild or default
    for n in graph.nodes:
        if n.id in new:
            continue
        ins = tuple(new.get(x.id, x) for x in n.inputs)
        if any(a is not b for a, b in zip(ins, n.inputs, strict=True)):
            new[n.id] = make(n, ins)
    return Graph({k: new.get(v.id, v) for k, v in graph.outputs.items()}, meta=dict(graph.meta))
