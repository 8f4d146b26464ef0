"""Graphs whose fusion groups the CUDA tests compile and run: a training step of an MLP and of
a CNN (SGD with momentum, Adam), and small hand-made graphs covering every op the fused-kernel
generator knows, broadcasting, scalars, bool and integer dtypes and inlined constants.
"""

from __future__ import annotations

import numpy as np

import shardgrad as sg
from shardgrad.graph.ir import Graph, leaf
from shardgrad.graph.trace import trace_step
from shardgrad.ops import elementwise as E


def mlp(hidden=(16, 16), act=sg.nn.ReLU, n_in=20, n_out=5):
    sizes = (n_in, *hidden)
    layers = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [sg.nn.Linear(a, b), act()]
    return sg.nn.Sequential(*layers, sg.nn.Linear(sizes[-1], n_out))


def cnn(channels=(4, 6), hidden=16, n_out=5, side=8):
    layers, c = [], 1
    for k in channels:
        layers += [sg.nn.Conv2d(c, k, 3, padding=1), sg.nn.ReLU(), sg.nn.MaxPool2d(2)]
        c, side = k, side // 2
    return sg.nn.Sequential(*layers, sg.nn.Flatten(), sg.nn.Linear(c * side * side, hidden),
                            sg.nn.ReLU(), sg.nn.Linear(hidden, n_out))


def step_graph(model, optimizer, x_shape, n_out, dtype="float32"):
    """(graph, feeds) for one training step of ``model`` on a random batch."""
    g = trace_step(model, sg.nn.functional.cross_entropy, optimizer, (x_shape, dtype),
                   ((x_shape[0],), "int64"))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(x_shape).astype(dtype),
             "y": rng.integers(0, n_out, x_shape[0]),
             "lr": np.asarray(0.05, dtype), "t": np.asarray(3.0, dtype)}
    names = {id(p): n for n, p in model.named_parameters()}
    feeds.update({n: np.asarray(p.data, dtype) for n, p in model.named_parameters()})
    for p, st in zip(optimizer.params, optimizer.state, strict=True):
        for k in st:
            feeds[f"optim/{names[id(p)]}/{k}"] = rng.random(p.shape).astype(dtype) * 0.1
    return g, feeds


def training_graphs():
    """name -> (graph, feeds) for the step graphs."""
    sg.manual_seed(0)
    out = {}
    m = mlp(act=sg.nn.GELU)
    out["mlp-sgd"] = step_graph(m, sg.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                 nesterov=True, weight_decay=1e-3), (8, 20), 5)
    m = mlp(act=sg.nn.Tanh)
    out["mlp-adam"] = step_graph(m, sg.optim.AdamW(m.parameters(), lr=0.01), (8, 20), 5)
    m = cnn()
    out["cnn-sgd"] = step_graph(m, sg.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                (3, 1, 8, 8), 5)
    return out


def elementwise_graph():
    """One graph using every op with a C form, across dtypes and broadcasts; with feeds."""
    x = leaf("input", (4, 3), "float32", name="x")
    r = leaf("input", (4, 1), "float32", name="r")
    c = leaf("input", (3,), "float32", name="c")
    s = leaf("input", (), "float32", name="s")
    i = leaf("input", (4, 3), "int64", name="i")
    d = leaf("input", (2, 4, 3), "float64", name="d")
    pos = E.exp(x) + 0.5
    y = E.relu(x * r + c) - E.sigmoid(x) / (E.sqrt(pos) + s)
    y = y + E.gelu(x) * E.tanh(r) + E.log(pos + 1.0) ** 1.5 - E.neg(E.step(x)) + E.erf(x)
    y = E.maximum(y, c) + E.minimum(x, r) * E.sign(x)
    y = E.where(E.less_equal(x, 0.25), y, -y) + E.cast(E.equal(i, 2), "float32")
    k = i * 3 - E.maximum(i, 1) + E.cast(E.not_equal(i, 0), "int64")
    z = E.exp(d) * 0.5 + E.cast(E.greater_equal(x, r), "float64")
    w = E.where(E.less(i, 2), x, 1e30) * float("inf") - E.cast(E.greater(x, 0.0), "float32")
    outputs = {"y": y, "k": k, "z": z, "w": E.minimum(w, 1.0)}
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 3)).astype("float32"),
             "r": rng.standard_normal((4, 1)).astype("float32"),
             "c": rng.standard_normal(3).astype("float32"), "s": np.float32(0.75),
             "i": rng.integers(0, 4, (4, 3)), "d": rng.standard_normal((2, 4, 3))}
    return Graph(outputs), feeds


__all__ = ["cnn", "elementwise_graph", "mlp", "step_graph", "training_graphs"]
