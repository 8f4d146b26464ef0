"""Shape ops: reshape, transpose, broadcast_to, expand_dims, squeeze (views where NumPy
gives views). Imports only ops.registry and graph.ir.
"""

from __future__ import annotations

import numpy as np

from shardgrad.graph.ir import Node, ShapeError, user_frame
from shardgrad.ops.reduce import norm_axis
from shardgrad.ops.registry import OpDef, apply, builder, register, unbroadcast


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
               jvp=_linear_jvp("reshape"), cost=_view_cost))


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


register(OpDef("transpose", infer=_transpose_infer,
               forward=lambda xp, x, axes: xp.transpose(x, axes),
               vjp=lambda g, x, out, axes: (transpose(g, tuple(np.argsort(axes))),),  # P^-1 g
               jvp=_linear_jvp("transpose"), cost=_view_cost))


@builder("transpose")
def transpose(x, axes=None) -> Node:
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % max(x.ndim, 1)
                                                                     for a in axes)
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
               jvp=_linear_jvp("broadcast_to"), cost=_view_cost))


def broadcast_to(x, shape) -> Node:
    shape = tuple(int(s) for s in shape)
    return x if shape == x.shape else apply("broadcast_to", x, shape=shape)


def expand_dims(x, axis) -> Node:
    axes = norm_axis(axis, x.ndim + (1 if isinstance(axis, int) else len(axis)))
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return reshape(x, tuple(shape))


def squeeze(x, axis=None) -> Node:
    axes = norm_axis(axis, x.ndim) if axis is not None else tuple(
        i for i, s in enumerate(x.shape) if s == 1)
    for a in axes:
        if x.shape[a] != 1:
            raise ShapeError(f"squeeze({x!r}, axis={axis}) at {user_frame()}: dimension {a} has "
                             f"size {x.shape[a]}, not 1")
    return reshape(x, tuple(s for i, s in enumerate(x.shape) if i not in axes))
