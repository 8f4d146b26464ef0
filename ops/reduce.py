"""Reductions: sum, mean, max (axis, keepdims), argmax, and the scans and orderings along an
axis (cumsum, argsort), as NumPy names them.

Imports only ops.registry and graph.ir.
"""

from __future__ import annotations

import builtins
from functools import partial

import numpy as np

from shardgrad.graph.ir import Node
from shardgrad.ops.registry import (
    FLOAT_DTYPES,
    OpDef,
    OutKernel,
    apply,
    itemsize,
    register,
    same_dtype,
    shape_error,
)


def norm_axis(axis, ndim: int, op: str | None = None, inputs=()) -> tuple[int, ...]:
    """``axis`` (None, int or sequence) as a sorted tuple of non-negative axes. A bad axis is a
    ValueError, or, given the builder's ``op`` and ``inputs``, a ShapeError naming them and
    the user's line."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    out, reason = [], None
    for a in axes:
        if not -ndim <= int(a) < ndim:
            reason = f"axis {a} is out of range for {ndim} dimensions"
            break
        out.append(int(a) % ndim)
    if reason is None and len(set(out)) != len(out):
        reason = f"repeated axis in {axis}"
    if reason is not None:
        raise shape_error(op, list(inputs), reason) if op else ValueError(reason)
    return tuple(sorted(out))


def _reduce_infer(x, axis, keepdims, **_):
    axes = norm_axis(axis, len(x[0]))
    shape = tuple(1 if i in axes else s for i, s in enumerate(x[0]) if keepdims or i not in axes)
    return shape, x[1]


def _reduce_cost(node: Node) -> tuple[float, float]:
    x = node.inputs[0]
    return float(x.size), float((x.size + node.size) * itemsize(x.dtype))


def _keep(g: Node, x: Node, axis, keepdims) -> Node:
    """g reshaped so it broadcasts against x (reinsert the reduced axes)."""
    if keepdims:
        return g
    axes = norm_axis(axis, x.ndim)
    return apply("reshape", g, shape=tuple(1 if i in axes else s for i, s in enumerate(x.shape)))


def _reduce_out(name: str, ufunc: str, ordered: bool = False):
    # NumPy's sum/max are Python wrappers around ufunc.reduce: call that directly (same loop)
    def make(xp, n):
        fn = getattr(xp, ufunc).reduce if xp is np else getattr(xp, name)
        axis = n.attrs["axis"]
        fn = partial(fn, axis=tuple(axis) if axis is not None else None,
                     keepdims=n.attrs["keepdims"])
        if ordered:
            return (lambda x, out=None: fn(xp.ascontiguousarray(x), out=out)), ()
        return fn, ()
    return make


def _sum_fwd(xp, x, axis, keepdims):
    # a float sum's rounding follows the order NumPy walks memory in, so the same values laid
    # out transposed (a ufunc keeps its input's F order) summed to other bits: reduce in C
    # order, as the compiled executor's buffers are (no copy when x already is)
    return xp.sum(xp.ascontiguousarray(x), axis=axis, keepdims=keepdims)


def _sum_vjp(g, x, out, axis, keepdims):
    return (apply("broadcast_to", _keep(g, x, axis, keepdims), shape=x.shape),)  # d sum = sum d


def _sum_infer(x, axis, keepdims, **_):
    shape, dtype = _reduce_infer(x, axis, keepdims)
    kind = np.dtype(dtype).kind                  # NumPy sums bools and small ints in 64 bits
    return shape, {"b": "int64", "i": "int64", "u": "uint64"}.get(kind, dtype)


register(OpDef("sum", infer=_sum_infer,
               forward=_sum_fwd, vjp=_sum_vjp,
               jvp=lambda ts, x, out, axis, keepdims: None if ts[0] is None else
               sum(ts[0], axis, keepdims), cost=_reduce_cost,
               out=OutKernel(_reduce_out("sum", "add", ordered=True), False,
                             lambda n: n.dtype in FLOAT_DTYPES[1:])))


def sum(x, axis=None, keepdims=False) -> Node:  # noqa: A001 - NumPy's name
    axis = norm_axis(axis, x.ndim, "sum", [x]) if axis is not None else None
    return apply("sum", x, axis=axis, keepdims=bool(keepdims))


def mean(x, axis=None, keepdims=False) -> Node:
    if x.dtype not in FLOAT_DTYPES:             # as torch.mean: an integer mean would truncate
        raise shape_error("mean", [x], f"needs a floating-point input, got {x.dtype}; cast it "
                          f"first (x.astype('float32'))")
    axes = norm_axis(axis, x.ndim, "mean", [x])
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    return sum(x, axes, keepdims) * (1.0 / builtins.max(count, 1))


def _max_vjp(g, x, out, axis, keepdims):
    # d max = [x == max] dx, split evenly between ties so the gradient sums to g
    mask = apply("cast", apply("equal", x, _keep(out, x, axis, keepdims)), dtype=x.dtype)
    share = mask / _keep(sum(mask, axis, keepdims), x, axis, keepdims)
    return (share * _keep(g, x, axis, keepdims),)


def _max_jvp(ts, x, out, axis, keepdims):
    if ts[0] is None:
        return None
    mask = apply("cast", apply("equal", x, _keep(out, x, axis, keepdims)), dtype=x.dtype)
    share = mask / _keep(sum(mask, axis, keepdims), x, axis, keepdims)
    return sum(share * ts[0], axis, keepdims)


register(OpDef("max", infer=_reduce_infer,
               forward=lambda xp, x, axis, keepdims: xp.max(x, axis=axis, keepdims=keepdims),
               vjp=_max_vjp, jvp=_max_jvp, cost=_reduce_cost,
               out=OutKernel(_reduce_out("max", "maximum"), False, same_dtype("fiu"))))


def max(x, axis=None, keepdims=False) -> Node:  # noqa: A001 - NumPy's name
    axis = norm_axis(axis, x.ndim, "max", [x]) if axis is not None else None
    return apply("max", x, axis=axis, keepdims=bool(keepdims))


def _argmax_infer(x, axis, **_):
    shape = tuple(s for i, s in enumerate(x[0]) if i != axis)
    return shape, "int64"


register(OpDef("argmax", infer=_argmax_infer,
               forward=lambda xp, x, axis: xp.argmax(x, axis=axis), cost=_reduce_cost,
               nondiff=(0,),
               out=OutKernel(lambda xp, n: (partial(xp.argmax, axis=n.attrs["axis"]), ()),
                             False, lambda n: n.dtype == "int64")))


def argmax(x, axis=-1) -> Node:
    return apply("argmax", x, axis=norm_axis(axis, x.ndim, "argmax", [x])[0])


# ---- along one axis: cumsum, argsort ------------------------------------------------------------

def _flip(x: Node, axis: int) -> Node:
    return apply("getitem", x, index=tuple(("s", x.shape[axis] - 1, None, -1) if i == axis and
                                           x.shape[axis] else ("s", 0, s, 1)
                                           for i, s in enumerate(x.shape)))


def _cumsum_vjp(g, x, out, axis):
    # out_i = sum_{j<=i} x_j  =>  gx_j = sum_{i>=j} g_i: a cumsum of g from the far end
    return (_flip(cumsum(_flip(g, axis), axis), axis),)


def _cumsum_infer(x, axis, **_):
    return tuple(x[0]), _sum_infer(x, None, False)[1]


def _cumsum_fwd(xp, x, axis):
    out = xp.cumsum(x, axis=axis)
    dtype = _sum_infer((x.shape, str(x.dtype)), None, False)[1]
    return out if out.dtype == dtype else out.astype(dtype)


register(OpDef("cumsum", infer=_cumsum_infer, forward=_cumsum_fwd, vjp=_cumsum_vjp,
               jvp=lambda ts, x, out, axis: None if ts[0] is None else cumsum(ts[0], axis),
               cost=_reduce_cost))


def cumsum(x, axis=-1) -> Node:
    """Running sums along ``axis`` (numpy.cumsum, torch.cumsum; integers sum in 64 bits)."""
    return apply("cumsum", x, axis=norm_axis(axis, builtins.max(x.ndim, 1), "cumsum", [x])[0])


def _argsort_fwd(xp, x, axis, descending):
    # stable both ways: descending sorts -x (ties keep their order, as torch.sort(stable=True))
    if descending and x.dtype.kind in "bu":
        x = x.astype(xp.int64)
    return xp.argsort(-x if descending else x, axis=axis, kind="stable")


register(OpDef("argsort", infer=lambda x, axis, descending, **_: (tuple(x[0]), "int64"),
               forward=_argsort_fwd, cost=_reduce_cost, nondiff=(0,)))


def argsort(x, axis=-1, descending=False) -> Node:
    """Indices that sort ``x`` along ``axis`` (stable); sort and topk gather with them, so
    their gradient is gather's (scatter of g back to where each value came from)."""
    return apply("argsort", x, axis=norm_axis(axis, builtins.max(x.ndim, 1), "argsort", [x])[0],
                 descending=bool(descending))
