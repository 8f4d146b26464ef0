"""Softmax family and losses: log_softmax, softmax, cross_entropy (fused, integer labels).

Each is a primitive with a fused, numerically stable forward and a VJP built from nodes, so
gradients of gradients work. Imports ops.registry, sibling op families and graph.ir.
"""

from __future__ import annotations

from shardgrad.graph.ir import Node
from shardgrad.ops import gpu
from shardgrad.ops.fused import softmax_xent_grad
from shardgrad.ops.reduce import norm_axis, sum
from shardgrad.ops.registry import (
    OpDef,
    apply,
    as_node,
    elementwise_cost,
    float_unary_infer,
    is_int,
    register,
)
from shardgrad.ops.shape import onehot


def _log_softmax_fwd(xp, x, axis):
    s = x - xp.max(x, axis=axis, keepdims=True)       # shift by the max: exp never overflows
    return s - xp.log(xp.sum(xp.exp(s), axis=axis, keepdims=True))


def _log_softmax_vjp(g, x, out, axis):
    return (g - apply("exp", out) * sum(g, axis, True),)   # d lsm = dx - sum(softmax * dx)


def _log_softmax_jvp(ts, x, out, axis):
    return None if ts[0] is None else ts[0] - sum(apply("exp", out) * ts[0], axis, True)


register(OpDef("log_softmax", infer=float_unary_infer, forward=_log_softmax_fwd,
               vjp=_log_softmax_vjp, jvp=_log_softmax_jvp, cost=elementwise_cost,
               cuda=gpu.log_softmax))


def log_softmax(x, axis=-1) -> Node:
    """x - logsumexp(x, axis), computed stably in one kernel."""
    x = as_node(x)
    return apply("log_softmax", x, axis=norm_axis(axis, x.ndim, "log_softmax", [x])[0])


def _softmax_fwd(xp, x, axis):
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def _softmax_vjp(g, x, out, axis):
    return (out * (g - sum(g * out, axis, True)),)         # d s = s * (dx - sum(s * dx))


register(OpDef("softmax", infer=float_unary_infer, forward=_softmax_fwd, vjp=_softmax_vjp,
               jvp=lambda ts, x, out, axis: None if ts[0] is None else
               out * (ts[0] - sum(out * ts[0], axis, True)), cost=elementwise_cost,
               cuda=gpu.softmax))


def softmax(x, axis=-1) -> Node:
    x = as_node(x)
    return apply("softmax", x, axis=norm_axis(axis, x.ndim, "softmax", [x])[0])


# ---- cross_entropy ------------------------------------------------------------------------------
# One primitive, not log_softmax + gather + mean: one pass over the logits forward, and the
# backward is the textbook (softmax - onehot) / N instead of a chain of three VJPs.

REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy_infer(logits, labels, reduction, **_):
    (ls, ld), (ys, yd) = logits, labels
    float_unary_infer(logits)
    if not is_int(yd):
        raise TypeError(f"labels must be integers, got {yd}")
    if len(ls) != 2 or tuple(ys) != tuple(ls[:1]):
        raise ValueError(f"needs logits (N, C) and labels (N,); got {tuple(ls)} and "
                         f"{tuple(ys)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    return (tuple(ls[:1]) if reduction == "none" else ()), ld


def _cross_entropy_fwd(xp, logits, labels, reduction):
    n, c = logits.shape
    bad = (labels < 0) | (labels >= c)
    if n and bool(bad.any()):            # one device sync; a wrong label must not pass silently
        raise ValueError(f"label {int(labels[bad][0])} out of range for {c} classes")
    nll = -xp.take_along_axis(_log_softmax_fwd(xp, logits, 1), labels[:, None], axis=1)[:, 0]
    if reduction == "none":
        return nll
    return xp.sum(nll) / n if reduction == "mean" else xp.sum(nll)


def _per_row(g, logits, reduction):
    """The upstream gradient as an (N, 1) column (mean divides by N)."""
    n = logits.shape[0]
    if reduction == "none":
        return apply("reshape", g, shape=(n, 1))
    return apply("reshape", g * (1.0 / max(n, 1)) if reduction == "mean" else g, shape=(1, 1))


def _cross_entropy_vjp(g, logits, labels, out, reduction):
    # loss_i = -log softmax(x_i)[y_i]  =>  d loss_i / d x_i = softmax(x_i) - onehot(y_i);
    # one fused op (ops.fused), so a GPU computes the whole gradient in one kernel
    return softmax_xent_grad(logits, labels, _per_row(g, logits, reduction)), None


def _cross_entropy_jvp(ts, logits, labels, out, reduction):
    if ts[0] is None:
        return None
    p = softmax(logits, 1) - onehot(labels, logits.shape[1], logits.dtype)
    per_row = sum(p * ts[0], 1)
    if reduction == "none":
        return per_row
    return sum(per_row) * (1.0 / max(logits.shape[0], 1)) if reduction == "mean" else sum(per_row)


def _cross_entropy_cost(node: Node) -> tuple[float, float]:
    return elementwise_cost(node)[0] + 4.0 * node.inputs[0].size, elementwise_cost(node)[1]


register(OpDef("cross_entropy", infer=_cross_entropy_infer, forward=_cross_entropy_fwd,
               vjp=_cross_entropy_vjp, jvp=_cross_entropy_jvp, cost=_cross_entropy_cost,
               nondiff=(1,), cuda=gpu.cross_entropy))


def cross_entropy(logits, labels, reduction="mean") -> Node:
    """Mean (or summed, or per-row) negative log-likelihood of integer ``labels`` (N,) under
    ``softmax(logits)`` (N, C), as torch.nn.functional.cross_entropy."""
    return apply("cross_entropy", as_node(logits), as_node(labels), reduction=reduction)


__all__ = ["log_softmax", "softmax", "cross_entropy"]
