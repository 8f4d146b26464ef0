"""Neural-network ops on NCHW images: conv2d (im2col + one batched matmul), max/avg pooling,
dropout, layer_norm, batch_norm. Primitives come in adjoint pairs (im2col/col2im, avg_pool2d and its
spread, max_pool2d_grad/max_pool2d_gather) so every VJP is made of nodes and gradients of
gradients work. Imports ops.registry, sibling op families and graph.ir.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np

from shardgrad.graph.ir import Node
from shardgrad.ops import gpu
from shardgrad.ops.elementwise import sqrt
from shardgrad.ops.linalg import matmul
from shardgrad.ops.reduce import mean
from shardgrad.ops.registry import (
    FLOAT_DTYPES,
    CpuKernel,
    OpDef,
    apply,
    as_node,
    forward_out,
    is_int,
    itemsize,
    register,
    result_dtype,
    shape_error,
)
from shardgrad.ops.shape import reshape

# the window ops' forwards take out=: their results (im2col's columns are the step's largest
# value) then live in the compiled program's arena and are reused like any other
_WINDOW_OUT = forward_out(lambda n: n.dtype in FLOAT_DTYPES[1:])


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | np.integer) else (int(v[0]), int(v[1]))


def _window_shape(x, kernel, stride, padding) -> tuple[int, int]:
    """(OH, OW) of sliding a ``kernel`` over the padded (N, C, H, W) input ``x``."""
    if len(x) != 4:
        raise ValueError(f"needs an (N, C, H, W) input, got {tuple(x)}")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"kernel {kernel} and stride {stride} must be positive and padding "
                         f"{padding} non-negative")
    sizes = zip(x[2:], kernel, stride, padding, strict=True)
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in sizes)
    if min(out) < 1:
        raise ValueError(f"kernel {kernel}, stride {stride}, padding {padding} do not fit an "
                         f"input of {tuple(x[2:])}")
    return out


def _pad(xp, x, padding, value=0.0):
    (ph, pw), (n, c, h, w) = padding, x.shape
    if not ph and not pw:
        return x
    out = xp.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def _windows(xp, xpad, kernel, stride, out_hw):
    """A strided view (N, C, KH, KW, OH, OW) of ``xpad``: element (i, j) of window (oh, ow)."""
    sn, sc, sh, sw = xpad.strides
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=xpad.shape[:2] + tuple(kernel) + tuple(out_hw),
        strides=(sn, sc, sh, sw, sh * stride[0], sw * stride[1]))


def _spread(xp, parts, shape, kernel, stride, padding, out=None):
    """The adjoint of _windows: sum each window element (i, j) back onto its input pixel.
    ``parts(i, j)`` gives the (N, C, OH, OW) values for window element (i, j). Into ``out``
    when given (directly when there is no padding)."""
    (n, c, h, w), (ph, pw), (sh, sw) = shape, padding, stride
    acc = out if out is not None and not ph and not pw else None
    if acc is not None:
        acc[...] = 0
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            v = parts(i, j)
            if acc is None:
                acc = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=v.dtype)
            oh, ow = v.shape[2:]
            acc[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += v
    return _into(out, acc[:, :, ph:ph + h, pw:pw + w])


def _into(out, value):
    """``value``, written into ``out`` first when one is given (the compiled executor's
    planned buffer: the window ops take ``out=``)."""
    if out is None or out is value:
        return value
    out[...] = value
    return out


def _bytes_cost(node: Node) -> tuple[float, float]:
    nbytes = sum(x.size * itemsize(x.dtype) for x in node.inputs) + node.size * itemsize(
        node.dtype)
    return 0.0, float(nbytes)


def _window_cost(node: Node) -> tuple[float, float]:
    return float(node.inputs[0].size), _bytes_cost(node)[1]


def _float(t) -> None:
    if t[1] not in FLOAT_DTYPES:
        raise TypeError(f"needs a floating-point input, got {t[1]}")


# ---- im2col / col2im ----------------------------------------------------------------------------
# cols layout (N, C, KH, KW, OH, OW), the windows in the image's own order: reshaped to
# (N, C*KH*KW, OH*OW) it is the right operand of one batched matmul whose product is already
# NCHW. A (C*KH*KW, N*OH*OW) layout makes one big matmul, but then the product must be
# transposed to NCHW and the output gradient back, and col2im reads across the batch: those
# copies made the CNN benchmark step 8% slower here (17.5 vs 16.1 ms).

def _im2col_infer(x, kernel, stride, padding, **_):
    oh, ow = _window_shape(x[0], kernel, stride, padding)
    n, c = x[0][:2]
    return (n, c, *kernel, oh, ow), x[1]


def _im2col_fwd(xp, x, kernel, stride, padding, out=None):
    win = _windows(xp, _pad(xp, x, padding), kernel, stride,
                   _window_shape(x.shape, kernel, stride, padding))
    return xp.ascontiguousarray(win) if out is None else _into(out, win)


def _im2col_vjp(g, x, out, **a):
    return (apply("col2im", g, shape=x.shape, **a),)  # linear: gx = col2im(g) = im2col^T g


register(OpDef("im2col", infer=_im2col_infer, forward=_im2col_fwd, vjp=_im2col_vjp,
               jvp=lambda ts, x, out, **a: None if ts[0] is None else apply("im2col", ts[0], **a),
               cost=_bytes_cost, out=_WINDOW_OUT, cuda=gpu.im2col, cpu=CpuKernel("im2col", 0),
               batched=True))


def _col2im_infer(cols, shape, kernel, stride, padding, **_):
    expect, _d = _im2col_infer((shape, cols[1]), kernel, stride, padding)
    if tuple(cols[0]) != expect:
        raise ValueError(f"columns {tuple(cols[0])} do not come from an input of {shape}")
    return tuple(shape), cols[1]


def _col2im_fwd(xp, cols, shape, kernel, stride, padding, out=None):
    shape = (len(cols), *shape[1:])          # the rows given (a thread's share of the batch)
    return _spread(xp, lambda i, j: cols[:, :, i, j], shape, kernel, stride, padding, out)


def _col2im_vjp(g, cols, out, shape, **a):
    return (apply("im2col", g, **a),)                 # linear: g_cols = im2col(g) = col2im^T g


register(OpDef("col2im", infer=_col2im_infer, forward=_col2im_fwd, vjp=_col2im_vjp,
               jvp=lambda ts, c, out, shape, **a: None if ts[0] is None else
               apply("col2im", ts[0], shape=shape, **a), cost=_bytes_cost, out=_WINDOW_OUT,
               cuda=gpu.col2im, cpu=CpuKernel("col2im", -1),
               batched=True))


# ---- whole convolutions (a library's unit) ----------------------------------------------------
# conv_fprop, conv_dgrad and conv_wgrad are conv2d (groups 1) and its two gradients as single ops,
# the calls cuDNN makes (its frontend's conv_fprop / conv_dgrad / conv_wgrad). conv2d itself stays
# the composite above; graph.passes.conv_library rewrites a traced GPU step into these where
# cuDNN is installed. Forwards: im2col + GEMM, as the composite computes them. The three are
# adjoint to each other, so their VJPs close over the family:
#   y = fprop(x, w):   <h, y> = <dgrad(h, w), x> = <wgrad(x, h), w>


def _conv_geom(x_shape, w_shape, stride, padding):
    (n, c), (o, wc, kh, kw) = x_shape[:2], w_shape
    if len(x_shape) != 4 or len(w_shape) != 4 or c != wc:
        raise ValueError(f"needs x (N, C, H, W) and w (O, C, KH, KW); got {tuple(x_shape)}, "
                         f"{tuple(w_shape)}")
    oh, ow = _window_shape(x_shape, (kh, kw), stride, padding)
    return n, c, o, (kh, kw), oh, ow


def _conv_cost(node: Node) -> tuple[float, float]:
    # N*O*OH*OW outputs of C*KH*KW multiply-adds each, whichever of the three is computed
    y, w = {"conv_fprop": (node, node.inputs[1]), "conv_dgrad": node.inputs,
            "conv_wgrad": (node.inputs[1], node)}[node.op]
    nbytes = (sum(v.size for v in node.inputs) + node.size) * itemsize(node.dtype)
    return 2.0 * y.size * (w.size // w.shape[0]), float(nbytes)


def _conv_fprop_infer(x, w, stride, padding, **_):
    _float(x)
    n, _c, o, _k, oh, ow = _conv_geom(x[0], w[0], stride, padding)
    return (n, o, oh, ow), result_dtype(x[1], w[1])


def _conv_fprop_fwd(xp, x, w, stride, padding):
    cols = _im2col_fwd(xp, x, w.shape[2:], stride, padding)
    n, o = x.shape[0], w.shape[0]
    out = xp.matmul(w.reshape(o, -1), cols.reshape(n, -1, cols.shape[-2] * cols.shape[-1]))
    return out.reshape(n, o, *cols.shape[-2:])


def _conv_fprop_vjp(g, x, w, out, stride, padding):
    return (apply("conv_dgrad", g, w, shape=x.shape, stride=stride, padding=padding),
            apply("conv_wgrad", x, g, kernel=w.shape[2:], stride=stride, padding=padding))


register(OpDef("conv_fprop", infer=_conv_fprop_infer, forward=_conv_fprop_fwd,
               vjp=_conv_fprop_vjp, cost=_conv_cost,
               cuda=gpu.conv_fprop))


def _conv_dgrad_infer(g, w, shape, stride, padding, **_):
    _float(g)
    n, _c, o, _k, oh, ow = _conv_geom(shape, w[0], stride, padding)
    if tuple(g[0]) != (n, o, oh, ow):
        raise ValueError(f"gradient {tuple(g[0])} must be {(n, o, oh, ow)}")
    return tuple(shape), result_dtype(g[1], w[1])


def _conv_dgrad_fwd(xp, g, w, shape, stride, padding):
    n, o = g.shape[:2]
    gcols = xp.matmul(w.reshape(o, -1).T, g.reshape(n, o, -1))
    gcols = gcols.reshape(n, shape[1], *w.shape[2:], *g.shape[2:])
    return _col2im_fwd(xp, gcols, tuple(shape), w.shape[2:], stride, padding)


def _conv_dgrad_vjp(h, g, w, out, shape, stride, padding):
    return (apply("conv_fprop", h, w, stride=stride, padding=padding),
            apply("conv_wgrad", h, g, kernel=w.shape[2:], stride=stride, padding=padding))


register(OpDef("conv_dgrad", infer=_conv_dgrad_infer, forward=_conv_dgrad_fwd,
               vjp=_conv_dgrad_vjp, cost=_conv_cost,
               cuda=gpu.conv_dgrad))


def _conv_wgrad_infer(x, g, kernel, stride, padding, **_):
    _float(x)
    n, c = x[0][:2]
    o = g[0][1]
    _n, _c, _o, _k, oh, ow = _conv_geom(x[0], (o, c, *kernel), stride, padding)
    if tuple(g[0]) != (n, o, oh, ow):
        raise ValueError(f"gradient {tuple(g[0])} must be {(n, o, oh, ow)}")
    return (o, c, *kernel), result_dtype(x[1], g[1])


def _conv_wgrad_fwd(xp, x, g, kernel, stride, padding):
    # sum over the batch of g_n (O, P) @ cols_n^T (P, C*KH*KW), as one GEMM over N*P
    cols = _im2col_fwd(xp, x, kernel, stride, padding)
    n, o, p = g.shape[0], g.shape[1], g.shape[2] * g.shape[3]
    lhs = g.reshape(n, o, p).transpose(1, 0, 2).reshape(o, n * p)
    rhs = cols.reshape(n, -1, p).transpose(0, 2, 1).reshape(n * p, -1)
    return xp.matmul(lhs, rhs).reshape(o, x.shape[1], *kernel)


def _conv_wgrad_vjp(h, x, g, out, kernel, stride, padding):
    return (apply("conv_dgrad", g, h, shape=x.shape, stride=stride, padding=padding),
            apply("conv_fprop", x, h, stride=stride, padding=padding))


register(OpDef("conv_wgrad", infer=_conv_wgrad_infer, forward=_conv_wgrad_fwd,
               vjp=_conv_wgrad_vjp, cost=_conv_cost,
               cuda=gpu.conv_wgrad))


def conv2d(x, w, b=None, stride=1, padding=0, groups=1) -> Node:
    """2-D cross-correlation, x (N, C, H, W) with w (O, C/groups, KH, KW), plus bias b (O,):
    out (N, O, OH*OW) = w (O, C*KH*KW) @ im2col(x) (N, C*KH*KW, OH*OW), as PyTorch's conv2d.
    With ``groups`` G the channels split into G groups, each convolved with its O/G filters:
    one batched matmul (G, O/G, K) @ (N, G, K, OH*OW) (depthwise: G = C)."""
    x, w = as_node(x), as_node(w)
    ins = [x, w] if b is None else [x, w, as_node(b)]
    if x.ndim != 4 or w.ndim != 4:
        raise shape_error("conv2d", ins, "needs x (N, C, H, W) and w (O, C, KH, KW)")
    (n, c), (o, wc, kh, kw) = x.shape[:2], w.shape
    if groups < 1 or c % groups or o % groups:
        raise shape_error("conv2d", ins, f"groups={groups} must divide the {c} input and {o} "
                          f"output channels")
    if c != wc * groups:
        raise shape_error("conv2d", ins, f"input has {c} channels but the weight expects "
                          f"{wc * groups}" + (f" ({wc} a group, {groups} groups)"
                                              if groups > 1 else ""))
    if b is not None and ins[2].shape != (o,):
        raise shape_error("conv2d", ins, f"bias must have shape ({o},)")
    attrs = {"kernel": (kh, kw), "stride": _pair(stride), "padding": _pair(padding)}
    try:
        _window_shape(x.shape, **attrs)
    except ValueError as e:
        raise shape_error("conv2d", ins, str(e)) from None
    cols = apply("im2col", x, **attrs)
    oh, ow = cols.shape[-2:]
    if groups == 1:
        out = matmul(reshape(w, (o, c * kh * kw)), reshape(cols, (n, c * kh * kw, oh * ow)))
    else:
        k = wc * kh * kw
        out = matmul(reshape(w, (groups, o // groups, k)),
                     reshape(cols, (n, groups, k, oh * ow)))
    out = reshape(out, (n, o, oh, ow))
    return out if b is None else out + reshape(ins[2], (1, o, 1, 1))


# ---- max pooling --------------------------------------------------------------------------------
# max_pool2d_grad(g, x) sends g to the first maximum of each window of x; its adjoint
# max_pool2d_gather(y, x) reads y at those positions. Both are linear in their first input and
# piecewise constant in x (zero derivative almost everywhere), so the pair closes under VJP.

def _pool_infer(x, kernel, stride, padding, **_):
    _float(x)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(f"padding {padding} must be at most half the kernel {kernel}")
    oh, ow = _window_shape(x[0], kernel, stride, padding)
    return tuple(x[0][:2]) + (oh, ow), x[1]


def _window_parts(xp, x, kernel, stride, padding, fill=0.0):
    """(i*KW + j, view) for each window element: reducing over the KH*KW strided (N, C, OH, OW)
    views elementwise is ~80x faster in NumPy than reducing the 6-d view over its two window
    axes (0.25 vs 19.6 ms for 2x2 max pooling of f32[64,16,16,16] here)."""
    win = _windows(xp, _pad(xp, x, padding, fill), kernel, stride,
                   _window_shape(x.shape, kernel, stride, padding))
    return [(i * kernel[1] + j, win[:, :, i, j]) for i in range(kernel[0])
            for j in range(kernel[1])]


def _max_pool_fwd(xp, x, kernel, stride, padding, out=None):
    # over the KH window rows first (whole image rows, contiguous), then over the KW columns
    # (strided): 1.25x faster than KH*KW strided passes for 2x2 windows of f32[64,16,26,26]
    xpad = _pad(xp, x, padding, -np.inf)
    (oh, ow), (kh, kw), (sh, sw) = _window_shape(x.shape, kernel, stride, padding), kernel, stride
    rows = xpad[:, :, 0:sh * oh:sh].copy()
    for i in range(1, kh):
        xp.maximum(rows, xpad[:, :, i:i + sh * oh:sh], out=rows)
    first = rows[..., 0:sw * ow:sw]
    out = first.copy() if out is None else _into(out, first)
    for j in range(1, kw):
        xp.maximum(out, rows[..., j:j + sw * ow:sw], out=out)
    return out


def _first_max(xp, x, kernel, stride, padding, top=None):
    """[(i*KW + j, mask)]: each mask (N, C, OH, OW) is true where window element (i, j) is the
    first maximum of its window in row-major order (ties keep the first, as PyTorch; a NaN is
    the maximum, as numpy.argmax). Found by comparing each element with the window's max
    ``top`` (the forward's output when given, else recomputed): cheap whole-array ufuncs,
    where a running argmax needs masked copies, which branch on random masks (1.9 vs 7.4 ms
    for 2x2 windows of f32[64,16,26,26] here)."""
    parts = _window_parts(xp, x, kernel, stride, padding, -np.inf)
    if top is None:
        top = _max_pool_fwd(xp, x, kernel, stride, padding)
    nan = xp.isnan(top)
    if not nan.any():
        nan = None
    taken = None
    masks = []
    for k, v in parts:
        hit = v == top
        if nan is not None:
            hit |= nan & (v != v)
        if taken is None:
            taken = hit.copy()
        else:
            xp.greater(hit, taken, out=hit)       # hit and not taken
            taken |= hit
        masks.append((k, hit))
    return masks


def _max_pool_vjp(g, x, out, **a):
    # d max(window) = dx at the window's argmax; the forward's output rides along as the
    # window maxima, so the backward finds the argmax without recomputing the pooling
    return (apply("max_pool2d_grad", g, x, out, **a),)


register(OpDef("max_pool2d", infer=_pool_infer, forward=_max_pool_fwd, vjp=_max_pool_vjp,
               jvp=lambda ts, x, out, **a: None if ts[0] is None else
               apply("max_pool2d_gather", ts[0], x, **a), cost=_window_cost, out=_WINDOW_OUT,
               cuda=gpu.max_pool2d, cpu=CpuKernel("maxpool", 0),
               batched=True))


def _pool_pair_infer(y, x, kernel, stride, padding, to_input, **_):
    out = _pool_infer(x, kernel, stride, padding)
    want = x if to_input else out
    have = out if to_input else x
    if tuple(y[0]) != tuple(have[0]) or y[1] != x[1]:
        raise ValueError(f"first input must be {tuple(have[0])} {x[1]}, got {tuple(y[0])} {y[1]}")
    return tuple(want[0]), x[1]


def _max_pool_grad_fwd(xp, g, x, *top, kernel, stride, padding, out=None):
    masks = _first_max(xp, x, kernel, stride, padding, *top)
    zero = xp.zeros((), dtype=g.dtype)
    if stride[0] < kernel[0] or stride[1] < kernel[1] or not xp.isfinite(g).all():
        # overlapping windows (or an inf in g, which g * mask would spread as NaN): add up
        return _spread(xp, lambda i, j: xp.where(masks[i * kernel[1] + j][1], g, zero),
                       x.shape, kernel, stride, padding, out)
    # disjoint windows: each pixel takes g from at most one window, so each window element's
    # share is written, not added, into the pixels it covers (only the rest is zeroed). g *
    # mask, not where(): masks of ReLU outputs are random and where() branches (10x slower)
    (n, c, h, w), (ph, pw), (sh, sw) = x.shape, padding, stride
    shape = (n, c, h + 2 * ph, w + 2 * pw)
    oh, ow = g.shape[2:]
    acc = out if out is not None and not ph and not pw else xp.empty(shape, dtype=g.dtype)
    if stride == kernel:
        acc[:, :, sh * oh:] = 0
        acc[:, :, :, sw * ow:] = 0
    else:
        acc[...] = 0
    share = xp.empty(g.shape, dtype=g.dtype)
    for k, hit in masks:
        i, j = divmod(k, kernel[1])
        xp.multiply(g, hit, out=share)      # contiguous, then one strided copy: 1.1x faster
        acc[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] = share
    return _into(out, acc[:, :, ph:ph + h, pw:pw + w])


def _max_pool_gather_fwd(xp, y, x, kernel, stride, padding):
    masks = _first_max(xp, x, kernel, stride, padding)
    parts = _window_parts(xp, y, kernel, stride, padding)
    out = xp.zeros(masks[0][1].shape, dtype=y.dtype)
    for (_k, hit), (_i, v) in zip(masks, parts, strict=True):
        xp.copyto(out, v, where=hit)
    return out


def _max_pool_grad_infer(g, x, *top, **a):
    if len(top) > 1 or top and (tuple(top[0][0]) != tuple(g[0]) or top[0][1] != x[1]):
        raise ValueError(f"the window maxima must be one {tuple(g[0])} {x[1]} input, got "
                         f"{[(tuple(t[0]), t[1]) for t in top]}")
    return _pool_pair_infer(g, x, **a, to_input=True)


def _max_pool_grad_vjp(g, y, x, *top_out, **a):
    # linear in y: the adjoint reads g back; x and the maxima get no gradient
    return (apply("max_pool2d_gather", g, x, **a), None) + (None,) * (len(top_out) - 1)


def _max_pool_gather_vjp(g, y, x, out, **a):
    return apply("max_pool2d_grad", g, x, **a), None     # linear in y: the adjoint routes g


# max_pool2d_grad(g, x[, top]): top, the forward's output, saves recomputing the maxima
register(OpDef("max_pool2d_grad", infer=_max_pool_grad_infer,
               forward=_max_pool_grad_fwd, vjp=_max_pool_grad_vjp,
               jvp=lambda ts, y, x, *top_out, **a: None if ts[0] is None else
               apply("max_pool2d_grad", ts[0], x, *top_out[:-1], **a), cost=_window_cost,
               nondiff=(1, 2),
               out=_WINDOW_OUT, cuda=gpu.max_pool2d_grad, cpu=CpuKernel("maxpool_grad", 1),
               batched=True))
register(OpDef("max_pool2d_gather", infer=lambda y, x, **a: _pool_pair_infer(y, x, **a,
                                                                             to_input=False),
               forward=_max_pool_gather_fwd, vjp=_max_pool_gather_vjp,
               jvp=lambda ts, y, x, out, **a: None if ts[0] is None else
               apply("max_pool2d_gather", ts[0], x, **a), cost=_window_cost, nondiff=(1,),
               cuda=gpu.max_pool2d_gather))


def _pool_attrs(kernel, stride, padding) -> dict:
    kernel = _pair(kernel)
    return {"kernel": kernel, "stride": kernel if stride is None else _pair(stride),
            "padding": _pair(padding)}


def max_pool2d(x, kernel, stride=None, padding=0) -> Node:
    """Max over each ``kernel`` window of x (N, C, H, W); padding counts as -inf; stride
    defaults to the kernel (PyTorch's max_pool2d)."""
    return apply("max_pool2d", as_node(x), **_pool_attrs(kernel, stride, padding))


# ---- average pooling ----------------------------------------------------------------------------

def _avg_pool_fwd(xp, x, kernel, stride, padding):
    parts = _window_parts(xp, x, kernel, stride, padding)
    out = parts[0][1].copy()
    for _k, v in parts[1:]:
        out += v
    return out * (1.0 / (kernel[0] * kernel[1]))


def _avg_pool_vjp(g, x, out, **a):
    return (apply("avg_pool2d_grad", g, shape=x.shape, **a),)  # linear: each pixel gets g/(KH*KW)


register(OpDef("avg_pool2d", infer=_pool_infer, forward=_avg_pool_fwd, vjp=_avg_pool_vjp,
               jvp=lambda ts, x, out, **a: None if ts[0] is None else
               apply("avg_pool2d", ts[0], **a), cost=_window_cost, cuda=gpu.avg_pool2d))


def _avg_pool_grad_infer(g, shape, kernel, stride, padding, **_):
    out = _pool_infer((shape, g[1]), kernel, stride, padding)
    if tuple(g[0]) != out[0]:
        raise ValueError(f"gradient {tuple(g[0])} does not match pooling {shape} to {out[0]}")
    return tuple(shape), g[1]


def _avg_pool_grad_fwd(xp, g, shape, kernel, stride, padding):
    share = g * (1.0 / (kernel[0] * kernel[1]))
    return _spread(xp, lambda i, j: share, shape, kernel, stride, padding)


def _avg_pool_grad_vjp(g, y, out, shape, **a):
    return (apply("avg_pool2d", g, **a),)     # linear: the adjoint of spreading is averaging


register(OpDef("avg_pool2d_grad", infer=_avg_pool_grad_infer, forward=_avg_pool_grad_fwd,
               vjp=_avg_pool_grad_vjp,
               jvp=lambda ts, y, out, shape, **a: None if ts[0] is None else
               apply("avg_pool2d_grad", ts[0], shape=shape, **a), cost=_window_cost,
               cuda=gpu.avg_pool2d_grad))


def avg_pool2d(x, kernel, stride=None, padding=0) -> Node:
    """Mean over each ``kernel`` window of x (N, C, H, W); padding counts as zeros in the mean
    (PyTorch's default count_include_pad=True)."""
    return apply("avg_pool2d", as_node(x), **_pool_attrs(kernel, stride, padding))


# ---- dropout ------------------------------------------------------------------------------------
# The mask is a counter-based hash (splitmix64) of (seed, salt, element index), not
# xp.random: numpy and cupy streams differ, and a hash gives the same mask on every device,
# rank and executor for the same seed and salt.

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _uniform(xp, n, seed, salt):
    u64 = xp.uint64
    z = xp.arange(n, dtype=u64) * u64(_GOLDEN) + u64((seed * _MIX1 + _GOLDEN) % 2**64)
    if salt is not None:
        z = z + salt.astype(u64) * u64(_MIX2)
    z = (z ^ (z >> u64(30))) * u64(_MIX1)
    z = (z ^ (z >> u64(27))) * u64(_MIX2)
    return ((z ^ (z >> u64(31))) >> u64(11)).astype(xp.float64) * 2.0 ** -53


def _dropout_mask_infer(x, *salt, p, seed, **_):
    _float(x)
    if salt and (tuple(salt[0][0]) != () or not is_int(salt[0][1])):
        raise TypeError(f"salt must be an integer scalar, got {salt[0]}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return x


def _dropout_mask_fwd(xp, x, *salt, p, seed):
    keep = _uniform(xp, x.size, seed, salt[0] if salt else None).reshape(x.shape) >= p
    return keep.astype(x.dtype) * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


register(OpDef("dropout_mask", infer=_dropout_mask_infer, forward=_dropout_mask_fwd,
               cost=_window_cost, nondiff=(0, 1)))


def dropout(x, p=0.5, seed=0, training=True, salt=None) -> Node:
    """x * mask / (1 - p), mask ~ Bernoulli(1 - p) drawn from ``seed`` and the optional integer
    scalar node ``salt`` (e.g. the step counter, so each step draws a new mask). Identity when
    not training. The mask is a separate non-differentiable node, so gx = g * mask exactly."""
    x = as_node(x)
    if not training or p == 0.0:
        return x
    ins = [x] if salt is None else [x, as_node(salt)]
    return x * apply("dropout_mask", *ins, p=float(p), seed=int(seed))


# ---- embedding: a row lookup and its adjoint, the row scatter-add ------------------------------
# A pair of primitives, not gather + scatter_add along axis 0: those need the index broadcast
# to every column, and scatter_add's one-hot matmul holds (N*T, D, V) values.

def _embedding_infer(w, idx, **_):
    _float(w)
    if len(w[0]) != 2:
        raise ValueError(f"needs a weight (num_embeddings, dim), got {tuple(w[0])}")
    if not is_int(idx[1]):
        raise TypeError(f"indices must be integers, got {idx[1]}")
    return tuple(idx[0]) + (w[0][1],), w[1]


def _embedding_fwd(xp, w, idx):
    if idx.size and bool(((idx < 0) | (idx >= w.shape[0])).any()):
        bad = idx[(idx < 0) | (idx >= w.shape[0])][0]
        raise IndexError(f"index {int(bad)} out of range for {w.shape[0]} embeddings")
    return xp.take(w, idx, axis=0)


def _embedding_vjp(g, w, idx, out):
    return apply("embedding_grad", g, idx, num=w.shape[0]), None   # gw[v] = sum of g where idx = v


register(OpDef("embedding", infer=_embedding_infer, forward=_embedding_fwd, vjp=_embedding_vjp,
               jvp=lambda ts, w, idx, out: None if ts[0] is None else
               apply("embedding", ts[0], idx), cost=_bytes_cost, nondiff=(1,)))


def _embedding_grad_infer(g, idx, num, **_):
    _float(g)
    if not is_int(idx[1]) or tuple(g[0][:-1]) != tuple(idx[0]):
        raise ValueError(f"g {tuple(g[0])} must be the indices' shape {tuple(idx[0])} plus one "
                         f"dim, with integer indices")
    return (num, g[0][-1]), g[1]


def _embedding_grad_fwd(xp, g, idx, num):
    out = xp.zeros((num, g.shape[-1]), dtype=g.dtype)
    rows, flat = g.reshape(-1, g.shape[-1]), idx.reshape(-1)
    if xp is np:
        np.add.at(out, flat, rows)          # repeated indices accumulate
    else:
        import cupyx
        cupyx.scatter_add(out, flat, rows)
    return out


def _embedding_grad_vjp(g, y, idx, out, num):
    return apply("embedding", g, idx), None     # linear in y: the adjoint of a scatter is a gather


register(OpDef("embedding_grad", infer=_embedding_grad_infer, forward=_embedding_grad_fwd,
               vjp=_embedding_grad_vjp, jvp=lambda ts, y, idx, out, num: None if ts[0] is None
               else apply("embedding_grad", ts[0], idx, num=num), cost=_bytes_cost,
               nondiff=(1,)))


def embedding(idx, w) -> Node:
    """Rows of ``w`` (num_embeddings, dim) at integer ``idx`` (any shape): idx.shape + (dim,),
    as torch.nn.functional.embedding."""
    return apply("embedding", as_node(w), as_node(idx))


# ---- normalisation (composites: autodiff of mean/sub/sqrt gives exact gradients) ----------------

_SYNC: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "sync_batch_stats", default=None)


@contextlib.contextmanager
def sync_batch_stats(group: str, world_size: int) -> Iterator[None]:
    """Inside, batch_norm in training takes its statistics over the whole global batch: the
    per-rank sums are allreduced over ``group`` (``world_size`` equal local batches), as
    PyTorch's SyncBatchNorm, so data parallelism gives the single-process result."""
    token = _SYNC.set((group, int(world_size)))
    try:
        yield
    finally:
        _SYNC.reset(token)


def batch_stats_sync() -> tuple[str, int] | None:
    """The (group, world_size) batch_norm statistics are synchronised over, if any."""
    return _SYNC.get()


def _batch_mean(v, axes):
    sync = _SYNC.get()
    if sync is None:
        return mean(v, axes, keepdims=True)
    group, world = sync
    local = apply("sum", v, axis=axes, keepdims=True)
    count = v.size // local.size
    return apply("allreduce", local, op="sum", group=group) * (1.0 / (count * world))


def _normalize(x, axes, eps, mu=None, var=None, mean_of=None):
    """(x - mu) / sqrt(var + eps), with the batch statistics where mu, var are not given."""
    mean_of = mean_of or (lambda v: mean(v, axes, keepdims=True))
    mu = mean_of(x) if mu is None else mu
    xc = x - mu
    var = mean_of(xc * xc) if var is None else var
    return xc / sqrt(var + eps), mu, var


def layer_norm(x, w=None, b=None, normalized_shape=None, eps=1e-5) -> Node:
    """(x - mean) / sqrt(var + eps) * w + b over the trailing ``normalized_shape`` dims
    (default: w's shape, else the last dim), as torch.nn.functional.layer_norm."""
    x = as_node(x)
    w, b = (None if v is None else as_node(v) for v in (w, b))
    shape = tuple(normalized_shape) if normalized_shape is not None else (
        w.shape if w is not None else x.shape[-1:])
    ins = [v for v in (x, w, b) if v is not None]
    if x.shape[x.ndim - len(shape):] != shape or any(
            v is not None and v.shape != shape for v in (w, b)):
        raise shape_error("layer_norm", ins, f"normalized_shape {shape} must be the trailing "
                          f"dims of the input and the shape of w and b")
    out = _normalize(x, tuple(range(x.ndim - len(shape), x.ndim)), eps)[0]
    out = out if w is None else out * w
    return out if b is None else out + b


def batch_norm(x, w=None, b=None, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5) -> tuple[Node, Node | None, Node | None]:
    """Batch normalisation over every axis but the channel axis 1, for (N, C) and (N, C, H, W)
    (any (N, C, ...)). Returns (out, new_running_mean, new_running_var): in training the batch
    statistics normalise and the running ones move by ``momentum`` (the variance unbiased, as
    PyTorch); in eval the running statistics normalise and come back unchanged. Inside
    ``sync_batch_stats`` the statistics are those of the global batch over all ranks."""
    x = as_node(x)
    w, b, rm, rv = (None if v is None else as_node(v) for v in (w, b, running_mean, running_var))
    ins = [v for v in (x, w, b, rm, rv) if v is not None]
    if x.ndim < 2:
        raise shape_error("batch_norm", ins, "needs an (N, C, ...) input")
    c, axes = x.shape[1], (0,) + tuple(range(2, x.ndim))
    if any(v is not None and v.shape != (c,) for v in (w, b, rm, rv)):
        raise shape_error("batch_norm", ins, f"w, b and running statistics must have shape "
                          f"({c},)")
    bshape = (1, c) + (1,) * (x.ndim - 2)
    count = x.size // max(c, 1)
    if training:
        count *= _SYNC.get()[1] if _SYNC.get() else 1        # values per channel, all ranks
        if count < 2:
            raise shape_error("batch_norm", ins, "training needs more than one value per channel"
                              + (" over all ranks" if _SYNC.get() else ""))
        out, mu, var = _normalize(x, axes, eps, mean_of=lambda v: _batch_mean(v, axes))
        if rm is not None:
            rm = rm * (1.0 - momentum) + reshape(mu, (c,)) * momentum
        if rv is not None:
            rv = rv * (1.0 - momentum) + reshape(var, (c,)) * (momentum * count / (count - 1))
    else:
        if rm is None or rv is None:
            raise shape_error("batch_norm", ins, "eval mode needs running_mean and running_var")
        out = _normalize(x, axes, eps, reshape(rm, bshape), reshape(rv, bshape))[0]
    out = out if w is None else out * reshape(w, bshape)
    return (out if b is None else out + reshape(b, bshape)), rm, rv


__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "dropout", "embedding", "layer_norm", "batch_norm",
           "sync_batch_stats"]
