"""C for the compiled CPU step, as torch.compile's inductor and torch's intra-op pool do it:
each elementwise fusion group of a graph (graph.passes) as one generated C loop, its C
expressions the ops' own (OpDef.cuda_expr through ops.codegen.cpu_source), vectorized (glibc's
libmvec for exp, erf, tanh, ...); the window ops' C kernels (OpDef.cpu, ops/cpu/*.c); GEMMs
split into blocks, each single-threaded BLAS; all of them over one intra-op thread pool
(runtime/pool.c). Built with the system C compiler into shared libraries cached under the
user's cache dir, loaded with ctypes; with no compiler, a failed build, or SHARDGRAD_NATIVE=0,
the program keeps NumPy's kernels (``Native.reason``).

Side effects (a compiler process, files, ctypes) live here, in runtime/. Imports graph and ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from shardgrad.graph import ir, passes
from shardgrad.graph.ir import Graph, Node
from shardgrad.ops.codegen import (
    C_PRELUDE,
    CPU_POOL,
    KernelSource,
    Unsupported,
    cpu_source,
    eager_source,
    read_through,
)
from shardgrad.ops.registry import get, set_cpu_runner, set_cpu_updates

# A group below this many elements stays NumPy's: a ctypes call (about 1-2 us with its
# pointer look-ups) costs what a ufunc on a few thousand float32 costs.
MIN_SIZE = 4096
# From this many elements a loop is split over the threads, in parts of GRAIN or more: a fused
# float32 pass takes about 0.5 ns an element here (add + relu over 692k: 0.32 ms), so 32k
# elements take ~16 us, against a hand-off to a spinning pool thread of about a microsecond;
# torch's intra-op grain is 32k elements too.
PARALLEL_FROM = 1 << 16
GRAIN = 1 << 15
# -O3 -march=native: the library runs on the machine that built it only (its cache key has
# the CPU's flags); -ffp-contract=off keeps a * b + c two roundings, as NumPy computes it;
# -fno-math-errno lets the math functions vectorize (NumPy never reads errno either).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
# tried in order until one builds: OpenMP's simd directives (no OpenMP runtime: the threads are
# runtime/pool.c's) with libmvec, without, neither (scalar math)
VARIANTS = (("-fopenmp-simd", "-DSG_LIBMVEC", "-pthread", "-lmvec", "-lm"),
            ("-fopenmp-simd", "-pthread", "-lm"), ("-pthread", "-lm"))
# how long a pool thread spins for the next job before it sleeps (the next comes within
# microseconds inside a step; between steps it sleeps)
SPIN_NS = 2_000_000


class NativeError(RuntimeError):
    """The C path cannot be used here (no compiler, or the build failed): says why."""


def enabled() -> bool:
    """False when SHARDGRAD_NATIVE=0 (or "no", "off") turns generated C off."""
    from shardgrad.runtime.config import env
    return (env("SHARDGRAD_NATIVE", "1") or "1").lower() not in ("0", "no", "off", "false")


def compiler() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on the PATH; None when there is none."""
    from shardgrad.runtime.config import env
    cc = env("CC")
    key = (cc, os.environ.get("PATH"))
    if key not in _compilers:      # a PATH search costs 0.1 ms: once per $CC and $PATH
        if cc:
            found = shutil.which(cc) or (cc if os.path.isfile(cc) else None)
        else:
            found = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
        _compilers[key] = found
    return _compilers[key]


_compilers: dict[tuple[str | None, str | None], str | None] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: $SHARDGRAD_CACHE, else $XDG_CACHE_HOME/shardgrad/native
    (~/.cache/shardgrad/native)."""
    from shardgrad.runtime.config import env
    root = env("SHARDGRAD_CACHE")
    if root:
        return Path(root)
    return Path(env("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardgrad" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        import platform
        return platform.processor() + platform.machine()


_identity: dict[str, str] = {}


def _compiler_identity(cc: str) -> str:
    if cc not in _identity:
        try:
            res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
            _identity[cc] = f"{cc}\n{res.stdout}"
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeError(f"C compiler {cc} does not run: {e}") from None
    return _identity[cc]


_lock = threading.Lock()
_loaded: dict[str, tuple[ctypes.CDLL, str]] = {}


def build(code: str) -> tuple[ctypes.CDLL, str]:
    """The shared library of C ``code`` (C_PRELUDE is prepended), built once per source,
    compiler and CPU and cached on disk; returns (library, flags it was built with). Raises
    NativeError with the compiler's message when nothing builds."""
    cc = compiler()
    if cc is None:
        raise NativeError("no C compiler (set CC, or install cc/gcc/clang)")
    source = C_PRELUDE + code
    key = hashlib.sha256("\n".join([source, _compiler_identity(cc), " ".join(FLAGS),
                                    repr(VARIANTS), _cpu_flags()]).encode()).hexdigest()[:24]
    with _lock:
        if key in _loaded:
            return _loaded[key]
        folder = cache_dir()
        lib = folder / f"sg_{key}.so"
        used = folder / f"sg_{key}.flags"
        if not (lib.exists() and used.exists()):
            _compile(cc, source, folder, lib, used)
        try:
            loaded = _load(lib), used.read_text()
        except OSError as e:
            raise NativeError(f"cannot load {lib}: {e}") from None
        _loaded[key] = loaded
        return loaded


def _load(lib: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(lib))


def _compile(cc: str, source: str, folder: Path, lib: Path, used: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(source)
        for variant in VARIANTS:
            out = Path(tmp) / lib.name
            cmd = [cc, "-std=gnu99", *FLAGS, str(src), "-o", str(out), *variant]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if res.returncode == 0 and out.exists():
                flags = Path(tmp) / used.name
                flags.write_text(" ".join(variant))
                os.replace(out, lib)             # atomic: a reader sees all of it or none
                os.replace(flags, used)
                return
            errors.append(f"{' '.join(cmd)}: exit {res.returncode}: "
                          f"{(res.stderr or res.stdout).strip()[-800:]}")
    raise NativeError("the C kernels did not build: " + " | ".join(errors))


def threads() -> int:
    """The threads of the compiled CPU step's intra-op pool: SHARDGRAD_NATIVE_THREADS when set,
    else get_num_threads() (BLAS's count: what device.threads, sg.set_num_threads,
    threadpoolctl or OMP_NUM_THREADS set) where the C runtime builds, else 1. Left at BLAS's
    default (every core) in one of several processes on a node (mpirun's local ranks, as
    torchrun's), the cores are shared out among them: a pool thread spins briefly after each
    job, and two processes' pools on one core would starve each other."""
    from shardgrad.runtime import device
    from shardgrad.runtime.config import ConfigError, env, local_size
    value = env("SHARDGRAD_NATIVE_THREADS")
    if value is None or value == "":
        if not enabled() or runtime() is None:
            return 1
        n, cores, local = get_num_threads(), device.cores(), local_size()
        return max(1, cores // local) if local > 1 and n >= cores else n
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"SHARDGRAD_NATIVE_THREADS={value!r}: give a whole number >= 1")
    return n


# ---- BLAS and the threads ------------------------------------------------------------------------

@dataclass(frozen=True)
class Blas:
    """An OpenBLAS (NumPy's, or gemm_blas()'s) reached directly: its CBLAS GEMMs
    (``sgemm``/``dgemm`` addresses, ``i64``: 64-bit integers), and its thread count
    (process-wide: the "_local" setter of OpenBLAS 0.3.31 sets it for every thread too)."""

    path: str
    sgemm: int
    dgemm: int
    i64: bool
    get_threads: Any
    set_threads: Any


_blas: list[Blas | None] = []


def blas() -> Blas | None:
    """NumPy's OpenBLAS (the library under numpy's own folder when several are loaded), or
    None when NumPy uses another BLAS (MKL, Accelerate): then GEMMs stay np.matmul's."""
    if _blas:
        return _blas[0]
    found = None
    try:
        from threadpoolctl import threadpool_info
        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    except Exception:           # noqa: BLE001 - threadpoolctl scans every loaded library
        libs = []
    # NumPy's own: vendored into numpy.libs/ (manylinux) or numpy/.dylibs/ (macOS); never
    # gemm_blas()'s wheel, which lies beside it in site-packages
    pkg = os.path.dirname(os.path.realpath(np.__file__))
    mine = (pkg + os.sep, pkg + ".libs" + os.sep)
    libs = [i for i in libs if f"{os.sep}scipy_openblas64{os.sep}" not in i["filepath"]]
    libs.sort(key=lambda i: not os.path.realpath(i["filepath"]).startswith(mine))
    for info in libs:
        found = _open_blas(info["filepath"])
        if found:
            break
    _blas.append(found)
    return found


def gemm_blas() -> Blas | None:
    """The OpenBLAS whose CBLAS GEMMs the split calls, each block on one thread: the
    scipy-openblas64 wheel's (a dependency: SciPy too carries its own), whose OpenBLAS 0.3.34
    ran ``x @ W.T`` 11% faster than NumPy 2.4's 0.3.31 here (docs/performance.md); NumPy's
    (blas()) where the wheel is missing or ``SHARDGRAD_BLAS=numpy``."""
    if _gemm_blas:
        return _gemm_blas[0]
    from shardgrad.runtime.config import env
    found = None
    if (env("SHARDGRAD_BLAS") or "").strip().lower() != "numpy":
        try:
            import scipy_openblas64 as wheel
            lib_dir = Path(wheel.get_lib_dir())
            path = next((str(p) for p in sorted(lib_dir.iterdir())
                         if p.name.startswith(f"lib{wheel.get_library()}.")), None)
        except (ImportError, OSError, IndexError):
            path = None
        found = _open_blas(path) if path else None
    _gemm_blas.append(found or blas())
    return _gemm_blas[0]


_gemm_blas: list[Blas | None] = []


def _open_blas(path: str) -> Blas | None:
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None

    def sym(*names):
        for name in names:
            try:
                return name, getattr(lib, name)
            except AttributeError:
                continue
        return None, None
    sname, sgemm = sym("scipy_cblas_sgemm64_", "cblas_sgemm64_", "scipy_cblas_sgemm",
                       "cblas_sgemm")
    _dname, dgemm = sym(*(n.replace("sgemm", "dgemm") for n in (sname or "x",)))
    _g, get_threads = sym("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                          "scipy_openblas_get_num_threads", "openblas_get_num_threads")
    _s, set_threads = sym("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                          "scipy_openblas_set_num_threads", "openblas_set_num_threads")
    if sgemm is None or dgemm is None or get_threads is None or set_threads is None:
        return None
    i64 = "64" in sname
    if not i64:
        _c, config = sym("openblas_get_config", "scipy_openblas_get_config64_")
        if config is not None:
            config.restype = ctypes.c_char_p
            i64 = b"USE64BITINT" in (config() or b"")
    get_threads.restype, get_threads.argtypes = ctypes.c_int, []
    set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
    addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value or 0
    return Blas(path, addr(sgemm), addr(dgemm), i64, get_threads, set_threads)


def get_num_threads() -> int:
    """The CPU threads a step uses (torch.get_num_threads): NumPy's BLAS thread count, which
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, threadpoolctl and set_num_threads set."""
    b = blas()
    rt = next((r for r in _runtimes.values() if isinstance(r, Runtime)), None)
    if rt is not None:                  # not the 1 it holds BLAS at while a step runs
        return max(1, int(rt.blas_threads()))
    if b is not None:
        return max(1, int(b.get_threads()))
    from threadpoolctl import threadpool_info
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, max(counts, default=os.cpu_count() or 1))


def set_num_threads(n: int) -> None:
    """Use ``n`` CPU threads (torch.set_num_threads): BLAS's thread count, and the intra-op
    pool of every step compiled after this (device.threads does this for a training run)."""
    from shardgrad.runtime.config import ConfigError
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"set_num_threads({n!r}): give a whole number >= 1")
    from threadpoolctl import threadpool_limits
    threadpool_limits(int(n), user_api="blas")


# ---- the C runtime: the pool, the window kernels, the GEMM split ---------------------------------

class Runtime:
    """runtime/pool.c with ops/cpu/*.c and the eager elementwise kernels, built and loaded
    once per process: ``window(name)``, ``sg_gemm``, ``sg_update`` (the optimizers' fused
    updates) and ``sg_run_ew`` are its entry points, each called with one int64 argument
    array."""

    def __init__(self, lib: ctypes.CDLL, flags: str):
        self.lib, self.flags = lib, flags
        self.blas = blas()
        self.gemm = gemm_blas()
        self.parallel_for = ctypes.cast(lib.sg_parallel_for, ctypes.c_void_p).value
        lib.sg_pool_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value
        lib.sg_pool_init(addr(self.blas.set_threads) if self.blas else None,
                         addr(self.blas.get_threads) if self.blas else None, SPIN_NS)
        if self.gemm is not None and self.gemm is not self.blas:   # sg_gemm holds it at 1
            lib.sg_gemm_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.sg_gemm_init(addr(self.gemm.set_threads), addr(self.gemm.get_threads))
        lib.sg_blas_threads.restype = ctypes.c_int
        self.blas_enter, self.blas_exit, self.blas_threads = (
            lib.sg_blas_enter, lib.sg_blas_exit, lib.sg_blas_threads)
        for name in ("sg_gemm", "sg_update", "sg_run_ew"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = None

    def window(self, name: str):
        fn = getattr(self.lib, f"sg_run_{name}")
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
        return fn


_runtimes: dict[str | None, Runtime | str] = {}     # per compiler: the runtime, or why not


# Elementwise ops whose eager C kernels the runtime carries (ops.codegen.eager_source, from
# each op's own C expression): those whose every float op is exactly rounded, so that an
# eager value is NumPy's bit for bit whichever kernel computed it (exp, tanh, erf... stay
# NumPy's: libm's and NumPy's SIMD versions differ in the last bits).
# By name, with their operand counts.
EAGER_ELEMENTWISE = {"add": 2, "sub": 2, "mul": 2, "div": 2, "maximum": 2, "minimum": 2,
                     "neg": 1, "relu": 1, "step": 1, "sqrt": 1, "sign": 1}


def _eager_kernels() -> str:
    code = []
    for op, arity in EAGER_ELEMENTWISE.items():
        opdef = get(op)
        for dtype in FLOAT_TYPES:
            try:
                code.append(eager_source(op, opdef.cuda_expr, dtype, arity)[1])
            except Unsupported:
                continue
    return "\n".join(code)


def _sources() -> str:
    here = Path(__file__).resolve().parent
    cpu = here.parent / "ops" / "cpu"
    return "\n".join([*(p.read_text() for p in sorted(cpu.glob("*.c"))),
                      _eager_kernels(), (here / "pool.c").read_text()])


def runtime() -> Runtime | None:
    """The C runtime, built on first use (per C compiler); None when it cannot be built here
    (runtime_error() says why)."""
    cc = compiler()
    with _lock_runtime:
        if cc not in _runtimes:
            try:
                _runtimes[cc] = Runtime(*build(_sources()))
            except NativeError as e:
                _runtimes[cc] = str(e)
        got = _runtimes[cc]
    return got if isinstance(got, Runtime) else None


def signals() -> ctypes.CDLL | None:
    """runtime/signals.c (a rank's last words said from its signal handler), built on first
    use: a library of its own, small to build, used whether or not SHARDGRAD_NATIVE turns
    the generated kernels off; None where no C compiler builds it."""
    with _lock_runtime:
        if not _signals:
            try:
                lib = build((Path(__file__).resolve().parent / "signals.c").read_text())[0]
            except NativeError:
                lib = None
            _signals.append(lib)
    return _signals[0]


_signals: list[ctypes.CDLL | None] = []


def runtime_error() -> str:
    """Why runtime() is None ("" when it is not)."""
    got = _runtimes.get(compiler())
    return got if isinstance(got, str) else ""


_lock_runtime = threading.Lock()


# ---- rows over threads ---------------------------------------------------------------------------

class Pool:
    """Runs calls on ``threads`` threads at once (this one and ``threads - 1`` workers): the
    compiled program splits a batched op (OpDef.batched: the window ops) by rows over them,
    as torch's intra-op pool splits its pooling and im2col kernels; NumPy releases the GIL
    inside its copies and ufuncs, so the rows run in parallel. One per thread count."""

    _pools: dict[int, Pool] = {}
    _made = threading.Lock()

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor
        self.threads = threads
        self._ex = ThreadPoolExecutor(threads - 1, thread_name_prefix="sg-rows")

    @classmethod
    def of(cls, threads: int) -> Pool:
        with cls._made:
            if threads not in cls._pools:
                cls._pools[threads] = cls(threads)
            return cls._pools[threads]

    def run(self, calls) -> None:
        """Each of ``calls`` (at most ``threads``) once, concurrently; re-raises the first
        failure after all have finished."""
        futures = [self._ex.submit(c) for c in calls[1:]]
        try:
            calls[0]()
        finally:
            for f in futures:
                f.exception()
        for f in futures:
            f.result()


# ---- the window ops' and the GEMMs' steps ----------------------------------------------

FLOAT_TYPES = ("float32", "float64")
# a window kernel part covers this many (image, channel) planes or more
PLANE_GRAIN = 4


class Addresses:
    """An array's data address by its identity: numpy's .ctypes.data builds two objects per
    call (3% of the exact-GELU step, py-spy); a step's arrays are the same few objects, held
    here so that no other takes their ids. An input that is not C-contiguous is copied first
    (the copy kept alive until the call returns, and some calls more)."""

    def __init__(self):
        self._seen: dict[int, tuple[Any, int]] = {}
        self._keep: list[Any] = []

    def __call__(self, x) -> int:
        hit = self._seen.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
            self._keep.append(x)                   # until release(), after the call
            return x.ctypes.data
        if len(self._seen) > 64:
            self._seen.clear()
        self._seen[id(x)] = (weakref.ref(x), x.ctypes.data)
        return self._seen[id(x)][1]

    def release(self) -> None:
        self._keep.clear()


def c_step(rt: Runtime, node: Node, n_threads: int, slots: list, ins: list[int], i: int,
           fixed: list[bool]):
    """The step running ``node`` (its op's CpuKernel) into ``slots[i]`` (a fixed buffer, or an
    output's, which changes from run to run), reading its inputs from ``slots[ins]``, over
    ``n_threads`` threads; None when the op has no C kernel or this node is not one it takes
    (dtype, rank, layout: then the op's own runs)."""
    from shardgrad.ops.registry import kernel_for
    kern = kernel_for(node, "cpu", "c")
    if kern is None or node.dtype not in FLOAT_TYPES or any(
            x.dtype != node.dtype for x in node.inputs[:len(ins)] if x.dtype in FLOAT_TYPES):
        return None
    if kern.name == "gemm":
        return _gemm_step(rt, node, n_threads, slots, ins, i, fixed)
    return _window_step(rt, kern, node, n_threads, slots, ins, i, fixed)


# an eager op runs its C kernel from this much work (multiply-adds of a GEMM, elements of a
# window op's image): below it the call's setup (10-30 us) outweighs what C saves over NumPy.
# On several threads a GEMM goes to the pool from where the pool splits it (sg_gemm), so
# that NumPy's BLAS never wakes threads of its own beside the pool's.
EAGER_GEMM_FROM = 1 << 23
EAGER_SPLIT_FROM = 1 << 18
EAGER_WINDOW_FROM = 1 << 12


def run_eager(node: Node, args: list) -> Any:
    """An eager op's C kernel (its OpDef.cpu; ops.registry's CPU runner): the op on the
    intra-op pool over threads() threads, as a compiled step runs it, into a new array; None
    where the op's own ``forward`` runs instead: C off or not built here, an input that is
    not a NumPy array, a dtype or layout the kernel does not take, or too little work."""
    kern = get(node.op).cpu
    if kern is None:
        return run_elementwise(node, args)
    if node.dtype not in FLOAT_TYPES or any(
            type(a) is not np.ndarray or a.dtype != node.dtype for a in args):
        return None                 # the kernels read every operand as the node's dtype
    gemm = kern.name == "gemm"
    if (args[0].ndim == 0 or args[0].size * args[1].shape[-1] < EAGER_SPLIT_FROM) if gemm \
            else max(a.size for a in args) < EAGER_WINDOW_FROM:
        return None
    got = _eager_setting()
    if got is None:
        return None
    rt, n_threads = got
    if gemm:
        a, b = args
        if n_threads == 1 and a.size * b.shape[-1] < EAGER_GEMM_FROM:
            return None
        out = np.empty(node.shape, node.dtype)
        call = _gemm_args(rt, n_threads, a, b, out)
        if call is None:
            return None
        step = partial(rt.lib.sg_gemm, (ctypes.c_longlong * 17)(*call))
    else:
        out = np.empty(node.shape, node.dtype)
        k = len(args)
        step = _window_step(rt, kern, node, n_threads, [*args, out], list(range(k)), k,
                            [True] * (k + 1))
        if step is None:
            return None
    if rt.gemm is rt.blas:      # NumPy's own BLAS, held at 1 thread in the pool's blocks
        rt.blas_enter()
        try:
            step()
        finally:
            rt.blas_exit()
    else:
        step()
    return out


def run_elementwise(node: Node, args: list) -> Any:
    """An EAGER_ELEMENTWISE op's C kernel over the pool into a new array (None: NumPy's):
    operands of the node's dtype, broadcast and strided as they come where the dimensions
    merge into three with each operand read along the rows or held. Only where it pays for
    the call's ~10 us of setup (EAGER_ELEMENTWISE_FROM)."""
    size = math.prod(node.shape)
    if size < (EAGER_SLOW_FROM if node.op in EAGER_SLOW_IN_NUMPY else EAGER_ELEMENTWISE_FROM):
        return None                 # first: a small op (most of them) pays only this
    if node.dtype not in FLOAT_TYPES or any(
            type(a) is not np.ndarray or a.dtype != node.dtype for a in args):
        return None                 # the kernels read every operand as the node's dtype
    got = _eager_setting()
    if got is None:
        return None
    rt, n_threads = got
    if n_threads == 1 and node.op not in EAGER_SLOW_IN_NUMPY and all(
            a.shape == node.shape or a.size == 1 for a in args):
        return None                     # NumPy's one-thread loops stream as fast as ours
    key = (node.op, node.dtype, node.shape, *[(a.shape, a.strides) for a in args])
    plan = _ew_plans.get(key)
    if plan is None:
        if len(_ew_plans) > 256:
            _ew_plans.clear()
        plan = _ew_plans[key] = _ew_plan(rt, node, args, size)
    if plan is False:
        return None
    out = np.empty(node.shape, node.dtype)
    call = (ctypes.c_longlong * 15)(n_threads, *plan, out.ctypes.data,
                                   *[a.ctypes.data for a in args])
    rt.lib.sg_run_ew(call)
    return out


def _ew_plan(rt: Runtime, node: Node, args: list, size: int) -> tuple | bool:
    """(kernel, elements, grain, geometry) of an eager elementwise op, or False where its C
    kernel cannot read the operands (eager_source's geometry)."""
    fn = getattr(rt.lib, f"sg_ew_{node.op}_{node.dtype}", None)
    if fn is None:
        return False
    shape, nd = node.shape, len(node.shape)
    per: list[list[int]] = []              # each operand's strides in elements, broadcast 0
    for a in args:
        item, pad = a.itemsize, nd - a.ndim
        if pad < 0 or any(s % item for s in a.strides):
            return False
        per.append([0] * pad + [0 if a.shape[k] == 1 else a.strides[k] // item
                                for k in range(a.ndim)])
    dims = [(shape[d], [st[d] for st in per]) for d in range(nd) if shape[d] != 1]
    merged: list[tuple[int, list[int]]] = []
    for size_d, st in dims:                 # outer to inner: merge into the previous dim
        if merged and all(o == i * size_d for o, i in zip(merged[-1][1], st, strict=True)):
            merged[-1] = (merged[-1][0] * size_d, st)
        else:
            merged.append((size_d, st))
    if len(merged) > 3 or any(s not in (0, 1) for s in (merged[-1][1] if merged else [])):
        return False
    while len(merged) < 3:
        merged.insert(0, (1, [0] * len(args)))
    (_, s0), (d1, s1), (length, s_l) = merged
    geometry = [length, d1]
    for k in range(len(args)):
        geometry += [s0[k], s1[k], s_l[k]]
    geometry += [0] * (8 - len(geometry))
    return (ctypes.cast(fn, ctypes.c_void_p).value, size, GRAIN, *geometry)


# eager elementwise plans by (op, dtype, shape, operands' shapes and strides): an eager step
# meets the same few each step
_ew_plans: dict[tuple, tuple | bool] = {}
# An eager elementwise op runs its C kernel from 2^18 elements (at 2^16, 8 us of NumPy's
# add, the call's setup, ~10 us, outweighs a second thread): on one thread only where an
# operand is broadcast (NumPy's broadcast loops run at half the speed of its plain ones; a
# (64,16,26,26) + (16,1,1) bias add: 144 us, ours 77). NumPy's maximum (relu's forward)
# checks each element for NaN at a third of our loop's speed: those from 2^15, any threads.
EAGER_ELEMENTWISE_FROM = 1 << 18
EAGER_SLOW_IN_NUMPY = frozenset({"relu", "maximum", "minimum"})
EAGER_SLOW_FROM = 1 << 15


def _eager_setting() -> tuple[Runtime, int] | None:
    """(the runtime, its threads) for eager ops, or None with C off or not built: threads()
    and runtime() cost 10 us a call (environment reads), so they are kept per setting."""
    env = os.environ
    key = (env.get("SHARDGRAD_NATIVE"), env.get("SHARDGRAD_NATIVE_THREADS"), env.get("CC"))
    hit = _eager.get(key)
    if hit is None:
        _eager.clear()
        rt = runtime() if enabled() else None
        hit = _eager[key] = (rt, {})
    rt, counts = hit
    if rt is None:
        return None
    blas_threads = rt.blas_threads()        # what set_num_threads changes
    n = counts.get(blas_threads)
    if n is None:
        n = counts[blas_threads] = threads()
    return rt, n


_eager: dict[tuple, tuple[Runtime | None, dict[int, int]]] = {}


# ---- the optimizers' fused updates -------------------------------------------------------------
# graph.optim's eager SGD and Adam step on NumPy parameters, as torch's fused multi-tensor
# optimizers (ops.gpu's sgd_multi_ / adam_multi_ are their GPU twins, with these signatures):
# each rule one pass over every parameter and its state in place, split over the intra-op
# pool, with the rule's values bit for bit (ops/cpu/update.c rounds as NumPy does op by op).


def sgd_multi_(ps: list, gs: list, bufs: list | None, *, lr: float, momentum: float = 0.0,
               weight_decay: float = 0.0, nesterov: bool = False) -> bool:
    """graph.optim.SGD's rule over C-contiguous NumPy arrays of one float dtype (gradients
    shaped as their parameters; momentum buffers ``bufs`` when momentum > 0), each updated in
    place. False, with nothing done, when the C runtime is off or cannot be built here."""
    if momentum and bufs is None:
        raise ValueError("momentum needs momentum buffers")
    flags = (1 if weight_decay else 0) | (2 if momentum else 0) | (
        4 if momentum and nesterov else 0)
    return _update(0, ps, gs, [bufs] if momentum else [],
                   (lr, weight_decay, momentum, flags))


def adam_multi_(ps: list, gs: list, ms: list, vs: list, *, lr: float, step: int,
                betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                decoupled: bool = False) -> bool:
    """graph.optim.Adam's (``decoupled``: AdamW's) rule at 1-based ``step`` over NumPy arrays
    as sgd_multi_'s, with their first and second moments ``ms`` and ``vs``, in place. The bias
    corrections are the rule's Python floats. False when the C runtime is off or not built."""
    b1, b2 = float(betas[0]), float(betas[1])
    flags = (2 if decoupled else 1) if weight_decay else 0
    return _update(1, ps, gs, [ms, vs], (lr, weight_decay, flags, b1, 1.0 - b1, b2, 1.0 - b2,
                                         1.0 - b1 ** step, 1.0 - b2 ** step, eps,
                                         lr * weight_decay))


def _update(rule: int, ps: list, gs: list, states: list[list], hyper: tuple) -> bool:
    got = _eager_setting()
    if got is None:
        return False
    if not ps:
        return True
    rt, n_threads = got
    k, dtype = len(ps), ps[0].dtype
    kept = [*ps, *(a for lst in states for a in lst)]
    key = (rule, n_threads, len(states), *map(id, kept))
    call = _update_calls.get(key)
    if call is None or any(r() is not a for r, a in zip(call[0], kept, strict=True)):
        _check_update(ps, gs, states)
        if len(_update_calls) > 16:
            _update_calls.clear()
        call = _update_calls[key] = _update_call(rule, n_threads, ps, states, len(hyper))
    refs, ptrs, h, args = call
    for t, g in enumerate(gs):
        if (type(g) is not np.ndarray or g.dtype != dtype or not g.flags.c_contiguous
                or g.size != ps[t].size):
            _check_update(ps, gs, states)
        ptrs[k + t] = g.ctypes.data
    h[:] = [float(v) for v in hyper]
    rt.lib.sg_update(args)
    return True


def _check_update(ps: list, gs: list, states: list[list]) -> None:
    k, dtype = len(ps), ps[0].dtype
    for lst in (ps, gs, *states):
        if len(lst) != k or any(type(a) is not np.ndarray or a.dtype != dtype or
                                not a.flags.c_contiguous for a in lst):
            raise ValueError(f"fused update: every array must be a C-contiguous {dtype} "
                             f"NumPy array, {k} of each")
    if dtype not in (np.float32, np.float64) or any(
            g.size != p.size for p, g in zip(ps, gs, strict=True)) or any(
            s.size != p.size for lst in states for p, s in zip(ps, lst, strict=True)):
        raise ValueError("fused update: float32 or float64 arrays, each gradient and state "
                         "the size of its parameter")


def _update_call(rule: int, n_threads: int, ps: list, states: list[list], n_hyper: int):
    """sg_update's arguments for these parameters and states (weakly held: the same arrays
    step after step, so only the gradients' addresses and the hyper-parameters change)."""
    k, kept = len(ps), [*ps, *(a for lst in states for a in lst)]
    off = np.zeros(k + 1, np.int64)
    np.cumsum([p.size for p in ps], out=off[1:])
    ptrs = (ctypes.c_void_p * (k * (2 + len(states))))()
    for t, p in enumerate(ps):
        ptrs[t] = p.ctypes.data
    for j, a in enumerate(kept[k:]):
        ptrs[2 * k + j] = a.ctypes.data
    h = (ctypes.c_double * n_hyper)()
    base, size = ctypes.addressof(ptrs), ctypes.sizeof(ctypes.c_void_p) * k
    args = (ctypes.c_longlong * 11)(
        n_threads, rule, ps[0].dtype == np.float64, k, GRAIN, ctypes.addressof(h),
        off.ctypes.data, base, base + size, base + 2 * size, len(states))
    args._keep = (off, ptrs, h)                 # alive as long as the arguments
    return [weakref.ref(a) for a in kept], ptrs, h, args


# the fused updates' prepared calls, by (rule, threads, states, ids of the parameters and
# states): a few optimizers per process; checked against their arrays by weak reference
_update_calls: dict[tuple, tuple] = {}


def _window_step(rt, kern, node, n_threads, slots, ins, i, fixed):
    if kern.name == "maxpool_grad" and len(ins) != 3:
        return None                 # without the forward's maxima: the op's own kernel
    image = node if kern.image < 0 else node.inputs[kern.image]
    if len(image.shape) != 4:
        return None
    (n, c, h, w), a = image.shape, node.attrs
    kh, kw = a["kernel"]
    (sh, sw), (ph, pw) = a["stride"], a["padding"]
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    args = (ctypes.c_longlong * (15 + len(ins) + 1))(
        n_threads, node.dtype == "float64", PLANE_GRAIN, n, c, h, w, kh, kw, sh, sw, ph, pw,
        oh, ow)
    fn = rt.window(kern.name)
    places = [*ins, i]
    if all(fixed[j] for j in places) and all(slots[j].flags.c_contiguous for j in places):
        for k, j in enumerate(places):
            args[15 + k] = slots[j].ctypes.data
        return partial(fn, args)
    addr = Addresses()

    def step():
        for k, j in enumerate(ins):
            args[15 + k] = addr(slots[j])
        out = slots[i]
        into = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
        args[15 + len(ins)] = addr(into)
        try:
            fn(args)
        finally:
            addr.release()
        if into is not out:                     # a caller's strided array (outputs_into)
            np.copyto(out, into)
    return step


def _operand(x, batch: int) -> tuple[int, int, int] | None:
    """(transposed, leading dimension, batch stride) of a 2-d or 3-d GEMM operand, in
    elements, or None when BLAS cannot read it as it lies."""
    item = x.itemsize
    if any(s % item or s < 0 for s in x.strides):
        return None
    st = [s // item for s in x.strides]
    rows, cols = x.shape[-2:]
    bs = 0 if x.ndim == 2 or x.shape[0] == 1 else st[0]
    if x.ndim == 3 and x.shape[0] not in (1, batch):
        return None
    r, c = st[-2:]
    if (c == 1 or cols == 1) and r >= max(1, cols):
        return 0, r if rows > 1 else max(1, cols), bs
    if (r == 1 or rows == 1) and c >= max(1, rows):
        return 1, c if cols > 1 else max(1, rows), bs
    return None


def _as_3d(x, lead: tuple[int, ...]):
    """``x`` (..., r, c) as (batch, r, c) without a copy: leading dimensions ``lead`` merged
    into one (a 2-d ``x`` as it is, broadcast over them), or None when its strides do not
    allow it (or its leading dimensions are not ``lead``: broadcast ones)."""
    if x.ndim == 2:
        return x
    if all(d == 1 for d in x.shape[:-2]):
        return x.reshape(x.shape[-2:])
    if tuple(x.shape[:-2]) != lead:
        return None
    if x.ndim == 3:
        return x
    view = x.reshape((-1,) + x.shape[-2:])     # a copy where the strides do not merge
    return view if np.shares_memory(view, x) else None


def _gemm_args(rt: Runtime, n_threads: int, a, b, out) -> list[int] | None:
    if out.ndim < 2 or not out.flags.c_contiguous or not out.size or (
            a.dtype != out.dtype or b.dtype != out.dtype or a.ndim < 2 or b.ndim < 2):
        return None
    lead = tuple(out.shape[:-2])
    a, b, out = _as_3d(a, lead), _as_3d(b, lead), out.reshape((-1,) + out.shape[-2:])
    if a is None or b is None:
        return None
    batch = out.shape[0] if out.ndim == 3 else 1
    m, k = a.shape[-2:]
    nn = b.shape[-1]
    if k == 0:
        return None
    pa, pb = _operand(a, batch), _operand(b, batch)
    if pa is None or pb is None:
        return None
    dbl = out.dtype == np.float64
    return [n_threads, rt.gemm.dgemm if dbl else rt.gemm.sgemm, int(dbl), int(rt.gemm.i64),
            pa[0], pb[0], batch, m, nn, k, pa[1], pb[1], pa[2], pb[2], a.ctypes.data,
            b.ctypes.data, out.ctypes.data]


def _gemm_step(rt, node, n_threads, slots, ins, i, fixed):
    if rt.gemm is None or len(ins) != 2:
        return None
    gemm = rt.lib.sg_gemm
    ja, jb = ins
    if fixed[ja] and fixed[jb] and fixed[i]:
        got = _gemm_args(rt, n_threads, slots[ja], slots[jb], slots[i])
        if got is None:
            return None
        return partial(gemm, (ctypes.c_longlong * 17)(*got))
    memo: dict[tuple, Any] = {}

    def step():
        a, b, out = slots[ja], slots[jb], slots[i]
        key = (id(a), id(b), id(out))
        hit = memo.get(key)
        if hit is None or hit[0]() is not a or hit[1]() is not b or hit[2]() is not out:
            got = _gemm_args(rt, n_threads, a, b, out)
            if len(memo) > 16:
                memo.clear()
            hit = memo[key] = (weakref.ref(a), weakref.ref(b), weakref.ref(out),
                               None if got is None else (ctypes.c_longlong * 17)(*got))
        if hit[3] is None:
            np.matmul(a, b, out=out)
        else:
            gemm(hit[3])
    return step


# ---- one group's kernel --------------------------------------------------------------------------

class Kernel:
    """A built group: ``kernel(*inputs, out=buf)`` computes the group's outputs into ``buf``
    (the one output, or all of them raveled one after another). Inputs must be C-contiguous
    (any other is copied first); ``threads`` is passed to the loop."""

    def __init__(self, fn, src: KernelSource, sizes: list[int], itemsize: int, n_threads: int):
        self.fn, self.passed, self.threads = fn, src.args, n_threads
        self._addr = Addresses()
        self.offsets = [sum(sizes[:k]) * itemsize for k in range(len(sizes))]
        fn.argtypes = [ctypes.c_void_p] * (len(src.args) + len(sizes)) + [ctypes.c_int]
        fn.restype = None

    def __call__(self, *xs, out):
        addr = self._addr
        args = [addr(xs[j]) for j in self.passed]
        into = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
        base = addr(into)
        try:
            self.fn(*args, *[base + o for o in self.offsets], self.threads)
        finally:
            addr.release()
        if into is not out:                 # a caller's strided array (outputs_into)
            np.copyto(out, into)
        return out

    def __repr__(self) -> str:
        return f"<C kernel {self.fn.__name__}, {self.threads} threads>"


@dataclass
class Native:
    """What the C path did: ``groups`` fused (``ops`` nodes in them), the intra-op pool's
    ``threads``, the ``flags`` the libraries were built with, the nodes the compiled program
    runs with C kernels (``c_steps``, filled in by runtime.compiled: window ops and GEMMs), or
    why the C path is off (``reason``)."""

    groups: int = 0
    ops: int = 0
    threads: int = 1
    flags: str = ""
    reason: str = ""
    c_steps: dict[str, int] = field(default_factory=dict)
    kernels: list[Kernel] = field(default_factory=list, repr=False)
    runtime: Runtime | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.reason:
            return f"NumPy kernels ({self.reason})"
        steps = ", ".join(f"{v} {k}" for k, v in sorted(self.c_steps.items()))
        return (f"C kernels: {self.groups} groups of {self.ops} ops"
                f"{', ' + steps if steps else ''}; {self.threads} threads ({self.flags})")


def _fusable(group) -> bool:
    """Worth a kernel and expressible as one node (a group of several outputs writes them
    into one flat buffer, so they must share a dtype)."""
    size = int(np.prod(group.shape, dtype=np.int64))
    return size >= MIN_SIZE and len({o.dtype for o in group.outputs}) == 1


def fuse(graph: Graph, n_threads: int | None = None) -> tuple[Graph, Native]:
    """``graph`` with each worthwhile elementwise fusion group replaced by one ``fused`` node
    whose out= kernel is its generated C (and ``unpack`` views of it for a group of several
    outputs), and what was done. The graph is returned unchanged, with the reason, when the C
    path is turned off or cannot be built."""
    if not enabled():
        return graph, Native(reason="turned off by SHARDGRAD_NATIVE=0")
    rt = runtime()
    if rt is None:
        return graph, Native(reason=runtime_error())
    n_threads = threads() if n_threads is None else n_threads
    info = Native(threads=n_threads, flags=rt.flags, runtime=rt)
    chosen = []
    for g in passes.fusion_groups(graph):
        if not _fusable(g):
            continue
        views = [read_through(x) for x in g.inputs]
        try:
            src = cpu_source(g, [v[1] for v in views], [v[2] for v in views], PARALLEL_FROM,
                             GRAIN)
        except Unsupported:
            continue
        chosen.append((g, views, src))
    if not chosen:
        return graph, info
    code = CPU_POOL + "\n".join(dict.fromkeys(src.code for _, _, src in chosen))
    try:
        lib, flags = build(code)
    except NativeError as e:
        return graph, Native(reason=str(e))
    ctypes.c_void_p.in_dll(lib, "sg_par").value = rt.parallel_for
    replace: dict[int, tuple[Any, int]] = {}      # member id -> (group index, output index)
    members: dict[int, int] = {}
    made: dict[int, tuple[Node, list[Node]]] = {}
    for k, (g, _views, src) in enumerate(chosen):
        for m in g.nodes:
            members[m.id] = k
        for o, out in enumerate(g.outputs):
            replace[out.id] = (k, o)
        itemsize = np.dtype(g.outputs[0].dtype).itemsize
        size = int(np.prod(g.shape, dtype=np.int64))
        info.kernels.append(Kernel(getattr(lib, src.name), src, [size] * len(g.outputs),
                                   itemsize, n_threads))
        info.groups += 1
        info.ops += len(g.nodes)

    new: dict[int, Node] = {}
    order: list[Node] = []

    def rebuilt(n: Node) -> Node:
        if n.id in new:
            return new[n.id]
        if n.id in members:
            k = members[n.id]
            if k not in made:
                made[k] = _group_nodes(chosen[k], info.kernels[k], rebuilt, order)
            fused, views = made[k]
            new[n.id] = views[replace[n.id][1]]
            return new[n.id]
        stack = [n]
        while stack:                        # iterative: a long chain must not recurse deeply
            top = stack[-1]
            waiting = [x for x in top.inputs if x.id not in new and x.id not in members]
            if waiting:
                stack.extend(waiting)
                continue
            stack.pop()
            if top.id in new:
                continue
            ins = tuple(rebuilt(x) for x in top.inputs)
            node = top if all(a is b for a, b in zip(ins, top.inputs, strict=True)) else Node(
                top.op, ins, top.attrs, top.shape, top.dtype, top.where)
            new[top.id] = node
            order.append(node)
        return new[n.id]

    for n in graph.nodes:
        if n.id not in members or n.id in replace:
            rebuilt(n)
    outs = {name: rebuilt(n) for name, n in graph.outputs.items()}
    live = ir.ancestors(outs.values())
    order = [n for n in order if n.id in live or not n.inputs]
    return Graph(outs, order, dict(graph.meta)), info


def _group_nodes(choice, kernel: Kernel, rebuilt, order: list[Node]) -> tuple[Node, list[Node]]:
    """The ``fused`` node of a group and the node standing for each of its outputs."""
    g, views, _src = choice
    ins = [rebuilt(v[0]) for v in views]
    view_attrs = tuple(
        None if v[0] is x else ("transpose", tuple(x.attrs["axes"])) if x.op == "transpose"
        else ("broadcast_to", tuple(x.shape)) for x, v in zip(g.inputs, views, strict=True))
    index = {m.id: k for k, m in enumerate(g.nodes)}
    attrs = {"steps": tuple((s.op, tuple(s.args), dict(s.attrs)) for s in g.expr),
             "dtypes": tuple(m.dtype for m in g.nodes),
             "outputs": tuple(index[o.id] for o in g.outputs), "shape": tuple(g.shape),
             "views": view_attrs, "kernel": kernel}
    where = g.nodes[-1].where
    fused = Node("fused", tuple(ins), attrs, *get("fused").infer(
        *[(x.shape, x.dtype) for x in ins], **attrs), where=where)
    order.append(fused)
    if len(g.outputs) == 1:
        return fused, [fused]
    size = int(np.prod(g.shape, dtype=np.int64))
    parts = []
    for k, o in enumerate(g.outputs):
        part = Node("unpack", (fused,), {"offset": k * size, "shape": tuple(o.shape)},
                    tuple(o.shape), o.dtype, o.where)
        order.append(part)
        parts.append(part)
    return fused, parts


# eager ops take the same C kernels, and eager optimizers these updates (ops.registry asks
# this module through the runner and the updates it installs)
set_cpu_runner(run_eager, run_elementwise, EAGER_ELEMENTWISE)
set_cpu_updates(SimpleNamespace(sgd_multi_=sgd_multi_, adam_multi_=adam_multi_,
                                ready=lambda: _eager_setting() is not None))

__all__ = ["Blas", "Kernel", "Native", "NativeError", "Pool", "Runtime", "blas", "build",
           "adam_multi_", "c_step", "cache_dir", "compiler", "enabled", "fuse", "gemm_blas",
           "get_num_threads", "run_eager", "run_elementwise", "runtime", "runtime_error",
           "set_num_threads", "sgd_multi_", "signals", "threads"]
