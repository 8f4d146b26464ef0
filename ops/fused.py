"""Fused ops: one primitive for a chain a GPU runs as one kernel (ops/cuda/*.cu), with the
chain's exact semantics on any ``xp``: bias_act = act(x + b) and its gradient
bias_act_grad, softmax_xent_grad, cross_entropy's gradient (softmax - onehot) * scale, and
``fused``, any elementwise group an executor runs as one generated kernel. Each VJP is made of
nodes, so gradients of gradients work. Imports ops.registry, sibling op
families and graph.ir.
"""

from __future__ import annotations

import math

import numpy as np

from shardgrad.graph.ir import Node
from shardgrad.ops import gpu
from shardgrad.ops.elementwise import tanh
from shardgrad.ops.reduce import sum
from shardgrad.ops.registry import (
    OpDef,
    OutKernel,
    apply,
    as_node,
    broadcast_infer,
    elementwise_cost,
    float_unary_infer,
    get,
    is_int,
    register,
    shape_error,
    unbroadcast,
)

ACTIVATIONS = ("relu", "gelu", "tanh")
_GELU_C = math.sqrt(2.0 / math.pi)


def _bias_infer(x, b, act, **_):
    float_unary_infer(x)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, not {act!r}")
    if len(b[0]) != 1 or not x[0] or b[0][0] != x[0][-1]:
        raise ValueError(f"bias {tuple(b[0])} must be 1-d and match the last axis of "
                         f"{tuple(x[0])}")
    return broadcast_infer(x, b)


def _dact_fwd(xp, z, act):
    """act'(z) as the unfused chain's VJP computes it."""
    if act == "relu":
        return (z > 0).astype(z.dtype)
    t = xp.tanh(z) if act == "tanh" else xp.tanh(_GELU_C * (z + 0.044715 * z * z * z))
    if act == "tanh":
        return 1.0 - t * t
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 0.134145 * z * z)


def _ddact(z: Node, act: str) -> Node | None:
    """act''(z) as nodes (None: zero almost everywhere, as for relu)."""
    if act == "relu":
        return None
    if act == "tanh":
        t = tanh(z)
        return -2.0 * t * (1.0 - t * t)            # d (1 - tanh^2) = -2 tanh (1 - tanh^2)
    # act' = 0.5 (1 + t) + 0.5 z (1 - t^2) u', t = tanh u, u = c (z + a z^3)
    # act'' = (1 - t^2) (u' + 0.5 z (u'' - 2 t u'^2)), u' = c (1 + 3a z^2), u'' = 6 a c z
    t = tanh(_GELU_C * (z + 0.044715 * z * z * z))
    du = _GELU_C * (1.0 + 0.134145 * z * z)
    ddu = (6.0 * 0.044715 * _GELU_C) * z
    return (1.0 - t * t) * (du + 0.5 * z * (ddu - 2.0 * t * du * du))


def _bias_act_vjp(g, x, b, out, act):
    gz = apply("bias_act_grad", g, x, b, act=act)   # d act(x + b) = act'(x + b) (dx + db)
    return gz, unbroadcast(gz, b.shape)


register(OpDef("bias_act", infer=_bias_infer,
               forward=lambda xp, x, b, act: get(act).forward(xp, x + b),
               vjp=_bias_act_vjp, cost=elementwise_cost, cuda=gpu.bias_act))


def _bias_grad_infer(g, x, b, act, **_):
    out = _bias_infer(x, b, act)
    if tuple(g[0]) != tuple(out[0]) or g[1] != out[1]:
        raise ValueError(f"gradient {tuple(g[0])} {g[1]} must match {tuple(out[0])} {out[1]}")
    return out


def _bias_act_grad_vjp(h, g, x, b, out, act):
    # out = g act'(z), z = x + b:  d out = act'(z) dg + g act''(z) (dx + db)
    gg = apply("bias_act_grad", h, x, b, act=act)
    dd = _ddact(x + b, act)
    if dd is None:
        return gg, None, None
    gz = h * g * dd
    return gg, gz, unbroadcast(gz, b.shape)


register(OpDef("bias_act_grad", infer=_bias_grad_infer,
               forward=lambda xp, g, x, b, act: g * _dact_fwd(xp, x + b, act),
               vjp=_bias_act_grad_vjp, cost=elementwise_cost, cuda=gpu.bias_act_grad))


def bias_act(x, b, act="relu") -> Node:
    """``act(x + b)`` with the bias ``b`` (C,) along the last axis of ``x`` (..., C), as one
    kernel forward and one backward (act: relu, gelu (tanh form) or tanh)."""
    x, b = as_node(x), as_node(b)
    return apply("bias_act", x, b, act=str(act))


# ---- GEMM + bias + activation ------------------------------------------------------------------
# One op for a linear layer's forward, so a GPU library can run it as one GEMM with an
# epilogue (cuBLASLt's BIAS / RELU_BIAS / GELU_BIAS). graph.passes.gemm_epilogues makes it
# from matmul + add (+ relu) after the backward is traced; its VJP exists for completeness.
EPILOGUE_ACTS = ("none", "relu", "gelu")


def _mba_infer(x, w, b, act, **_):
    float_unary_infer(x)
    if act not in EPILOGUE_ACTS:
        raise ValueError(f"act must be one of {EPILOGUE_ACTS}, not {act!r}")
    (xs, xd), (ws, wd), (bs, bd) = x, w, b
    if len(xs) != 2 or len(ws) != 2 or xs[1] != ws[0] or tuple(bs) != (ws[1],):
        raise ValueError(f"needs x (M, K), w (K, N) and b (N,); got {tuple(xs)}, {tuple(ws)}, "
                         f"{tuple(bs)}")
    if not xd == wd == bd:
        raise TypeError(f"dtypes {xd}, {wd}, {bd} differ; cast one explicitly")
    return (xs[0], ws[1]), xd


def _mba_fwd(xp, x, w, b, act):
    z = xp.matmul(x, w) + b
    return z if act == "none" else get(act).forward(xp, z)


def _mba_vjp(g, x, w, b, out, act):
    # out = act(z), z = x w + b:  gz = act'(z) g;  gx = gz w^T, gw = x^T gz, gb = sum_rows gz
    z = apply("matmul", x, w)
    gz = g if act == "none" else apply("bias_act_grad", g, z, b, act=act)
    return (apply("matmul", gz, apply("transpose", w, axes=(1, 0))),
            apply("matmul", apply("transpose", x, axes=(1, 0)), gz), unbroadcast(gz, b.shape))


def _mba_cost(node: Node) -> tuple[float, float]:
    (m, k), n = node.inputs[0].shape, node.shape[1]
    nbytes = sum(v.size for v in node.inputs) + node.size
    return 2.0 * m * k * n, float(nbytes * np.dtype(node.dtype).itemsize)


register(OpDef("matmul_bias_act", infer=_mba_infer, forward=_mba_fwd, vjp=_mba_vjp,
               cost=_mba_cost, cuda=gpu.matmul_bias_act))


def matmul_bias_act(x, w, b, act="none") -> Node:
    """``act(x @ w + b)``, x (M, K), w (K, N), b (N,), act none / relu / gelu (tanh form):
    one GEMM with its epilogue where a GPU library runs it (docs/gpu.md)."""
    return apply("matmul_bias_act", as_node(x), as_node(w), as_node(b), act=str(act))


# ---- softmax cross-entropy gradient ---------------------------------------------------------

def _xent_grad_infer(logits, labels, scale, **_):
    float_unary_infer(logits)
    (ls, ld), (ys, yd), (ss, sd) = logits, labels, scale
    if not is_int(yd):
        raise TypeError(f"labels must be integers, got {yd}")
    if len(ls) != 2 or tuple(ys) != tuple(ls[:1]):
        raise ValueError(f"needs logits (N, C) and labels (N,); got {tuple(ls)}, {tuple(ys)}")
    if tuple(ss) not in ((1, 1), (ls[0], 1)) or sd != ld:
        raise ValueError(f"scale must be ({ls[0]}, 1) or (1, 1) {ld}, got {tuple(ss)} {sd}")
    return tuple(ls), ld


def _xent_grad_fwd(xp, logits, labels, scale):
    e = xp.exp(logits - xp.max(logits, axis=1, keepdims=True))
    p = e / xp.sum(e, axis=1, keepdims=True)
    onehot = (labels[:, None] == xp.arange(logits.shape[1])).astype(logits.dtype)
    return (p - onehot) * scale


def _xent_grad_vjp(h, logits, labels, scale, out, **_):
    # out = (p - onehot) s, p = softmax(x):  d out = s dp + (p - onehot) ds,
    # dp = p (dx - sum(p dx));  so gx = p (hs - sum(p hs)), gs = sum over classes of h (p - y)
    p = apply("softmax", logits, axis=1)
    hs = h * scale
    gx = p * (hs - sum(p * hs, 1, True))
    y = apply("onehot", labels, n=logits.shape[1], dtype=logits.dtype)
    gs = unbroadcast(sum(h * (p - y), 1, True), scale.shape)
    return gx, None, gs


register(OpDef("softmax_xent_grad", infer=_xent_grad_infer, forward=_xent_grad_fwd,
               vjp=_xent_grad_vjp, cost=elementwise_cost, nondiff=(1,),
               cuda=gpu.softmax_xent_grad))


def softmax_xent_grad(logits, labels, scale) -> Node:
    """``(softmax(logits, 1) - onehot(labels)) * scale``: the gradient of cross_entropy with
    respect to its logits in one kernel, ``scale`` (N, 1) or (1, 1) the upstream gradient per
    row (already divided by N for a mean)."""
    logits, labels, scale = as_node(logits), as_node(labels), as_node(scale)
    if logits.ndim != 2:
        raise shape_error("softmax_xent_grad", [logits, labels, scale], "needs (N, C) logits")
    return apply("softmax_xent_grad", logits, labels, scale)


# ---- an elementwise group as one node -----------------------------------------------------------
# An executor's rewrite (runtime.native) puts a graph.passes.FusionGroup in one node so its
# planner gives the group one buffer: the group's outputs, in order, raveled into one flat
# array (or the one output as it is), read back with unpack. Not differentiable: it exists
# only inside a compiled program. attrs: ``steps`` ((op, args, attrs) as FusionGroup.expr),
# ``dtypes`` of the members, ``outputs`` (member indices), ``shape`` of the group, ``views``
# (per input: None, ("transpose", axes) or ("broadcast_to", shape): the input is the
# operand of that view) and, where it was built, ``kernel``: the compiled function called as
# ``kernel(*inputs, out=buf)``, the op's out= form.

def _fused_infer(*xs, steps, dtypes, outputs, shape, **_):
    if len(outputs) == 1:
        return tuple(shape), dtypes[outputs[0]]
    if len({dtypes[k] for k in outputs}) != 1:
        raise TypeError("the outputs of a fused group must share one dtype")
    size = int(math.prod(shape))
    return (size * len(outputs),), dtypes[outputs[0]]


def _fused_fwd(xp, *xs, steps, dtypes, outputs, shape, views, **_):
    vals = []
    for x, view in zip(xs, views, strict=True):
        if view is not None:
            x = xp.transpose(x, view[1]) if view[0] == "transpose" else xp.broadcast_to(
                x, view[1])
        vals.append(x)
    for op, args, attrs in steps:
        vals.append(get(op).forward(xp, *[vals[a] for a in args], **attrs))
    outs = [xp.broadcast_to(vals[len(xs) + k], shape) for k in outputs]
    if len(outs) == 1:
        return xp.ascontiguousarray(outs[0])
    return xp.concatenate([o.ravel() for o in outs])


register(OpDef("fused", infer=_fused_infer, forward=_fused_fwd, cost=elementwise_cost,
               out=OutKernel(lambda xp, n: (n.attrs["kernel"], ()), False,
                             lambda n: n.attrs.get("kernel") is not None)))


__all__ = ["bias_act", "matmul_bias_act", "softmax_xent_grad", "ACTIVATIONS", "EPILOGUE_ACTS"]
