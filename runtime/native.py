"""Generated C for the CPU: each elementwise fusion group of a graph (graph.passes) as one C
loop, its C expressions the ops' own (OpDef.cuda_expr through ops.codegen.cpu_source), split
over the step's threads by OpenMP and vectorized (glibc's libmvec for exp, erf, tanh, ...), as
torch.compile's inductor does for its CPU kernels. Built with the system C compiler into a
shared library cached under the user's cache dir, loaded with ctypes; with no compiler, a
failed build, or SHARDGRAD_NATIVE=0, the program keeps NumPy's kernels (``Native.reason``).

Side effects (a compiler process, files, ctypes) live here, in runtime/. Imports graph and ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardgrad.graph import ir, passes
from shardgrad.graph.ir import Graph, Node
from shardgrad.ops.codegen import C_PRELUDE, KernelSource, Unsupported, cpu_source, read_through
from shardgrad.ops.registry import get

# A group below this many elements stays NumPy's: a ctypes call (about 1-2 us with its
# pointer look-ups) costs what a ufunc on a few thousand float32 costs.
MIN_SIZE = 4096
# From this many elements a loop is split over the threads: a fused float32 pass takes about
# 0.5 ns an element here (add + relu over 692k: 0.32 ms), so 128k elements take ~60 us alone,
# half of which the second thread saves, against the wake-up of a sleeping (passive, see
# _load) OpenMP thread, some microseconds; torch's intra-op grain is 32k elements.
PARALLEL_FROM = 1 << 17
# -O3 -march=native: the library runs on the machine that built it only (its cache key has
# the CPU's flags); -ffp-contract=off keeps a * b + c two roundings, as NumPy computes it;
# -fno-math-errno lets the math functions vectorize (NumPy never reads errno either).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
# tried in order until one builds: OpenMP with libmvec, OpenMP alone, neither (one thread)
VARIANTS = (("-fopenmp", "-DSG_LIBMVEC", "-lmvec", "-lm"), ("-fopenmp", "-lm"), ("-lm",))


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
    if cc:
        return shutil.which(cc) or (cc if os.path.isfile(cc) else None)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


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
    """Load ``lib`` with libgomp's threads sleeping as soon as a loop ends (OMP_WAIT_POLICY
    passive) unless the user chose a policy: they and OpenBLAS's threads share the cores,
    and a gomp thread spinning after its loop took the core OpenBLAS's next GEMM needed.
    bench/bench_step.py --threads 2 on the 2 shared cores (others' jobs at load 8-10): CNN
    step 19-31 ms passive against 270-530 ms with the default spin, exact-GELU MLP 87-94
    against 290-470 ms. libgomp reads the variable once, when it loads (here, with the
    first library), so the process's environment is left as it was."""
    from shardgrad.runtime.config import env
    if env("OMP_WAIT_POLICY") is not None or env("GOMP_SPINCOUNT") is not None:
        return ctypes.CDLL(str(lib))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(lib))
    finally:
        del os.environ["OMP_WAIT_POLICY"]


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
    """The threads a C loop and a batched op's row split use: SHARDGRAD_NATIVE_THREADS,
    default 1, whatever device.threads gives BLAS. OpenBLAS's workers spin for a while after
    each GEMM; a woken OpenMP or pool thread then waits for a core they hold until the
    scheduler's tick. bench_step's workers at device.threads = 2, quiet (load 1.4-1.6),
    kernels on 2 threads vs 1: exact-GELU MLP 16.0 vs 3.3 ms a step (torch 3.2), CNN 17-33
    vs 9.2-9.9 ms (torch 7.2). Where the cores are not shared with BLAS, set it higher."""
    from shardgrad.runtime.config import ConfigError, env
    value = env("SHARDGRAD_NATIVE_THREADS", "1") or "1"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"SHARDGRAD_NATIVE_THREADS={value!r}: give a whole number >= 1")
    return n


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


# ---- one group's kernel --------------------------------------------------------------------------

class Kernel:
    """A built group: ``kernel(*inputs, out=buf)`` computes the group's outputs into ``buf``
    (the one output, or all of them raveled one after another). Inputs must be C-contiguous
    (any other is copied first); ``threads`` is passed to the loop."""

    def __init__(self, fn, src: KernelSource, sizes: list[int], itemsize: int, n_threads: int):
        self.fn, self.passed, self.threads = fn, src.args, n_threads
        self._addrs: dict[int, tuple[Any, int]] = {}
        self._keep = None
        self.offsets = [sum(sizes[:k]) * itemsize for k in range(len(sizes))]
        fn.argtypes = [ctypes.c_void_p] * (len(src.args) + len(sizes)) + [ctypes.c_int]
        fn.restype = None

    def __call__(self, *xs, out):
        addr = self._addr
        args = [addr(xs[j]) for j in self.passed]
        base = addr(out)
        self.fn(*args, *[base + o for o in self.offsets], self.threads)
        return out

    def _addr(self, x) -> int:
        # an array's address by its identity: numpy's .ctypes.data builds two objects per
        # call, 3% of the exact-GELU step (py-spy); a step's arrays are the same few objects
        hit = self._addrs.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if not x.flags.c_contiguous:
            x = self._keep = np.ascontiguousarray(x)   # alive until the call returns
            return x.ctypes.data
        if len(self._addrs) > 64:                      # old feeds: let them go
            self._addrs.clear()
        self._addrs[id(x)] = (x, x.ctypes.data)
        return self._addrs[id(x)][1]

    def __repr__(self) -> str:
        return f"<C kernel {self.fn.__name__}, {self.threads} threads>"


@dataclass
class Native:
    """What the rewrite did: ``groups`` fused (``ops`` nodes in them), the ``threads`` their
    loops use, ``flags`` the library was built with, or why the C path is off (``reason``)."""

    groups: int = 0
    ops: int = 0
    threads: int = 1
    flags: str = ""
    reason: str = ""
    kernels: list[Kernel] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        if self.reason:
            return f"NumPy kernels ({self.reason})"
        return (f"C kernels: {self.groups} groups of {self.ops} ops, {self.threads} threads "
                f"({self.flags})")


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
    chosen = []
    for g in passes.fusion_groups(graph):
        if not _fusable(g):
            continue
        views = [read_through(x) for x in g.inputs]
        try:
            src = cpu_source(g, [v[1] for v in views], [v[2] for v in views], PARALLEL_FROM)
        except Unsupported:
            continue
        chosen.append((g, views, src))
    if not chosen:
        return graph, Native(reason="no elementwise group worth a kernel")
    code = "\n".join(dict.fromkeys(src.code for _, _, src in chosen))
    try:
        lib, flags = build(code)
    except NativeError as e:
        return graph, Native(reason=str(e))
    n_threads = threads() if n_threads is None else n_threads
    info = Native(threads=n_threads, flags=flags)
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


__all__ = ["Kernel", "Native", "NativeError", "Pool", "build", "cache_dir", "compiler", "enabled",
           "fuse", "threads"]
