"""Every op in the registry, one table: forward against NumPy (float64 and float32, on every
device), and for each differentiable op the float64 gradient check, forward-mode check and
Hessian-vector-product check of op_harness. A registry op without a case fails the suite.
"""

import numpy as np
import pytest
import scipy.special
from op_harness import (
    B,
    F,
    I,
    OpCase,
    check_device,
    check_forward,
    check_grad,
    check_hvp,
    check_jvp,
)

from shardgrad.ops import REGISTRY, apply, fused, loss, nn
from shardgrad.ops import elementwise as E
from shardgrad.ops import reduce as R
from shardgrad.ops import shape as S
from shardgrad.ops.linalg import matmul

# ---- NumPy references ---------------------------------------------------------------------------


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


REF_ACT = {"relu": lambda z: np.maximum(z, 0), "gelu": ref_gelu, "tanh": np.tanh}


def ref_dact(act, z):
    z = z.astype(np.float64)
    if act == "relu":
        return (z > 0).astype(np.float64)
    if act == "tanh":
        return 1.0 - np.tanh(z) ** 2
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (z + 0.044715 * z ** 3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)


def ref_xent_grad(x, y, s):
    p = np.exp(ref_log_softmax(x))
    return (p - np.eye(x.shape[1])[y]) * s


def ref_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def ref_cross_entropy(x, y, reduction="mean"):
    nll = -ref_log_softmax(x)[np.arange(len(y)), y]
    return {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[reduction]


def ref_scatter_add(g, idx, axis, size):
    shape = list(g.shape)
    shape[axis] = size
    out = np.zeros(shape, g.dtype)
    for pos in np.ndindex(g.shape):
        at = list(pos)
        at[axis] = idx[pos]
        out[tuple(at)] += g[pos]
    return out


def ref_windows(x, k, s, p, fill=0.0):
    """(N, C, OH, OW, KH, KW) windows by explicit loops."""
    n, c, h, w = x.shape
    xp_ = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), fill, x.dtype)
    xp_[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    oh, ow = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
    out = np.empty((n, c, oh, ow) + tuple(k), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = xp_[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
    return out


def ref_unwindow(v, shape, k, s, p):
    """Adjoint of ref_windows: add each window element back onto its input pixel."""
    n, c, h, w = shape
    out = np.zeros((n, c, h + 2 * p[0], w + 2 * p[1]), v.dtype)
    for i in range(v.shape[2]):
        for j in range(v.shape[3]):
            out[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]] += v[:, :, i, j]
    return out[:, :, p[0]:p[0] + h, p[1]:p[1] + w]


def ref_im2col(x, k, s, p):
    return ref_windows(x, k, s, p).transpose(0, 1, 4, 5, 2, 3)


def ref_conv2d(x, w, b=None, s=(1, 1), p=(0, 0)):
    out = np.einsum("ncijab,ocab->noij", ref_windows(x, w.shape[2:], s, p), w)
    return out if b is None else out + b[None, :, None, None]


def ref_group_conv2d(x, w, b, groups):
    xs, ws = np.split(x, groups, 1), np.split(w, groups, 0)
    out = np.concatenate([ref_conv2d(a, v, s=(1, 1), p=(1, 1))
                          for a, v in zip(xs, ws, strict=True)], 1)
    return out if b is None else out + b[None, :, None, None]


def ref_embedding_grad(g, idx):
    out = np.zeros((5, g.shape[-1]))
    for pos in np.ndindex(idx.shape):
        out[idx[pos]] += g[pos]
    return out


def ref_argmax_onehot(x, k, s, p):
    win = ref_windows(x, k, s, p, -np.inf)
    flat = win.reshape(win.shape[:4] + (-1,))
    return (np.arange(flat.shape[-1]) == flat.argmax(-1)[..., None]).reshape(win.shape)


def ref_max_pool_grad(g, x, k, s, p):
    return ref_unwindow(ref_argmax_onehot(x, k, s, p) * g[..., None, None], x.shape, k, s, p)


def ref_max_pool_gather(y, x, k, s, p):
    return (ref_windows(y, k, s, p) * ref_argmax_onehot(x, k, s, p)).sum((-2, -1))


def ref_layer_norm(x, w, b, nd, eps=1e-5):
    axes = tuple(range(x.ndim - nd, x.ndim))
    mu, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def ref_batch_norm(x, w, b, rm, rv, training, momentum=0.1, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    bs = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mu, var = x.mean(axes), x.var(axes)
        m = x.size // x.shape[1]
        new_rm, new_rv = (1 - momentum) * rm + momentum * mu, (
            (1 - momentum) * rv + momentum * var * m / (m - 1))
    else:
        mu, var, new_rm, new_rv = rm, rv, rm, rv
    out = (x - mu.reshape(bs)) / np.sqrt(var.reshape(bs) + eps) * w.reshape(bs) + b.reshape(bs)
    return out, new_rm, new_rv


_MASK64 = 2 ** 64 - 1


def ref_dropout_mask(x, p, seed, salt=0):
    """splitmix64 in plain Python integers: checks the uint64 array arithmetic."""
    g, m1, m2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
    out = np.empty(x.size)
    for i in range(x.size):
        z = (i * g + seed * m1 + g + salt * m2) & _MASK64
        z = ((z ^ (z >> 30)) * m1) & _MASK64
        z = ((z ^ (z >> 27)) * m2) & _MASK64
        u = ((z ^ (z >> 31)) >> 11) * 2.0 ** -53
        out[i] = (u >= p) / (1 - p)
    return out.reshape(x.shape).astype(x.dtype)


# ---- the table -----------------------------------------------------------------------------------

POS = dict(lo=0.5, hi=2.0)
K3S2P1 = dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1))
K2S1P0 = dict(kernel=(2, 2), stride=(1, 1), padding=(0, 0))
IDX = (("s", 3, None, -2), ("n",), ("i", 1))        # x[::-2, None, 1] on a (4, 3) input


def _bn(training, nd):
    shape = (4, 2) + ((2, 2) if nd == 4 else ())
    return OpCase("batch_norm", lambda x, w, b, rm, rv: nn.batch_norm(x, w, b, rm, rv, training),
                  (F(*shape), F(2), F(2), F(2), F(2, **POS)),
                  lambda x, w, b, rm, rv: ref_batch_norm(x, w, b, rm, rv, training),
                  name=f"{'train' if training else 'eval'}-{nd}d")


CASES = [
    # elementwise binary, with broadcasting
    OpCase("add", E.add, (F(2, 3), F(3)), np.add),
    OpCase("sub", E.sub, (F(2, 1), F(1, 3)), np.subtract),
    OpCase("mul", E.mul, (F(2, 3), F(2, 1)), np.multiply),
    OpCase("div", E.div, (F(3, 2), F(2, **POS)), np.divide),
    OpCase("pow", E.pow, (F(2, 3, **POS), F(3, lo=-1.5, hi=2.0)), np.power),
    OpCase("pow", lambda x: x ** 3.0, (F(2, 3, lo=-2.0, hi=-0.5),), lambda x: x ** 3,
           name="negative-base"),
    OpCase("pow", lambda x: x ** 0.0, (F(4, lo=-1.0, hi=1.0),), lambda x: x ** 0.0,
           name="zero-exponent"),
    OpCase("maximum", E.maximum, (F(2, 3), F(3)), np.maximum),
    OpCase("minimum", E.minimum, (F(2, 3), F(2, 1)), np.minimum),
    OpCase("where", E.where, (B(2, 3), F(2, 3), F(3)), np.where),
    # elementwise unary
    OpCase("neg", E.neg, (F(2, 3),), np.negative),
    OpCase("exp", E.exp, (F(2, 3),), np.exp),
    OpCase("log", E.log, (F(2, 3, **POS),), np.log),
    OpCase("sqrt", E.sqrt, (F(2, 3, **POS),), np.sqrt),
    OpCase("tanh", E.tanh, (F(2, 3),), np.tanh),
    OpCase("sin", E.sin, (F(2, 3, lo=-4, hi=4),), np.sin),
    OpCase("cos", E.cos, (F(2, 3, lo=-4, hi=4),), np.cos),
    OpCase("floor_divide", E.floor_divide, (F(2, 3, lo=-5, hi=5), F(3, **POS)), np.floor_divide,
           grad=False),
    OpCase("floor_divide", lambda x, y: E.floor_divide(x - 4, y + 1), (I(2, 3, hi=9), I(3, hi=4)),
           lambda x, y: np.floor_divide(x - 4, y + 1), grad=False, name="int"),
    # away from the jumps of floor(x / y): x / y in (k + 0.1, k + 0.9)
    OpCase("remainder", E.remainder, (F(2, 3, lo=2.3, hi=2.7), F(3, lo=1.0, hi=1.1)),
           np.remainder),
    OpCase("remainder", lambda x: E.remainder(x, -1.5), (F(2, 3, lo=-3.6, hi=-3.1),),
           lambda x: np.remainder(x, -1.5), name="negative-divisor"),
    OpCase("sigmoid", E.sigmoid, (F(2, 3, lo=-4, hi=4),), ref_sigmoid),
    OpCase("relu", E.relu, (F(2, 3),), lambda x: np.maximum(x, 0)),
    OpCase("gelu", E.gelu, (F(2, 3, lo=-3, hi=3),), ref_gelu),
    OpCase("erf", E.erf, (F(2, 3, lo=-2.5, hi=2.5),), scipy.special.erf),
    OpCase("erf", E.gelu_erf, (F(2, 3, lo=-3, hi=3),),
           lambda x: 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0))), name="gelu-exact"),
    OpCase("cast", lambda x: E.cast(x, "float64"), (F(2, 3),), lambda x: x.astype("float64"),
           extra={"f32": False}),
    OpCase("cast", lambda x: E.cast(x, "int64"), (F(2, 3, lo=-5, hi=5),),
           lambda x: x.astype("int64"), grad=False, name="to-int"),
    OpCase("step", E.step, (F(2, 3),), lambda x: (x > 0).astype(x.dtype), grad=False),
    OpCase("sign", E.sign, (F(2, 3),), np.sign, grad=False),
    *[OpCase(n, getattr(E, n), (I(2, 3, hi=3), I(3, hi=3)), getattr(np, n), grad=False)
      for n in ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")],
    # reductions
    OpCase("sum", lambda x: R.sum(x, 1), (F(2, 3, 2),), lambda x: x.sum(1)),
    OpCase("sum", lambda x: R.sum(x, (0, 2), keepdims=True), (F(2, 3, 2),),
           lambda x: x.sum((0, 2), keepdims=True), name="keepdims"),
    OpCase("sum", R.sum, (F(2, 3),), np.sum, name="all"),
    OpCase("mean", lambda x: R.mean(x, -1), (F(2, 3),), lambda x: x.mean(-1)),
    OpCase("max", lambda x: R.max(x, 0), (F(3, 4),), lambda x: x.max(0)),
    OpCase("max", lambda x: R.max(x, keepdims=True), (F(3, 4),),
           lambda x: x.max(keepdims=True), name="all"),
    OpCase("argmax", lambda x: R.argmax(x, 1), (F(3, 4),), lambda x: x.argmax(1), grad=False),
    OpCase("cumsum", lambda x: R.cumsum(x, 1), (F(2, 4, 3),), lambda x: np.cumsum(x, 1)),
    OpCase("cumsum", lambda x: R.cumsum(x, 0), (F(5),), np.cumsum, name="1d"),
    OpCase("argsort", lambda x: R.argsort(x, 1), (F(3, 5),),
           lambda x: np.argsort(x, 1, kind="stable"), grad=False),
    OpCase("argsort", lambda x: R.argsort(x, 0, descending=True), (F(4, 3),),
           lambda x: np.argsort(-x, 0, kind="stable"), grad=False, name="descending"),
    OpCase("gather", lambda x: S.gather(x, R.argsort(x, 1, True), 1), (F(3, 5),),
           lambda x: -np.sort(-x, 1), name="sort-values"),
    # linear algebra
    OpCase("matmul", matmul, (F(2, 3), F(3, 4)), np.matmul),
    OpCase("matmul", matmul, (F(2, 2, 3), F(3, 2)), np.matmul, name="batched"),
    OpCase("matmul", matmul, (F(3), F(3, 2)), np.matmul, name="vector-matrix"),
    OpCase("matmul", matmul, (F(3), F(3)), np.matmul, name="dot"),
    OpCase("matmul", lambda x, w: matmul(x, S.transpose(w)), (F(2, 3), F(4, 3)),
           lambda x, w: x @ w.T, name="linear"),
    # shape
    OpCase("reshape", lambda x: S.reshape(x, (3, -1)), (F(2, 3, 2),),
           lambda x: x.reshape(3, -1)),
    OpCase("transpose", lambda x: S.transpose(x, (2, 0, 1)), (F(2, 3, 2),),
           lambda x: x.transpose(2, 0, 1)),
    OpCase("broadcast_to", lambda x: S.broadcast_to(x, (2, 3, 4)), (F(3, 1),),
           lambda x: np.broadcast_to(x, (2, 3, 4))),
    OpCase("concat", lambda *xs: S.concat(xs, axis=1), (F(2, 1), F(2, 3), F(2, 2)),
           lambda *xs: np.concatenate(xs, 1)),
    OpCase("getitem", lambda x: S.getitem(x, (1, slice(None, None, -1))), (F(3, 4),),
           lambda x: x[1, ::-1]),
    OpCase("getitem", lambda x: S.getitem(x, (None, ..., slice(1, 3))), (F(2, 4),),
           lambda x: x[None, ..., 1:3], name="none-ellipsis"),
    OpCase("getitem", lambda x: S.getitem(x, (-1, slice(None, None, 2), None)), (F(2, 5),),
           lambda x: x[-1, ::2, None], name="step"),
    OpCase("getitem_grad", lambda g: apply("getitem_grad", g, index=IDX, shape=(4, 3)),
           (F(2, 1),), lambda g: _scatter_slice(g, (slice(3, None, -2), None, 1), (4, 3))),
    OpCase("gather", lambda x, i: S.gather(x, i, 1), (F(3, 4), I(3, 2, hi=4)),
           lambda x, i: np.take_along_axis(x, i, 1)),
    OpCase("gather", lambda x, i: S.gather(x, i, 0), (F(3, 2), I(5, 2, hi=3)),
           lambda x, i: np.take_along_axis(x, i, 0), name="axis0-repeats"),
    OpCase("scatter_add", lambda g, i: apply("scatter_add", g, i, axis=1, size=4),
           (F(3, 5), I(3, 5, hi=4)), lambda g, i: ref_scatter_add(g, i, 1, 4)),
    OpCase("onehot", lambda y: S.onehot(y, 4, "float64"), (I(5, hi=4),),
           lambda y: np.eye(4)[y], grad=False),
    # softmax family and losses
    OpCase("log_softmax", loss.log_softmax, (F(3, 4),), ref_log_softmax),
    OpCase("log_softmax", lambda x: loss.log_softmax(x, 0), (F(3, 4),),
           lambda x: ref_log_softmax(x, 0), name="axis0"),
    OpCase("softmax", loss.softmax, (F(3, 4),), lambda x: np.exp(ref_log_softmax(x))),
    *[OpCase("cross_entropy", lambda x, y, r=r: loss.cross_entropy(x, y, r),
             (F(4, 5, lo=-3, hi=3), I(4, hi=5)), lambda x, y, r=r: ref_cross_entropy(x, y, r),
             name=r) for r in ("mean", "sum", "none")],
    # fused (ops.fused): one primitive for a chain, the chain's semantics
    *[OpCase("softmax_xent_grad", fused.softmax_xent_grad,
             (F(4, 5, lo=-3, hi=3), I(4, hi=5), F(*s)), ref_xent_grad, name=f"scale{s[0]}")
      for s in ((4, 1), (1, 1))],
    *[OpCase("bias_act", lambda x, b, a=a: fused.bias_act(x, b, a), (F(3, 4, lo=-2, hi=2), F(4)),
             lambda x, b, a=a: REF_ACT[a](x + b), name=a) for a in REF_ACT],
    *[OpCase("bias_act_grad", lambda g, x, b, a=a: apply("bias_act_grad", g, x, b, act=a),
             (F(3, 4), F(3, 4, lo=-2, hi=2), F(4)),
             lambda g, x, b, a=a: g * ref_dact(a, x + b), name=a) for a in REF_ACT],
    *[OpCase("matmul_bias_act", lambda x, w, b, a=a: fused.matmul_bias_act(x, w, b, a),
             (F(3, 4, lo=-2, hi=2), F(4, 5), F(5)),
             lambda x, w, b, a=a: (x @ w + b) if a == "none" else REF_ACT[a](x @ w + b), name=a)
      for a in ("none", "relu", "gelu")],
    # an elementwise group as one node (runtime.native's rewrite): relu(x.T + b) and
    # exp(-(x.T + b)), both outputs raveled into one flat array; b a broadcast_to's operand
    OpCase("fused", lambda x, b: apply(
        "fused", x, b, steps=(("add", (0, 1), {}), ("relu", (2,), {}), ("neg", (2,), {}),
                              ("exp", (4,), {})),
        dtypes=("float64",) * 4, outputs=(1, 3), shape=(4, 3),
        views=(("transpose", (1, 0)), ("broadcast_to", (4, 3)))), (F(3, 4), F(3)),
        lambda x, b: np.concatenate([np.maximum(x.T + b, 0).ravel(), np.exp(-(x.T + b)).ravel()]),
        grad=False, extra={"f32": False}),       # attrs name the members' dtypes
    OpCase("fused", lambda x: apply(
        "fused", x, steps=(("tanh", (0,), {}),), dtypes=("float64",), outputs=(0,),
        shape=(2, 3), views=(None,)), (F(2, 3),), np.tanh, grad=False, name="one-output",
        extra={"f32": False}),
    # nn
    OpCase("im2col", lambda x: apply("im2col", x, **K3S2P1), (F(2, 2, 5, 4),),
           lambda x: ref_im2col(x, (3, 3), (2, 2), (1, 1))),
    OpCase("col2im", lambda c: apply("col2im", c, shape=(2, 2, 5, 4), **K3S2P1),
           (F(2, 2, 3, 3, 3, 2),),
           lambda c: ref_unwindow(c.transpose(0, 1, 4, 5, 2, 3), (2, 2, 5, 4), (3, 3), (2, 2),
                                  (1, 1))),
    # conv2d (groups 1) and its gradients as single ops (a library's calls: ops.nn)
    OpCase("conv_fprop", lambda x, w: apply("conv_fprop", x, w, stride=(2, 2), padding=(1, 1)),
           (F(2, 3, 5, 4), F(4, 3, 3, 3)),
           lambda x, w: ref_conv2d(x, w, s=(2, 2), p=(1, 1))),
    OpCase("conv_dgrad", lambda g, w: apply("conv_dgrad", g, w, shape=(2, 3, 5, 4),
                                            stride=(2, 2), padding=(1, 1)),
           (F(2, 4, 3, 2), F(4, 3, 3, 3)),
           lambda g, w: ref_unwindow(np.einsum("ocab,noij->ncijab", w, g), (2, 3, 5, 4),
                                     (3, 3), (2, 2), (1, 1))),
    OpCase("conv_wgrad", lambda x, g: apply("conv_wgrad", x, g, kernel=(3, 3), stride=(2, 2),
                                            padding=(1, 1)),
           (F(2, 3, 5, 4), F(2, 4, 3, 2)),
           lambda x, g: np.einsum("ncijab,noij->ocab", ref_windows(x, (3, 3), (2, 2), (1, 1)),
                                  g)),
    OpCase("conv2d", lambda x, w, b: nn.conv2d(x, w, b, padding=1),
           (F(2, 3, 4, 4), F(4, 3, 3, 3), F(4)), lambda x, w, b: ref_conv2d(x, w, b, p=(1, 1))),
    OpCase("conv2d", lambda x, w: nn.conv2d(x, w, stride=(2, 1)), (F(2, 2, 5, 4), F(3, 2, 2, 3)),
           lambda x, w: ref_conv2d(x, w, s=(2, 1)), name="stride-rect"),
    OpCase("conv2d", lambda x, w, b: nn.conv2d(x, w, b, padding=1, groups=2),
           (F(2, 4, 4, 3), F(6, 2, 3, 3), F(6)), lambda x, w, b: ref_group_conv2d(x, w, b, 2),
           name="groups"),
    OpCase("conv2d", lambda x, w: nn.conv2d(x, w, padding=1, groups=3),
           (F(1, 3, 4, 4), F(3, 1, 3, 3)), lambda x, w: ref_group_conv2d(x, w, None, 3),
           name="depthwise"),
    OpCase("embedding", lambda w, i: nn.embedding(i, w), (F(5, 3), I(2, 4, hi=5)),
           lambda w, i: w[i]),
    OpCase("embedding_grad", lambda g, i: apply("embedding_grad", g, i, num=5),
           (F(2, 4, 3), I(2, 4, hi=5)), ref_embedding_grad),
    OpCase("max_pool2d", lambda x: nn.max_pool2d(x, 2), (F(2, 2, 4, 4),),
           lambda x: ref_windows(x, (2, 2), (2, 2), (0, 0)).max((-2, -1))),
    OpCase("max_pool2d", lambda x: nn.max_pool2d(x, 3, 2, 1), (F(1, 2, 5, 4),),
           lambda x: ref_windows(x, (3, 3), (2, 2), (1, 1), -np.inf).max((-2, -1)),
           name="overlap-pad"),
    OpCase("max_pool2d_grad", lambda g, x: apply("max_pool2d_grad", g, x, **K3S2P1),
           (F(1, 2, 3, 2), F(1, 2, 5, 4)),
           lambda g, x: ref_max_pool_grad(g, x, (3, 3), (2, 2), (1, 1))),
    OpCase("max_pool2d_gather", lambda y, x: apply("max_pool2d_gather", y, x, **K2S1P0),
           (F(1, 2, 3, 3), F(1, 2, 3, 3)),
           lambda y, x: ref_max_pool_gather(y, x, (2, 2), (1, 1), (0, 0))),
    OpCase("avg_pool2d", lambda x: nn.avg_pool2d(x, 3, 2, 1), (F(2, 2, 5, 4),),
           lambda x: ref_windows(x, (3, 3), (2, 2), (1, 1)).mean((-2, -1))),
    OpCase("avg_pool2d_grad", lambda g: apply("avg_pool2d_grad", g, shape=(1, 2, 5, 4),
                                              **K3S2P1), (F(1, 2, 3, 2),),
           lambda g: ref_unwindow(np.broadcast_to(g[..., None, None] / 9, g.shape + (3, 3)),
                                  (1, 2, 5, 4), (3, 3), (2, 2), (1, 1))),
    OpCase("dropout_mask", lambda x: apply("dropout_mask", x, p=0.3, seed=7), (F(3, 5),),
           lambda x: ref_dropout_mask(x, 0.3, 7), grad=False),
    OpCase("dropout_mask", lambda x, s: apply("dropout_mask", x, s, p=0.5, seed=3),
           (F(2, 3), I(hi=100)), lambda x, s: ref_dropout_mask(x, 0.5, 3, int(s)), grad=False,
           name="salt"),
    OpCase("dropout", lambda x: nn.dropout(x, 0.3, seed=7), (F(3, 5),),
           lambda x: x * ref_dropout_mask(x, 0.3, 7)),
    OpCase("layer_norm", lambda x, w, b: nn.layer_norm(x, w, b, (2, 3)),
           (F(2, 2, 3), F(2, 3), F(2, 3)), lambda x, w, b: ref_layer_norm(x, w, b, 2)),
    _bn(True, 4), _bn(True, 2), _bn(False, 4), _bn(False, 2),
]


def _scatter_slice(g, index, shape):
    out = np.zeros(shape, g.dtype)
    out[index] = g
    return out


GRAD_CASES = [c for c in CASES if c.grad]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(case, xp):
    check_forward(case, "float64", xp)
    if case.extra.get("f32", True) and any(a.dtype == "float64" for a in case.args):
        check_forward(case, "float32", xp)
    if xp is not np:
        check_device(case, xp)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_grad(case):
    check_grad(case)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_jvp(case):
    check_jvp(case)


@pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.hvp], ids=lambda c: c.id)
def test_hvp(case):
    check_hvp(case)


# Ops whose kernels need a bound Communicator are checked by their owners' tests
# (tests/runtime, against the single-process communicator), not by this table.
ELSEWHERE = ("shardgrad.ops.collective",)


def test_every_registered_op_has_cases():
    """A new op must come with its test case: a forward check for every op, and a float64
    gradient check for every differentiable one."""
    ours = {n: d for n, d in REGISTRY.items() if d.forward.__module__ not in ELSEWHERE}
    forward = {c.op for c in CASES if c.ref is not None}
    grad = {c.op for c in GRAD_CASES}
    missing_fwd = sorted(set(ours) - forward)
    missing_grad = sorted(n for n, d in ours.items() if d.vjp is not None and n not in grad)
    assert not missing_fwd, f"ops without a forward check: {missing_fwd}"
    assert not missing_grad, f"differentiable ops without a gradient check: {missing_grad}"
