"""The GPU executor: runs a Graph on one CUDA device with CuPy arrays, each elementwise fusion
group (graph.passes.fusion_groups) as one generated kernel (ops.codegen), every other op
through its hand-written CUDA kernel where it has one (OpDef.cuda) or its generic forward on
cupy (matmul is cuBLAS). ``DeviceStep`` keeps a training step's parameters and optimizer
state on the device between steps and can replay the whole step as one CUDA graph.

Semantics are the reference Interpreter's (tested against it). Side effects (CUDA launches)
live here, in runtime/. Imports graph, ops and runtime (device, interpreter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph, Node
from shardgrad.graph.passes import FusionGroup, fusion_groups
from shardgrad.ops import gpu
from shardgrad.ops.codegen import KernelSource, Unsupported, fused_source
from shardgrad.ops.registry import get
from shardgrad.runtime.device import Device, xp_for
from shardgrad.runtime.interpreter import ExecutionError, describe, leaf_value


class FusedKernel:
    """One fusion group as one kernel: ``kernel(xp, inputs) -> outputs`` (the group's
    outputs, in order). A group input that is a ``broadcast_to`` view is read through its
    operand, so the view is never materialized."""

    def __init__(self, group: FusionGroup):
        self.group = group
        self.sources = [x.inputs[0] if x.op == "broadcast_to" else x for x in group.inputs]
        self.src: KernelSource = fused_source(group, [s.shape for s in self.sources])
        self.out_types = [(o.shape, o.dtype) for o in group.outputs]

    def __call__(self, xp, inputs: list[Any]) -> list[Any]:
        outs = [xp.empty(shape, dtype) for shape, dtype in self.out_types]
        args = [xp.ascontiguousarray(inputs[j]) for j in self.src.args]
        if self.src.size:
            gpu.launch(self.src.code, self.src.name, (), gpu.blocks(self.src.size), gpu.BLOCK,
                       (*args, *outs))
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


class GPUExecutor:
    """Runs ``graph`` on ``device`` (default: the current GPU). Build once; call ``run``.

    ``run(feeds)`` takes leaf values by name (NumPy arrays are copied to the device, CuPy
    arrays used as they are) and returns the outputs by name as device arrays. Values are
    dropped after their last use unless ``keep_all`` (needed while capturing a CUDA graph,
    whose replays reuse the memory of every value: ``kept`` then holds them all).
    ``fuse=False`` runs elementwise ops one by one; ``simplify`` first runs passes.simplify
    (which changes no result); ``xp`` overrides the array module (tests run the kernels on
    NumPy through runtime.host_cuda).
    """

    def __init__(self, graph: Graph, device: str | Device = "cuda", fuse: bool = True,
                 simplify: bool = True, xp=None, rank: int | None = None):
        graph = passes.simplify(graph) if simplify else graph
        self.graph, self.rank = graph, rank
        self.xp = xp if xp is not None else xp_for(device)
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
                fn = gpu.kernel(get(n.op), self.xp)
                actions.append(("op", (n, fn), tuple(x.id for x in n.inputs), (n.id,)))
        actions = _dependencies_first(actions)
        # drop what nothing reads any more (a broadcast_to whose fused users read its operand)
        live = {n.id for n in graph.outputs.values()}
        kept = []
        for act in reversed(actions):
            if act[0] == "leaf" or any(d in live for d in act[3]):
                live.update(act[2])
                kept.append(act[:3])
        self.actions: list[tuple[str, Any, tuple[int, ...]]] = kept[::-1]
        last: dict[int, int] = {}
        for a, (_, _, uses) in enumerate(self.actions):
            for u in uses:
                last[u] = a
        keep = {n.id for n in graph.outputs.values()}
        self.free_after: list[list[int]] = [[] for _ in self.actions]
        for nid, a in last.items():
            if nid not in keep:
                self.free_after[a].append(nid)
        self._consts: dict[int, Any] = {}
        self.keep_all = False
        self.kept: dict[int, Any] = {}

    def _leaf(self, n: Node, feeds: Mapping[Any, Any]):
        xp = self.xp
        if n.op == "const":
            if n.id not in self._consts:
                self._consts[n.id] = xp.asarray(np.asarray(n.attrs["value"]))
            return self._consts[n.id]
        value = leaf_value(np, n, feeds)
        return value if isinstance(value, xp.ndarray) else xp.asarray(value)

    def run(self, feeds: Mapping[Any, Any]) -> dict[str, Any]:
        xp, env = self.xp, {}
        for a, (kind, payload, uses) in enumerate(self.actions):
            try:
                if kind == "leaf":
                    env[payload.id] = self._leaf(payload, feeds)
                elif kind == "op":
                    n, fn = payload
                    env[n.id] = fn(xp, *[env[u] for u in uses], **n.attrs)
                else:
                    outs = payload(xp, [env[u] for u in uses])
                    for o, v in zip(payload.group.outputs, outs, strict=True):
                        env[o.id] = v
            except ExecutionError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the node attached
                n = payload if kind == "leaf" else payload[0] if kind == "op" else (
                    payload.group.nodes[-1])
                where = f" on rank {self.rank}" if self.rank is not None else ""
                what = "" if kind != "group" else f" (fused group of {len(payload.group.nodes)}"\
                    f" ops: {', '.join(m.op for m in payload.group.nodes)})"
                raise ExecutionError(f"while executing {describe(self.graph, n)}{what} (from "
                                     f"{n.where}) on the GPU{where}: {type(e).__name__}: {e}",
                                     n, self.rank) from e
            if not self.keep_all:
                for nid in self.free_after[a]:
                    env.pop(nid, None)
        if self.keep_all:
            self.kept = env
        return {k: env[v.id] for k, v in self.graph.outputs.items()}


class DeviceStep:
    """A training-step Graph (graph.trace.trace_step's leaves and outputs) run on one GPU
    with its parameters and states resident there.

    ``params`` / ``states`` map leaf names to arrays (copied to the device once). Each call
    ``step(x, y, lr, t)`` feeds a batch, runs forward, backward and update, swaps the new
    parameters and states in, and returns the loss as a 0-d device array (no host sync).
    With ``capture=True`` the first call runs eagerly (compiling every kernel and creating
    library handles), the second records the step into a CUDA graph with static buffers, and
    every later call copies the batch into those buffers and replays the graph: one launch
    instead of one per kernel.
    """

    def __init__(self, graph: Graph, params: Mapping[str, Any], states: Mapping[str, Any],
                 device: str | Device = "cuda", capture: bool = False, fuse: bool = True,
                 xp=None):
        self.exe = GPUExecutor(graph, device, fuse=fuse, xp=xp)
        self.xp = self.exe.xp
        self.params = {k: self.xp.array(v) for k, v in params.items()}
        self.states = {k: self.xp.array(v) for k, v in states.items()}
        self.capture = capture
        self.capture_error: str | None = None    # why capture was given up, if it was
        self.calls = 0
        self._graph = None

    def _feeds(self, x, y, lr, t) -> dict[str, Any]:
        xp = self.xp
        dtype = next(iter(self.params.values())).dtype
        return {"x": x, "y": y, "lr": xp.asarray(lr, dtype), "t": xp.asarray(t, dtype),
                **self.params, **self.states}

    def _swap(self, out: Mapping[str, Any]) -> None:
        for k in self.params:
            self.params[k] = out[f"param/{k}"]
        for k in self.states:
            if f"state/{k}" in out:
                self.states[k] = out[f"state/{k}"]

    def __call__(self, x, y, lr: float, t: float):
        xp = self.xp
        self.calls += 1
        if not self.capture or self.calls == 1:
            out = self.exe.run(self._feeds(xp.asarray(x), xp.asarray(y), lr, t))
            self._swap(out)
            return out["loss"]
        if self._graph is None:
            try:
                self._record(xp.asarray(x), xp.asarray(y), lr, t)
            except Exception as e:  # noqa: BLE001 - nothing ran: go on without a graph
                self.capture, self.capture_error = False, f"{type(e).__name__}: {e}"
                self.calls = 0
                return self(x, y, lr, t)
        return self._replay(x, y, lr, t)

    def _record(self, x, y, lr, t) -> None:
        xp = self.xp
        feeds = self._feeds(x.copy(), y.copy(), lr, t)
        self._static = {k: v for k, v in feeds.items()}
        self._stream = xp.cuda.Stream(non_blocking=True)
        self._stream.wait_event(xp.cuda.get_current_stream().record())
        self.exe.keep_all = True
        with self._stream:
            self._stream.begin_capture()
            try:
                out = self.exe.run(self._static)
                for k in self.params:
                    xp.copyto(self._static[k], out[f"param/{k}"])
                for k in self.states:
                    if f"state/{k}" in out:
                        xp.copyto(self._static[k], out[f"state/{k}"])
            finally:
                self.exe.keep_all = False
                graph = self._stream.end_capture()
        self._graph = graph
        self._keep = self.exe.kept    # every replay writes into these: never free them
        self.params = {k: self._static[k] for k in self.params}
        self.states = {k: self._static[k] for k in self.states}
        self._loss = out["loss"]

    def _replay(self, x, y, lr, t):
        xp, s = self.xp, self._static
        s["x"][...] = xp.asarray(x)
        s["y"][...] = xp.asarray(y)
        s["lr"][...] = lr
        s["t"][...] = t
        cur = xp.cuda.get_current_stream()
        self._stream.wait_event(cur.record())
        self._graph.launch(stream=self._stream)
        cur.wait_event(self._stream.record())
        return self._loss


__all__ = ["DeviceStep", "FusedKernel", "GPUExecutor"]
