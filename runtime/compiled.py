"""The compiled executor: a Graph turned once into a flat schedule of kernel calls over
pre-planned buffers (liveness-based reuse, ``out=`` and in-place kernels, views for shape ops,
constants materialized once, values computed straight into the bucket that packs them). Same
interface and semantics as the reference Interpreter, and tested for equivalence against it:
a backend of graph.walk's executor core (its steps are the schedule, run by the one loop).

Imports graph and ops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph, Node, fmt_type
from shardgrad.graph.walk import ExecutionError, Walk, leaf_value
from shardgrad.ops.registry import OutKernel, device_kind, get, kernel_for

FEEDS = ("input", "param", "state")


# ---- the plan: what each node is, where its value lives, when its buffer dies ----------------

@dataclass
class _Value:
    kind: str                 # feed | const | kernel | view | call | pack | slice (of a pack)
    storage: int | None       # the storage a kernel node writes (index into storages)
    holds: frozenset[int]     # storages the value may point into (views, unknown kernels)
    contiguous: bool          # statically known to be C-contiguous (a reshape stays a view)


@dataclass
class _Storage:
    dtype: str
    size: int
    start: int                # position of the node that writes it
    end: int = -1             # position of its last reader (through any view)
    pinned: bool = False      # an output lives here: its own buffers, one per parity
    offset: int = 0           # where it lives in the arena (not pinned)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


ALIGN = 64   # arena offsets are cache-line aligned
# a batched op is split over the threads from this many elements: a hand-off to the pool
# costs tens of microseconds, a window op on 64k float32 a few hundred here
SPLIT_FROM = 1 << 16


def _view(n: Node) -> str | None:
    """OpDef.view: whether the op's forward returns a view ("any", "contiguous"); a view of
    part of a C-contiguous input ("part": unpack) is one here as a reshape's is."""
    view = get(n.op).view if n.inputs else None
    return "contiguous" if view == "part" else view


def _out_kernel(n: Node, device: str) -> OutKernel | None:
    """The node's out= kernel (OpDef.out) when it is exact for the node's dtypes."""
    k = kernel_for(n.op, device, "out") if n.inputs else None
    return k if k is not None and k.accepts(n) else None


def _classify(graph: Graph, slices: Mapping[int, tuple[int, int]], packs: bool, device: str
              ) -> tuple[list[_Value], list[_Storage]]:
    """Each node's kind and the storages kernel nodes write. ``slices[node id] = (pack id,
    offset)``: that node writes straight into its slice of the pack's storage. ``packs``:
    pack nodes write a planned buffer (else their forward returns a fresh one)."""
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    values: list[_Value] = []
    storages: list[_Storage] = []
    pack_storage: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        ins = [values[pos[x.id]] for x in n.inputs]
        held = frozenset().union(*(v.holds for v in ins)) if ins else frozenset()
        if n.id in slices or (packs and n.op == "pack"):
            pack_id = slices[n.id][0] if n.id in slices else n.id
            if pack_id not in pack_storage:     # the first of its members to run opens it
                storages.append(_Storage(graph.nodes[pos[pack_id]].dtype,
                                         graph.nodes[pos[pack_id]].size, i))
                pack_storage[pack_id] = len(storages) - 1
            sid = pack_storage[pack_id]
            values.append(_Value("slice" if n.id in slices else "pack", sid, frozenset({sid}),
                                 True))
        elif n.op in FEEDS:
            values.append(_Value("feed", None, frozenset(), False))
        elif n.op == "const":
            values.append(_Value("const", None, frozenset(), True))
        elif _view(n) == "any" or (_view(n) == "contiguous" and ins[0].contiguous):
            values.append(_Value("view", None, held, _view(n) == "contiguous"))
        elif _out_kernel(n, device) is not None:
            storages.append(_Storage(n.dtype, n.size, i))
            sid = len(storages) - 1
            values.append(_Value("kernel", sid, frozenset({sid}), True))
        else:
            # an op's own forward may return a view of an input: keep the inputs alive with it
            values.append(_Value("call", None, held, False))
    return values, storages


def _slices(graph: Graph, values: list[_Value]) -> dict[int, tuple[int, int]]:
    """The pack inputs that can be computed straight into their slice of the pack's buffer
    (PyTorch DDP's gradient_as_bucket_view), as {node id: (pack id, offset)}: a kernel value
    written by an out= kernel (a slice of a flat buffer is C-contiguous), packed once, no
    output's, and read by nothing but the pack itself after the pack runs (the pack scales
    the slice in place and an allreduce may reduce into it: a later reader would see that)."""
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    outputs = frozenset().union(*(values[pos[o.id]].holds for o in graph.outputs.values()))
    last_read: dict[int, int] = {}       # storage -> last position reading it, the packs aside
    direct: dict[int, list[int]] = {}    # storage -> positions of packs reading its own node
    for i, n in enumerate(graph.nodes):
        for x in n.inputs:
            v = values[pos[x.id]]
            for sid in v.holds:
                if n.op == "pack" and v.kind == "kernel" and v.storage == sid:
                    direct.setdefault(sid, []).append(i)
                else:
                    last_read[sid] = max(last_read.get(sid, -1), i)
    out: dict[int, tuple[int, int]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op != "pack":
            continue
        offset = 0
        for x in n.inputs:
            v = values[pos[x.id]]
            if (v.kind == "kernel" and x.dtype == n.dtype and v.storage not in outputs
                    and direct[v.storage] == [i] and last_read.get(v.storage, -1) < i):
                out[x.id] = (n.id, offset)
            offset += x.size
    return out


def _plan(graph: Graph, elide: bool = True, device: str = "cpu"
          ) -> tuple[list[_Value], list[_Storage], int, int, dict[int, tuple[int, int]]]:
    """Classify nodes, give each kernel node a storage, and place the storages that are not
    pinned in one arena by liveness. Returns (values, storages, arena bytes, blocks placed,
    slices: the pack inputs written into their pack's buffer, see ``_slices``).

    With ``elide``, pack nodes write a planned buffer and the inputs ``_slices`` allows are
    computed straight into it. An elementwise kernel whose same-shape input dies at it
    writes over that input (an in-place chain is one block); blocks are then placed greedy
    by size, each at the lowest offset free for its whole lifetime (TFLite's and XNNPACK's
    offset planner)."""
    values, storages = _classify(graph, {}, elide, device)
    slices = _slices(graph, values) if elide else {}
    if slices:
        values, storages = _classify(graph, slices, elide, device)
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    last = {n.id: i for i, n in enumerate(graph.nodes)}
    for i, n in enumerate(graph.nodes):
        for x in n.inputs:
            last[x.id] = i
    for o in graph.outputs.values():
        for sid in values[pos[o.id]].holds:
            storages[sid].pinned = True
    for n, v in zip(graph.nodes, values, strict=True):
        for sid in v.holds:
            storages[sid].end = max(storages[sid].end, last[n.id])

    # in-place chains: the output joins the block of a dying input it may overwrite
    block = list(range(len(storages)))
    for i, (n, v) in enumerate(zip(graph.nodes, values, strict=True)):
        if (v.kind != "kernel" or not kernel_for(n, device, "out").inplace
                or storages[v.storage].pinned):
            continue
        for x in n.inputs:
            xv = values[pos[x.id]]
            if xv.kind != "kernel" or x.shape != n.shape or x.dtype != n.dtype:
                continue
            st = storages[xv.storage]
            # it must die here, and no other input may read it through a different layout
            if st.pinned or st.end != i or any(
                    xv.storage in values[pos[y.id]].holds and values[pos[y.id]] is not xv
                    for y in n.inputs):
                continue
            block[v.storage] = block[xv.storage]
            break

    spans: dict[int, list[int]] = {}
    for sid, st in enumerate(storages):
        if st.pinned:
            continue
        b = block[sid]
        span = spans.setdefault(b, [st.start, st.end, 0])
        span[0], span[1] = min(span[0], st.start), max(span[1], st.end)
        span[2] = max(span[2], -(-st.nbytes // ALIGN) * ALIGN)
    offset_of, arena_bytes = place(spans)
    for sid, st in enumerate(storages):
        if not st.pinned:
            st.offset = offset_of[block[sid]]
    return values, storages, arena_bytes, len(spans), slices


def place(spans: Mapping[Any, tuple[int, int, int]]) -> tuple[dict[Any, int], int]:
    """Offsets in one arena for blocks ``{key: (first position, last position, bytes)}``
    live over those (inclusive) positions: greedy by size, each at the lowest offset free
    for its whole lifetime (TFLite's and XNNPACK's offset planner). Returns (offsets, arena
    bytes). The GPU executor's plan (runtime.gpu) places its buffers with it too."""
    placed: list[tuple[int, int, int, int]] = []      # (offset, nbytes, start, end)
    offset_of: dict[Any, int] = {}
    for b, (start, end, nbytes) in sorted(spans.items(), key=lambda kv: (-kv[1][2], kv[1][0])):
        offset = 0
        for o, size, *_ in sorted(p for p in placed if p[2] <= end and start <= p[3]):
            if offset + nbytes <= o:
                break
            offset = max(offset, o + size)
        placed.append((offset, nbytes, start, end))
        offset_of[b] = offset
    return offset_of, max((o + size for o, size, _, _ in placed), default=0)


def _peak_live_bytes(graph: Graph, storages: list[_Storage]) -> int:
    """The planner's lower bound: the largest total size of values live at one time (an
    output from its definition to the end of the step)."""
    horizon = len(graph.nodes)
    delta = [0] * (horizon + 2)
    for st in storages:
        delta[st.start] += st.nbytes
        delta[(horizon if st.pinned else max(st.end, st.start)) + 1] -= st.nbytes
    peak = live = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


# ---- the program ------------------------------------------------------------------------------

class Program(Walk):
    """A Graph compiled for repeated execution on ``xp`` (numpy or cupy). Build once with
    ``compile(graph)``; call ``run`` every step.

    ``run(feeds, outputs_into=None)`` takes leaf values keyed by leaf name (or Node) and returns
    the outputs by name, exactly as ``Interpreter.run`` does (a failure is an ExecutionError
    naming the node, op and source line).

    Output contract: an output computed by a kernel lives in a buffer the Program owns. Output
    buffers alternate between two sets, so the arrays returned by one run stay valid through
    the next run and are overwritten by the run after it. Feeding the outputs of one run into
    the next (the training loop: new parameters in, newer out) is therefore safe; a feed that
    is one of the buffers about to be written is copied first. Copy an output to keep it longer.

    ``outputs_into={name: array}`` writes those outputs into the caller's arrays instead (e.g.
    views into one flat parameter buffer): directly from the kernel when no leaf read later in
    the step shares memory with the array, else through the Program's buffer and a copy.

    ``elide_packs`` (default True): a ``pack`` (the data-parallel bucket) writes a planned
    buffer, and each value it packs that an out= kernel computes, that no output holds and
    that nothing but the pack reads after the pack runs, is computed straight into its slice
    there; the pack then only scales those slices in place (the same multiply, so the same
    bits). ``packed_in_place`` and ``pack_copies`` count the values written there and copied.
    """

    def __init__(self, graph: Graph, xp=np, rank: int | None = None, shard: str | None = None,
                 elide_packs: bool = True, threads: int = 1, runtime=None):
        super().__init__(graph, rank, shard)
        self.xp = xp
        nodes = graph.nodes
        pos = {n.id: i for i, n in enumerate(nodes)}
        self.device = device = device_kind(xp)
        self.native = None      # what compile()'s generated C did (runtime.native.Native)
        self.threads = threads
        # the C runtime (runtime.native.Runtime): window ops and GEMMs as its C kernels
        self.runtime = runtime if device == "cpu" else None
        self.c_steps: dict[str, int] = {}
        pool = None
        if threads > 1 and device == "cpu" and self.runtime is None:
            from shardgrad.runtime.native import Pool
            pool = Pool.of(threads)
        self.split = 0          # batched nodes whose rows are split over the threads
        values, storages, arena_bytes, self.n_blocks, slices = _plan(graph, elide_packs, device)
        self.packed_in_place = len(slices)
        self.pack_copies = sum(len(n.inputs) for n in nodes if n.op == "pack") - len(slices)
        self.n_storages = len(storages)
        self.arena_bytes = arena_bytes
        self.pinned_bytes = sum(st.nbytes for st in storages if st.pinned)
        self.n_pinned = sum(st.pinned for st in storages)
        self.lower_bound_bytes = _peak_live_bytes(graph, storages)
        arena = xp.empty(arena_bytes, np.uint8)
        self._parity = 0

        slots: list[Any] = [None] * len(nodes)
        fixed = [False] * len(nodes)
        self._slots = slots
        # per pinned kernel node: its slot, its buffer in each parity, its type
        self._pinned: list[tuple[int, list[Any], tuple[int, ...], str]] = []
        # per value written into a pinned pack's buffer: its slot, the pack's slot, where it
        # lies there, its shape, and its view of the pack's buffer in each parity
        self._sliced: list[tuple[int, int, int, int, tuple[int, ...], list[Any]]] = []
        self._feeds: list[tuple[int, Node, str | None, tuple[int, ...], np.dtype]] = []
        steps, step_nodes = self.steps, self.step_nodes

        for i, (n, v) in enumerate(zip(nodes, values, strict=True)):
            ins = [pos[x.id] for x in n.inputs]
            if v.kind == "feed":
                self._feeds.append((i, n, n.name, n.shape, np.dtype(n.dtype)))
                continue
            if v.kind == "const":
                slots[i] = xp.asarray(np.array(n.attrs["value"], order="C"))
                fixed[i] = True
                continue
            if v.kind == "pack":
                st = storages[v.storage]
                if st.pinned:
                    self._pinned.append((i, [None, None], n.shape, n.dtype))
                else:
                    slots[i] = arena[st.offset:st.offset + st.nbytes].view(st.dtype)
                    fixed[i] = True
                parts = _pack_parts(n, ins, slices)
                if parts:
                    steps.append(_pack_step(xp, slots, i, parts, n))
                    step_nodes.append(n)
                continue
            if v.kind == "slice":
                st = storages[v.storage]
                fn, tail = kernel_for(n, device, "out").make(xp, n)
                pack, offset = slices[n.id]
                if st.pinned:
                    self._sliced.append((i, pos[pack], offset, offset + n.size, n.shape,
                                         [None, None]))
                    steps.append(self._c_step(n, slots, ins, i, fixed)
                                 or _out_step(fn, tail, slots, ins, i))
                else:
                    start = st.offset + offset * np.dtype(n.dtype).itemsize
                    raw = arena[start:start + n.size * np.dtype(n.dtype).itemsize]
                    slots[i] = raw.view(st.dtype).reshape(n.shape)
                    fixed[i] = True
                    steps.append(self._c_step(n, slots, ins, i, fixed)
                                 or _fixed_out_step(fn, tail, slots, ins, slots[i], fixed))
                step_nodes.append(n)
                continue
            if v.kind == "kernel":
                st = storages[v.storage]
                fn, tail = kernel_for(n, device, "out").make(xp, n)
                if st.pinned:
                    # allocated on first use: outputs the caller directs elsewhere need none
                    self._pinned.append((i, [None, None], n.shape, n.dtype))
                    steps.append(self._c_step(n, slots, ins, i, fixed)
                                 or _out_step(fn, tail, slots, ins, i))
                else:
                    raw = arena[st.offset:st.offset + st.nbytes]
                    slots[i] = raw.view(st.dtype).reshape(n.shape)
                    fixed[i] = True
                    c = self._c_step(n, slots, ins, i, fixed)
                    if c is not None:
                        steps.append(c)
                    elif pool is not None and get(n.op).batched and n.size >= SPLIT_FROM and (
                            n.shape[0] >= threads):
                        steps.append(_rows_step(pool, fn, tail, slots, ins, slots[i]))
                        self.split += 1
                    else:
                        steps.append(_fixed_out_step(fn, tail, slots, ins, slots[i], fixed))
                step_nodes.append(n)
                continue
            if v.kind == "view" and all(fixed[j] for j in ins):
                slots[i] = kernel_for(n, device)(xp, slots[ins[0]], **n.attrs)
                fixed[i] = True
                continue
            fn = kernel_for(n, device)
            steps.append(_call_step(partial(fn, xp, **n.attrs), slots, ins, i))
            step_nodes.append(n)

        users = graph.users()
        self._out_slots = [(k, pos[o.id]) for k, o in graph.outputs.items()]
        self._by_name = {k: pos[o.id] for k, o in graph.outputs.items()}
        pinned_slots = {p[0] for p in self._pinned if values[p[0]].kind == "kernel"}
        # leaves a direct write into a caller's array could clobber: read after the output
        # node, or by it when its kernel is not elementwise-in-place
        self._hazards: dict[int, list[int]] = {}
        for i in pinned_slots:
            o = nodes[i]
            reads = [j for j, n in enumerate(nodes) if n.op in FEEDS and (
                any(pos[u.id] > i for u in users[n.id])
                or (o in users[n.id] and not kernel_for(o, device, "out").inplace))]
            self._hazards[i] = reads
        self._owned: tuple[set[int], set[int]] = (set(), set())

    def _c_step(self, n: Node, slots, ins, i, fixed):
        """The node's C kernel step into ``slots[i]`` (runtime.native.c_step), counted in
        ``c_steps``, or None."""
        if self.runtime is None:
            return None
        from shardgrad.runtime.native import c_step
        step = c_step(self.runtime, n, self.threads, slots, ins, i, fixed)
        if step is not None:
            self.c_steps[n.op] = self.c_steps.get(n.op, 0) + 1
        return step

    # the schedule loop is the hot path: everything here was resolved at build time
    def run(self, feeds: Mapping[Any, Any], outputs_into: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
        xp, slots = self.xp, self._slots
        parity = self._parity
        self._parity ^= 1
        owned = self._owned[parity]
        for i, n, name, shape, dtype in self._feeds:
            value = feeds[n] if n in feeds else feeds.get(name)
            if getattr(value, "shape", None) != shape or getattr(value, "dtype", None) != dtype:
                value = leaf_value(xp, n, feeds)      # the reference's checks and messages
            base = getattr(value, "base", None)
            if id(value) in owned or (base is not None and id(base) in owned):
                value = value.copy()
            slots[i] = value
        copies: list[tuple[int, Any]] = []
        direct: set[int] = set()
        if outputs_into:
            for name, arr in outputs_into.items():
                i = self._by_name[name]
                node = self.graph.nodes[i]
                if tuple(arr.shape) != node.shape or str(arr.dtype) != node.dtype:
                    raise ExecutionError(
                        f"outputs_into[{name!r}] is {fmt_type(arr.shape, str(arr.dtype))}, "
                        f"output is {fmt_type(node.shape, node.dtype)}", node, self.rank)
                if i in self._hazards and i not in direct and not any(
                        xp.may_share_memory(arr, slots[j]) for j in self._hazards[i]):
                    slots[i] = arr
                    direct.add(i)
                else:
                    copies.append((i, arr))
        for i, bufs, shape, dtype in self._pinned:
            if i not in direct:
                if bufs[parity] is None:
                    bufs[parity] = xp.empty(shape, dtype)
                    owned.add(id(bufs[parity]))
                slots[i] = bufs[parity]
        for i, pack, start, stop, shape, views in self._sliced:
            if views[parity] is None:
                views[parity] = slots[pack][start:stop].reshape(shape)
            slots[i] = views[parity]
        if self.runtime is None:
            self.execute()
        else:       # BLAS on one thread in this one: the GEMMs' parallelism is the pool's
            self.runtime.blas_enter()
            try:
                self.execute()
            finally:
                self.runtime.blas_exit()
        out = {k: slots[i] for k, i in self._out_slots}
        for i, arr in copies:
            xp.copyto(arr, slots[i])
        if outputs_into:
            out.update(outputs_into)
        return out

    def stats(self) -> dict[str, int]:
        """Plan facts: nodes, scheduled kernel calls, values written by kernels, the distinct
        buffers they share (arena blocks plus output storages), the arena, the outputs (each
        with one buffer per parity, allocated on first use), and the lower bound on live bytes
        within a step; ``planned_bytes`` is the arena plus one parity's outputs (the other
        parity holds what the caller fed back)."""
        return {"nodes": len(self.graph.nodes), "steps": len(self.steps),
                "kernel_values": self.n_storages, "buffers": self.n_blocks + self.n_pinned,
                "arena_bytes": self.arena_bytes, "outputs": self.n_pinned,
                "output_bytes": self.pinned_bytes,
                "planned_bytes": self.arena_bytes + self.pinned_bytes,
                "lower_bound_bytes": self.lower_bound_bytes,
                "packed_in_place": self.packed_in_place, "pack_copies": self.pack_copies}


def _fixed_out_step(fn, tail, slots, ins, out, fixed) -> Callable[[], Any]:
    """A kernel writing into its own fixed buffer; a C-level partial when every input is
    fixed too, else a closure that reads the varying inputs from their slots."""
    if all(fixed[j] for j in ins):
        return partial(fn, *[slots[j] for j in ins], *tail, out=out)
    if len(ins) == 1:
        (a,) = ins
        return lambda: fn(slots[a], *tail, out=out)
    if len(ins) == 2:
        a, b = ins
        return lambda: fn(slots[a], slots[b], *tail, out=out)
    return lambda: fn(*[slots[j] for j in ins], *tail, out=out)


def _rows_step(pool, fn, tail, slots, ins, out) -> Callable[[], Any]:
    """A batched kernel (OpDef.batched) over the pool's threads, each its share of the rows
    of every input and of ``out``."""
    rows, k = out.shape[0], pool.threads
    bounds = [(rows * j // k, rows * (j + 1) // k) for j in range(k)]
    parts = [(a, b, out[a:b]) for a, b in bounds if b > a]

    def step():
        xs = [slots[j] for j in ins]
        pool.run([partial(fn, *[x[a:b] for x in xs], *tail, out=o) for a, b, o in parts])
    return step


def _out_step(fn, tail, slots, ins, i) -> Callable[[], Any]:
    """A kernel writing into the buffer its slot holds this run (an output's)."""
    if len(ins) == 2:
        a, b = ins
        return lambda: fn(slots[a], slots[b], *tail, out=slots[i])
    return lambda: fn(*[slots[j] for j in ins], *tail, out=slots[i])


def _pack_parts(n: Node, ins: list[int], slices: Mapping[int, tuple[int, int]]
                ) -> list[tuple[int, int, tuple[int, ...], int | None]]:
    """What pack ``n``'s step does, as (start, stop, shape, slot) ranges of its buffer: copy
    the input in ``slot`` there, or (slot None) scale in place a run of inputs that were
    computed there (nothing at all when the scale is 1)."""
    parts: list[tuple[int, int, tuple[int, ...], int | None]] = []
    start = 0
    for x, j in zip(n.inputs, ins, strict=True):
        stop = start + x.size
        if slices.get(x.id, (None,))[0] != n.id:
            parts.append((start, stop, x.shape, j))
        elif n.attrs.get("scale", 1.0) != 1.0:
            if parts and parts[-1][3] is None and parts[-1][1] == start:
                parts[-1] = (parts[-1][0], stop, (stop - parts[-1][0],), None)
            else:
                parts.append((start, stop, (x.size,), None))
        start = stop
    return parts


def _pack_step(xp, slots, i, parts, n: Node) -> Callable[[], Any]:
    """Pack ``n``'s forward into the buffer in slot ``i``: the same multiply (or copy) per
    element, so the same bits, whether an input is copied in or was computed in place."""
    scale = n.attrs.get("scale", 1.0)
    factor = np.dtype(n.dtype).type(scale)

    def step():
        flat = slots[i]
        for start, stop, shape, j in parts:
            view = flat[start:stop].reshape(shape)
            if scale == 1.0:
                view[...] = slots[j]
            else:
                xp.multiply(view if j is None else slots[j], factor, out=view)
    return step


def _call_step(fn, slots, ins, i) -> Callable[[], Any]:
    """An op's own forward (or a view of a varying value): a fresh result every run."""
    if len(ins) == 1:
        (a,) = ins

        def step():
            slots[i] = fn(slots[a])
        return step

    def step_n():
        slots[i] = fn(*[slots[j] for j in ins])
    return step_n


def compile(graph: Graph, xp=np, simplify: bool = True, rank: int | None = None,  # noqa: A001
            shard: str | None = None, elide_packs: bool = True, native: bool = True,
            threads: int | None = None) -> Program:
    """Compile ``graph`` into a Program on ``xp``. With ``simplify`` (the default) the graph
    first goes through ``passes.fold_transposes`` (products written in the layout their users
    read), ``passes.simplify`` (dead code, constant folding, common subexpressions) and
    ``passes.schedule`` (gradients consumed as soon as they exist). With ``elide_packs`` (the
    default) a pack writes a planned buffer and the values it packs are computed straight
    into their slices of it where that is safe, as PyTorch DDP's gradient_as_bucket_view
    (``stats()["packed_in_place"]`` counts them); else each pack copies into a fresh buffer.
    With ``native`` (the default) on NumPy, the step runs C over an intra-op thread pool
    (runtime.native, runtime/pool.c): each elementwise fusion group of a few thousand
    elements or more as one generated loop, the window ops as their C kernels (OpDef.cpu),
    GEMMs as blocks of single-threaded BLAS; ``program.native`` says what ran, and why not
    where it did not (no compiler, a failed build, SHARDGRAD_NATIVE=0). Its arithmetic is
    NumPy's (bit for bit, but for the sign of a zero maximum-pooling gradient); exp, erf, tanh
    and the other math functions are glibc's vector forms, within a few float ulps of
    NumPy's. ``threads`` (default: runtime.native.threads(), BLAS's thread count; 1 without
    the C path) is the pool's width; without the C path, batched ops (OpDef.batched) are
    split by rows over that many Python threads (the same values)."""
    if simplify:
        graph = passes.schedule(passes.simplify(passes.fold_transposes(graph)))
    info = None
    if device_kind(xp) == "cpu":
        from shardgrad.runtime import native as c
        if threads is None:        # NumPy's kernels alone stay on one thread (BLAS's own aside)
            threads = c.threads() if native else 1
        if native:
            graph, info = c.fuse(graph, threads)
    program = Program(graph, xp, rank, shard, elide_packs, threads or 1,
                      info.runtime if info is not None else None)
    program.native = info
    if info is not None:
        info.c_steps = program.c_steps
    return program
