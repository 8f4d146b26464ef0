"""The op test harness (chainer's FunctionTestCase, jax's check_grads): an OpCase says how to
build an op from input leaves, how to draw its inputs and what NumPy computes; the checks run
the graph on the reference Interpreter and compare forward values, reverse-mode gradients
against central differences in float64, forward mode against reverse mode, and gradients of
gradients (Hessian-vector products) against differences of gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, Node, const, leaf
from shardgrad.ops.reduce import sum as rsum
from shardgrad.runtime.interpreter import Interpreter

EPS = 1e-6         # central differences in float64: truncation ~EPS^2, rounding ~1e-16/EPS


@dataclass(frozen=True)
class Arg:
    """How to draw one input: uniform floats in [lo, hi), integers in [0, hi), or booleans."""

    shape: tuple[int, ...]
    dtype: str = "float64"
    lo: float = -1.0
    hi: float = 1.0

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        kind = np.dtype(self.dtype).kind
        if kind == "b":
            return rng.random(self.shape) < 0.5
        if kind in "iu":
            return rng.integers(int(self.lo), int(self.hi), self.shape).astype(self.dtype)
        return rng.uniform(self.lo, self.hi, self.shape).astype(self.dtype)


def F(*shape: int, lo: float = -1.0, hi: float = 1.0) -> Arg:
    return Arg(tuple(shape), "float64", lo, hi)


def I(*shape: int, hi: int) -> Arg:  # noqa: E743 - reads as a type tag in case tables
    return Arg(tuple(shape), "int64", 0, hi)


def B(*shape: int) -> Arg:
    return Arg(tuple(shape), "bool")


@dataclass(frozen=True)
class OpCase:
    """One test case for the op ``op`` (the registry name it covers).

    fn      builds the op from input Nodes; returns a Node or a tuple of Nodes.
    args    one Arg per input.
    ref     NumPy reference: arrays -> array or tuple of arrays (None: no forward check).
    grad    whether to run the gradient checks (float inputs only are differentiated).
    hvp     whether to check gradients of gradients too.
    """

    op: str
    fn: Callable[..., Any]
    args: tuple[Arg, ...]
    ref: Callable[..., Any] | None = None
    grad: bool = True
    hvp: bool = True
    name: str = ""
    rtol: float = 1e-5
    atol: float = 1e-6
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}" if self.name else self.op


def draw(case: OpCase, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [a.draw(rng) for a in case.args]


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def build(case: OpCase, arrays: list[np.ndarray]) -> tuple[list[Node], tuple[Node, ...]]:
    """Input leaves x0, x1, ... typed like ``arrays``, and the op's output nodes."""
    xs = [leaf("input", a.shape, str(a.dtype), name=f"x{i}") for i, a in enumerate(arrays)]
    return xs, _tuple(case.fn(*xs))


def feeds(arrays: list[np.ndarray], xp=np) -> dict[str, Any]:
    return {f"x{i}": xp.asarray(a) for i, a in enumerate(arrays)}


def run(outputs: dict[str, Node], arrays: list[np.ndarray], xp=np,
        extra: dict | None = None) -> dict[str, Any]:
    return Interpreter(Graph(outputs), xp).run({**feeds(arrays, xp), **(extra or {})})


def to_numpy(v) -> np.ndarray:
    return np.asarray(v.get() if hasattr(v, "get") else v)


def check_forward(case: OpCase, dtype: str = "float64", xp=np, seed: int = 0) -> None:
    """Forward values, shapes and dtypes against the NumPy reference. With dtype float32 the
    float inputs are drawn in float32 and the output must stay float32."""
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in draw(case, seed)]
    _, outs = build(case, arrays)
    got = run({f"o{k}": o for k, o in enumerate(outs)}, arrays, xp)
    want = _tuple(case.ref(*arrays))
    assert len(want) == len(outs), f"{case.id}: {len(outs)} outputs, reference has {len(want)}"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for k, (o, w) in enumerate(zip(outs, want, strict=True)):
        g, w = to_numpy(got[f"o{k}"]), np.asarray(w)
        assert o.shape == w.shape, f"{case.id}: inferred shape {o.shape}, NumPy gives {w.shape}"
        assert g.shape == w.shape, f"{case.id}: kernel shape {g.shape}, NumPy gives {w.shape}"
        if w.dtype.kind == "f":
            assert o.dtype == g.dtype == dtype, f"{case.id}: dtype {o.dtype}/{g.dtype}"
        else:
            assert o.dtype == str(g.dtype), f"{case.id}: inferred {o.dtype}, kernel {g.dtype}"
        np.testing.assert_allclose(g, w, err_msg=f"{case.id} output {k}", **tol)


def _diff_inputs(arrays: list[np.ndarray]) -> list[int]:
    return [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]


def _objective(outs: tuple[Node, ...], seed: int) -> tuple[Node, list[np.ndarray]]:
    """L = sum_k <out_k, u_k> with random cotangents u_k (its gradient is J^T u), and the u_k."""
    rng = np.random.default_rng(seed)
    us = [rng.standard_normal(o.shape) for o in outs]
    total = None
    for o, u in zip(outs, us, strict=True):
        term = rsum(o * const(u))
        total = term if total is None else total + term
    return total, us


def _fd(f: Callable[[list[np.ndarray]], np.ndarray], arrays, i: int, v: np.ndarray | None):
    """Central difference of f along direction v of input i (v None: every element)."""
    def at(delta):
        moved = list(arrays)
        moved[i] = arrays[i] + delta
        return f(moved)
    if v is not None:
        return (at(EPS * v) - at(-EPS * v)) / (2 * EPS)
    out = np.zeros(arrays[i].shape + np.shape(f(arrays)))
    for idx in np.ndindex(arrays[i].shape):
        e = np.zeros(arrays[i].shape)
        e[idx] = EPS
        out[idx] = (at(e) - at(-e)) / (2 * EPS)
    return out


def check_grad(case: OpCase, seed: int = 0) -> None:
    """Reverse mode (graph.autodiff.grad, run on the Interpreter) against central differences
    of the forward graph, every element of every float input, in float64."""
    arrays = draw(case, seed)
    xs, outs = build(case, arrays)
    loss, _ = _objective(outs, seed + 1)
    wrt = _diff_inputs(arrays)
    g = Graph({"L": loss})
    grads = Interpreter(autodiff.grad(g, [xs[i] for i in wrt]), np).run(feeds(arrays))
    fwd = Interpreter(g, np)
    f = lambda a: np.asarray(fwd.run(feeds(a))["L"])
    for i in wrt:
        np.testing.assert_allclose(grads[f"grad/x{i}"], _fd(f, arrays, i, None),
                                   rtol=case.rtol, atol=case.atol,
                                   err_msg=f"{case.id}: gradient of input {i}")


def check_jvp(case: OpCase, seed: int = 0) -> None:
    """Forward mode: J v against central differences, and <u, J v> = <J^T u, v> against
    reverse mode (the dot-product test)."""
    arrays = draw(case, seed)
    xs, outs = build(case, arrays)
    rng = np.random.default_rng(seed + 2)
    wrt = _diff_inputs(arrays)
    vs = {f"tangent/x{i}": rng.standard_normal(arrays[i].shape) for i in wrt}
    names = {f"o{k}": o for k, o in enumerate(outs)}
    jg = Interpreter(autodiff.jvp(Graph(names), [xs[i] for i in wrt]), np)
    jv = jg.run({**feeds(arrays), **vs})
    fwd = Interpreter(Graph(names), np)
    for k in range(len(outs)):
        f = lambda a, k=k: np.asarray(fwd.run(feeds(a))[f"o{k}"], dtype=np.float64)
        fd = sum(_fd(f, arrays, i, vs[f"tangent/x{i}"]) for i in wrt)
        np.testing.assert_allclose(jv[f"jvp/o{k}"], fd, rtol=case.rtol, atol=case.atol,
                                   err_msg=f"{case.id}: J v of output {k}")
    loss, u = _objective(outs, seed + 1)
    lhs = sum(float(np.sum(uk * jv[f"jvp/o{k}"])) for k, uk in enumerate(u))
    grads = Interpreter(autodiff.grad(Graph({"L": loss}), [xs[i] for i in wrt]), np).run(
        feeds(arrays))
    rhs = sum(float(np.sum(grads[f"grad/x{i}"] * vs[f"tangent/x{i}"])) for i in wrt)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-9, err_msg=f"{case.id}: <u,Jv>")


def check_hvp(case: OpCase, seed: int = 0) -> None:
    """Gradients of gradients: grad_x <grad_x L, v> = H v against central differences of
    grad_x L along v (every VJP must build differentiable nodes)."""
    arrays = draw(case, seed)
    xs, outs = build(case, arrays)
    wrt = _diff_inputs(arrays)
    first = autodiff.grad(Graph({"L": _objective(outs, seed + 1)[0]}), [xs[i] for i in wrt])
    rng = np.random.default_rng(seed + 3)
    vs = {i: rng.standard_normal(arrays[i].shape) for i in wrt}
    gnodes = {i: first.outputs[f"grad/x{i}"] for i in wrt}
    dot = None
    for i in wrt:
        term = rsum(gnodes[i] * const(vs[i]))
        dot = term if dot is None else dot + term
    hv = Interpreter(autodiff.grad(Graph({"M": dot}), [xs[i] for i in wrt]), np).run(
        feeds(arrays))
    g1 = Interpreter(Graph({f"g{i}": gnodes[i] for i in wrt}), np)
    for j in wrt:
        f = lambda a, j=j: np.asarray(g1.run(feeds(a))[f"g{j}"])
        fd = sum(_fd(f, arrays, i, vs[i]) for i in wrt)
        np.testing.assert_allclose(hv[f"grad/x{j}"], fd, rtol=case.rtol * 10,
                                   atol=case.atol * 10, err_msg=f"{case.id}: (H v) of input {j}")


def check_device(case: OpCase, xp, seed: int = 0) -> None:
    """Forward and gradient graphs on ``xp`` (cupy) give what they give on NumPy."""
    arrays = draw(case, seed)
    xs, outs = build(case, arrays)
    names = {f"o{k}": o for k, o in enumerate(outs)}
    wrt = _diff_inputs(arrays) if case.grad else []
    g = Graph(names)
    if wrt:
        g = autodiff.grad(Graph({**names, "L": _objective(outs, seed + 1)[0]}),
                          [xs[i] for i in wrt], output="L")
    want = Interpreter(g, np).run(feeds(arrays))
    got = Interpreter(g, xp).run(feeds(arrays, xp))
    for k in want:
        np.testing.assert_allclose(to_numpy(got[k]), want[k], rtol=1e-9, atol=1e-9,
                                   err_msg=f"{case.id}: {k} on device")
