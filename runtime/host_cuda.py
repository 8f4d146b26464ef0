"""Runs this project's CUDA C kernels on the CPU, for tests on machines without a GPU.

A shim (no system headers, so a kernel builds in tens of milliseconds) maps the CUDA
built-ins to one host thread (blockDim = gridDim = 1, warpSize 1, barriers and shuffles as
no-ops) and declares the libm functions the kernels call. Every kernel here is written with
grid-stride loops and block reductions that stay correct at one thread, so the same source
computes the same values. ``HostLauncher`` compiles a source with the system C++ compiler
into a shared library and calls the kernel through ctypes on NumPy arrays; installed as
``ops.gpu.launch`` it lets ops/gpu.py and the GPU executor run on NumPy. It also checks each
call against the kernel's C signature (count, pointer element types, exact scalar types): a
mismatch the host ABI would forgive (an int64 where an int is declared) shifts every later
argument of a real launch. Side effects (compiler processes, temporary files) live here, in
runtime/. Imports nothing from shardgrad.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
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
double pow(double, double); float powf(float, float); double erf(double); float erff(float);
double sin(double); float sinf(float); double cos(double); float cosf(float);
}
static inline float exp(float x) { return expf(x); }
static inline float log(float x) { return logf(x); }
static inline float tanh(float x) { return tanhf(x); }
static inline float sqrt(float x) { return sqrtf(x); }
static inline float pow(float x, float y) { return powf(x, y); }
static inline float erf(float x) { return erff(x); }
static inline float sin(float x) { return sinf(x); }
static inline float cos(float x) { return cosf(x); }
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


# the NumPy dtype of each C type a kernel parameter may have (T resolved through its typedef)
DTYPES = {"float": "float32", "double": "float64", "int": "int32", "long long": "int64",
          "unsigned int": "uint32", "unsigned long long": "uint64", "short": "int16",
          "signed char": "int8", "unsigned char": "uint8", "bool": "bool"}
_KERNEL = re.compile(r'extern\s+"C"\s+(?:__global__\s+)?void\s+(\w+)\s*\(([^)]*)\)\s*\{')
_TYPEDEF_T = re.compile(r"typedef\s+([\w ]+?)\s+T\s*;")

Param = tuple[str, bool, str | None]          # (declaration, is a pointer, NumPy dtype or None)


def signatures(text: str) -> dict[str, list[Param]]:
    """The parameters of every ``extern "C"`` kernel defined in ``text`` (preprocessed, where
    it has macros)."""
    t = _TYPEDEF_T.search(text)
    found = {}
    for name, params in _KERNEL.findall(text):
        parsed = []
        for decl in (d.strip() for d in params.split(",") if d.strip()):
            words = decl.replace("*", " * ").split()
            base = [w for w in words[:-1] if w not in ("const", "__restrict__", "*")]
            ctype = " ".join(base)
            if ctype == "T" and t is not None:
                ctype = t.group(1).strip()
            parsed.append((" ".join(decl.split()), "*" in words, DTYPES.get(ctype)))
        found[name] = parsed
    return found


def check_args(name: str, params: list[Param], args: tuple) -> None:
    """Raise TypeError unless ``args`` match kernel ``name``'s ``params`` as CuPy passes
    them: one argument per parameter, arrays (or None) of the pointee's dtype for pointers,
    NumPy scalars of exactly the declared type for values."""
    if len(args) != len(params):
        raise TypeError(f"kernel {name} takes {len(params)} arguments, got {len(args)}")
    for k, ((decl, pointer, dtype), a) in enumerate(zip(params, args, strict=True)):
        if pointer:
            ok = a is None or (isinstance(a, np.ndarray) and (dtype is None or a.dtype == dtype))
        else:
            ok = isinstance(a, np.generic) and (dtype is None or a.dtype == dtype)
        if not ok:
            got = (f"{type(a).__name__} of {a.dtype}" if hasattr(a, "dtype")
                   else type(a).__name__)
            raise TypeError(f"kernel {name} argument {k} ({decl}) takes "
                            f"{'an array of ' if pointer else 'a NumPy '}{dtype}, got {got}")


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
        self._params: dict[tuple[str, tuple[str, ...]], dict[str, list[Param]]] = {}
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
        # no fused multiply-adds (some hosts contract by default): NumPy's rounding, op by op
        cmd = [self.cxx, "-O0", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-w",
               *defines, src, "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"host compile failed ({' '.join(cmd)}):\n{done.stderr}")
        if "#define" not in code:                   # generated kernels: no macros to expand
            self._params[key] = signatures(code)
        else:
            pre = subprocess.run([self.cxx, "-E", "-P", "-std=c++17", *defines, src],
                                 capture_output=True, text=True, timeout=120)
            self._params[key] = signatures(pre.stdout) if pre.returncode == 0 else {}
        self.compiles += 1
        self._libs[key] = ctypes.CDLL(lib)
        return self._libs[key]

    def signature(self, code: str, options: tuple[str, ...], name: str) -> list[Param] | None:
        """Kernel ``name``'s parameters as ``__call__`` checks them (None: not parsed)."""
        self.library(code, options)
        return self._params[(code, tuple(options))].get(name)

    def __call__(self, code: str, name: str, options: tuple[str, ...], grid: int, block: int,
                 args: tuple, shared_mem: int = 0) -> None:
        fn = getattr(self.library(code, options), name)
        params = self.signature(code, options, name)
        if params is not None:
            check_args(name, params, args)
        fn.restype = None
        fn(*[_arg(a) for a in args])


__all__ = ["DTYPES", "HostLauncher", "SHIM", "check_args", "compiler", "signatures"]
