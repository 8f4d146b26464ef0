"""shardgrad: one graph IR for the whole training step, run locally, over MPI or on Ray.

``import shardgrad as sg``: tensors and ops (``sg.tensor``, ``sg.no_grad``), layers
(``sg.nn``), optimizers and LR schedules (``sg.optim``, ``sg.optim.lr_scheduler``), data
loading (``sg.utils.data``), ``sg.compile_step``, ``sg.save`` / ``sg.load`` and, for scripts
run under mpirun, ``sg.distributed``. The subpackages are graph/, ops/, partition/, runtime/
and cluster/ (see DESIGN.md).
"""

import builtins as _builtins  # this module defines torch's bool, sum, max, min, pow
import sys as _sys
import types as _types

import numpy as _np

from shardgrad import ops as _ops
from shardgrad.graph import lr_scheduler, nn, optim
from shardgrad.graph.ir import Graph, Node, ShapeError
from shardgrad.graph.nn import functional
from shardgrad.graph.tensor import (
    Tensor,
    arange,
    full,
    get_default_dtype,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    set_default_dtype,
    set_grad_enabled,
    stack,
    tensor,
    zeros,
    zeros_like,
)
from shardgrad.graph.tensor import apply as _apply
from shardgrad.graph.tensor import join_axis as _join_axis
from shardgrad.runtime import device as _device
from shardgrad.runtime import distributed
from shardgrad.runtime import loader as _loader
from shardgrad.runtime.interpreter import ExecutionError
from shardgrad.runtime.native import get_num_threads, set_num_threads
from shardgrad.runtime.serialize import load, save
from shardgrad.runtime.step import Predictor, accuracy, compile_step

_device.keep_freed_memory()        # eager steps' arrays reuse freed heap memory (see there)

# `import shardgrad.nn.functional as F` and `from shardgrad.optim import SGD` work as in torch.
_sys.modules[__name__ + ".nn"] = nn
_sys.modules[__name__ + ".nn.functional"] = functional
_sys.modules[__name__ + ".nn.init"] = nn.init
optim.lr_scheduler = lr_scheduler
_sys.modules[__name__ + ".optim"] = optim
_sys.modules[__name__ + ".optim.lr_scheduler"] = lr_scheduler
_sys.modules[__name__ + ".distributed"] = distributed
utils = _types.ModuleType(__name__ + ".utils", "As torch.utils: ``utils.data`` (TensorDataset, "
                          "DataLoader).")
utils.data = _loader
_sys.modules[__name__ + ".utils"] = utils
_sys.modules[__name__ + ".utils.data"] = _loader


def _elementwise(name):
    def fn(x):
        return getattr(x, name)() if isinstance(x, Tensor) else getattr(tensor(x), name)()
    fn.__name__ = name
    return fn


exp, log, sqrt, tanh, sigmoid, relu, sin, cos, abs = (  # noqa: A001 - torch's names
    _elementwise(n) for n in ("exp", "log", "sqrt", "tanh", "sigmoid", "relu", "sin", "cos",
                              "abs"))


def concat(tensors, axis: int = 0, *, dim: int | None = None) -> Tensor:
    """Join tensors along ``axis`` (NumPy's concatenate, torch.cat with ``dim=``)."""
    return _apply(_ops.shape.concat, list(tensors), axis=_join_axis("concat", axis, dim))


def where(condition, x, y) -> Tensor:
    return _apply(_ops.elementwise.where, condition, x, y)


def maximum(x, y) -> Tensor:
    return _apply(_ops.elementwise.maximum, x, y)


def minimum(x, y) -> Tensor:
    return _apply(_ops.elementwise.minimum, x, y)


def matmul(x, y) -> Tensor:
    return _apply(_ops.linalg.matmul, x, y)


cat = concat

# torch's dtype names (a Tensor's dtype is its NumPy name, so ``x.dtype == sg.float32``)
float16 = half = "float16"
float32 = "float32"
float64 = double = "float64"
int8, int16, int32, int64, uint8 = "int8", "int16", "int32", "int64", "uint8"
long = "int64"
bool = "bool"  # noqa: A001 - torch's name


def _method(name: str):
    def fn(x, *args, **kwargs):
        return getattr(x if isinstance(x, Tensor) else tensor(x), name)(*args, **kwargs)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``x.{name}(...)`` as a function, as torch.{name}."
    return fn


# torch's function forms of Tensor methods (torch.sum(x, dim=1) is x.sum(dim=1))
(sum, mean, argmax, argmin, topk, sort, chunk, split, unsqueeze, squeeze,  # noqa: A001
 permute, reshape, gather, cumsum, log_softmax, norm, tril, triu, logsumexp, var, std, sign,
 square, rsqrt, log1p, isnan, isfinite, erf, flip, numel, amax, amin, unbind,
 index_select, narrow, masked_select, nonzero, clone, t) = (_method(n) for n in (
    "sum", "mean", "argmax", "argmin", "topk", "sort", "chunk", "split", "unsqueeze",
    "squeeze", "permute", "reshape", "gather", "cumsum", "log_softmax", "norm", "tril",
    "triu", "logsumexp", "var", "std", "sign", "square", "rsqrt", "log1p", "isnan",
    "isfinite", "erf", "flip", "numel", "amax", "amin", "unbind", "index_select", "narrow",
    "masked_select", "nonzero", "clone", "t"))
max, min, transpose = _method("max"), _method("min"), _method("transpose")  # noqa: A001
mm = bmm = matmul


def pow(x, y) -> Tensor:  # noqa: A001 - torch's name
    return (x if isinstance(x, Tensor) else tensor(x)) ** y


def outer(x, y) -> Tensor:
    return x.reshape(-1, 1) * y.reshape(1, -1)


def is_tensor(x) -> bool:
    return isinstance(x, Tensor)


def allclose(x, y, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> bool:
    return _builtins.bool(_np.allclose(_np.asarray(x), _np.asarray(y), rtol, atol, equal_nan))


def equal(x, y) -> bool:
    """Same shape and elements (torch.equal)."""
    return _np.asarray(x).shape == _np.asarray(y).shape and _builtins.bool(
        _np.array_equal(_np.asarray(x), _np.asarray(y)))


def enable_grad():
    return set_grad_enabled(True)


inference_mode = no_grad


def from_numpy(a) -> Tensor:
    """A tensor of ``a``'s values and dtype (a copy: shardgrad never aliases your arrays)."""
    return tensor(a)


def eye(n: int, m: int | None = None, dtype=None, device=None) -> Tensor:
    return tensor(_np.eye(n, m, dtype=dtype or get_default_dtype()), device=device)


def linspace(start, end, steps: int, dtype=None, device=None) -> Tensor:
    return tensor(_np.linspace(start, end, steps, dtype=dtype or get_default_dtype()),
                  device=device)


def full_like(t: Tensor, fill_value, dtype=None, device=None) -> Tensor:
    return full(t.shape, fill_value, dtype or t.dtype, device or t.device)


def randn_like(t: Tensor, dtype=None, device=None) -> Tensor:
    return randn(*t.shape, dtype=dtype or t.dtype, device=device or t.device)


def rand_like(t: Tensor, dtype=None, device=None) -> Tensor:
    return rand(*t.shape, dtype=dtype or t.dtype, device=device or t.device)


def clamp(x: Tensor, min=None, max=None) -> Tensor:  # noqa: A002 - torch's names
    return x.clamp(min, max)


def softmax(x: Tensor, dim: int) -> Tensor:
    return x.softmax(dim=dim)


def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    return x.flatten(start_dim, end_dim)

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "zeros", "ones", "full", "zeros_like", "ones_like", "arange",
           "randn", "rand", "randint", "stack", "no_grad", "is_grad_enabled", "nn", "optim",
           "distributed", "utils", "save", "load",
           "functional", "compile_step", "Predictor", "accuracy", "manual_seed",
           "set_default_dtype", "get_default_dtype", "Graph", "Node", "ShapeError",
           "ExecutionError", "exp", "log", "sqrt", "tanh", "sigmoid", "relu", "sin", "cos", "abs",
           "concat", "cat",
           "where", "maximum", "minimum", "matmul", "float16", "half", "float32", "float64",
           "double", "int8", "int16", "int32", "int64", "uint8", "long", "bool", "from_numpy",
           "eye", "linspace", "full_like", "randn_like", "rand_like", "clamp", "softmax",
           "flatten", "mm", "bmm", "pow", "outer", "is_tensor", "allclose", "equal",
           "set_grad_enabled", "enable_grad", "inference_mode", "sum", "mean", "max", "min",
           "argmax", "argmin", "topk", "sort", "chunk", "split", "unsqueeze", "squeeze",
           "permute", "reshape", "gather", "cumsum", "log_softmax", "norm", "tril", "triu",
           "logsumexp", "var", "std", "sign", "square", "rsqrt", "log1p", "isnan", "isfinite",
           "erf", "flip", "numel", "amax", "amin", "unbind", "index_select", "narrow",
           "masked_select", "nonzero", "clone", "t", "transpose", "get_num_threads",
           "set_num_threads"]
