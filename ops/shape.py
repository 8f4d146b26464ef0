"""Shape ops: reshape, transpose, broadcast_to, expand_dims, squeeze, concat, basic
indexing (getitem), gather along an axis, onehot. Views where NumPy gives views.
Imports only ops.registry and graph.ir.
"""

from __future__ import annotations

import numpy as np

from shardgrad.graph.ir import Node, ShapeError, user_frame
from shardgrad.ops.reduce import norm_axis
from shardgrad.ops.registry import (
    OpDef,
    apply,
    as_node,
    builder,
    elementwise_cost,
    is_int,
    itemsize,
    register,
    result_dtype,
    shape_error,
    unbroadcast,
    zeros,
)


def _view_cost(node: Node) -> tuple[float, float]:
    return 0.0, 0.0


def _linear_jvp(name):
    """JVP of a linear op: the same op applied to the tangent."""
    return lambda ts, x, out, **attrs: None if ts[0] is None else apply(name, ts[0], **attrs)


def _reshape_infer(x, shape, **_):
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(x[0], dtype=np.int64)):
        raise ValueError(f"cannot reshape {tuple(x[0])} ({int(np.prod(x[0]))} elements) "
                         f"into {tuple(shape)}")
    return tuple(shape), x[1]


register(OpDef("reshape", infer=_reshape_infer,
               forward=lambda xp, x, shape: xp.reshape(x, shape),
               vjp=lambda g, x, out, shape: (reshape(g, x.shape),),  # reshape is a relabelling
               jvp=_linear_jvp("reshape"), cost=_view_cost, view="contiguous"))


def reshape(x, shape) -> Node:
    shape = tuple(int(s) for s in (shape if isinstance(shape, tuple | list) else (shape,)))
    if shape.count(-1) > 1:
        raise ValueError(f"reshape{shape}: at most one dimension may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        if known == 0 or x.size % known:
            raise ShapeError(f"reshape({x!r}, {shape}) at {user_frame()}: cannot infer -1")
        shape = tuple(x.size // known if s == -1 else s for s in shape)
    return x if shape == x.shape else apply("reshape", x, shape=shape)


def _transpose_infer(x, axes, **_):
    if sorted(axes) != list(range(len(x[0]))):
        raise ValueError(f"axes {axes} are not a permutation of {len(x[0])} dimensions")
    return tuple(x[0][a] for a in axes), x[1]


def _inverse(axes: tuple[int, ...]) -> tuple[int, ...]:
    # the inverse permutation (np.argsort's, without NumPy: its call was a tenth of the VJP)
    return tuple(sorted(range(len(axes)), key=axes.__getitem__))


register(OpDef("transpose", infer=_transpose_infer,
               forward=lambda xp, x, axes: xp.transpose(x, axes),
               vjp=lambda g, x, out, axes: (transpose(g, _inverse(axes)),),  # P^-1 g
               jvp=_linear_jvp("transpose"), cost=_view_cost, view="any"))


@builder("transpose")
def transpose(x, axes=None) -> Node:
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % max(x.ndim, 1)
                                                                     for a in axes)
    if isinstance(x, Node) and x.op == "transpose" and len(axes) == x.ndim:
        # a transpose of a transpose is one permutation (none at all for W^T's gradient)
        x, axes = x.inputs[0], tuple(x.attrs["axes"][a] for a in axes)
    return x if axes == tuple(range(x.ndim)) else apply("transpose", x, axes=axes)


def _broadcast_to_infer(x, shape, **_):
    try:
        np.broadcast_shapes(tuple(x[0]), tuple(shape))
        if len(shape) < len(x[0]) or np.broadcast_shapes(tuple(x[0]), tuple(shape)) != tuple(
                shape):
            raise ValueError
    except ValueError:
        raise ValueError(f"cannot broadcast {tuple(x[0])} to {tuple(shape)}") from None
    return tuple(shape), x[1]


register(OpDef("broadcast_to", infer=_broadcast_to_infer,
               forward=lambda xp, x, shape: xp.broadcast_to(x, shape),
               vjp=lambda g, x, out, shape: (unbroadcast(g, x.shape),),  # adjoint: sum back
               jvp=_linear_jvp("broadcast_to"), cost=_view_cost, view="any"))


def broadcast_to(x, shape) -> Node:
    shape = tuple(int(s) for s in shape)
    return x if shape == x.shape else apply("broadcast_to", x, shape=shape)


def expand_dims(x, axis) -> Node:
    axes = norm_axis(axis, x.ndim + (1 if isinstance(axis, int) else len(axis)),
                     "expand_dims", [x])
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return reshape(x, tuple(shape))


def squeeze(x, axis=None) -> Node:
    axes = norm_axis(axis, x.ndim, "squeeze", [x]) if axis is not None else tuple(
        i for i, s in enumerate(x.shape) if s == 1)
    for a in axes:
        if x.shape[a] != 1:
            raise ShapeError(f"squeeze({x!r}, axis={axis}) at {user_frame()}: dimension {a} has "
                             f"size {x.shape[a]}, not 1")
    return reshape(x, tuple(s for i, s in enumerate(x.shape) if i not in axes))


def _copy_cost(node: Node) -> tuple[float, float]:
    nbytes = sum(x.size * itemsize(x.dtype) for x in node.inputs) + node.size * itemsize(
        node.dtype)
    return 0.0, float(nbytes)


def _same_but(s, t, axis: int) -> bool:
    """Shapes ``s`` and ``t`` agree on every dimension except ``axis``."""
    return len(s) == len(t) and all(a == b for i, (a, b) in enumerate(zip(s, t, strict=True))
                                    if i != axis)


# ---- concat -------------------------------------------------------------------------------------

def _concat_infer(*xs, axis, **_):
    first = xs[0][0]
    for s, _d in xs:
        if not _same_but(s, first, axis):
            raise ValueError(f"shapes {' and '.join(str(tuple(t[0])) for t in xs)} differ "
                             f"outside axis {axis}")
    shape = list(first)
    shape[axis] = int(np.sum([s[axis] for s, _d in xs]))
    return tuple(shape), result_dtype(*[d for _s, d in xs])


def _concat_vjp(g, *xs_out, axis):
    xs = xs_out[:-1]                       # d concat(x1..xn) = concat(dx1..dxn): g in slices
    ends = np.cumsum([x.shape[axis] for x in xs]).tolist()
    return tuple(getitem(g, (slice(None),) * axis + (slice(end - x.shape[axis], end),))
                 for x, end in zip(xs, ends, strict=True))


def _concat_jvp(ts, *xs_out, axis):
    xs = xs_out[:-1]
    return concat([zeros(x.shape, x.dtype) if t is None else t for t, x in zip(ts, xs,
                                                                                 strict=True)],
                  axis)


register(OpDef("concat", infer=_concat_infer,
               forward=lambda xp, *xs, axis: xp.concatenate(xs, axis=axis),
               vjp=_concat_vjp, jvp=_concat_jvp, cost=_copy_cost))


def concat(xs, axis=0) -> Node:
    """numpy.concatenate: join ``xs`` (a sequence of Nodes) along an existing ``axis``."""
    xs = [as_node(x) for x in xs]
    if not xs:
        raise shape_error("concat", [], "needs at least one input")
    return apply("concat", *xs, axis=norm_axis(axis, max(xs[0].ndim, 1), "concat", xs)[0])


# ---- getitem: basic indexing (ints, slices, None, Ellipsis) -------------------------------------
# The index lives in attrs in a normalised, hashable form that covers every dimension:
# ("s", start, stop, step) a slice (stop None: run past index 0 with a negative step),
# ("i", k) an integer (k >= 0), ("n",) a new axis.

def _norm_index(index, shape: tuple[int, ...]) -> tuple[tuple, ...]:
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, bool) or not (isinstance(it, int | np.integer | slice)
                                        or it is None or it is Ellipsis):
            raise TypeError(f"only ints, slices, None and ... are supported as indices, not "
                            f"{type(it).__name__}")
    if sum(it is Ellipsis for it in items) > 1:
        raise IndexError("an index can only have a single ellipsis")
    real = sum(isinstance(it, int | np.integer | slice) for it in items)
    if real > len(shape):
        raise IndexError(f"too many indices: {real} for {len(shape)} dimensions")
    fill = (slice(None),) * (len(shape) - real)
    items = (tuple(x for it in items for x in (fill if it is Ellipsis else (it,)))
             if Ellipsis in items else items + fill)
    out, d = [], 0
    for it in items:
        if it is None:
            out.append(("n",))
            continue
        n = shape[d]
        d += 1
        if isinstance(it, slice):
            r = range(*it.indices(n))
            if len(r) == 0:
                out.append(("s", 0, 0, 1))
            else:
                stop = r.start + len(r) * r.step
                out.append(("s", r.start, None if stop < 0 else stop, r.step))
        elif not -n <= int(it) < n:
            raise IndexError(f"index {int(it)} is out of bounds for axis {d - 1} with size {n}")
        else:
            out.append(("i", int(it) % n))
    return tuple(out)


def _py_index(index: tuple[tuple, ...]) -> tuple:
    return tuple(slice(*it[1:]) if it[0] == "s" else it[1] if it[0] == "i" else None
                 for it in index)


def _getitem_shape(shape, index) -> tuple[int, ...]:
    if sum(it[0] != "n" for it in index) != len(shape):
        raise ValueError(f"index {index} does not cover {len(shape)} dimensions")
    out = []
    for it in index:
        if it[0] == "n":
            out.append(1)
        elif it[0] == "s":
            out.append(len(range(it[1], -1 if it[2] is None else it[2], it[3])))
    return tuple(out)


def _getitem_vjp(g, x, out, index):
    return (apply("getitem_grad", g, index=index, shape=x.shape),)  # gx = zeros, gx[index] = g


register(OpDef("getitem", infer=lambda x, index, **_: (_getitem_shape(x[0], index), x[1]),
               forward=lambda xp, x, index: x[_py_index(index)], vjp=_getitem_vjp,
               jvp=_linear_jvp("getitem"), cost=_view_cost))


def _getitem_grad_infer(g, index, shape, **_):
    if _getitem_shape(shape, index) != tuple(g[0]):
        raise ValueError(f"{tuple(g[0])} is not the shape of {index} taken from {shape}")
    return tuple(shape), g[1]


def _getitem_grad_fwd(xp, g, index, shape):
    # new axes are dropped from both sides: plain slices and ints are what every xp assigns
    kinds = [it[0] for it in index if it[0] != "i"]
    out = xp.zeros(shape, dtype=g.dtype)
    out[_py_index(tuple(it for it in index if it[0] != "n"))] = g.reshape(
        [s for s, kind in zip(g.shape, kinds, strict=True) if kind != "n"])
    return out


def _getitem_grad_vjp(g, y, out, index, shape):
    return (apply("getitem", g, index=index),)  # linear: the adjoint of writing is reading g[index]


register(OpDef("getitem_grad", infer=_getitem_grad_infer, forward=_getitem_grad_fwd,
               vjp=_getitem_grad_vjp,
               jvp=_linear_jvp("getitem_grad"), cost=_copy_cost))


def getitem(x, index) -> Node:
    """``x[index]`` for basic indices (ints, slices with steps, None, Ellipsis): a view."""
    x = as_node(x)
    try:
        norm = _norm_index(index, x.shape)
    except (TypeError, IndexError, ValueError) as e:        # ValueError: a slice step of 0
        raise shape_error("getitem", [x], str(e), index=index) from None
    if len(norm) == x.ndim and all(it == ("s", 0, n, 1) for it, n in zip(norm, x.shape,
                                                                          strict=True)):
        return x
    return apply("getitem", x, index=norm)


def normalize_index(index, shape: tuple[int, ...]) -> tuple[tuple, ...]:
    """A basic index in getitem's normalised form (the ``index`` attribute)."""
    return _norm_index(index, tuple(shape))


def getitem_grad(g, index: tuple[tuple, ...], shape: tuple[int, ...]) -> Node:
    """Zeros of ``shape`` with ``g`` at the normalised basic ``index``: getitem's adjoint, and
    the written part of ``x[index] = v``."""
    return apply("getitem_grad", as_node(g), index=index, shape=tuple(shape))


# ---- gather / scatter_add along an axis ---------------------------------------------------------

def _gather_infer(x, idx, axis, **_):
    if not is_int(idx[1]):
        raise TypeError(f"indices must be integers, got {idx[1]}")
    if not _same_but(idx[0], x[0], axis):
        raise ValueError(f"indices {tuple(idx[0])} must match {tuple(x[0])} except on axis "
                         f"{axis}")
    return tuple(idx[0]), x[1]


def _gather_vjp(g, x, idx, out, axis):
    # out = x[.., idx, ..] along axis  =>  gx = scatter-add of g at idx (repeats accumulate)
    return apply("scatter_add", g, idx, axis=axis, size=x.shape[axis]), None


register(OpDef("gather", infer=_gather_infer,
               forward=lambda xp, x, idx, axis: xp.take_along_axis(x, idx, axis=axis),
               vjp=_gather_vjp, jvp=lambda ts, x, idx, out, axis: None if ts[0] is None else
               apply("gather", ts[0], idx, axis=axis), cost=_copy_cost, nondiff=(1,)))


def _scatter_add_infer(g, idx, axis, size, **_):
    if not is_int(idx[1]):
        raise TypeError(f"indices must be integers, got {idx[1]}")
    if tuple(idx[0]) != tuple(g[0]):
        raise ValueError(f"indices {tuple(idx[0])} must have the shape of {tuple(g[0])}")
    return tuple(size if i == axis else s for i, s in enumerate(g[0])), g[1]


def _scatter_add_fwd(xp, g, idx, axis, size):
    # a one-hot matmul, not xp.add.at: portable across numpy and cupy, and repeats accumulate
    idx = xp.moveaxis(xp.where(idx < 0, idx + size, idx), axis, -1)
    hit = (idx[..., :, None] == xp.arange(size)).astype(g.dtype)          # (..., k, size)
    return xp.moveaxis(xp.matmul(xp.moveaxis(g, axis, -1)[..., None, :], hit)[..., 0, :], -1,
                       axis)


def _scatter_add_vjp(g, y, idx, out, axis, size):
    return apply("gather", g, idx, axis=axis), None   # linear: the adjoint of scatter is gather


register(OpDef("scatter_add", infer=_scatter_add_infer, forward=_scatter_add_fwd,
               vjp=_scatter_add_vjp,
               jvp=lambda ts, y, idx, out, axis, size: None if ts[0] is None else
               apply("scatter_add", ts[0], idx, axis=axis, size=size), cost=_copy_cost,
               nondiff=(1,)))


def gather(x, idx, axis=-1) -> Node:
    """numpy.take_along_axis: ``out[..., j, ...] = x[..., idx[..., j, ...], ...]`` along
    ``axis`` (e.g. the logit of each label: ``gather(logits, labels[:, None], 1)``)."""
    x, idx = as_node(x), as_node(idx)
    return apply("gather", x, idx, axis=norm_axis(axis, max(x.ndim, 1), "gather", [x, idx])[0])


# ---- onehot -------------------------------------------------------------------------------------

def _onehot_infer(labels, n, dtype, **_):
    if not is_int(labels[1]):
        raise TypeError(f"labels must be integers, got {labels[1]}")
    return tuple(labels[0]) + (n,), dtype


register(OpDef("onehot", infer=_onehot_infer,
               forward=lambda xp, labels, n, dtype: (labels[..., None] == xp.arange(n)).astype(
                   dtype), cost=elementwise_cost, nondiff=(0,)))


def onehot(labels, n, dtype="float32") -> Node:
    """``out[..., k] = (labels[...] == k)`` in ``dtype``; labels outside [0, n) give zeros."""
    return apply("onehot", as_node(labels), n=int(n), dtype=str(np.dtype(dtype)))
