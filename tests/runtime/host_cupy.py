"""A stand-in for the cupy module on machines without a GPU: NumPy under the name "cupy", so
the GPU executor takes its GPU path (ops.registry.kernel_for picks the hand-written CUDA
kernels by the module's name) while host_cuda runs those kernels on the host, plus the few
``cupy.cuda`` calls the runtime makes (one visible device, no-op synchronization).

``device_module()`` goes further for code that tells host from device arrays (eager tensors):
its arrays are ``DeviceArray``s, which say they live on a GPU and, like CuPy's, refuse to mix
with NumPy arrays, so a value that stays on the host by mistake fails as it would on a GPU.
``install(cupy)`` puts either in CuPy's place, with host_cuda running the kernels.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np


class _Device:
    def __init__(self, index: int = 0):
        self.id = index

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def module(devices: int = 1) -> types.ModuleType:
    """A fresh module named "cupy" holding NumPy's namespace and a ``cuda`` namespace that
    reports ``devices`` GPUs."""
    cupy = types.ModuleType("cupy")
    cupy.__dict__.update({k: v for k, v in vars(np).items() if not k.startswith("__")})
    cupy.random, cupy.linalg = np.random, np.linalg      # NumPy loads these lazily
    stream = _Stream()
    cupy.cuda = types.SimpleNamespace(
        Device=_Device, get_current_stream=lambda: stream, Stream=_Stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: devices),
        alloc_pinned_memory=lambda nbytes: bytearray(nbytes))
    _cupyx()
    return cupy


def _cupyx() -> None:
    """The cupyx functions ops call on a GPU (``cupyx.scipy.special.erf``: SciPy's ufunc, which
    keeps DeviceArrays on the "device"; ``cupyx.scatter_add``: ``np.add.at``), registered once
    where no real cupyx is installed."""
    if "cupyx" in sys.modules or importlib.util.find_spec("cupyx") is not None:
        return
    import scipy.special
    names = ("cupyx", "cupyx.scipy", "cupyx.scipy.special")
    mods = {name: types.ModuleType(name) for name in names}
    mods["cupyx"].scipy = mods["cupyx.scipy"]
    mods["cupyx.scipy"].special = mods["cupyx.scipy.special"]
    mods["cupyx.scipy.special"].erf = scipy.special.erf
    mods["cupyx"].scatter_add = lambda a, slices, value: np.add.at(
        a.view(np.ndarray), _plain(slices), _plain(value))
    sys.modules.update(mods)


class _Stream:
    """cupy.cuda.Stream on the host: work runs at once, so entering it and synchronizing
    do nothing."""

    ptr = 0                     # the cudaStream_t a library call is given

    def __init__(self, null: bool = False, non_blocking: bool = False):
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _refuse_host(values) -> None:
    for v in values:
        if isinstance(v, list | tuple):
            _refuse_host(v)
        elif type(v) is np.ndarray:   # as CuPy: no implicit host-to-device conversion
            raise TypeError(f"Unsupported type {type(v)} (a NumPy array given to cupy)")


def _on_device(value):
    if type(value) is np.ndarray or isinstance(value, np.generic):   # CuPy gives 0-d arrays
        return np.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    return value


class DeviceArray(np.ndarray):
    """A NumPy array that says it is on GPU 0 (``__cuda_array_interface__``, ``device``,
    ``get()``) and, as a CuPy array, takes no NumPy array as an operand."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3,
                "data": (self.ctypes.data, False), "strides": self.strides}

    @property
    def device(self) -> _Device:
        return _Device(0)

    def get(self, out=None) -> np.ndarray:
        host = np.array(self.view(np.ndarray))
        if out is None:
            return host
        np.copyto(out, host)
        return out

    def set(self, arr) -> None:
        """The upload into this array (CuPy's ``ndarray.set``)."""
        np.copyto(self.view(np.ndarray), np.asarray(arr))

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (as CuPy): "
                        "use .get()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host(inputs)
        plain = [x.view(np.ndarray) if isinstance(x, DeviceArray) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in kwargs["out"])
        return _on_device(getattr(ufunc, method)(*plain, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        _refuse_host(args)
        return _on_device(func._implementation(*_plain(args), **_plain(kwargs)))

    def __getitem__(self, index):
        return _on_device(self.view(np.ndarray)[_plain(index)])

    def __setitem__(self, index, value):
        _refuse_host([value])
        self.view(np.ndarray)[_plain(index)] = _plain(value)

    def item(self, *args):
        return self.view(np.ndarray).item(*args)


def _plain(value):
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _creates_on_device(fn, uploads: bool = False):
    def wrapped(*args, **kwargs):
        if not uploads:
            _refuse_host(args)
        return _on_device(fn(*_plain(args), **_plain(kwargs)))
    wrapped.__name__ = getattr(fn, "__name__", "fn")
    return wrapped


class _Generator:
    """NumPy's Generator whose draws are DeviceArrays, as CuPy's ``cupy.random.Generator``."""

    def __init__(self, seed=None):
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _creates_on_device(getattr(self._rng, name))


def _random_module() -> types.ModuleType:
    """``cupy.random`` of device_module: NumPy's functions, drawing DeviceArrays (CuPy's draw on
    the device), and ``default_rng``'s Generator; NumPy's classes are left out, so a use
    that would draw host arrays fails by name."""
    rand = types.ModuleType("cupy.random")
    for name in dir(np.random):
        fn = getattr(np.random, name)
        if callable(fn) and not isinstance(fn, type) and not name.startswith("_"):
            setattr(rand, name, _creates_on_device(fn))
    rand.default_rng = _Generator
    rand.Generator = _Generator
    return rand


def device_module(devices: int = 1) -> types.ModuleType:
    """``module(devices)`` whose functions make DeviceArrays: ``asarray``/``array`` take host
    data (the upload), every other function and ufunc refuses NumPy arrays; so do the draws
    of ``random`` (and its ``default_rng``'s Generator)."""
    cupy = module(devices)
    for name, fn in vars(np).items():
        if callable(fn) and not isinstance(fn, type | np.ufunc) and not name.startswith("_"):
            setattr(cupy, name, _creates_on_device(fn, uploads=name in ("array", "asarray")))
    cupy.random = _random_module()
    cupy.ndarray = DeviceArray
    cupy.asnumpy = lambda x: x.get() if isinstance(x, DeviceArray) else np.asarray(x)
    cupy.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
        as_strided=_creates_on_device(np.lib.stride_tricks.as_strided)))
    return cupy


def install(cupy: types.ModuleType, monkeypatch=None, launcher=None) -> types.ModuleType:
    """Make ``cupy`` (``module()`` or ``device_module()``) the CuPy shardgrad imports and run
    the CUDA kernels on the host (``launcher``, default a new host_cuda.HostLauncher, as
    ops.gpu.launch): through ``monkeypatch`` (undone after the test) when given, else for
    the rest of the process (an mpirun worker, a benchmark). Returns ``cupy``."""
    import host_cuda

    from shardgrad.graph import device as base
    from shardgrad.ops import gpu as gpu_ops

    put = setattr if monkeypatch is None else monkeypatch.setattr
    put(base, "_cupy", lambda: cupy)
    put(gpu_ops, "launch", host_cuda.HostLauncher() if launcher is None else launcher)
    return cupy


__all__ = ["DeviceArray", "device_module", "install", "module"]
