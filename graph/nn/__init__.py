"""PyTorch-like modules (``sg.nn``): Module, Linear, Conv2d, pooling, activations, norms.

Modules hold Parameters (leaf tensors that require grad) and buffers (tensors updated
without gradient, e.g. BatchNorm's running statistics). Imports graph.tensor and ops.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from shardgrad import ops
from shardgrad.graph.device import CPU, Device, to_device
from shardgrad.graph.ir import ShapeError
from shardgrad.graph.nn import functional
from shardgrad.graph.nn import functional as F
from shardgrad.graph.tensor import Tensor, apply, get_default_dtype, rng_salt, tensor

_rng = [np.random.default_rng(0)]


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (and nothing else: data order has its own seed)."""
    _rng[0] = np.random.default_rng(seed)


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates."""

    __slots__ = ()

    def __init__(self, data):
        t = tensor(data, requires_grad=True)
        super().__init__(t.node, requires_grad=True)
        self._set_leaf(t.data)


def _uniform(shape, bound: float) -> Parameter:
    return Parameter(_rng[0].uniform(-bound, bound, size=shape).astype(get_default_dtype()))


class Module:
    """Base class of all layers, as torch.nn.Module: assign Parameters, buffers and
    sub-modules as attributes; override ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__()")
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        for table in ("_parameters", "_modules", "_buffers"):
            d = self.__dict__.get(table)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name: str, value) -> None:
        self._buffers[name] = value if isinstance(value, Tensor) else tensor(value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for prefix, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device) -> Module:
        """Move every parameter and buffer to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``)
        in place, as torch.nn.Module.to: the Parameter objects stay the same, so an optimizer
        made before keeps its parameters (its state follows them on its next step)."""
        for t in [*self.parameters(), *(b for _, b in self.named_buffers())]:
            t._set_leaf(to_device(t.data, device))
        return self

    def cuda(self, index: int | None = None) -> Module:
        return self.to(Device("cuda", index))

    def cpu(self) -> Module:
        return self.to(CPU)

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Parameters and buffers as NumPy arrays (copies, from the GPU too), by dotted name."""
        out = OrderedDict((k, p.numpy().copy()) for k, p in self.named_parameters())
        out.update((k, b.numpy().copy()) for k, b in self.named_buffers())
        return out

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays into parameters and buffers. With ``strict`` every key must match; a
        mismatch names the missing, unexpected and mis-shaped keys."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shaped = sorted(f"{k}: expected {own[k].shape}, got {tuple(np.shape(state[k]))}"
                        for k in set(own) & set(state)
                        if tuple(np.shape(state[k])) != own[k].shape)
        if shaped or (strict and (missing or unexpected)):
            parts = [f"missing keys {missing}" if missing else "",
                     f"unexpected keys {unexpected}" if unexpected else "",
                     f"mis-shaped keys [{'; '.join(shaped)}]" if shaped else ""]
            raise KeyError(f"load_state_dict for {type(self).__name__}: "
                           + ", ".join(p for p in parts if p))
        for k in set(own) & set(state):
            own[k].data = state[k]     # copied onto the device the tensor lives on

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({k}): " + repr(m).replace("\n", "\n  ")
                        for k, m in self._modules.items())
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features); PyTorch's default init,
    U(-1/sqrt(in), 1/sqrt(in)) for both W and b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform((out_features, in_features), bound)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Linear({self.in_features}, {self.out_features}) got input of "
                             f"shape {x.shape}: last dimension must be {self.in_features}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | np.integer) else tuple(int(a) for a in v)


class Conv2d(Module):
    """2-d convolution over NCHW input; weight (out, in, kh, kw); PyTorch's default init."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (_pair(kernel_size), _pair(stride),
                                                       _pair(padding))
        bound = 1.0 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
        self.weight = _uniform((out_channels, in_channels) + self.kernel_size, bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    def forward(self, x):
        return F.gelu(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Flatten(Module):
    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return x.flatten(self.start_dim)


class Dropout(Module):
    """Zeroes each element with probability p in training and scales the rest by 1/(1-p).
    The mask is a function of (seed, step or call count), so runs are reproducible."""

    _instances = [0]

    def __init__(self, p: float = 0.5, seed: int | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = p
        Dropout._instances[0] += 1
        self.seed = Dropout._instances[0] if seed is None else seed
        self.calls = 0

    def forward(self, x):
        salt = rng_salt()
        if salt is None:
            self.calls += 1
            salt = tensor(np.int64(self.calls))
        return F.dropout(x, self.p, self.training, seed=self.seed, salt=salt)


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else \
            tuple(normalized_shape)
        self.eps = eps
        dtype = get_default_dtype()
        self.weight = Parameter(np.ones(self.normalized_shape, dtype)) if elementwise_affine \
            else None
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype)) if elementwise_affine \
            else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class BatchNorm2d(Module):
    """Batch normalisation over N, H, W of NCHW input (or N of NC input), with running
    statistics (buffers) used in eval mode, as torch.nn.BatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, get_default_dtype()))
        self.bias = Parameter(np.zeros(num_features, get_default_dtype()))
        self.register_buffer("running_mean", np.zeros(num_features, get_default_dtype()))
        self.register_buffer("running_var", np.ones(num_features, get_default_dtype()))

    def forward(self, x):
        if x.ndim not in (2, 4) or x.shape[1] != self.num_features:
            raise ShapeError(f"BatchNorm2d({self.num_features}) got input of shape {x.shape}: "
                             f"expected (N, {self.num_features}[, H, W])")
        out, mean, var = apply(ops.nn.batch_norm, x, self.weight, self.bias, self.running_mean,
                               self.running_var, training=self.training,
                               momentum=self.momentum, eps=self.eps)
        if self.training:
            self.running_mean.assign_(mean)
            self.running_var.assign_(var)
        return out


BatchNorm1d = BatchNorm2d


class Sequential(Module):
    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


__all__ = ["Module", "Parameter", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "GELU",
           "Tanh", "Sigmoid", "Flatten", "Dropout", "LayerNorm", "BatchNorm2d", "BatchNorm1d",
           "Sequential", "functional", "manual_seed"]
