"""Runs this project's CUDA C kernels on the CPU, for tests on machines without a GPU.

A shim (no system headers, so a kernel builds in tens of milliseconds) maps the CUDA
built-ins to one host thread (blockDim = gridDim = 1, warpSize 1, barriers and shuffles as
no-ops) and declares the libm functions the kernels call. Every kernel here is written with
grid-stride loops and block reductions that stay correct at one thread, so the same source
computes the same values. ``HostLauncher`` compiles a source with the system C++ compiler
into a shared library and calls the kernel through ctypes on NumPy arrays; installed as
``ops.gpu.launch`` it lets ops/gpu.py and the GPU executor run on NumPy. Side effects
(compiler processes, temporary files) live here, in runtime/. Imports nothing from shardgrad.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import numpy as np

SHIM = r"""
extern "C" {
double exp(double); float expf(float); double log(double); float logf(float);
double tanh(double); float tanhf(float); double sqrt(double); float sqrtf(float);
double pow(double, double); float powf(float, float);
}
static inline float exp(float x) { return expf(x); }
static inline float log(float x) { return logf(x); }
static inline float tanh(float x) { return tanhf(x); }
static inline float sqrt(float x) { return sqrtf(x); }
static inline float pow(float x, float y) { return powf(x, y); }
struct sg_dim3 { unsigned int x, y, z; };
static const sg_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static const sg_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
static const int warpSize = 1;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() ((void)0)
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int) { return v; }
static inline float __int_as_float(int i) { float f; __builtin_memcpy(&f, &i, 4); return f; }
"""


def compiler() -> str | None:
    """The host C++ compiler, or None where there is none."""
    return shutil.which("g++") or shutil.which("c++")


def _arg(a: Any):
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError("kernel arrays must be C-contiguous")
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.generic):
        kind, size = a.dtype.kind, a.dtype.itemsize
        if kind == "f":
            return ctypes.c_float(a) if size == 4 else ctypes.c_double(a)
        if kind in "iub":
            ctype = {1: ctypes.c_int8, 2: ctypes.c_int16, 4: ctypes.c_int32,
                     8: ctypes.c_int64}[size]
            return ctype(int(a))
    raise TypeError(f"unsupported kernel argument {type(a).__name__}: pass arrays or NumPy "
                    f"scalars")


class HostLauncher:
    """``launch(code, name, options, grid, block, args)`` on the CPU (grid and block are
    ignored: the kernel runs as one thread looping over everything). Libraries are built once
    per (code, options) into ``workdir``, one build at a time (ranks on threads share it)."""

    def __init__(self, workdir: str | None = None, cxx: str | None = None):
        self.cxx = cxx or compiler()
        if self.cxx is None:
            raise RuntimeError("no C++ compiler (g++) found: cannot emulate CUDA kernels")
        self.workdir = workdir or tempfile.mkdtemp(prefix="sg_host_cuda_")
        self._libs: dict[tuple[str, tuple[str, ...]], ctypes.CDLL] = {}
        self._lock = threading.Lock()
        self.compiles = 0

    def library(self, code: str, options: tuple[str, ...] = ()) -> ctypes.CDLL:
        key = (code, tuple(options))
        with self._lock:
            return self._libs[key] if key in self._libs else self._build(key)

    def _build(self, key: tuple[str, tuple[str, ...]]) -> ctypes.CDLL:
        code, options = key
        digest = hashlib.sha1(("\n".join(options) + code).encode()).hexdigest()[:16]
        src = os.path.join(self.workdir, f"k{digest}.cpp")
        lib = os.path.join(self.workdir, f"k{digest}.so")
        with open(src, "w") as f:
            f.write(SHIM + "\n" + code)
        defines = [o for o in options if o.startswith("-D")]
        cmd = [self.cxx, "-O0", "-std=c++17", "-shared", "-fPIC", "-w", *defines, src,
               "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"host compile failed ({' '.join(cmd)}):\n{done.stderr}")
        self.compiles += 1
        self._libs[key] = ctypes.CDLL(lib)
        return self._libs[key]

    def __call__(self, code: str, name: str, options: tuple[str, ...], grid: int, block: int,
                 args: tuple, shared_mem: int = 0) -> None:
        fn = getattr(self.library(code, options), name)
        fn.restype = None
        fn(*[_arg(a) for a in args])


__all__ = ["HostLauncher", "SHIM", "compiler"]
