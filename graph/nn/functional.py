"""Functional forms of the layers (``sg.nn.functional``), on Tensors, eager or traced.

Each is a thin call into an op builder through ``graph.tensor.apply`` (the losses mse_loss
and nll_loss are composites of them). Imports graph.ir, graph.tensor and ops.
"""

from __future__ import annotations

import numpy as np

from shardgrad import ops
from shardgrad.graph.ir import ShapeError
from shardgrad.graph.tensor import Tensor, apply
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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, with W of shape (out_features, in_features) as in PyTorch."""
    out = x @ weight.T
    return out if bias is None else out + bias


def softmax(x: Tensor, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return x.softmax(axis, dim=dim)


def log_softmax(x: Tensor, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return x.log_softmax(axis, dim=dim)


def cross_entropy(logits: Tensor, labels, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,); with
    ``label_smoothing`` e, against (1 - e) one-hot + e / C, as torch: (1 - e) nll + e mean_c
    (-log p_c)."""
    loss = apply(ops.loss.cross_entropy, logits, labels, reduction=reduction)
    if not label_smoothing:
        return loss
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    uniform = -logits.log_softmax(-1).mean(axis=-1)
    if reduction == "mean":
        uniform = uniform.mean()
    elif reduction == "sum":
        uniform = uniform.sum()
    return loss * (1.0 - label_smoothing) + uniform * label_smoothing


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


def nll_loss(log_probs: Tensor, labels, reduction: str = "mean") -> Tensor:
    """-log_probs[i, labels[i]] for log-probabilities (N, C) and integer labels (N,), as
    torch.nn.functional.nll_loss: nll_loss(log_softmax(z), y) == cross_entropy(z, y)."""
    n = log_probs.shape[0] if log_probs.ndim else 0
    shape = labels.shape if isinstance(labels, Tensor) else np.shape(labels)
    if log_probs.ndim != 2 or tuple(shape) != (n,):
        raise ShapeError(f"nll_loss needs log-probabilities (N, C) and labels (N,), got "
                         f"{log_probs.shape} and {tuple(shape)}")
    column = apply(ops.shape.reshape, labels, (n, 1))
    picked = apply(ops.shape.gather, log_probs, column, axis=1)
    return _reduced(-picked.reshape(n), reduction, "nll_loss")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0):
    return apply(ops.nn.conv2d, x, weight, bias, stride=stride, padding=padding)


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return apply(ops.nn.max_pool2d, x, kernel_size, stride=stride, padding=padding)


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return apply(ops.nn.avg_pool2d, x, kernel_size, stride=stride, padding=padding)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, seed: int = 0,
            salt: Tensor | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); the mask is a
    function of (seed, salt, element index), identical on every device."""
    if not training or p == 0.0:
        return x
    return apply(ops.nn.dropout, x, p=p, seed=seed, salt=salt)


def layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Normalise over the trailing ``normalized_shape`` dims (an int or a tuple, as torch)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    return apply(ops.nn.layer_norm, x, weight, bias, normalized_shape=tuple(shape), eps=eps)
