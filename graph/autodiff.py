"""Automatic differentiation as graph transforms: reverse mode (``grad``) and forward mode
(``jvp``). Pure: new nodes are built, nothing is mutated. Because every VJP emits nodes,
gradients of gradients work (Hessian-vector products are ``grad`` of a ``grad``).

Imports graph.ir and ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shardgrad.graph.ir import (
    Graph,
    Node,
    ShapeError,
    const,
    descendants,
    leaf,
    located,
    toposort,
)
from shardgrad.ops.registry import apply, get


def zeros_like(x: Node) -> Node:
    return apply("broadcast_to", const(0, dtype=x.dtype), shape=x.shape)


def _check_wrt(wrt: Sequence[Node]) -> None:
    for w in wrt:
        if np.dtype(w.dtype).kind != "f":
            raise ShapeError(
                f"cannot differentiate with respect to {w!r} (created at {w.where}): its dtype "
                f"{w.dtype} is not floating point")


def backprop(outputs: Sequence[Node], cotangents: Sequence[Node],
             wrt: Sequence[Node], nodes: Sequence[Node] | None = None) -> list[Node]:
    """Reverse mode on nodes: the gradients of sum_i <outputs[i], cotangents[i]> with respect
    to each of ``wrt``. Fan-in is summed with ``add``. A node that no output depends on gets
    zeros. ``nodes``: ``toposort(outputs)``, when the caller has it already."""
    _check_wrt(wrt)
    nodes = toposort(outputs) if nodes is None else nodes
    needed = descendants(nodes, wrt)
    ct: dict[int, Node] = {}

    def accumulate(x: Node, g: Node) -> None:
        if g.shape != x.shape:
            raise ShapeError(f"VJP of {x.op} produced {g.shape} for an input of {x.shape}")
        ct[x.id] = g if x.id not in ct else ct[x.id] + g

    for o, g in zip(outputs, cotangents, strict=True):
        if g.shape != o.shape or g.dtype != o.dtype:
            raise ShapeError(f"the gradient given for {o!r} (created at {o.where}) is "
                             f"{g.dtype}{list(g.shape)}: it must match the output's "
                             f"{o.dtype}{list(o.shape)}")
        if o.id in needed:
            accumulate(o, g)
    for n in reversed(nodes):
        g = ct.get(n.id)
        if g is None or not n.inputs:
            continue
        opdef = get(n.op)
        if opdef.vjp is None:
            continue
        with located(n.site):
            gxs = opdef.vjp(g, *n.inputs, n, **n.attrs)
            for i, (x, gx) in enumerate(zip(n.inputs, gxs, strict=True)):
                if gx is not None and x.id in needed and i not in opdef.nondiff:
                    accumulate(x, gx)
    return [ct[w.id] if w.id in ct else zeros_like(w) for w in wrt]


def _jvp_by_transpose(n: Node, ts: list[Node | None]) -> Node:
    """Forward mode for an op without a JVP rule: its VJP u -> J^T u is linear in u, so
    J t = d/du <J^T u, t> (the transpose of the transpose), built with backprop."""
    u = zeros_like(n)
    gxs = get(n.op).vjp(u, *n.inputs, n, **n.attrs)
    inner = None
    for gx, t in zip(gxs, ts, strict=True):
        if gx is not None and t is not None:
            term = apply("sum", gx * t, axis=None, keepdims=False)
            inner = term if inner is None else inner + term
    if inner is None:
        return zeros_like(n)
    return backprop([inner], [const(1, dtype=inner.dtype)], [u])[0]


def forward_tangents(outputs: Sequence[Node], primals: Sequence[Node],
                     tangents: Sequence[Node]) -> list[Node]:
    """Forward mode on nodes: the directional derivative of each output along ``tangents``
    (one per primal), propagated node by node with each op's JVP rule."""
    _check_wrt(primals)
    tan: dict[int, Node] = {}
    for p, t in zip(primals, tangents, strict=True):
        if t.shape != p.shape:
            raise ShapeError(f"tangent {t.shape} does not match primal {p!r}")
        tan[p.id] = t
    for n in toposort(outputs):
        if not n.inputs or n.id in tan:
            continue
        opdef = get(n.op)
        ts = [None if i in opdef.nondiff else tan.get(x.id) for i, x in enumerate(n.inputs)]
        if opdef.vjp is None or all(t is None for t in ts):
            continue
        with located(n.site):
            t = opdef.jvp(ts, *n.inputs, n, **n.attrs) if opdef.jvp else _jvp_by_transpose(n, ts)
        if t is not None:
            tan[n.id] = t
    return [tan[o.id] if o.id in tan else zeros_like(o) for o in outputs]


def _resolve(graph: Graph, wrt) -> list[Node]:
    by_name = {n.name: n for n in graph.nodes if not n.inputs and n.name is not None}
    if wrt is None:
        return graph.params
    out = []
    for w in wrt:
        if isinstance(w, Node):
            out.append(w)
        elif w in by_name:
            out.append(by_name[w])
        else:
            raise ShapeError(f"no leaf named {w!r} in the graph; leaves: {sorted(by_name)}")
    return out


def _scalar_output(graph: Graph, output: str | None) -> tuple[str, Node]:
    name = output if output is not None else next(iter(graph.outputs))
    if name not in graph.outputs:
        raise ShapeError(f"no output {name!r}; outputs: {list(graph.outputs)}")
    y = graph.outputs[name]
    if y.shape != ():
        raise ShapeError(f"grad needs a scalar output, {name!r} has shape {y.shape}")
    return name, y


def grad(graph: Graph, wrt=None, output: str | None = None) -> Graph:
    """A new graph computing the original outputs plus ``grad/<name>`` for each leaf in
    ``wrt`` (names or nodes; default every param): the gradient of the scalar ``output``."""
    _, y = _scalar_output(graph, output)
    wrt = _resolve(graph, wrt)
    gs = backprop([y], [const(1, dtype=y.dtype)], wrt)
    outs = dict(graph.outputs)
    for w, g in zip(wrt, gs, strict=True):
        outs[f"grad/{w.name or w.id}"] = g
    return Graph(outs, meta={**graph.meta, "grads": [f"grad/{w.name or w.id}" for w in wrt]})


def jvp(graph: Graph, wrt=None) -> Graph:
    """A new graph with an extra input ``tangent/<name>`` for each leaf in ``wrt`` and an extra
    output ``jvp/<out>`` for each output: the forward-mode derivative along the tangents."""
    wrt = _resolve(graph, wrt)
    ts = [leaf("input", w.shape, w.dtype, name=f"tangent/{w.name or w.id}") for w in wrt]
    outs = list(graph.outputs.items())
    tangents = forward_tangents([v for _, v in outs], wrt, ts)
    return Graph({**graph.outputs, **{f"jvp/{k}": t for (k, _), t in zip(outs, tangents,
                                                                        strict=True)}},
                 meta=dict(graph.meta))
