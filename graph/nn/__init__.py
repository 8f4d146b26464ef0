"""PyTorch-like modules (``sg.nn``): Module, containers, Linear, Conv2d, pooling, activations,
norms, losses.

Modules hold Parameters (leaf tensors that require grad) and buffers (tensors updated
without gradient, e.g. BatchNorm's running statistics). Imports graph.ir, graph.device,
graph.tensor and ops.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from shardgrad import ops
from shardgrad.graph.device import CPU, Device, copy_of, to_device
from shardgrad.graph.ir import ShapeError
from shardgrad.graph.nn import functional
from shardgrad.graph.nn import functional as F
from shardgrad.graph.tensor import (
    Tensor,
    apply,
    default_generator,
    get_default_dtype,
    is_dtype,
    manual_seed,
    rng_salt,
    tensor,
    value_of,
    zeros,
)


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        t = tensor(data, requires_grad=requires_grad)
        super().__init__(t.node, requires_grad=requires_grad)
        self._set_leaf(t.data)


def _typename(v) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _checked(value, kind: type | None, what: str, name: str, expected: str):
    """``value`` if it is None or a ``kind``, else torch's TypeError for the assignment."""
    if value is None or (kind is not None and isinstance(value, kind)):
        return value
    raise TypeError(f"cannot assign {_typename(value)!r} as {what} {name!r} ({expected} or None "
                    f"expected)")


def _clear_grad(p: Tensor, set_to_none: bool) -> None:
    if set_to_none or p.grad is None:
        p.grad = None
    else:
        p.grad = zeros(p.shape, dtype=p.dtype, device=p.device)


def _positive(owner: str, **sizes) -> None:
    """ValueError naming the first size (an int or a tuple of them) that is not positive."""
    for name, v in sizes.items():
        if min(_pair(v) if not isinstance(v, int | np.integer) else (v,)) < 1:
            raise ValueError(f"{owner}: {name} must be positive, got {v}")


def _uniform(shape, bound: float) -> Parameter:
    # Drawn in float64 chunks straight into the parameter's dtype: the same values as one
    # uniform(size=shape) call (the generator draws element by element), without a float64
    # copy of the whole parameter beside a float32 one.
    out = np.empty(shape, dtype=get_default_dtype())
    flat, rng = out.reshape(-1), default_generator()
    for i in range(0, flat.size, 1 << 20):
        flat[i:i + (1 << 20)] = rng.uniform(-bound, bound, size=min(1 << 20, flat.size - i))
    return Parameter(out)


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
        # as torch: a registered name keeps its kind, so a stray value cannot silently take a
        # parameter out of training (None is allowed and stays registered)
        if isinstance(value, Parameter):
            self._forget(name, keep=self._parameters)
            self._parameters[name] = value
        elif name in self._parameters:
            self._parameters[name] = _checked(value, None, "parameter", name, "sg.nn.Parameter")
        elif isinstance(value, Module):
            self._forget(name, keep=self._modules)
            self._modules[name] = value
        elif name in self._modules:
            self._modules[name] = _checked(value, None, "child module", name, "sg.nn.Module")
        elif name in self._buffers:
            self._buffers[name] = _checked(value, Tensor, "buffer", name, "sg.Tensor")
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name: str, keep: dict | None = None) -> None:
        """Drop ``name`` from every table but ``keep`` (where a new value keeps its place)."""
        for table in (self._parameters, self._modules, self._buffers, self.__dict__):
            if table is not keep:
                table.pop(name, None)

    def __getattr__(self, name):
        for table in ("_parameters", "_modules", "_buffers"):
            d = self.__dict__.get(table)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name: str, value) -> None:
        self._forget(name, keep=self._buffers)
        self._buffers[name] = value if isinstance(value, Tensor) or value is None \
            else tensor(value)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{_typename(module)} is not a Module subclass")
        self._forget(name, keep=self._modules)
        self._modules[name] = module

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_modules(self, memo: set[int] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """Every module once, depth first, by dotted name: a module reached by two attribute
        names is yielded under its first (all of them with ``remove_duplicate=False``)."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, f"{prefix}.{name}" if prefix else name,
                                           remove_duplicate)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator[Module]:
        return (m for _, m in self.named_children())

    def _named_members(self, table: str, remove_duplicate: bool) -> Iterator[tuple[str, Tensor]]:
        seen: set[int] = set()
        for prefix, m in self.named_modules(remove_duplicate=remove_duplicate):
            for name, v in getattr(m, table).items():
                if v is None or (remove_duplicate and id(v) in seen):
                    continue
                seen.add(id(v))
                yield (f"{prefix}.{name}" if prefix else name), v

    def named_parameters(self, remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Every parameter once (tied weights under their first name), as torch; so an
        optimizer given ``parameters()`` updates a shared weight once per step."""
        return self._named_members("_parameters", remove_duplicate)

    def parameters(self) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self, remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", remove_duplicate)

    def buffers(self) -> Iterator[Tensor]:
        return (b for _, b in self.named_buffers())

    def apply(self, fn) -> Module:
        """``fn(m)`` for every sub-module, children first, then ``fn(self)``; returns self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze every parameter in place, as torch; returns self."""
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            _clear_grad(p, set_to_none)

    def to(self, device) -> Module:
        """Move every parameter and buffer to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``)
        in place, as torch.nn.Module.to: the Parameter objects stay the same, so an optimizer
        made before keeps its parameters (its state follows them on its next step), and their
        gradients move with them."""
        if is_dtype(device):                     # torch's model.to(torch.float64)
            return self._cast(str(np.dtype(device)))
        for t in [*self.parameters(), *(b for _, b in self.named_buffers())]:
            t._set_leaf(to_device(t.data, device))
            if t.grad is not None:
                t.grad._set_leaf(to_device(t.grad.data, device))
        return self

    def _cast(self, dtype: str) -> Module:
        """Floating-point parameters and buffers (and their gradients) to ``dtype`` in place,
        as torch's Module.double() / float() / half(); integer buffers keep theirs."""
        for t in [*self.parameters(), *(b for _, b in self.named_buffers())]:
            if np.dtype(t.dtype).kind == "f" and t.dtype != dtype:
                t._set_leaf(t.data.astype(dtype))
                if t.grad is not None:
                    t.grad._set_leaf(t.grad.data.astype(dtype))
        return self

    def double(self) -> Module:
        return self._cast("float64")

    def float(self) -> Module:  # noqa: A003 - torch's name
        return self._cast("float32")

    def half(self) -> Module:
        return self._cast("float16")

    def cuda(self, index: int | None = None) -> Module:
        return self.to(Device("cuda", index))

    def cpu(self) -> Module:
        return self.to(CPU)

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Parameters and buffers as NumPy arrays (copies, from the GPU too), by dotted name;
        a shared one under each of its names, as torch."""
        out = OrderedDict((k, p.numpy().copy())
                          for k, p in self.named_parameters(remove_duplicate=False))
        out.update((k, b.numpy().copy()) for k, b in self.named_buffers(remove_duplicate=False))
        return out

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays into parameters and buffers. With ``strict`` every key must match; a
        mismatch names the missing, unexpected and mis-shaped keys."""
        own = dict(self.named_parameters(remove_duplicate=False)) | dict(
            self.named_buffers(remove_duplicate=False))
        # entries torch's modules keep and these do not (BatchNorm's num_batches_tracked), so
        # a torch state_dict loads
        ignored = {f"{prefix}.{k}" if prefix else k for prefix, m in self.named_modules()
                   for k in getattr(m, "_ignored_state", ())}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own) - ignored)
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
            # a copy, as torch's: two models loaded from one dict (or the dict and the model)
            # shared their arrays, which in-place optimizer steps then changed for both
            own[k].data = copy_of(value_of(state[k]))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({k}): " + repr(m).replace("\n", "\n  ")
                        for k, m in self._modules.items() if m is not None)
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features); PyTorch's default init,
    U(-1/sqrt(in), 1/sqrt(in)) for both W and b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        _positive("Linear", in_features=in_features, out_features=out_features)
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
    """2-d convolution over NCHW input; weight (out, in, kh, kw); PyTorch's default init.
    ``padding`` is an int, a pair, ``"valid"`` (none) or ``"same"`` (output as large as the
    input, stride 1 only; an even kernel pads one more at the bottom and right, as torch)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True):
        super().__init__()
        _positive("Conv2d", in_channels=in_channels, out_channels=out_channels,
                  kernel_size=kernel_size, stride=stride, groups=groups, dilation=dilation)
        self.dilation = _pair(dilation)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.groups = groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"Conv2d: padding must be an int, a pair, 'same' or 'valid', "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("Conv2d: padding='same' is not supported for strided "
                                 "convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
            if min(self.padding) < 0:
                raise ValueError(f"Conv2d: padding must be non-negative, got {padding}")
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = _uniform((out_channels, in_channels // groups) + self.kernel_size, bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x):
        g, d = self.groups, self.dilation
        if self.padding == "valid":
            return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=0,
                            dilation=d, groups=g)
        if self.padding != "same":
            return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            dilation=d, groups=g)
        # k - 1 padding in all (k the dilated kernel's size): (k - 1) // 2 before, the rest
        # after. The op pads evenly, so an even k is padded k // 2 on both sides and the first
        # output row/column dropped.
        kh, kw = (di * (k - 1) + 1 for di, k in zip(d, self.kernel_size, strict=True))
        out = F.conv2d(x, self.weight, self.bias, padding=(kh // 2, kw // 2), dilation=d,
                       groups=g)
        return out if kh % 2 and kw % 2 else out[:, :, 1 - kh % 2:, 1 - kw % 2:]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}"
                + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + (f", groups={self.groups}" if self.groups != 1 else ""))


class Conv1d(Module):
    """1-d convolution over (N, C, L) input; weight (out, in/groups, k); PyTorch's default
    init. A height-1 Conv2d underneath, so it shares its kernels and gradients."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        _positive("Conv1d", in_channels=in_channels, out_channels=out_channels,
                  kernel_size=kernel_size, stride=stride, groups=groups, dilation=dilation)
        self.dilation = int(dilation)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv1d: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        bound = 1.0 / math.sqrt(in_channels // groups * self.kernel_size)
        self.weight = _uniform((out_channels, in_channels // groups, self.kernel_size), bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x):
        return F.conv1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class Embedding(Module):
    """A lookup table of ``num_embeddings`` vectors of ``embedding_dim``, N(0, 1) at init as
    torch's. With ``padding_idx`` that row starts at zero, and lookups of it give zeros and
    pass no gradient to it (torch keeps the row's own value; here the row stays zero unless
    set by hand)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        _positive("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"Embedding: padding_idx {padding_idx} out of range for "
                             f"{num_embeddings} embeddings")
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        w = default_generator().standard_normal((num_embeddings, embedding_dim)).astype(
            get_default_dtype())
        if self.padding_idx is not None:
            w[self.padding_idx] = 0
        self.weight = Parameter(w)

    def forward(self, x):
        out = F.embedding(x, self.weight)
        if self.padding_idx is None:
            return out
        return out * (x != self.padding_idx).astype(out.dtype).unsqueeze(-1)

    @classmethod
    def from_pretrained(cls, embeddings, freeze: bool = True,
                        padding_idx: int | None = None) -> Embedding:
        """An Embedding holding ``embeddings`` (num, dim), frozen unless ``freeze=False``."""
        w = embeddings.numpy() if isinstance(embeddings, Tensor) else np.asarray(embeddings)
        if w.ndim != 2:
            raise ValueError(f"Embeddings parameter is expected to be 2-dimensional, got "
                             f"{w.shape}")
        out = cls(*w.shape, padding_idx=padding_idx)
        out.weight = Parameter(w, requires_grad=not freeze)
        return out

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class AdaptiveAvgPool2d(Module):
    """Mean over adaptive bins to an ``output_size`` (int, pair, None keeps a dim), as torch;
    AdaptiveAvgPool2d(1) is global average pooling."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode = ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


class ReLU(Module):
    def __init__(self, inplace: bool = False):   # torch's flag; results never alias here
        super().__init__()

    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    """x Phi(x), exact by default (``approximate="none"``, through erf) or the tanh
    approximation (``"tanh"``), as torch.nn.GELU."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in F.GELU_APPROXIMATIONS:
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class SiLU(Module):
    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x):
        return F.silu(x)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return x.flatten(self.start_dim, self.end_dim)


class Dropout(Module):
    """Zeroes each element with probability p in training and scales the rest by 1/(1-p).
    The mask is a function of (seed, step or call count), so runs are reproducible."""

    _instances = [0]

    def __init__(self, p: float = 0.5, inplace: bool = False, seed: int | None = None):
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
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else \
            tuple(normalized_shape)
        self.eps = eps
        dtype = get_default_dtype()
        self.weight = Parameter(np.ones(self.normalized_shape, dtype)) if elementwise_affine \
            else None
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype)) if (
            elementwise_affine and bias) else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(Module):
    """Normalise ``num_groups`` groups of channels of (N, C, ...) input, with a per-channel
    affine transform (ones and zeros at init), as torch.nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__()
        _positive("GroupNorm", num_groups=num_groups, num_channels=num_channels)
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide "
                             f"num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        dtype = get_default_dtype()
        self.weight = Parameter(np.ones(num_channels, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_channels, dtype)) if affine else None

    def forward(self, x):
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ShapeError(f"GroupNorm({self.num_groups}, {self.num_channels}) got input of "
                             f"shape {x.shape}: expected {self.num_channels} channels at axis 1")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class _BatchNorm(Module):
    """Batch normalisation over every axis but the channel axis 1, with running statistics
    (buffers) used in eval mode, as torch.nn.BatchNorm*d. ``momentum=None`` makes the running
    statistics a cumulative average (weight 1/num_batches_tracked; that buffer exists only
    then)."""

    _ignored_state = ("num_batches_tracked",)   # torch always has it: its state_dict loads

    ndims: tuple[int, ...] = ()
    shape_text = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        _positive(type(self).__name__, num_features=num_features)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        dtype = get_default_dtype()
        # affine=False: no weight and bias (None, as torch); track_running_stats=False: no
        # running statistics, batch statistics in eval mode too
        self._parameters["weight"] = Parameter(np.ones(num_features, dtype)) if affine else None
        self._parameters["bias"] = Parameter(np.zeros(num_features, dtype)) if affine else None
        for name, value in [("running_mean", np.zeros(num_features, dtype)),
                            ("running_var", np.ones(num_features, dtype))]:
            self.register_buffer(name, value if track_running_stats else None)
        if momentum is None and track_running_stats:
            self.register_buffer("num_batches_tracked", np.asarray(0, np.int64))

    def forward(self, x):
        name = f"{type(self).__name__}({self.num_features})"
        if x.ndim not in self.ndims:
            raise ShapeError(f"{name} expected {' or '.join(f'{d}D' for d in self.ndims)} "
                             f"input {self.shape_text}, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{name} got input of shape {x.shape}: expected "
                             f"{self.num_features} channels at axis 1 {self.shape_text}")
        momentum = self.momentum
        tracked = self.track_running_stats
        if self.training and momentum is None and tracked:
            self.num_batches_tracked.assign_(self.num_batches_tracked + 1)
            momentum = 1.0 / self.num_batches_tracked.astype(self.running_mean.dtype)
        n, dtype = self.num_features, x.dtype
        weight, bias = (self.weight, self.bias) if self.affine else (
            tensor(np.ones(n, dtype)), tensor(np.zeros(n, dtype)))
        running = (self.running_mean, self.running_var) if tracked else (
            tensor(np.zeros(n, dtype)), tensor(np.ones(n, dtype)))
        training = self.training or not tracked
        out, mean, var = apply(ops.nn.batch_norm, x, weight, bias, *running, training=training,
                               momentum=0.1 if momentum is None else momentum, eps=self.eps)
        if self.training and tracked:
            self.running_mean.assign_(mean)
            self.running_var.assign_(var)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Over (N, C) or (N, C, L) input, as torch.nn.BatchNorm1d."""

    ndims, shape_text = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Over (N, C, H, W) input, as torch.nn.BatchNorm2d."""

    ndims, shape_text = (4,), "(N, C, H, W)"


class Sequential(Module):
    """Modules applied in order, as torch.nn.Sequential: given as arguments (named "0", "1",
    ...) or as one OrderedDict of names to modules."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            for name, layer in layers[0].items():
                if not isinstance(layer, Module):
                    raise TypeError(f"Sequential: entry {name!r} is {_typename(layer)}, not a "
                                    f"Module instance")
                self.add_module(name, layer)
            return
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                what = f"the class {layer.__module__}.{layer.__qualname__} (call it to make " \
                    f"an instance)" if isinstance(layer, type) else _typename(layer)
                hint = " (pass modules as separate arguments or an OrderedDict)" \
                    if isinstance(layer, list | tuple | dict) else ""
                raise TypeError(f"Sequential: argument {i} is {what}, not a Module "
                                f"instance{hint}")
            self.add_module(str(i), layer)

    def __getitem__(self, i):
        items = list(self._modules.items())
        if isinstance(i, slice):
            return Sequential(OrderedDict(items[i]))
        return items[i][1]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.append: {_typename(module)} is not a Module instance")
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


class ModuleList(Module):
    """A list of sub-modules that registers them (named "0", "1", ...), as torch.nn.ModuleList;
    it has no forward of its own."""

    def __init__(self, modules=None):
        super().__init__()
        for m in modules or ():
            self.append(m)

    def _index(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for a ModuleList of {len(self)}")
        return str(i % len(self))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ModuleList(list(self._modules.values())[i])
        return self._modules[self._index(i)]

    def __setitem__(self, i: int, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: {_typename(module)} is not a Module instance")
        self._modules[self._index(i)] = module

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> ModuleList:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: entry {len(self)} is {_typename(module)}, not a "
                            f"Module instance")
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules) -> ModuleList:
        for m in modules:
            self.append(m)
        return self


class ModuleDict(Module):
    """Sub-modules by name, registered in insertion order, as torch.nn.ModuleDict; it has no
    forward of its own."""

    def __init__(self, modules=None):
        super().__init__()
        self.update(modules or {})

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict[{key!r}]: {_typename(module)} is not a Module instance")
        self.add_module(key, module)

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

    def pop(self, key: str) -> Module:
        return self._modules.pop(key)

    def update(self, modules) -> None:
        for key, m in (modules.items() if hasattr(modules, "items") else modules):
            self[key] = m


class _Activation(Module):
    """A module calling ``fn`` of sg.nn.functional with its keyword arguments."""

    fn = ""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return getattr(F, self.fn)(x, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kw.items())


class ELU(_Activation):
    fn = "elu"

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(alpha=alpha)


class Softplus(_Activation):
    fn = "softplus"

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__(beta=beta, threshold=threshold)


class Hardtanh(_Activation):
    fn = "hardtanh"

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False):
        super().__init__(min_val=min_val, max_val=max_val)


class ReLU6(_Activation):
    fn = "relu6"

    def __init__(self, inplace: bool = False):
        super().__init__()


class Mish(_Activation):
    fn = "mish"


class LogSigmoid(_Activation):
    fn = "logsigmoid"


class LogSoftmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.log_softmax(dim=self.dim)


class Unflatten(Module):
    """Split dim ``dim`` into ``unflattened_size``, as torch.nn.Unflatten."""

    def __init__(self, dim: int, unflattened_size):
        super().__init__()
        self.dim, self.unflattened_size = dim, tuple(unflattened_size)

    def forward(self, x):
        d = self.dim % x.ndim
        return x.reshape(x.shape[:d] + self.unflattened_size + x.shape[d + 1:])


class Identity(Module):
    """Returns its input (extra arguments are ignored), as torch.nn.Identity."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class _Loss(Module):
    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ops.loss.REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of "
                             f"{ops.loss.REDUCTIONS}, not {reduction!r}")
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(_Loss):
    """``F.cross_entropy(logits, labels, weight, ignore_index, reduction, label_smoothing)``
    as a module (``weight`` a buffer, as torch)."""

    def __init__(self, weight=None, ignore_index: int = F.IGNORE_INDEX, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__(reduction)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.register_buffer("weight", _class_weights(weight))

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class MSELoss(_Loss):
    """``F.mse_loss(input, target, reduction)`` as a module."""

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(_Loss):
    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    def __init__(self, reduction: str = "mean", beta: float = 1.0):
        super().__init__(reduction)
        self.beta = beta

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(_Loss):
    def __init__(self, reduction: str = "mean", delta: float = 1.0):
        super().__init__(reduction)
        self.delta = delta

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class BCELoss(_Loss):
    def __init__(self, weight=None, reduction: str = "mean"):
        super().__init__(reduction)
        self.register_buffer("weight", _class_weights(weight))

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.binary_cross_entropy(input, target, weight=self.weight,
                                      reduction=self.reduction)


class NLLLoss(_Loss):
    """``F.nll_loss(log_probs, labels, weight, ignore_index, reduction)`` as a module."""

    def __init__(self, weight=None, ignore_index: int = F.IGNORE_INDEX, reduction: str = "mean"):
        super().__init__(reduction)
        self.ignore_index = ignore_index
        self.register_buffer("weight", _class_weights(weight))

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross-entropy in one stable expression, for binary or multi-label
    targets of the logits' shape, with optional ``weight`` and ``pos_weight`` (torch's)."""

    def __init__(self, weight=None, reduction: str = "mean", pos_weight=None):
        super().__init__(reduction)
        self.register_buffer("weight", None if weight is None else _as_tensor(weight))
        self.register_buffer("pos_weight", None if pos_weight is None else _as_tensor(pos_weight))

    def forward(self, input, target):  # noqa: A002 - torch's name
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction,
                                                  self.pos_weight)


def _class_weights(v) -> Tensor | None:
    """A loss's weight buffer in the dtype given (the function casts it to the input's), so
    float64 weights keep their precision."""
    return v if v is None or isinstance(v, Tensor) else tensor(np.asarray(v))


def _as_tensor(v) -> Tensor:
    return v if isinstance(v, Tensor) else tensor(np.asarray(v, get_default_dtype()))


class MultiheadAttention(Module):
    """Multi-head scaled dot-product attention, as torch.nn.MultiheadAttention (same
    parameter names: in_proj_weight (3E, E), in_proj_bias, out_proj), inputs (L, N, E), or
    (N, L, E) with ``batch_first``. forward returns (output, attention weights averaged over
    heads, or None with ``need_weights=False``). ``key_padding_mask`` (N, S) and a bool
    ``attn_mask`` (L, S) are True where a position is ignored, as torch's; a float attn_mask is
    added to the scores."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False):
        super().__init__()
        _positive("MultiheadAttention", embed_dim=embed_dim, num_heads=num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: num_heads={num_heads} must divide "
                             f"embed_dim={embed_dim}")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.dropout = dropout
        bound = math.sqrt(6.0 / (embed_dim + 3 * embed_dim))     # xavier_uniform, as torch
        self.in_proj_weight = _uniform((3 * embed_dim, embed_dim), bound)
        dtype = get_default_dtype()
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, dtype)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            self.out_proj.bias = Parameter(np.zeros(embed_dim, dtype))
        self.attn_drop = Dropout(dropout)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(1, 0, 2) for t in (query, key, value))
        n, lq, e = query.shape
        if e != self.embed_dim:
            raise ShapeError(f"MultiheadAttention({self.embed_dim}) got query of shape "
                             f"{query.shape}: last dimension must be {self.embed_dim}")
        h, hd, s_len = self.num_heads, e // self.num_heads, key.shape[1]
        w, b = self.in_proj_weight, self.in_proj_bias

        def heads(t, i):
            proj = F.linear(t, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
            return proj.reshape(n, t.shape[1], h, hd).transpose(0, 2, 1, 3)
        q, k, v = heads(query, 0), heads(key, 1), heads(value, 2)
        masks = []                  # additive: 0 where attended, -inf where ignored
        if attn_mask is not None:
            masks.append(_additive(attn_mask, query.dtype).reshape(
                _mask_shape(attn_mask, n, h, lq, s_len)))
        elif is_causal:
            masks.append(_additive(np.triu(np.ones((lq, s_len), bool), 1), query.dtype))
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, s_len):
                raise ShapeError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)}: "
                                 f"expected ({n}, {s_len})")
            masks.append(_additive(key_padding_mask, query.dtype).reshape(n, 1, 1, s_len))
        mask = None
        for m in masks:
            mask = m if mask is None else mask + m
        weights = F.attention_weights(q, k, mask)
        out = self.attn_drop(weights) @ v if self.dropout else weights @ v
        out = self.out_proj(out.transpose(0, 2, 1, 3).reshape(n, lq, e))
        if not self.batch_first:
            out = out.transpose(1, 0, 2)
        if not need_weights:
            return out, None
        return out, (weights.mean(1) if average_attn_weights else weights)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"


def _mask_shape(mask, n, h, lq, s_len) -> tuple[int, ...]:
    """An attention mask (L, S) or (N*H, L, S) as (1 or N, 1 or H, L, S)."""
    if tuple(mask.shape) == (lq, s_len):
        return (1, 1, lq, s_len)
    if tuple(mask.shape) == (n * h, lq, s_len):
        return (n, h, lq, s_len)
    raise ShapeError(f"attn_mask of shape {tuple(mask.shape)}: expected ({lq}, {s_len}) or "
                     f"({n * h}, {lq}, {s_len})")


def _additive(mask, dtype: str) -> Tensor:
    """A mask as scores to add: a bool one (True: ignored) as 0 / -inf, a float one as is."""
    mask = mask if isinstance(mask, Tensor) else tensor(np.asarray(mask))
    if mask.dtype != "bool":
        return mask.astype(dtype)
    inf, zero = (tensor(np.asarray(v, dtype)) for v in (-np.inf, 0.0))
    return zero.where(mask == False, inf)  # noqa: E712


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward block, each with dropout, a residual connection and
    LayerNorm (after, or before with ``norm_first``), as torch.nn.TransformerEncoderLayer
    (same sub-module names, so torch's state_dict loads)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation="relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first)
        self.linear1 = Linear(d_model, dim_feedforward, bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, layer_norm_eps)
        self.norm2 = LayerNorm(d_model, layer_norm_eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        if isinstance(activation, str):
            if activation not in ("relu", "gelu"):
                raise ValueError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' "
                                 f"or a callable, got {activation!r}")
            activation = F.relu if activation == "relu" else F.gelu
        self.activation = activation

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff(x))

    def _sa(self, x, mask, padding_mask, is_causal):
        out = self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False,
                             attn_mask=mask, is_causal=is_causal)[0]
        return self.dropout1(out)

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(Module):
    """``num_layers`` copies of ``encoder_layer`` (``layers.0``, ``layers.1``, ...), then
    ``norm`` if given, as torch.nn.TransformerEncoder (so its state_dict loads)."""

    def __init__(self, encoder_layer: Module, num_layers: int, norm: Module | None = None):
        super().__init__()
        _positive("TransformerEncoder", num_layers=num_layers)
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal: bool = False):
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                        is_causal=bool(is_causal))
        return out if self.norm is None else self.norm(out)


__all__ = ["Module", "Parameter", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "GELU",
           "Tanh", "Sigmoid", "Flatten", "Dropout", "LayerNorm", "BatchNorm2d", "BatchNorm1d",
           "Sequential", "ModuleList", "ModuleDict", "Identity", "CrossEntropyLoss", "MSELoss",
           "functional",
           "manual_seed", "Conv1d", "Embedding", "AdaptiveAvgPool2d", "SiLU", "LeakyReLU",
           "Softmax", "GroupNorm", "NLLLoss", "BCEWithLogitsLoss", "MultiheadAttention",
           "TransformerEncoderLayer", "TransformerEncoder", "ELU", "Softplus", "Hardtanh",
           "ReLU6", "Mish", "LogSigmoid", "LogSoftmax", "Unflatten", "L1Loss", "SmoothL1Loss",
           "HuberLoss", "BCELoss"]


from shardgrad.graph.nn.resnet import BasicBlock, GlobalAvgPool, ResNet  # noqa: E402 - uses the above

__all__ += ["BasicBlock", "GlobalAvgPool", "ResNet"]
from shardgrad.graph.nn import init, utils  # noqa: E402 - sg.nn.utils / sg.nn.init, as torch

__all__ += ["init", "utils"]
