"""Graphs shared by the pass and executor tests: an MLP training step built directly from
ops, and a hypothesis strategy for random DAGs. Imported by path (tests are not a package)."""

import numpy as np
from hypothesis import strategies as st

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, const, leaf
from shardgrad.ops import elementwise as E
from shardgrad.ops import reduce as R
from shardgrad.ops.registry import apply


def mlp_step(batch=4, sizes=(6, 5, 3), lr=0.1):
    """An MLP training step built from ops: forward, MSE loss, autodiff, SGD update nodes."""
    x = leaf("input", (batch, sizes[0]), "float32", name="x")
    y = leaf("input", (batch, sizes[-1]), "float32", name="y")
    h, params = x, []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        w = leaf("param", (a, b), "float32", name=f"w{i}")
        bias = leaf("param", (b,), "float32", name=f"b{i}")
        params += [w, bias]
        h = h @ w + bias
        if i < len(sizes) - 2:
            h = E.relu(h)
    d = h - y
    g = autodiff.grad(Graph({"loss": R.mean(d * d)}))
    outs = {"loss": g.outputs["loss"]}
    for p in params:
        outs[f"param/{p.name}"] = p - lr * g.outputs[f"grad/{p.name}"]
    return Graph(outs)


def feeds_for(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {n.name: rng.standard_normal(n.shape).astype(n.dtype)
            for n in graph.nodes if n.op in ("input", "param", "state")}


SHAPES = [(3, 4), (4,), (1, 4), (3, 1), ()]
UNARY = [E.exp, E.tanh, E.relu, E.sigmoid, E.neg, E.step]
BINARY = [E.add, E.sub, E.mul, E.maximum]


@st.composite
def random_graphs(draw):
    """A random DAG over a few inputs: elementwise ops with broadcasting, reductions, matmul,
    reshape/transpose, where, and constants (so cse and folding have work to do)."""
    nodes = [leaf("input", s, "float32", name=f"x{i}") for i, s in enumerate(SHAPES[:3])]
    nodes += [const(np.float32(0.5)), const(np.float32(0.5))]
    for _ in range(draw(st.integers(3, 14))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "matmul", "shape",
                                     "where", "const"]))
        x = draw(st.sampled_from(nodes))
        if kind == "unary":
            nodes.append(draw(st.sampled_from(UNARY))(x))
        elif kind == "binary":
            ys = [y for y in nodes if _broadcastable(x.shape, y.shape)]
            nodes.append(draw(st.sampled_from(BINARY))(x, draw(st.sampled_from(ys))))
        elif kind == "reduce" and x.ndim:
            axis = draw(st.sampled_from([None, 0, x.ndim - 1]))
            op = draw(st.sampled_from([R.sum, R.max]))
            nodes.append(op(x, axis=axis, keepdims=draw(st.booleans())))
        elif kind == "matmul" and x.ndim == 2:
            ys = [y for y in nodes if y.ndim in (1, 2) and y.shape[0] == x.shape[1]]
            if ys:
                nodes.append(x @ draw(st.sampled_from(ys)))
        elif kind == "shape" and x.ndim == 2:
            nodes.append(x.T if draw(st.booleans()) else apply("reshape", x, shape=(x.size,)))
        elif kind == "where":
            ys = [y for y in nodes if _broadcastable(x.shape, y.shape)]
            y = draw(st.sampled_from(ys))
            nodes.append(E.where(E.greater(x, y), x, y))
        elif kind == "const":
            nodes.append(E.tanh(const(np.float32(draw(st.sampled_from([0.5, 2.0]))))) * x)
    k = draw(st.integers(1, 3))
    return Graph({f"out{i}": n for i, n in enumerate(nodes[-k:])})


def _broadcastable(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False
