"""Functional forms of the layers (``sg.nn.functional``), on Tensors, eager or traced.

Each is a thin call into an op builder through ``graph.tensor.apply``, or a composite of them
(the losses, silu, leaky_relu, group_norm, adaptive pooling, attention), so its gradient is
the primitives' by the chain rule. Imports graph.ir, graph.tensor and ops.
"""

from __future__ import annotations

import math

import numpy as np

from shardgrad import ops
from shardgrad.graph.ir import ShapeError
from shardgrad.graph.tensor import Tensor, apply, default_generator, rng_salt, tensor
from shardgrad.ops import elementwise as E

GELU_APPROXIMATIONS = ("none", "tanh")


def relu(x: Tensor) -> Tensor:
    return apply(E.relu, x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x Phi(x), as torch: exact, through erf (``approximate="none"``), or the tanh
    approximation (``"tanh"``, one op with its own derivative)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return apply(E.gelu if approximate == "tanh" else E.gelu_erf, x)


def tanh(x: Tensor) -> Tensor:
    return apply(E.tanh, x)


def sigmoid(x: Tensor) -> Tensor:
    return apply(E.sigmoid, x)


def silu(x: Tensor) -> Tensor:
    """x sigmoid(x) (swish), a composite: d = (s + x s (1 - s)) dx by the chain rule."""
    return x * x.sigmoid()


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """x where x > 0, else negative_slope * x (at 0 the slope, as torch's backward)."""
    return x.where(x > 0, x * negative_slope)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, with W of shape (out_features, in_features) as in PyTorch."""
    out = x @ weight.T
    return out if bias is None else out + bias


def softmax(x: Tensor, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return x.softmax(axis, dim=dim)


def log_softmax(x: Tensor, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return x.log_softmax(axis, dim=dim)


IGNORE_INDEX = -100        # torch's default ignore_index


def cross_entropy(logits: Tensor, labels, weight=None, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C) or (N, C, d1, ...) against integer
    ``labels`` (N,) or (N, d1, ...), or class probabilities of the logits' shape, as torch:
    per-class ``weight`` (a weighted mean divides by the picked weights), labels equal to
    ``ignore_index`` add nothing (torch's default -100), and ``label_smoothing`` e takes
    (1 - e) one-hot + e / C as the target. The plain case is the fused ``cross_entropy``
    op; weights, ignored labels and probabilities are a composite of log_softmax."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits, labels, shape = _classes_last(logits, labels, "cross_entropy")
    if _is_float_target(labels):
        return _unflatten(_soft_cross_entropy(logits, labels, weight, reduction,
                                              label_smoothing), reduction, shape)
    if weight is None and not _ignores(labels, ignore_index):
        loss = apply(ops.loss.cross_entropy, logits, labels, reduction=reduction)
        if not label_smoothing:
            return _unflatten(loss, reduction, shape)
        uniform = -logits.log_softmax(-1).mean(axis=-1)
        return _unflatten(loss * (1.0 - label_smoothing) + _reduced(
            uniform, reduction, "cross_entropy") * label_smoothing, reduction, shape)
    logp = logits.log_softmax(-1)
    loss, picked_w = _weighted_nll(logp, labels, weight, ignore_index)
    if label_smoothing:
        c = logits.shape[-1]
        smooth = -(logp if weight is None else logp * _as_tensor(weight, logp)).sum(axis=-1)
        smooth = smooth * (labels != ignore_index).astype(logp.dtype)
        loss = loss * (1.0 - label_smoothing) + smooth * (label_smoothing / c)
    if reduction == "mean":
        return loss.sum() / picked_w.sum()
    return _unflatten(_reduced(loss, reduction, "cross_entropy"), reduction, shape)


def _classes_last(logits: Tensor, labels, name: str):
    """(rows, C) logits, (rows,) labels (or (rows, C) probabilities) and the shape "none"
    gives the rows back in: a loss over (N, C, d1, ...) is the loss over N * d1 * ... rows
    of C classes, kept as (N, d1, ...)."""
    if not isinstance(labels, Tensor):
        labels = tensor(np.asarray(labels))
    if logits.ndim <= 2:
        return logits, labels, None
    n, c, rest = logits.shape[0], logits.shape[1], logits.shape[2:]
    perm = (0,) + tuple(range(2, logits.ndim)) + (1,)
    rows = logits.permute(perm).reshape(-1, c)
    if _is_float_target(labels) and labels.shape == logits.shape:
        return rows, labels.permute(perm).reshape(-1, c), (n,) + rest
    if labels.shape != (n,) + rest:
        raise ShapeError(f"{name}: logits {logits.shape} need labels {(n,) + rest}, got "
                         f"{labels.shape}")
    return rows, labels.reshape(-1), (n,) + rest


def _unflatten(loss: Tensor, reduction: str, shape) -> Tensor:
    return loss.reshape(shape) if reduction == "none" and shape is not None else loss


def _is_float_target(labels) -> bool:
    return np.dtype(labels.dtype).kind == "f"


def _ignores(labels: Tensor, ignore_index: int) -> bool:
    """Whether some label is ``ignore_index``: read from an eager CPU tensor; traced or GPU
    labels take the composite unless ignore_index is torch's default (the fused op refuses
    such a label, naming it: pass ignore_index=-100 to have it ignored there)."""
    if labels.is_symbolic or labels.is_cuda:       # (not a copy to the host each step)
        return ignore_index != IGNORE_INDEX
    return bool(np.any(labels.data == ignore_index))


def _as_tensor(v, like: Tensor) -> Tensor:
    if isinstance(v, str):          # reduction passed where torch's order has weight
        raise TypeError(f"weight must be a tensor of class weights, got {v!r}: pass "
                        f"reduction={v!r} by name (torch's order is input, target, weight, ...)")
    v = v if isinstance(v, Tensor) else tensor(np.asarray(v, like.dtype))
    return v if v.dtype == like.dtype else v.astype(like.dtype)


def _weighted_nll(logp: Tensor, labels: Tensor, weight, ignore_index: int):
    """Per-row -w[y] logp[y] (0 where y == ignore_index) and the rows' weights w[y] (0 there),
    for log-probabilities (N, C) and labels (N,)."""
    n, c = logp.shape
    if labels.shape != (n,):
        raise ShapeError(f"needs log-probabilities (N, C) and labels (N,), got {logp.shape} "
                         f"and {labels.shape}")
    keep = labels != ignore_index
    safe = apply(E.where, keep, labels, 0)
    picked = logp.gather(1, safe.reshape(n, 1)).reshape(n)
    w = keep.astype(logp.dtype)
    if weight is not None:
        weight = _as_tensor(weight, logp)
        if weight.shape != (c,):
            raise ShapeError(f"weight must have one entry per class ({c},), got {weight.shape}")
        w = weight[safe] * w
    return -picked * w, w


def _soft_cross_entropy(logits, target, weight, reduction, label_smoothing):
    """Cross-entropy against class probabilities (torch: a float target of the logits'
    shape); the mean is over rows, weights or not."""
    if target.shape != logits.shape:
        raise ShapeError(f"cross_entropy with probabilities: target {target.shape} must have "
                         f"the logits' shape {logits.shape}")
    target = _as_tensor(target, logits)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    logp = logits.log_softmax(-1)
    if weight is not None:
        logp = logp * _as_tensor(weight, logp)
    return _reduced(-(logp * target).sum(axis=-1), reduction, "cross_entropy")


def _reduced(loss: Tensor, reduction: str, name: str) -> Tensor:
    if reduction not in ops.loss.REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {ops.loss.REDUCTIONS}, not "
                         f"{reduction!r}")
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def mse_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:  # noqa: A002 - torch's
    """(input - target)^2 averaged over every element (or summed, or kept), as
    torch.nn.functional.mse_loss; the shapes must broadcast."""
    d = input - target
    return _reduced(d * d, reduction, "mse_loss")


def nll_loss(log_probs: Tensor, labels, weight=None, ignore_index: int = IGNORE_INDEX,
             reduction: str = "mean") -> Tensor:
    """-weight[y] log_probs[i, y] for log-probabilities (N, C) (or (N, C, d1, ...)) and
    integer labels y, as torch.nn.functional.nll_loss: labels equal to ``ignore_index`` add
    nothing, the mean divides by the picked weights; nll_loss(log_softmax(z), y) ==
    cross_entropy(z, y)."""
    if log_probs.ndim < 2:
        raise ShapeError(f"nll_loss needs log-probabilities (N, C) and labels (N,), got "
                         f"{log_probs.shape}")
    log_probs, labels, shape = _classes_last(log_probs, labels, "nll_loss")
    if labels.shape != log_probs.shape[:1]:
        raise ShapeError(f"nll_loss needs log-probabilities (N, C) and labels (N,), got "
                         f"{log_probs.shape} and {labels.shape}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise ShapeError(f"nll_loss: indices must be integers, got labels of {labels.dtype}")
    loss, w = _weighted_nll(log_probs, labels, weight, ignore_index)
    if reduction == "mean":
        return loss.sum() / w.sum()
    return _unflatten(_reduced(loss, reduction, "nll_loss"), reduction, shape)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1):
    """torch.nn.functional.conv2d (its argument order). A ``dilation`` d > 1 convolves with
    the kernel spread out by d (zeros between its taps: getitem's adjoint writes it, so the
    weight's gradient is read back from those taps)."""
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if min(dh, dw) < 1:
        raise ValueError(f"conv2d: dilation must be positive, got {dilation}")
    if (dh, dw) != (1, 1):
        o, c, kh, kw = weight.shape
        shape = (o, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        index = (("s", 0, o, 1), ("s", 0, c, 1), ("s", 0, shape[2], dh), ("s", 0, shape[3], dw))
        weight = apply(ops.shape.getitem_grad, weight, index, shape)
    return apply(ops.nn.conv2d, x, weight, bias, stride=stride, padding=padding, groups=groups)


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
           padding: int = 0, dilation: int = 1, groups: int = 1):
    """x (N, C, L) with weight (O, C/groups, K): conv2d over a height-1 image."""
    if x.ndim != 3 or weight.ndim != 3:
        raise ShapeError(f"conv1d needs x (N, C, L) and weight (O, C, K), got {x.shape} and "
                         f"{weight.shape}")
    out = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, stride=(1, int(stride)),
                 padding=(0, int(padding)), dilation=(1, int(dilation)), groups=groups)
    return out.squeeze(2)


def embedding(input, weight: Tensor) -> Tensor:  # noqa: A002 - torch's name
    """Rows of ``weight`` (num_embeddings, dim) at the integer ``input``: input.shape + (dim,)."""
    return apply(ops.nn.embedding, input, weight)


def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    """Mean over torch's adaptive bins: output cell i covers [floor(i H / oh), ceil((i+1) H /
    oh)); an even split is one avg_pool2d, otherwise a mean per bin."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    if x.ndim != 4:
        raise ShapeError(f"adaptive_avg_pool2d needs (N, C, H, W), got {x.shape}")
    h, w = x.shape[2:]
    oh, ow = h if oh is None else int(oh), w if ow is None else int(ow)
    if h % oh == 0 and w % ow == 0:
        return x if (oh, ow) == (h, w) else avg_pool2d(x, (h // oh, w // ow))

    def bins(t, axis, n, size):
        parts = [t[(slice(None),) * axis + (slice(i * size // n, -(-(i + 1) * size // n)),)]
                 .mean(axis, keepdims=True) for i in range(n)]
        return parts[0] if n == 1 else apply(ops.shape.concat, parts, axis=axis)
    return bins(bins(x, 2, oh, h), 3, ow, w)


def group_norm(x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Normalise each of ``num_groups`` channel groups of x (N, C, ...) over its channels and
    positions, then scale and shift per channel (torch.nn.functional.group_norm)."""
    n, c = x.shape[:2]
    if c % num_groups:
        raise ShapeError(f"group_norm: {num_groups} groups do not divide {c} channels")
    out = layer_norm(x.reshape(n, num_groups, -1), (x.size // max(n * num_groups, 1),),
                     eps=eps).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    out = out if weight is None else out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def binary_cross_entropy_with_logits(input: Tensor, target, weight=None,  # noqa: A002
                                     reduction: str = "mean", pos_weight=None) -> Tensor:
    """-[p y log s(x) + (1 - y) log(1 - s(x))] per element, computed stably as
    (1 - y) x + (1 + (p - 1) y) (log(1 + e^-|x|) + max(-x, 0)), as torch's; the targets may be
    any probabilities (binary or multi-label), ``pos_weight`` p broadcasts over the classes."""
    target = target if isinstance(target, Tensor) else tensor(np.asarray(target, input.dtype))
    if target.shape != input.shape:
        raise ShapeError(f"binary_cross_entropy_with_logits: target {target.shape} must have "
                         f"the input's shape {input.shape}")
    soft = (1.0 + (-input.abs()).exp()).log() + (-input).relu()
    lw = soft if pos_weight is None else (1.0 + (pos_weight - 1.0) * target) * soft
    loss = (1.0 - target) * input + lw
    return _reduced(loss if weight is None else loss * weight, reduction,
                    "binary_cross_entropy_with_logits")


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 training: bool = True, seed: int = 0, salt=None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over the last two dims, as torch's: a bool mask is
    True where attention is allowed, a float mask is added to the scores."""
    weights = attention_weights(q, k, attn_mask, is_causal)
    return dropout(weights, dropout_p, training, seed, salt) @ v


def attention_weights(q: Tensor, k: Tensor, attn_mask=None, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) (see scaled_dot_product_attention); a row with every
    position masked gives NaN, as torch's."""
    scores = (q @ k.transpose(tuple(range(k.ndim - 2)) + (k.ndim - 1, k.ndim - 2))) * (
        1.0 / float(np.sqrt(q.shape[-1])))
    if is_causal:
        attn_mask = np.tril(np.ones((q.shape[-2], k.shape[-2]), bool))
    if attn_mask is not None:
        if str(getattr(attn_mask, "dtype", "")) == "bool":
            scores = scores.masked_fill(attn_mask == False, float("-inf"))  # noqa: E712
        else:
            scores = scores + attn_mask
    return scores.softmax(-1)


def _ceil_extra(x: Tensor, kernel_size, stride, padding) -> tuple[int, int]:
    """The rows and columns ceil_mode adds at the bottom and right: torch's output size
    ceil((n + 2p - k) / s) + 1, less one if the last window would start in the padding."""
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    k, p = pair(kernel_size), pair(padding)
    s = pair(stride if stride is not None else kernel_size)
    extra = []
    for n, ki, si, pi in zip(x.shape[-2:], k, s, p, strict=True):
        out = -(-(n + 2 * pi - ki) // si) + 1
        if (out - 1) * si >= n + pi:
            out -= 1
        extra.append(max((out - 1) * si + ki - (n + 2 * pi), 0))
    return extra[0], extra[1]


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0,
               ceil_mode: bool = False) -> Tensor:
    if ceil_mode:            # the extra bottom/right cells are -inf: never the maximum
        eh, ew = _ceil_extra(x, kernel_size, stride, padding)
        x = pad(x, (0, ew, 0, eh), value=float("-inf"))
    return apply(ops.nn.max_pool2d, x, kernel_size, stride=stride, padding=padding)


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> Tensor:
    """The window means, as torch: ``count_include_pad=False`` divides by the window's cells
    inside the input (a mean of ones over the same windows counts them); ceil_mode's extra
    cells are never counted."""
    eh = ew = 0
    if ceil_mode:
        eh, ew = _ceil_extra(x, kernel_size, stride, padding)
        x = pad(x, (0, ew, 0, eh))
    out = apply(ops.nn.avg_pool2d, x, kernel_size, stride=stride, padding=padding)
    if count_include_pad and not (eh or ew):
        return out
    h, w = x.shape[-2] - eh, x.shape[-1] - ew
    if count_include_pad:      # the padding counts, the ceil cells past it do not (torch's)
        ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
        counted = np.zeros((h + eh + 2 * ph, w + ew + 2 * pw), x.dtype)
        counted[:h + 2 * ph, :w + 2 * pw] = 1
        cover = apply(ops.nn.avg_pool2d, tensor(counted[None, None]), kernel_size,
                      stride=stride, padding=0)
    else:
        counted = np.zeros(x.shape[-2:], x.dtype)
        counted[:h, :w] = 1
        cover = apply(ops.nn.avg_pool2d, tensor(counted[None, None]), kernel_size,
                      stride=stride, padding=padding)
    return out / cover


def dropout(x: Tensor, p: float = 0.5, training: bool = True, seed: int | None = None,
            salt: Tensor | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); the mask is a
    function of (seed, salt, element index), identical on every device. Without a seed each
    call draws one from the manual_seed generator (a fixed seed gave every eager call, and
    every step of a compiled one, the same mask); traced, the step counter is the salt."""
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = int(default_generator().integers(2 ** 31))
    if salt is None:
        salt = rng_salt()
    return apply(ops.nn.dropout, x, p=p, seed=seed, salt=salt)


def layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Normalise over the trailing ``normalized_shape`` dims (an int or a tuple, as torch)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    return apply(ops.nn.layer_norm, x, weight, bias, normalized_shape=tuple(shape), eps=eps)


# ---- torch's other common functions: composites of the primitives above --------------------

def pad(x: Tensor, pad: tuple, mode: str = "constant", value: float = 0.0) -> Tensor:
    """Pad (or, negative, crop) the last len(pad) // 2 dims by (left, right, top, bottom, ...)
    with ``value``, as torch.nn.functional.pad (constant mode)."""
    if mode != "constant":
        raise NotImplementedError(f"pad: mode={mode!r} (only 'constant')")
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ShapeError(f"pad: {tuple(pad)} needs pairs for at most {x.ndim} dims")
    for i in range(len(pad) // 2):
        d = x.ndim - 1 - i
        before, after = int(pad[2 * i]), int(pad[2 * i + 1])
        index = [slice(None)] * x.ndim
        index[d] = slice(max(-before, 0), x.shape[d] - max(-after, 0))
        x = x[tuple(index)] if min(before, after) < 0 else x
        parts = [x]
        for n, at in ((before, 0), (after, 1)):
            if n > 0:
                shape = x.shape[:d] + (n,) + x.shape[d + 1:]
                block = tensor(np.full(shape, value, x.dtype))
                parts.insert(at * len(parts), block)
        x = apply(ops.shape.concat, parts, axis=d) if len(parts) > 1 else x
    return x


def one_hot(labels, num_classes: int = -1) -> Tensor:
    """int64 (..., num_classes) with a 1 at each label (num_classes -1: the largest + 1)."""
    labels = labels if isinstance(labels, Tensor) else tensor(np.asarray(labels))
    if num_classes < 0:
        num_classes = int(labels.max()) + 1
    return apply(ops.shape.onehot, labels, num_classes, "int64")


def normalize(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """x / max(||x||_p over dim, eps), as torch.nn.functional.normalize."""
    return x / x.norm(p, dim=dim, keepdim=True).clamp(min=eps)


def l1_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:  # noqa: A002
    return _reduced((input - target).abs(), reduction, "l1_loss")


def smooth_l1_loss(input: Tensor, target, reduction: str = "mean",  # noqa: A002
                   beta: float = 1.0) -> Tensor:
    """0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta (torch's)."""
    a = (input - target).abs()
    if beta == 0:
        return _reduced(a, reduction, "smooth_l1_loss")
    return _reduced(a.where(a >= beta, a * a * (0.5 / beta)) - (a >= beta).astype(a.dtype)
                    * (0.5 * beta), reduction, "smooth_l1_loss")


def huber_loss(input: Tensor, target, reduction: str = "mean",  # noqa: A002
               delta: float = 1.0) -> Tensor:
    """0.5 d^2 where |d| <= delta, else delta (|d| - 0.5 delta) (torch's)."""
    a = (input - target).abs()
    return _reduced((a * a * 0.5).where(a <= delta, (a - 0.5 * delta) * delta), reduction,
                    "huber_loss")


def binary_cross_entropy(input: Tensor, target, weight=None,  # noqa: A002 - torch's name
                         reduction: str = "mean") -> Tensor:
    """-(y log p + (1 - y) log(1 - p)) for probabilities p, each log clamped at -100 (as
    torch's, so p = 0 or 1 gives a finite loss)."""
    target = _as_tensor(target, input)
    # log(max(p, e^-100)): the clamp before the log, so p = 0 gives no 0 * inf in the
    # gradient (torch's own backward divides by max(p (1 - p), 1e-12) there instead)
    tiny = math.exp(-100.0)
    loss = -(target * input.clamp(min=tiny).log()
             + (1.0 - target) * (1.0 - input).clamp(min=tiny).log())
    if weight is not None:
        loss = loss * _as_tensor(weight, input)
    return _reduced(loss, reduction, "binary_cross_entropy")


def softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + e^(beta x)) / beta, x itself where beta x > threshold (torch's). Each branch
    of the where exponentiates a non-positive number only (no overflow, so no 0 * inf in the
    gradient of the branch not taken)."""
    bx = x * beta
    up = bx.clamp(min=0.0)
    pos = up + (1.0 + (-up).exp()).log()                         # bx > 0
    neg = (1.0 + bx.clamp(max=0.0).exp()).log()                  # bx <= 0
    return x.where(bx > threshold, pos.where(bx > 0, neg) * (1.0 / beta))


def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    """x where x > 0, else alpha (e^x - 1) (e^ of min(x, 0): no overflow in the other branch)."""
    return x.where(x > 0, (x.clamp(max=0.0).exp() - 1.0) * alpha)


def relu6(x: Tensor) -> Tensor:
    return hardtanh(x, 0.0, 6.0)


def hardtanh(x: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    """x limited to [min_val, max_val]; unlike clamp, no gradient at the bounds (torch's)."""
    inner = (x > min_val).where(x < max_val, False)
    return x.where(inner, x.clamp(min_val, max_val).detach())


def logsigmoid(x: Tensor) -> Tensor:
    return -softplus(-x)


def mish(x: Tensor) -> Tensor:
    return x * softplus(x).tanh()
