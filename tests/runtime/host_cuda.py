"""Runs this project's CUDA C kernels on the CPU, for tests on machines without a GPU.

A launch runs the kernel's whole grid as CUDA would: every block (one after another), each
as ``blockDim.x`` threads with their own ``threadIdx``, so grid-stride loops really stride.
A kernel whose source synchronizes (``__syncthreads``, warp shuffles) runs each thread of a
block as a fiber (ucontext) on one host thread: ``__syncthreads`` waits until every live
thread of the block has arrived, ``__shfl_xor_sync`` / ``__shfl_down_sync`` exchange values
between the 32 lanes of a warp (a warp barrier on each side), so block and warp reductions
compute what they compute on a GPU. Other kernels run their threads as plain calls.

``HostLauncher`` compiles a source with the system C++ compiler (a small shim maps the CUDA
built-ins; generated ``sg_launch_<kernel>`` wrappers run the grid) into a shared library and
calls it through ctypes on NumPy arrays; installed as ``ops.gpu.launch`` it lets ops/gpu.py
and the GPU executor run on NumPy. It also checks each call against the kernel's C signature
(count, pointer element types, exact scalar types): a mismatch the host ABI would forgive
(an int64 where an int is declared) shifts every later argument of a real launch.
Test support (tests/): imports nothing from shardgrad.
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

WARP = 32
# a fiber's stack: the kernels' frames are small (a few hundred bytes at -O0); untouched pages
# of the reservation cost nothing
STACK_BYTES = 64 * 1024

# Every kernel: the CUDA built-ins for a host thread. No system headers, so a generated kernel
# builds in tens of milliseconds.
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
// per host thread: ranks on threads may launch at once (ctypes releases the GIL)
static thread_local sg_dim3 threadIdx, blockIdx, blockDim, gridDim;
static const int warpSize = 32;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local
static inline float __int_as_float(int i) { float f; __builtin_memcpy(&f, &i, 4); return f; }

// Runs every block of the grid, its threads one after another (no barrier in the source).
template <class F> static int sg_run_plain(unsigned grid, unsigned block, F&& body) {
    gridDim.x = grid; gridDim.y = gridDim.z = 1;
    blockDim.x = block; blockDim.y = blockDim.z = 1;
    threadIdx.y = threadIdx.z = blockIdx.y = blockIdx.z = 0;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) { threadIdx.x = t; body(); }
    }
    return 0;
}
"""

# Kernels whose source synchronizes: each block's threads as fibers, barriers and shuffles.
FIBERS = r"""
#include <stdlib.h>
#include <ucontext.h>
enum { SG_RUN, SG_BLOCK, SG_WARP, SG_DONE };
struct sg_fiber { ucontext_t ctx; int state; };
static thread_local sg_fiber* sg_fibers;
static thread_local int sg_cur;
static thread_local ucontext_t sg_sched;
static thread_local void (*sg_body)(void*);
static thread_local void* sg_arg;
static thread_local unsigned long long sg_xchg[1024];
static thread_local unsigned long long sg_switches;

static void sg_yield(int state) {
    sg_fibers[sg_cur].state = state;
    swapcontext(&sg_fibers[sg_cur].ctx, &sg_sched);
}
static inline void __syncthreads() { sg_yield(SG_BLOCK); }
template <class T> static inline T sg_shfl(T v, int src) {
    __builtin_memcpy(&sg_xchg[sg_cur], &v, sizeof(T));
    sg_yield(SG_WARP);                      // every lane has written its value
    T r = v;
    if (src >= 0 && src < (int)blockDim.x && src / warpSize == sg_cur / warpSize)
        __builtin_memcpy(&r, &sg_xchg[src], sizeof(T));
    sg_yield(SG_WARP);                      // every lane has read before any writes again
    return r;
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
    return sg_shfl(v, sg_cur ^ o);
}
template <class T> static inline T __shfl_down_sync(unsigned, T v, unsigned d) {
    const int lane = sg_cur % warpSize;
    return sg_shfl(v, lane + (int)d < warpSize ? sg_cur + (int)d : sg_cur);
}

static void sg_trampoline() {
    sg_body(sg_arg);
    sg_fibers[sg_cur].state = SG_DONE;      // then back to the scheduler (uc_link)
}

// Runs every block of the grid, its threads as fibers; a thread runs until it finishes or
// waits at a barrier, which opens once every live thread of its block (__syncthreads) or
// warp (shuffles) waits there. Returns 0, or 1 when threads wait on barriers that cannot open.
static int sg_run_fibers(unsigned grid, unsigned block, void (*body)(void*), void* arg) {
    if (block > 1024) return 2;
    sg_fiber* f = (sg_fiber*)calloc(block, sizeof(sg_fiber));
    char* stacks = (char*)malloc((size_t)SG_STACK * block);
    sg_fibers = f; sg_body = body; sg_arg = arg;
    gridDim.x = grid; gridDim.y = gridDim.z = 1;
    blockDim.x = block; blockDim.y = blockDim.z = 1;
    int status = 0;
    for (unsigned b = 0; b < grid && !status; ++b) {
        blockIdx.x = b; blockIdx.y = blockIdx.z = 0;
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&f[t].ctx);
            f[t].ctx.uc_stack.ss_sp = stacks + (size_t)SG_STACK * t;
            f[t].ctx.uc_stack.ss_size = SG_STACK;
            f[t].ctx.uc_link = &sg_sched;
            makecontext(&f[t].ctx, sg_trampoline, 0);
            f[t].state = SG_RUN;
        }
        for (;;) {
            int ran = 0;
            for (unsigned t = 0; t < block; ++t) {
                if (f[t].state != SG_RUN) continue;
                sg_cur = (int)t;
                threadIdx.x = t; threadIdx.y = threadIdx.z = 0;
                swapcontext(&sg_sched, &f[t].ctx);
                ++ran; ++sg_switches;
            }
            unsigned live = 0, at_block = 0;
            for (unsigned t = 0; t < block; ++t) {
                live += f[t].state != SG_DONE;
                at_block += f[t].state == SG_BLOCK;
            }
            if (!live) break;
            int opened = 0;
            if (at_block == live) {
                for (unsigned t = 0; t < block; ++t) f[t].state = SG_RUN;
                opened = 1;
            }
            for (unsigned w = 0; w * warpSize < block; ++w) {
                unsigned lanes = 0, waiting = 0, end = (w + 1) * warpSize;
                for (unsigned t = w * warpSize; t < end && t < block; ++t) {
                    lanes += f[t].state != SG_DONE;
                    waiting += f[t].state == SG_WARP;
                }
                if (lanes && waiting == lanes) {
                    for (unsigned t = w * warpSize; t < end && t < block; ++t)
                        if (f[t].state == SG_WARP) f[t].state = SG_RUN;
                    opened = 1;
                }
            }
            if (!ran && !opened) { status = 1; break; }
        }
    }
    free(stacks);
    free(f);
    return status;
}
extern "C" unsigned long long sg_fiber_switches() { return sg_switches; }
""".replace("SG_STACK", str(STACK_BYTES))

_SYNCS = re.compile(r"__syncthreads|__shfl_\w+_sync")


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


def wrappers(text: str, fibers: bool) -> str:
    """C++ for one ``extern "C" int sg_launch_<kernel>(grid, block, params...)`` per kernel of
    ``text`` (preprocessed): runs the grid, each block's threads as fibers when ``fibers``
    (the source synchronizes), else one after another."""
    out = []
    for name, params in _KERNEL.findall(text):
        decls = [" ".join(d.split()) for d in params.split(",") if d.strip()]
        names = [d.replace("*", " * ").split()[-1] for d in decls]
        run = ("sg_run_fibers(sg_grid, sg_block, [](void* p) { (*(decltype(sg_call)*)p)(); }, "
               "&sg_call)" if fibers else "sg_run_plain(sg_grid, sg_block, sg_call)")
        out.append(f'extern "C" int sg_launch_{name}(unsigned sg_grid, unsigned sg_block'
                   + "".join(f", {d}" for d in decls) + ") {\n"
                   f"    auto sg_call = [&]() {{ {name}({', '.join(names)}); }};\n"
                   f"    return {run};\n}}\n")
    return "\n".join(out)


class HostLauncher:
    """``launch(code, name, options, grid, block, args)`` on the CPU: the whole grid of
    ``block``-thread blocks, as the module docstring says. Libraries are built once per (code,
    options) into ``workdir``, one build at a time (ranks on threads share it).
    ``launches`` counts calls by kernel name, ``threads`` the most threads a block of each
    kernel ran (tests check the emulation is not one thread)."""

    def __init__(self, workdir: str | None = None, cxx: str | None = None):
        self.cxx = cxx or compiler()
        if self.cxx is None:
            raise RuntimeError("no C++ compiler (g++) found: cannot emulate CUDA kernels")
        self.workdir = workdir or tempfile.mkdtemp(prefix="sg_host_cuda_")
        self._libs: dict[tuple[str, tuple[str, ...]], ctypes.CDLL] = {}
        self._params: dict[tuple[str, tuple[str, ...]], dict[str, list[Param]]] = {}
        self._lock = threading.Lock()
        self.compiles = 0
        self.launches: dict[str, int] = {}
        self.threads: dict[str, int] = {}

    def library(self, code: str, options: tuple[str, ...] = ()) -> ctypes.CDLL:
        key = (code, tuple(options))
        with self._lock:
            return self._libs[key] if key in self._libs else self._build(key)

    def _build(self, key: tuple[str, tuple[str, ...]]) -> ctypes.CDLL:
        code, options = key
        digest = hashlib.sha1(("\n".join(options) + code).encode()).hexdigest()[:16]
        src = os.path.join(self.workdir, f"k{digest}.cpp")
        lib = os.path.join(self.workdir, f"k{digest}.so")
        defines = [o for o in options if o.startswith("-D")]
        text = code
        if "#" in code:                 # macros (SG_T): the signatures are the expanded ones
            raw = os.path.join(self.workdir, f"k{digest}.raw.cpp")
            with open(raw, "w") as f:
                f.write(code)
            pre = subprocess.run([self.cxx, "-E", "-P", "-std=c++17", *defines, raw],
                                 capture_output=True, text=True, timeout=120)
            if pre.returncode != 0:
                raise RuntimeError(f"host preprocessing failed:\n{pre.stderr}")
            text = pre.stdout
        with open(src, "w") as f:
            fibers = bool(_SYNCS.search(code))
            f.write(SHIM + (FIBERS if fibers else "") + "\n" + code + "\n"
                    + wrappers(text, fibers))
        # no fused multiply-adds (some hosts contract by default): NumPy's rounding, op by op
        cmd = [self.cxx, "-O0", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-w",
               *defines, src, "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"host compile failed ({' '.join(cmd)}):\n{done.stderr}")
        self._params[key] = signatures(text)
        self.compiles += 1
        self._libs[key] = ctypes.CDLL(lib)
        return self._libs[key]

    def signature(self, code: str, options: tuple[str, ...], name: str) -> list[Param] | None:
        """Kernel ``name``'s parameters as ``__call__`` checks them (None: not parsed)."""
        self.library(code, options)
        return self._params[(code, tuple(options))].get(name)

    def fiber_switches(self, code: str, options: tuple[str, ...] = ()) -> int:
        """Context switches between fibers so far on this host thread (for tests)."""
        fn = self.library(code, options).sg_fiber_switches
        fn.restype = ctypes.c_ulonglong
        return int(fn())

    def __call__(self, code: str, name: str, options: tuple[str, ...], grid: int, block: int,
                 args: tuple, shared_mem: int = 0) -> None:
        lib = self.library(code, options)
        params = self.signature(code, options, name)
        if params is None:
            raise RuntimeError(f"no kernel {name!r} in the source")
        check_args(name, params, args)
        if not 1 <= int(block) <= 1024 or int(grid) < 1:
            raise ValueError(f"kernel {name}: grid {grid} x block {block} is not a valid launch")
        fn = getattr(lib, f"sg_launch_{name}")
        fn.restype = ctypes.c_int
        status = fn(ctypes.c_uint(int(grid)), ctypes.c_uint(int(block)),
                    *[_arg(a) for a in args])
        if status:
            raise RuntimeError(f"kernel {name} (grid {grid}, block {block}) deadlocked: threads "
                               f"wait at a barrier that not every thread reaches")
        with self._lock:
            self.launches[name] = self.launches.get(name, 0) + 1
            self.threads[name] = max(self.threads.get(name, 0), int(block))


__all__ = ["DTYPES", "FIBERS", "HostLauncher", "SHIM", "WARP", "check_args", "compiler",
           "signatures", "wrappers"]
