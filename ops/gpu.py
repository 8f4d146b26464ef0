"""Hand-written CUDA kernels for the ops a training step spends its time in: each op's stanza
names its function here as ``OpDef.cuda`` (executors find it through ``kernel_for``). The CUDA
C sources live beside this file in ops/cuda/*.cu (with the headers they share, *.cuh); CuPy
compiles each on first use (NVRTC) for the dtype it is called with.

Every function takes the array module ``xp`` and never imports cupy itself; kernels are
started through ``launch`` (CuPy's RawModule by default; tests swap in a host emulation).
A call a kernel does not cover (a dtype other than float32/float64, a softmax over an inner
axis) runs the op's generic ``forward``. Imports ops.registry only.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shardgrad.ops import gpu_libs
from shardgrad.ops.registry import get

SOURCES = Path(__file__).parent / "cuda"
CTYPES = {"float32": "float", "float64": "double"}
BLOCK = 256
# Grid-stride kernels get at most this many blocks: 8 waves of 8 blocks of 256 threads on an
# H100's 132 SMs, enough to hide memory latency without a block per element.
MAX_BLOCKS = 8192

Launch = Callable[..., None]


# a header of ops/cuda included by name: #include "window.cuh"
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([\w.]+)"[ \t]*$', re.M)


@functools.cache
def source(file: str) -> str:
    """The text of ops/cuda/``file`` with each ``#include "name"`` replaced by the text of
    ops/cuda/``name``: one self-contained unit, so NVRTC needs no include path (nor the host
    emulation), and CuPy's on-disk kernel cache, which hashes the source text and options but
    not the files an ``-I`` path would pull in, rebuilds when a header changes."""
    return _LOCAL_INCLUDE.sub(lambda m: source(m.group(1)), (SOURCES / file).read_text())


@functools.cache
def _cupy_function(code: str, name: str, options: tuple[str, ...]):
    import cupy
    return cupy.RawModule(code=code, options=options).get_function(name)


def cupy_launch(code: str, name: str, options: tuple[str, ...], grid: int, block: int,
                args: tuple, shared_mem: int = 0) -> None:
    """Compile ``code`` with NVRTC (cached per code, name and options) and launch ``name``
    on the current stream."""
    _cupy_function(code, name, options)((int(grid),), (int(block),), args,
                                        shared_mem=shared_mem)


launch: Launch = cupy_launch


def run_kernel(file: str, name: str, dtype, grid: int, block: int, args: tuple) -> None:
    """Launch kernel ``name`` of ops/cuda/``file`` compiled for element type ``dtype``."""
    launch(source(file), name, (f"-DSG_T={CTYPES[str(np.dtype(dtype))]}",), grid, block, args)


def blocks(total: int, block: int = BLOCK) -> int:
    return max(1, min(-(-int(total) // block), MAX_BLOCKS))


def row_block(cols: int) -> int:
    """Threads per row for the row kernels: a power of two from 32 to 1024, about ``cols``."""
    return min(1024, max(32, 1 << max(0, int(cols) - 1).bit_length()))


def _i32(*vals) -> tuple:
    return tuple(np.int32(v) for v in vals)


def _covered(*arrays) -> bool:
    return all(str(a.dtype) in CTYPES for a in arrays) and len({a.dtype for a in arrays}) == 1


def _c(xp, a):
    return xp.ascontiguousarray(a)


def _into(xp, out, shape, dtype):
    """``out`` (a planned buffer the caller gives: runtime.gpu's memory plan), or a new one."""
    return xp.empty(shape, dtype) if out is None else out


def _generic(xp, op: str, out, *arrays, **attrs):
    """The op's generic forward, for a call its kernel does not cover, written into ``out``
    when one is given."""
    value = get(op).forward(xp, *arrays, **attrs)
    if out is None:
        return value
    xp.copyto(out, value)
    return out


_SCRATCH = threading.local()


def _scratch(xp, shape, dtype):
    """A temporary of this thread, reused by the next call of the same type: calls on one
    thread are ordered on its stream, so the last reader is done before the next writer."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    # keyed by the module itself: by id(xp), a module that had died (a test's CuPy stand-in)
    # left its buffer to the next one given its address, a NumPy array handed to CuPy
    key = (xp, tuple(shape), str(dtype))
    if key not in cache:
        cache[key] = xp.empty(shape, dtype)
    return cache[key]


# ---- softmax family -------------------------------------------------------------------------

def _rows(xp, x, log_out: int, out=None):
    cols = x.shape[-1]
    rows = x.size // max(cols, 1)
    out = _into(xp, out, x.shape, x.dtype)
    if x.size:
        run_kernel("softmax.cu", "softmax_rows", x.dtype, min(rows, 1 << 20), row_block(cols),
                   (_c(xp, x), out, *_i32(rows, cols, log_out)))
    return out


def softmax(xp, x, axis, out=None):
    if not _covered(x) or axis != x.ndim - 1:
        return _generic(xp, "softmax", out, x, axis=axis)
    return _rows(xp, x, 0, out)


def log_softmax(xp, x, axis, out=None):
    if not _covered(x) or axis != x.ndim - 1:
        return _generic(xp, "log_softmax", out, x, axis=axis)
    return _rows(xp, x, 1, out)


class DeferredChecks:
    """Input checks a step's kernels record on the device instead of synchronizing: inside
    ``with checks:`` cross_entropy sets a persistent flag (the bad label itself) and goes
    on; ``raise_if_set()`` reads the flags (one device-to-host copy each) and raises the
    error the immediate check would have raised. A flag stays set until read, so a check
    read after several steps still reports the bad label of any of them."""

    def __init__(self):
        self._flags: dict[tuple, Any] = {}       # (what, classes) -> int32[1] on the device
        self._token = None

    def flag(self, xp, what: str, classes: int):
        key = (what, classes)
        if key not in self._flags:
            self._flags[key] = xp.zeros((1,), np.int32)
        return self._flags[key]

    def raise_if_set(self) -> None:
        for (what, classes), flag in self._flags.items():
            value = int(flag[0])
            if value:
                flag.fill(0)
                raise ValueError(f"{what} {value} out of range for {classes} classes")

    def __enter__(self):
        self._token = _DEFERRED.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _DEFERRED.reset(self._token)


_DEFERRED: contextvars.ContextVar[DeferredChecks | None] = contextvars.ContextVar(
    "shardgrad_deferred_checks", default=None)


def cross_entropy(xp, logits, labels, reduction, out=None):
    """Fused log-softmax + pick + reduce. A label outside [0, C) raises ValueError as the
    generic forward does: at once (one device sync), or, inside ``DeferredChecks``, when the
    checks are read (no sync in the step). With ``out`` the per-row losses of a reduction
    go to a scratch buffer of this thread, so nothing is allocated."""
    if not _covered(logits):
        return _generic(xp, "cross_entropy", out, logits, labels, reduction=reduction)
    n, c = logits.shape
    if out is None:
        nll = xp.empty((n,), logits.dtype)
    else:
        nll = out if reduction == "none" else _scratch(xp, (n,), logits.dtype)
    deferred = _DEFERRED.get()
    bad = deferred.flag(xp, "label", c) if deferred is not None else xp.zeros((1,), np.int32)
    if n:
        run_kernel("softmax.cu", "xent_fwd", logits.dtype, min(n, 1 << 20), row_block(c),
                   (_c(xp, logits), _c(xp, labels.astype(np.int64, copy=False)), nll, bad,
                    *_i32(n, c)))
    if n and deferred is None and int(bad[0]):
        raise ValueError(f"label {int(bad[0])} out of range for {c} classes")
    if reduction == "none":
        return nll
    if out is None:
        return xp.sum(nll) / n if reduction == "mean" else xp.sum(nll)
    xp.sum(nll, out=out)
    if reduction == "mean":
        xp.divide(out, n, out=out)
    return out


def softmax_xent_grad(xp, logits, labels, scale, out=None):
    if not _covered(logits, scale):
        return _generic(xp, "softmax_xent_grad", out, logits, labels, scale)
    n, c = logits.shape
    gx = _into(xp, out, (n, c), logits.dtype)
    if n:
        run_kernel("softmax.cu", "xent_bwd", logits.dtype, min(n, 1 << 20), row_block(c),
                   (_c(xp, logits), _c(xp, labels.astype(np.int64, copy=False)),
                    _c(xp, scale), gx, *_i32(n, c), logits.dtype.type(1),
                    np.int32(scale.size != 1)))
    return gx


# ---- bias + activation ------------------------------------------------------------------------

ACTS = {"relu": 1, "gelu": 2, "tanh": 3}


def bias_act(xp, x, b, act, out=None):
    if not _covered(x, b):
        return _generic(xp, "bias_act", out, x, b, act=act)
    out = _into(xp, out, x.shape, x.dtype)
    if x.size:
        run_kernel("bias_act.cu", "bias_act_fwd", x.dtype, blocks(x.size), BLOCK,
                   (_c(xp, x), _c(xp, b), out, np.int64(x.size), *_i32(b.size, ACTS[act])))
    return out


def bias_act_grad(xp, g, x, b, act, out=None):
    if not _covered(g, x, b):
        return _generic(xp, "bias_act_grad", out, g, x, b, act=act)
    gz = _into(xp, out, x.shape, x.dtype)
    if x.size:
        run_kernel("bias_act.cu", "bias_act_bwd", x.dtype, blocks(x.size), BLOCK,
                   (_c(xp, g), _c(xp, x), _c(xp, b), gz, np.int64(x.size),
                    *_i32(b.size, ACTS[act])))
    return gz


def matmul_bias_act(xp, x, w, b, act, out=None, gemm=None):
    """``act(x @ w + b)``: cuBLASLt's GEMM with its epilogue (ops.gpu_libs, where nvmath-python
    is installed and measured faster for this shape), else the own pair: the GEMM (``gemm``,
    a capture-safe one while a CUDA Graph is captured, or CuPy's) and the bias + activation
    kernel in place."""
    if not _covered(x, w, b) or x.ndim != 2 or w.ndim != 2:
        return _generic(xp, "matmul_bias_act", out, x, w, b, act=act)
    out = _into(xp, out, (x.shape[0], w.shape[1]), x.dtype)

    def own():
        if gemm is None or not gemm(x, w, out):
            xp.matmul(x, w, out=out)
        if act == "none":
            return xp.add(out, b, out=out)
        return bias_act(xp, out, b, act, out=out)

    key = ("matmul_bias_act", x.shape, w.shape, x.strides, w.strides, str(x.dtype), act)
    return gpu_libs.choose("cublaslt", key, xp, out, own,
                           lambda: gpu_libs.cublaslt_bias_act(xp, x, w, b, act, out))


# ---- conv2d's im2col / col2im and pooling ------------------------------------------------------

def _geom(shape, kernel, stride, padding) -> tuple:
    n, c, h, w = shape
    oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return _i32(n, c, h, w, *kernel, *stride, *padding, oh, ow)


def _out_hw(geom) -> tuple[int, int]:
    return int(geom[-2]), int(geom[-1])


def im2col(xp, x, kernel, stride, padding, out=None):
    if not _covered(x):
        return _generic(xp, "im2col", out, x, kernel=kernel, stride=stride, padding=padding)
    geom = _geom(x.shape, kernel, stride, padding)
    n, c = x.shape[:2]
    cols = _into(xp, out, (n, c, *kernel, *_out_hw(geom)), x.dtype)
    if cols.size:
        run_kernel("conv.cu", "im2col", x.dtype, blocks(cols.size), BLOCK,
                   (_c(xp, x), cols, *geom))
    return cols


def col2im(xp, cols, shape, kernel, stride, padding, out=None):
    if not _covered(cols):
        return _generic(xp, "col2im", out, cols, shape=shape, kernel=kernel, stride=stride,
                        padding=padding)
    out = _into(xp, out, tuple(shape), cols.dtype)
    if out.size:
        run_kernel("conv.cu", "col2im", cols.dtype, blocks(out.size), BLOCK,
                   (_c(xp, cols), out, *_geom(shape, kernel, stride, padding)))
    return out


def _gemm(xp, gemm, a, b, out):
    """``out = a @ b``: the capture-safe GEMM while a CUDA Graph is captured, else CuPy's."""
    if gemm is None or not gemm(a, b, out):
        xp.matmul(a, b, out=out)
    return out


def conv_fprop(xp, x, w, stride, padding, out=None, gemm=None):
    """conv2d (groups 1) as one op: cuDNN's conv_fprop where it is installed and measured
    faster (ops.gpu_libs), else the own pair, im2col and one batched GEMM."""
    if not _covered(x, w):
        return _generic(xp, "conv_fprop", out, x, w, stride=stride, padding=padding)
    kernel = tuple(w.shape[2:])
    geom = _geom(x.shape, kernel, stride, padding)
    (n, c), o, (oh, ow) = x.shape[:2], w.shape[0], _out_hw(geom)
    out = _into(xp, out, (n, o, oh, ow), x.dtype)

    def own():
        cols = _scratch(xp, (n, c, *kernel, oh, ow), x.dtype)
        im2col(xp, x, kernel, stride, padding, out=cols)
        _gemm(xp, gemm, _c(xp, w).reshape(o, -1), cols.reshape(n, -1, oh * ow),
              out.reshape(n, o, oh * ow))
        return out

    key = ("conv_fprop", x.shape, w.shape, stride, padding, str(x.dtype))
    return gpu_libs.choose("cudnn", key, xp, out, own, lambda: gpu_libs.cudnn_conv(
        xp, "fprop", x, w, out, stride, padding))


def conv_dgrad(xp, g, w, shape, stride, padding, out=None, gemm=None):
    """The input gradient of conv_fprop: cuDNN's conv_dgrad, else one batched GEMM of the
    transposed weight and col2im."""
    if not _covered(g, w):
        return _generic(xp, "conv_dgrad", out, g, w, shape=shape, stride=stride,
                        padding=padding)
    kernel, (n, o, oh, ow) = tuple(w.shape[2:]), g.shape
    out = _into(xp, out, tuple(shape), g.dtype)

    def own():
        gcols = _scratch(xp, (n, shape[1], *kernel, oh, ow), g.dtype)
        _gemm(xp, gemm, _c(xp, w).reshape(o, -1).T, _c(xp, g).reshape(n, o, oh * ow),
              gcols.reshape(n, -1, oh * ow))
        return col2im(xp, gcols, tuple(shape), kernel, stride, padding, out=out)

    key = ("conv_dgrad", g.shape, w.shape, tuple(shape), stride, padding, str(g.dtype))
    return gpu_libs.choose("cudnn", key, xp, out, own, lambda: gpu_libs.cudnn_conv(
        xp, "dgrad", g, w, out, stride, padding))


def conv_wgrad(xp, x, g, kernel, stride, padding, out=None, gemm=None):
    """The weight gradient of conv_fprop: cuDNN's conv_wgrad, else im2col and one GEMM over
    the batch laid end to end, (O, N*P) @ (N*P, C*KH*KW)."""
    if not _covered(x, g):
        return _generic(xp, "conv_wgrad", out, x, g, kernel=kernel, stride=stride,
                        padding=padding)
    kernel, (n, c), (o, p) = tuple(kernel), x.shape[:2], (g.shape[1], g.shape[2] * g.shape[3])
    out = _into(xp, out, (o, c, *kernel), x.dtype)

    def own():
        cols = _scratch(xp, (n, c, *kernel, *g.shape[2:]), x.dtype)
        im2col(xp, x, kernel, stride, padding, out=cols)
        ckk = c * kernel[0] * kernel[1]
        flat = _scratch(xp, (n * p * (o + ckk),), x.dtype)     # both operands, one buffer
        lhs, rhs = flat[:o * n * p].reshape(o, n, p), flat[o * n * p:].reshape(n, p, ckk)
        xp.copyto(lhs, _c(xp, g).reshape(n, o, p).transpose(1, 0, 2))
        xp.copyto(rhs, cols.reshape(n, ckk, p).transpose(0, 2, 1))
        _gemm(xp, gemm, lhs.reshape(o, n * p), rhs.reshape(n * p, ckk), out.reshape(o, ckk))
        return out

    key = ("conv_wgrad", x.shape, g.shape, kernel, stride, padding, str(x.dtype))
    return gpu_libs.choose("cudnn", key, xp, out, own, lambda: gpu_libs.cudnn_conv(
        xp, "wgrad", x, g, out, stride, padding))


def _pool_out(xp, x, geom, out=None):
    return _into(xp, out, tuple(x.shape[:2]) + _out_hw(geom), x.dtype)


def _argmax(xp, x, geom):
    """The first-max index of each window (and the max itself), one kernel."""
    out = _pool_out(xp, x, geom)
    arg = xp.empty(out.shape, np.int32)
    if out.size:
        run_kernel("pool.cu", "maxpool_fwd", x.dtype, blocks(out.size), BLOCK,
                   (_c(xp, x), out, arg, *geom))
    return out, arg


def max_pool2d(xp, x, kernel, stride, padding, out=None):
    if not _covered(x):
        return _generic(xp, "max_pool2d", out, x, kernel=kernel, stride=stride,
                        padding=padding)
    geom = _geom(x.shape, kernel, stride, padding)
    out = _pool_out(xp, x, geom, out)
    if out.size:
        run_kernel("pool.cu", "maxpool_fwd", x.dtype, blocks(out.size), BLOCK,
                   (_c(xp, x), out, None, *geom))
    return out


def max_pool2d_grad(xp, g, x, *top, kernel, stride, padding, out=None):
    """With ``top`` (the forward's maxima, as the CPU path) one kernel finds each window's
    first maximum by comparing with it; without, a maxpool_fwd launch first finds the argmax."""
    if not _covered(g, x, *top):
        return _generic(xp, "max_pool2d_grad", out, g, x, *top, kernel=kernel, stride=stride,
                        padding=padding)
    geom = _geom(x.shape, kernel, stride, padding)
    gx = _into(xp, out, x.shape, x.dtype)
    if not gx.size:
        return gx
    if top:
        run_kernel("pool.cu", "maxpool_bwd_top", x.dtype, blocks(gx.size), BLOCK,
                   (_c(xp, g), _c(xp, x), _c(xp, top[0]), gx, *geom))
    else:
        _, arg = _argmax(xp, x, geom)
        run_kernel("pool.cu", "maxpool_bwd", x.dtype, blocks(gx.size), BLOCK,
                   (_c(xp, g), arg, gx, *geom))
    return gx


def max_pool2d_gather(xp, y, x, kernel, stride, padding, out=None):
    if not _covered(y, x):
        return _generic(xp, "max_pool2d_gather", out, y, x, kernel=kernel, stride=stride,
                        padding=padding)
    geom = _geom(x.shape, kernel, stride, padding)
    _, arg = _argmax(xp, x, geom)
    out = _pool_out(xp, x, geom, out)
    if out.size:
        run_kernel("pool.cu", "maxpool_gather", x.dtype, blocks(out.size), BLOCK,
                   (_c(xp, y), arg, out, *geom))
    return out


def avg_pool2d(xp, x, kernel, stride, padding, out=None):
    if not _covered(x):
        return _generic(xp, "avg_pool2d", out, x, kernel=kernel, stride=stride,
                        padding=padding)
    geom = _geom(x.shape, kernel, stride, padding)
    out = _pool_out(xp, x, geom, out)
    if out.size:
        run_kernel("pool.cu", "avgpool_fwd", x.dtype, blocks(out.size), BLOCK,
                   (_c(xp, x), out, *geom, x.dtype.type(1.0 / (kernel[0] * kernel[1]))))
    return out


def avg_pool2d_grad(xp, g, shape, kernel, stride, padding, out=None):
    if not _covered(g):
        return _generic(xp, "avg_pool2d_grad", out, g, shape=shape, kernel=kernel,
                        stride=stride, padding=padding)
    geom = _geom(shape, kernel, stride, padding)
    gx = _into(xp, out, tuple(shape), g.dtype)
    if gx.size:
        run_kernel("pool.cu", "avgpool_bwd", g.dtype, blocks(gx.size), BLOCK,
                   (_c(xp, g), gx, *geom, g.dtype.type(1.0 / (kernel[0] * kernel[1]))))
    return gx


# ---- optimizer updates over a flat parameter buffer ---------------------------------------------

def check_flat(*arrays) -> None:
    """ValueError unless ``arrays`` are 1-d contiguous buffers of one length and dtype,
    TypeError unless that dtype is float32 or float64: what the flat updates take."""
    n = arrays[0].size
    for a in arrays:
        if a.ndim != 1 or a.size != n or a.dtype != arrays[0].dtype or not (
                a.flags.c_contiguous):
            raise ValueError("flat updates need 1-d contiguous buffers of one length and dtype")
    if str(arrays[0].dtype) not in CTYPES:
        raise TypeError(f"flat updates support float32 and float64, not {arrays[0].dtype}")


# ---- multi-tensor updates: a list of tensors in one launch -----------------------------------

# Tensors one multi-tensor launch takes: their pointers and lengths are kernel arguments (CUDA
# allows 4 KB of them; 48 Adam tensors take 2.3 KB); a longer list takes further launches.
MULTI_TENSORS = 48
CHUNK = 4096           # elements one block updates: it finds its tensor once, not per element
_MULTI = {"sgd": (("p", "g", "buf"), "T lr, T mu, T wd, int nesterov",
                  "sgd_elem(P0, P1, P2, i, lr, mu, wd, nesterov)"),
          "adam": (("p", "g", "m", "v"), "T lr, T b1, T b2, T eps, T wd, T bc1, T bc2, "
                   "int decoupled", "adam_elem(P0, P1, P2, P3, i, lr, b1, b2, eps, wd, bc1, "
                   "bc2, decoupled)")}


@functools.cache
def multi_tensor_source(kind: str, count: int) -> str:
    """optim.cu plus ``<kind>_multi``, the update of ``count`` tensors in one launch (apex's
    multi_tensor_apply, the table in the arguments): tensor j is its pointers (``p<j>``,
    ``g<j>``, then its state), its length ``n<j>`` and ``c<j>``, the chunks of CHUNK elements
    of tensors 0..j; block k of the grid updates chunk k (grid-stride)."""
    names, tail, call = _MULTI[kind]
    params = []
    for j in range(count):
        params += [f"{'const ' if x == 'g' else ''}T* __restrict__ {x}{j}" for x in names]
        params += [f"long long n{j}", f"long long c{j}"]
    pick = []
    for j in range(count):
        ptrs = " ".join(f"P{k} = {x}{j};" for k, x in enumerate(names))
        cond = f"if (c < c{j}) " if j < count - 1 else ""
        pick.append(f"{cond}{{ {ptrs} n = n{j}; first = {f'c{j - 1}' if j else '0'}; }}")
    decl = " ".join(f"{'const ' if x == 'g' else ''}T* P{k};" for k, x in enumerate(names))
    return source("optim.cu") + f"""
extern "C" __global__ void {kind}_multi({", ".join(params)}, {tail}) {{
    for (long long c = blockIdx.x; c < c{count - 1}; c += gridDim.x) {{
        {decl} long long n, first;
        {" else ".join(pick)}
        const long long lo = (c - first) * {CHUNK}, hi = lo + {CHUNK} < n ? lo + {CHUNK} : n;
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {call};
    }}
}}
"""


def _multi(kind: str, lists: list[list[Any]], tail: tuple) -> int:
    """Launch ``<kind>_multi`` over ``lists`` (the parameters, gradients, then each state:
    1-d contiguous arrays of one dtype, tensor j of each list of one length); returns the
    launches made."""
    launches = 0
    dtype = lists[0][0].dtype
    check_flat(*(a.reshape(-1) for col in lists for a in col[:1]))
    for start in range(0, len(lists[0]), MULTI_TENSORS):
        group = [col[start:start + MULTI_TENSORS] for col in lists]
        args: list[Any] = []
        chunks = 0
        for j in range(len(group[0])):
            n = group[0][j].size
            chunks += -(-n // CHUNK)
            for col in group:
                if col[j].size != n or col[j].dtype != dtype or not col[j].flags.c_contiguous:
                    raise ValueError("multi-tensor updates need contiguous tensors of one "
                                     "dtype, each the length of its parameter")
                args.append(col[j])
            args += [np.int64(n), np.int64(chunks)]
        if chunks:
            launch(multi_tensor_source(kind, len(group[0])), f"{kind}_multi",
                   (f"-DSG_T={CTYPES[str(dtype)]}",), min(chunks, MAX_BLOCKS), BLOCK,
                   (*args, *tail))
            launches += 1
    return launches


def sgd_multi_(ps: list, gs: list, bufs: list | None, *, lr: float, momentum: float = 0.0,
               weight_decay: float = 0.0, nesterov: bool = False) -> int:
    """graph.optim.SGD's rule over lists of tensors, each updated in place (momentum buffers
    ``bufs`` needed when momentum > 0): one launch per MULTI_TENSORS tensors. Returns the
    launches."""
    if not ps:
        return 0
    if momentum and bufs is None:
        raise ValueError("momentum needs momentum buffers")
    t = ps[0].dtype.type
    return _multi("sgd", [ps, gs, ps if bufs is None else bufs],
                  (t(lr), t(momentum), t(weight_decay), np.int32(bool(nesterov))))


def adam_multi_(ps: list, gs: list, ms: list, vs: list, *, lr: float, step: int,
                betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                decoupled: bool = False) -> int:
    """graph.optim.Adam's (``decoupled``: AdamW's) rule over lists of tensors, each updated
    in place with its ``ms`` and ``vs``, at 1-based ``step``: one launch per MULTI_TENSORS
    tensors. Returns the launches."""
    if not ps:
        return 0
    t = ps[0].dtype.type
    b1, b2 = t(betas[0]), t(betas[1])
    return _multi("adam", [ps, gs, ms, vs],
                  (t(lr), b1, b2, t(eps), t(weight_decay), t(1) - b1 ** t(step),
                   t(1) - b2 ** t(step), np.int32(bool(decoupled))))
