"""The GPU executor: runs a Graph on one CUDA device with CuPy arrays, each elementwise fusion
group (graph.passes.fusion_groups) as one generated kernel (ops.codegen), every other op
through ``kernel_for(op, "cuda")``: its hand-written CUDA kernel where it has one, else its
generic forward on cupy (matmul is cuBLAS, which reads transposed views in place).

Semantics are the reference Interpreter's (tested against it). Side effects (CUDA launches)
live here, in runtime/. Imports graph, ops and runtime (device, interpreter).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph, Node
from shardgrad.graph.passes import FusionGroup, fusion_groups
from shardgrad.graph.walk import EnvWalk, leaf_value
from shardgrad.ops import gpu
from shardgrad.ops.codegen import KernelSource, Unsupported, fused_source, read_through
from shardgrad.ops.registry import device_kind, get, kernel_for
from shardgrad.runtime.compiled import ALIGN, place
from shardgrad.runtime.device import Device, xp_for


class FusedKernel:
    """One fusion group as one kernel: ``kernel(xp, inputs) -> outputs`` (the group's
    outputs, in order), ``inputs`` being the values of ``sources``. A group input that is a
    ``broadcast_to`` or ``transpose`` view (a weight gradient out of a matmul, a conv output
    in NCHW order) is read through its operand, so the view is never materialized."""

    def __init__(self, group: FusionGroup):
        self.group = group
        views = [read_through(x) for x in group.inputs]
        self.sources = [v[0] for v in views]
        self.src: KernelSource = fused_source(group, [v[1] for v in views],
                                              [v[2] for v in views])
        self.out_types = [(o.shape, o.dtype) for o in group.outputs]
        self.grid = gpu.blocks(self.src.size)

    def __call__(self, xp, inputs: list[Any], outs: list[Any] | None = None) -> list[Any]:
        if outs is None:
            outs = [xp.empty(shape, dtype) for shape, dtype in self.out_types]
        args = [xp.ascontiguousarray(inputs[j]) for j in self.src.args]
        if self.src.size:
            gpu.launch(self.src.code, self.src.name, (), self.grid, gpu.BLOCK, (*args, *outs))
        return outs


def _dependencies_first(actions: list[tuple]) -> list[tuple]:
    """``actions`` (kind, payload, uses, defines) reordered so each comes after whatever
    defines what it uses, otherwise keeping their order. A fused group sits at its last
    member's position, but a node outside it that reads an earlier member may come before
    that: such a group moves up to just before its first reader (convexity guarantees the
    group does not depend on that reader)."""
    producer = {d: i for i, act in enumerate(actions) for d in act[3]}
    done: set[int] = set()
    order: list[int] = []
    for start in range(len(actions)):
        stack = [(start, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(j)
                continue
            stack.append((j, True))
            stack.extend((producer[u], False) for u in reversed(actions[j][2])
                         if u in producer and producer[u] not in done)
    return [actions[j] for j in order]


class GPUExecutor(EnvWalk):
    """Runs ``graph`` on ``device`` (default: the current GPU). Build once; call ``run``.

    ``run(feeds)`` takes leaf values by name (NumPy arrays are copied to the device, CuPy
    arrays used as they are; a 0-d host value such as the learning rate is copied once and
    reused while it stays the same) and returns the outputs by name as device arrays. Values
    are dropped after their last use (the executor core's walk, graph.walk, over one step per
    leaf, op or fused group). ``fuse=False`` runs elementwise ops one by one;
    ``simplify`` first runs passes.simplify (which changes no result); ``xp`` overrides the
    array module (tests run the kernels on NumPy through tests/runtime/host_cuda.py).

    ``plan=True``: a static memory plan (``MemoryPlan``), as the CPU's compiled program has:
    every value a kernel can write into a given buffer (fused groups, the hand-written
    kernels, ``OpDef.out`` kernels: matmul, reductions) gets a buffer in one arena allocated
    at build time, buffers whose values are never live at once sharing memory; a run then
    allocates nothing but what an op without such a kernel returns. The outputs then live in
    the arena too, overwritten by the next run: the caller copies what it keeps. ``into``
    names outputs to write straight into the caller's arrays instead (a flat gradient
    buffer's views); the caller must not feed those arrays to the graph.
    """

    def __init__(self, graph: Graph, device: str | Device = "cuda", fuse: bool = True,
                 simplify: bool = True, xp=None, rank: int | None = None, plan: bool = False,
                 into: Mapping[str, Any] | None = None):
        graph = passes.simplify(graph) if simplify else graph
        super().__init__(graph, rank, on=" on the GPU")
        self.xp = xp if xp is not None else xp_for(device)
        # the kernels follow the array module: CuPy (or its stand-in) takes the CUDA ones
        self.device_kind = device_kind(self.xp)
        pos = {n.id: i for i, n in enumerate(graph.nodes)}
        groups: dict[int, FusedKernel] = {}       # by position of the group's last member
        member: set[int] = set()
        if fuse:
            for g in fusion_groups(graph):
                try:
                    kernel = FusedKernel(g)
                except Unsupported:
                    continue
                groups[pos[g.nodes[-1].id]] = kernel
                member.update(n.id for n in g.nodes)
        self.n_fused = len(groups)
        # actions: (kind, payload, uses, defines) in graph order; kind leaf | op | group
        actions: list[tuple[str, Any, tuple[int, ...], tuple[int, ...]]] = []
        for i, n in enumerate(graph.nodes):
            if i in groups:
                k = groups[i]
                actions.append(("group", k, tuple(x.id for x in k.sources),
                                tuple(o.id for o in k.group.outputs)))
            elif n.id in member:
                continue
            elif not n.inputs:
                actions.append(("leaf", n, (), (n.id,)))
            else:
                fn = kernel_for(n, self.device_kind)
                actions.append(("op", (n, fn), tuple(x.id for x in n.inputs), (n.id,)))
        actions = _dependencies_first(actions)
        # drop what nothing reads any more (a view whose fused readers read its operand)
        live = {n.id for n in graph.outputs.values()}
        kept = []
        for act in reversed(actions):
            if act[0] == "leaf" or any(d in live for d in act[3]):
                live.update(act[2])
                kept.append(act[:3])
        self.actions: list[tuple[str, Any, tuple[int, ...]]] = kept[::-1]
        self._consts: dict[int, Any] = {}
        self._scalars: dict[int, tuple[Any, Any]] = {}   # leaf id -> (host value, on device)
        # a fed device array of the leaf's name, shape and dtype is used as it is: checked
        # without str(dtype) (its cost was a quarter of a small step's host time)
        self._types = {n.id: (n.name, n.shape, np.dtype(n.dtype)) for n in graph.nodes
                       if not n.inputs and n.op != "const"}
        self._feeds: Mapping[Any, Any] = {}
        xp = self.xp
        self.plan = MemoryPlan(graph, self.actions, self.device_kind, xp, into) if plan else None
        bufs = self.plan.buffers if plan else {}
        for kind, payload, uses in self.actions:
            if kind == "leaf":
                self.add_leaf(payload, lambda n: self.leaf(n, self._feeds))
            elif kind == "op":
                n, fn = payload
                if n.id in bufs:
                    self.add(n, self.plan.step(n, bufs[n.id]), uses, n.id)
                else:
                    self.add(n, _bind(fn, xp, n.attrs), uses, n.id)
            else:
                outs = [bufs.get(o.id) for o in payload.group.outputs]
                if any(o is None for o in outs):
                    outs = None
                self.add(payload.group.nodes[-1], _bind_group(payload, xp, outs), uses,
                         [o.id for o in payload.group.outputs],
                         note=f" (fused group of {len(payload.group.nodes)} ops: "
                              f"{', '.join(m.op for m in payload.group.nodes)})")
        self.finish(n.id for n in graph.outputs.values())

    def leaf(self, n: Node, feeds: Mapping[Any, Any]):
        """The device value of leaf ``n``: a const's (copied once), or the one fed by name."""
        xp = self.xp
        if n.op == "const":
            if n.id not in self._consts:
                self._consts[n.id] = xp.asarray(np.asarray(n.attrs["value"]))
            return self._consts[n.id]
        name, shape, dtype = self._types[n.id]
        value = feeds.get(name) if n not in feeds else None
        if (value is not None and isinstance(value, xp.ndarray) and value.shape == shape
                and value.dtype == dtype):
            return value
        value = leaf_value(np, n, feeds)
        if isinstance(value, xp.ndarray):
            return value
        if np.ndim(value) != 0:
            return xp.asarray(value)
        # lr, t, step: each upload of a scalar costs a host-to-device copy, so keep the last
        host = np.asarray(value).item()
        hit = self._scalars.get(n.id)
        if hit is None or hit[0] != host:
            hit = self._scalars[n.id] = (host, xp.asarray(value))
        return hit[1]

    def run(self, feeds: Mapping[Any, Any]) -> dict[str, Any]:
        self._feeds = feeds
        try:
            env = self.run_env()
        finally:
            self._feeds = {}
        out = {k: env[v.id] for k, v in self.graph.outputs.items()}
        if self.plan is not None:
            out.update(self.plan.direct)
        return out


def _bind(fn, xp, attrs):
    return lambda *a: fn(xp, *a, **attrs)


def _bind_group(kernel: FusedKernel, xp, outs=None):
    return lambda *a: kernel(xp, list(a), outs)


def _takes_gemm(n: Node, kind: str) -> bool:
    """Whether node ``n``'s kernel runs GEMMs of its own (a library op's own-kernel path:
    ops.gpu's ``gemm=``), which a CUDA Graph capture must route through its safe GEMM."""
    fn = kernel_for(n, kind)
    return fn is get(n.op).cuda and "gemm" in inspect.signature(fn).parameters


def _writer(n: Node, kind: str, xp):
    """``fn(*inputs, out)`` computing node ``n`` into ``out`` on this device, or None: the
    op's hand-written CUDA kernel where it takes ``out=``, else its OpDef.out kernel."""
    opdef = get(n.op)
    fn = kernel_for(opdef, kind)
    if fn is opdef.cuda:
        if "out" not in inspect.signature(fn).parameters:
            return None
        attrs = n.attrs
        return lambda *a, out: fn(xp, *a, **attrs, out=out)
    k = opdef.out
    if n.op == "matmul" and len({n.dtype, *(x.dtype for x in n.inputs)}) == 1:
        # any one dtype on the GPU, bf16 included (precision=): cuBLAS writes into out
        return lambda a, b, out: xp.matmul(a, b, out=out)
    if k is None or not k.accepts(n):
        return None
    call, tail = k.make(xp, n)
    return lambda *a, out: call(*a, *tail, out=out)


class MemoryPlan:
    """A GPUExecutor's static memory plan (``plan=True``): which values are computed into
    buffers planned once, where those lie in one arena, and what the plan saves.

    A value is planned when its kernel writes into a given buffer (``_writer``) or it is a
    reshape of a non-contiguous planned value (a copy into its buffer); a view (transpose,
    broadcast, a reshape of a contiguous value or of a feed) holds the buffers of its operand, an op
    without such a kernel (``unplanned``) returns a fresh array and may hold its operands'.
    A buffer is live from its writer to its last reader through any view (the outputs to
    the end of the run), and buffers are placed by compiled.place (greedy by size, lowest
    free offset), the CPU program's planner. ``arena_bytes`` is what it takes, ``naive_bytes``
    what one buffer a value would take, ``peak_bytes`` the lower bound (most bytes live at
    one position)."""

    def __init__(self, graph: Graph, actions, kind: str, xp, into: Mapping[str, Any] | None):
        self.xp, self.kind = xp, kind
        # a capture-safe GEMM (runtime.capture_gemm) the step's CUDA Graph capture sets: the
        # matmuls then run through it while it is active
        self.gemm: Any = None
        nodes = {n.id: n for n in graph.nodes}
        holds: dict[int, frozenset[int]] = {}        # value -> the planned nodes it may view
        contiguous: dict[int, bool] = {}
        planned: dict[int, int] = {}                 # planned node id -> its writer's position
        self.writers: dict[int, Any] = {}
        self.copies: set[int] = set()                # reshapes of non-contiguous values
        self.unplanned: list[str] = []
        for i, (act, payload, uses) in enumerate(actions):
            if act == "leaf":
                holds[payload.id], contiguous[payload.id] = frozenset(), False
                continue
            if act == "group":
                for o in payload.group.outputs:
                    planned[o.id] = i
                    holds[o.id], contiguous[o.id] = frozenset({o.id}), True
                continue
            n = payload[0]
            held = frozenset().union(*(holds[u] for u in uses))
            view = get(n.op).view
            writer = _writer(n, kind, xp)
            if view == "any" or (view == "contiguous" and contiguous[uses[0]]):
                holds[n.id], contiguous[n.id] = held, view == "contiguous"
            elif view == "contiguous" and not held:
                # of a feed: a view when the fed array is contiguous (parameters are views of
                # their flat buffer), else a copy of the caller's making
                holds[n.id], contiguous[n.id] = held, False
            elif view == "contiguous":
                self.copies.add(n.id)
                planned[n.id] = i
                holds[n.id], contiguous[n.id] = frozenset({n.id}), True
            elif writer is not None:
                self.writers[n.id] = (self._matmul(writer) if n.op == "matmul" else
                                      self._with_gemm(n) if _takes_gemm(n, kind) else writer)
                planned[n.id] = i
                holds[n.id], contiguous[n.id] = frozenset({n.id}), True
            else:
                self.unplanned.append(n.op)
                holds[n.id], contiguous[n.id] = held, False
        horizon = len(actions)
        spans = {k: [i, i, -(-nodes[k].size * np.dtype(nodes[k].dtype).itemsize // ALIGN)
                     * ALIGN] for k, i in planned.items()}
        for i, (_, _, uses) in enumerate(actions):
            for u in uses:
                for k in holds[u]:
                    spans[k][1] = max(spans[k][1], i)
        out_ids = {o.id for o in graph.outputs.values()}
        for o in out_ids:
            for k in holds[o]:
                spans[k][1] = horizon
        # outputs written straight into the caller's arrays: a planned value, or a reshape of
        # one of the same size, that no other output shares
        self.direct: dict[str, Any] = {}
        self.buffers: dict[int, Any] = {}
        owners: dict[int, list[str]] = {}
        for name, o in graph.outputs.items():
            for k in holds[o.id]:
                owners.setdefault(k, []).append(name)
        for name, target in (into or {}).items():
            o = graph.outputs[name]
            (k,) = holds[o.id] if len(holds[o.id]) == 1 else (None,)
            if (k is None or owners[k] != [name] or k in self.buffers
                    or nodes[k].size != o.size or not _reshapes_of(o, k)
                    or tuple(target.shape) != o.shape or str(target.dtype) != o.dtype):
                continue
            self.buffers[k] = target.reshape(nodes[k].shape)
            self.direct[name] = target
            del spans[k]
        offsets, self.arena_bytes = place({k: tuple(v) for k, v in spans.items()})
        self.naive_bytes = sum(v[2] for v in spans.values())
        self.peak_bytes = _peak(spans.values(), horizon)
        arena = xp.empty(self.arena_bytes, np.uint8)
        for k, off in offsets.items():
            n = nodes[k]
            nbytes = n.size * np.dtype(n.dtype).itemsize
            self.buffers[k] = arena[off:off + nbytes].view(n.dtype).reshape(n.shape)
        self.arena = arena

    def _matmul(self, writer):
        def matmul(a, b, out):
            gemm = self.gemm
            if gemm is None or not gemm.matmul(a, b, out):
                writer(a, b, out=out)
        return matmul

    def _with_gemm(self, n: Node):
        fn, attrs, xp = kernel_for(n, self.kind), n.attrs, self.xp

        def write(*args, out):                  # its own GEMMs capture-safe while capturing
            gemm = self.gemm
            return fn(xp, *args, **attrs, out=out, gemm=None if gemm is None else gemm.matmul)
        return write

    def step(self, n: Node, buf):
        """The step computing planned op node ``n`` into ``buf``."""
        if n.id in self.copies:
            xp = self.xp

            def copy(x):
                xp.copyto(buf.reshape(x.shape), x)
                return buf
            return copy
        writer = self.writers[n.id]

        def write(*a):
            writer(*a, out=buf)
            return buf
        return write

    def stats(self) -> dict[str, Any]:
        return {"arena_bytes": self.arena_bytes, "naive_bytes": self.naive_bytes,
                "peak_bytes": self.peak_bytes, "planned": len(self.buffers),
                "direct_outputs": len(self.direct), "unplanned": list(self.unplanned)}


def _reshapes_of(o: Node, k: int) -> bool:
    """Whether ``o`` is node ``k`` or a chain of reshapes of it."""
    while o.id != k:
        if o.op != "reshape":
            return False
        o = o.inputs[0]
    return True


def _peak(spans, horizon: int) -> int:
    delta = [0] * (horizon + 2)
    for start, end, nbytes in spans:
        delta[start] += nbytes
        delta[end + 1] -= nbytes
    peak = live = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


__all__ = ["FusedKernel", "GPUExecutor", "MemoryPlan"]
