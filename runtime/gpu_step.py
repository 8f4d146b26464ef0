"""compile_step's path for a model on a GPU: the step owns its state on the device.

Parameters, buffers and optimizer state live in device storage the step owns (the optimizer's
parameters, and each of its state keys, in one flat buffer); the model's Tensors are views of
it, rebound only when user code gives one a new value, so a step builds no Node and copies
nothing back. SGD, Adam and AdamW update the whole flat buffer in one kernel (ops.gpu's flat
updates, scalars as kernel arguments); other optimizers run the update traced in the graph.
The loss comes back as a 0-d device Tensor whose label check is read with it: nothing in a
step waits for the GPU or uploads from the host. Under data parallelism the step averages
its flat gradient buffer over the ranks, one allreduce a bucket. Imports graph, ops,
partition and runtime.gpu.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph import passes
from shardgrad.graph.device import to_device
from shardgrad.graph.ir import Graph
from shardgrad.graph.optim import SGD, Adam, AdamW, Optimizer
from shardgrad.graph.tensor import Tensor, eager_leaf
from shardgrad.ops import collective, gpu_libs
from shardgrad.ops import gpu as gpu_ops
from shardgrad.ops.registry import is_effectful
from shardgrad.partition.data_parallel import averaged_outputs
from shardgrad.runtime.capture_gemm import CaptureGemm
from shardgrad.runtime.gpu import GPUExecutor

FLAT_DTYPES = ("float32", "float64")


class StepLoss(Tensor):
    """A step's loss, a 0-d Tensor on the step's device, as torch's. Reading its value
    (``float()``, ``item()``, ``numpy()``, printing) synchronizes with the GPU, and first
    raises any input check the step deferred (a label out of range), as the step would have."""

    __slots__ = ("_checks",)

    def __init__(self, value, checks: gpu_ops.DeferredChecks | None):
        super().__init__(eager_leaf(value, False))
        self._checks = checks

    @property
    def data(self):
        checks, self._checks = self._checks, None
        if checks is not None:
            checks.raise_if_set()
        return Tensor.data.fget(self)

    @data.setter
    def data(self, value) -> None:
        Tensor.data.fset(self, value)


class _Bound:
    """A Tensor the step owns: its device storage (``view``) and the node it was bound as
    (another node means user code set a new value: copied in at the next step)."""

    __slots__ = ("tensor", "view", "node")

    def __init__(self, tensor: Tensor, view):
        self.tensor, self.view, self.node = tensor, view, None


def flat_kind(optimizer: Optimizer) -> str | None:
    """The flat update kernel for ``optimizer`` (exactly SGD, Adam or AdamW: a subclass may
    change the rule; the kernels have no SGD dampening nor AMSGrad, and one set of values),
    else None."""
    if getattr(optimizer, "dampening", 0) or getattr(optimizer, "amsgrad", False) or len(
            optimizer.param_groups) > 1:
        return None
    return {SGD: "sgd", Adam: "adam", AdamW: "adam"}.get(type(optimizer))


class DeviceState:
    """The storage a GPU TrainStep owns for its model's parameters, buffers and optimizer
    state, and the feeds (by leaf name) that read it. ``refresh()`` (every step) copies in
    whatever user code replaced since (``load_state_dict``, ``p.data = ...``, ``to_host``)
    and rebinds that tensor; it builds nothing otherwise."""

    def __init__(self, params: list[tuple[str, Tensor]], buffers: list[tuple[str, Tensor]],
                 optimizer: Optimizer, device, xp):
        self.xp, self.device, self.optimizer = xp, device, optimizer
        name_of = {id(p): n for n, p in params}
        opt_params = optimizer.params
        dtypes = {p.dtype for p in opt_params}
        self.kind = flat_kind(optimizer) if len(dtypes) == 1 and (
            next(iter(dtypes)) in FLAT_DTYPES) else None
        self.flat_names = [name_of[id(p)] for p in opt_params]
        self.bound: list[_Bound] = []
        self.feeds: dict[str, Any] = {}
        self.views: dict[str, Any] = {}            # leaf name -> its storage
        self.flat: dict[str, Any] = {}             # "param", "grad", state key -> flat buffer
        if self.kind is not None:
            dtype = next(iter(dtypes))
            total = sum(p.size for p in opt_params)
            offsets = np.cumsum([0] + [p.size for p in opt_params])
            self.flat["param"] = xp.empty(total, dtype)
            # one element more: a data-parallel step reduces its loss with the gradients
            self.grad_and_loss = xp.zeros(total + 1, dtype)
            self.flat["grad"] = self.grad_and_loss[:total]
            for k in optimizer.state_keys:
                self.flat[k] = xp.empty(total, dtype)

            def view(key, i, p):
                return self.flat[key][int(offsets[i]):int(offsets[i + 1])].reshape(p.shape)
            for i, p in enumerate(opt_params):
                self._own(self.flat_names[i], p, view("param", i, p))
                self.views[f"grad/{self.flat_names[i]}"] = view("grad", i, p)
                for k, v in optimizer.state[i].items():
                    self._own(f"optim/{self.flat_names[i]}/{k}", v, view(k, i, p))
        else:
            for i, p in enumerate(opt_params):
                self._own(self.flat_names[i], p, xp.empty(p.shape, p.dtype))
                for k, v in optimizer.state[i].items():
                    self._own(f"optim/{self.flat_names[i]}/{k}", v, xp.empty(v.shape, v.dtype))
        for n, t in params + buffers:
            if n not in self.views:
                self._own(n, t, xp.empty(t.shape, t.dtype))
        self.rebinds = 0
        self.refresh()
        self.rebinds = 0
        self.gemm: Any = None            # the capture-safe GEMM, probed at the first capture
        self.gemm_note: str | None = None

    def _own(self, name: str, tensor: Tensor, view) -> None:
        self.bound.append(_Bound(tensor, view))
        self.views[name] = self.feeds[name] = view

    def refresh(self) -> None:
        for b in self.bound:
            if b.tensor.node is not b.node:
                value = b.tensor.data
                if value is not b.view:
                    self.xp.copyto(b.view, to_device(value, self.device))
                    b.tensor._set_leaf(b.view)
                b.node = b.tensor.node
                self.rebinds += 1


class DeviceProgram:
    """One traced step graph run against a DeviceState. With a flat update the graph is cut
    to the loss, the gradients and the buffers' new values; the gradients are written into
    the flat gradient buffer and one kernel updates every parameter and its state. Otherwise
    the graph's own update runs and its results are copied into the state's storage.

    ``parallel = (DataParallel transform, communicator)``: data parallelism. With a flat
    update the step averages the flat gradient buffer itself (``GradientBuckets``: the loss
    rides in its last element; one allreduce a bucket, as DDP's gradient-as-bucket-view);
    otherwise the transform rewrites the graph, whose collectives run on the communicator."""

    def __init__(self, graph: Graph, state: DeviceState, parallel: tuple | None = None):
        self.state = state
        updated = [n for n in graph.meta["params"] if f"param/{n}" in graph.outputs]
        # loss scaling (skips a step's update) and gradient clipping (scales the gradients
        # by their global norm) are in the traced update: that one runs then
        self.flat = state.kind is not None and sorted(updated) == sorted(state.flat_names) and (
            not graph.meta.get("loss_scaling")) and not state.optimizer.max_grad_norm
        self.comm = parallel[1] if parallel is not None else None
        averaged = []
        if parallel is not None and not self.flat:
            graph = parallel[0](graph)
        elif parallel is not None:
            averaged = [k for k in averaged_outputs(graph) if k.startswith("state/")]
        if self.flat:
            keep = {"loss", *(f"grad/{n}" for n in state.flat_names)}
            keep |= {k for k in graph.outputs if k.startswith("state/")
                     and not k.startswith("state/optim/")}
            graph = Graph({k: v for k, v in graph.outputs.items() if k in keep},
                          meta=graph.meta)
            self.copies = [(k, state.views[k[len("state/"):] if k.startswith("state/") else k])
                           for k in graph.outputs if k != "loss"]
        else:
            self.copies = [(k, state.views[k.split("/", 1)[1]]) for k in graph.outputs
                           if k.startswith(("param/", "state/"))]
        # products written in the layout their users read, as the CPU program does; conv
        # weight gradients as one GEMM each (passes.gemm_batch_sums: a GPU-only choice)
        # Where the gpu-libs extra is installed, convolutions as cuDNN's three calls and linear
        # layers as one GEMM with a bias/activation epilogue (cuBLASLt): ops.gpu_libs then
        # measures each against the own kernels per shape and keeps the faster
        if gpu_libs.probe("cudnn")[0] is not None:
            graph = passes.conv_library(graph)
        graph = passes.fold_transposes(passes.gemm_batch_sums(graph))
        if gpu_libs.probe("cublaslt")[0] is not None:
            graph = passes.gemm_epilogues(graph)
        self.graph = graph
        self.reads_step = any(n.op == "input" and n.name == "step" for n in graph.nodes)
        # a static memory plan: intermediates in one arena planned once, the gradients
        # computed straight into the flat gradient buffer (nothing reads it in the step)
        self.targets = list(self.copies)
        into = {k: v for k, v in self.copies if k.startswith("grad/")} if self.flat else {}
        loss_dtype = graph.outputs["loss"].dtype
        if parallel is not None and self.flat and loss_dtype == str(state.flat["grad"].dtype):
            into["loss"] = state.grad_and_loss[-1:].reshape(())
        self.exe = GPUExecutor(graph, state.device, xp=state.xp, plan=True, into=into)
        self.copies = [(k, v) for k, v in self.copies if k not in self.exe.plan.direct]
        self.reduce = None
        if parallel is not None and self.flat:
            extra = [v for k, v in self.targets if k in averaged]
            self.reduce = GradientBuckets(
                state.grad_and_loss if "loss" in self.exe.plan.direct else state.flat["grad"],
                extra, "loss" not in self.exe.plan.direct, parallel[0].bucket_bytes,
                parallel[0].world_size, self.comm, state.xp)
        self.path = f"flat-{state.kind}" if self.flat else "graph-update"
        self.update = FlatUpdate(state) if self.flat else None
        self._ring: Any = None           # the losses handed out: a slot each, see loss_slot
        self._slot = 0

        self.replay: GraphReplay | None = None
        self.calls = 0
        self.cuda_graph = False
        self.graph_note = "off"
        self.gemm_note = "not probed (no capture tried)"

    def loss_slot(self):
        """A 0-d device array for this step's loss, one slot of a ring of LOSS_RING: a loss
        the caller holds is never overwritten (a full ring is left to the losses still
        held and a new one allocated), and a step allocates nothing."""
        if self._ring is None or self._slot == LOSS_RING:
            self._ring = self.state.xp.empty((LOSS_RING,), self.graph.outputs["loss"].dtype)
            self._slot = 0
        self._slot += 1
        return self._ring[self._slot - 1:self._slot].reshape(())

    def body(self, feeds: Mapping[str, Any], checks: gpu_ops.DeferredChecks):
        """Forward and backward, their results in the state's storage (what a CUDA Graph
        captures: no scalar from the host); returns the loss in the executor's arena."""
        xp = self.state.xp
        with checks, (collective.bind(self.comm) if self.comm is not None
                      else contextlib.nullcontext()):
            out = self.exe.run(feeds)
        for name, view in self.copies:
            xp.copyto(view, out[name])
        return out["loss"]

    def run(self, feeds: Mapping[str, Any], checks: gpu_ops.DeferredChecks,
            use_graph: bool = False):
        self.calls += 1
        if use_graph and self.replay is None and self.calls > WARMUP and (
                self.graph_note == "off"):
            self.replay, self.graph_note, loss = GraphReplay.build(self, feeds, checks)
            self.cuda_graph = self.replay is not None
            if loss is not None:
                return loss
        if self.replay is not None:
            return self.replay(feeds)
        loss = self.body(feeds, checks)
        if self.reduce is not None:
            self.reduce(loss)
        if self.flat:
            self.update(self.state.optimizer)
        out = self.loss_slot()
        self.state.xp.copyto(out, loss)
        return out


WARMUP = 2      # plain steps of a program before its capture (kernels compiled, pool warm)
LOSS_RING = 1024    # losses a ring holds: 4 KiB in float32, one allocation per 1024 steps


def _capture(xp, stream, fn):
    """Record what ``fn()`` queues on ``stream`` as a CUDA Graph (nothing runs); returns
    (the graph, what fn returned)."""
    stream.begin_capture()
    try:
        result = fn()
    finally:
        graph = stream.end_capture()
    return graph, result


class GraphReplay:
    """A DeviceProgram's forward and backward captured once as a CUDA Graph on a non-default
    stream and replayed each step: the batch copied into static input buffers, the graph
    launched, the update (scalars as kernel arguments) and a copy of the loss after it, all
    on that stream, ordered after and before the caller's stream by events. The values the
    graph writes live in the program's planned arena, anything else it allocates in a
    memory pool of its own, so nothing else reuses them between replays; its matmuls run
    through the capture-safe GEMM (runtime.capture_gemm: CuPy refuses its cuBLAS wrappers
    while capturing, cupy#6290). ``build`` checks the first replay against plain launches of
    the same step (CuPy's matmuls) and falls back to plain launches (returning None and the
    reason) when capture fails or the results differ."""

    def __init__(self, program, stream, graph, pool, static, loss, events):
        self.program, self.stream, self.graph, self.pool = program, stream, graph, pool
        self.static, self.loss, self.events = static, loss, events

    @staticmethod
    def build(program, feeds, checks) -> tuple[GraphReplay | None, str, Any]:
        """Run this step (plain launches) and capture it: (the replay or None, what happened,
        this step's loss or None when it has not run: then the caller runs it)."""
        state = program.state
        xp = state.xp
        cuda = xp.cuda
        if not program.flat:
            return None, "not captured: the traced update reads lr and t from the host", None
        if program.reads_step:
            return None, "not captured: random ops read the step count from the host", None
        if any(is_effectful(n.op) for n in program.graph.nodes):
            return None, ("not captured: the step's graph communicates (synchronised batch "
                          "norm statistics)"), None
        if not all(hasattr(cuda, a) for a in ("Stream", "Event", "MemoryPool",
                                                  "using_allocator")):
            return None, "not captured: this CuPy has no stream capture", None
        loss = plain = None
        targets = [view for _, view in program.targets]
        slot = program.loss_slot()        # outside the capture's pool: the caller keeps it
        if state.gemm_note is None:       # its workspace outside the capture's pool too
            state.gemm, state.gemm_note = CaptureGemm.probe(xp)
        note = "captured"
        try:
            stream = cuda.Stream(non_blocking=True)
            pool = cuda.MemoryPool()
            static = {k: xp.empty(feeds[k].shape, feeds[k].dtype) for k in ("x", "y")}
            events = (cuda.Event(disable_timing=True), cuda.Event(disable_timing=True))
            fed = dict(feeds, **static)
            kept = [view for name, view in program.targets if not name.startswith("grad/")]
            _enter(xp, stream, events[0])
            with stream, cuda.using_allocator(pool.malloc):
                for k in static:
                    xp.copyto(static[k], xp.asarray(feeds[k]))
                before = [v.copy() for v in kept]          # buffers the step updates
                loss = program.body(fed, checks)           # this step, plain; the pool warms
                plain = [v.copy() for v in targets] + [slot]
                xp.copyto(slot, loss)
                for v, b in zip(kept, before, strict=True):
                    xp.copyto(v, b)
                with capture_gemm(program):
                    # once outside the capture: the GEMM's kernels loaded (CUDA loads
                    # modules lazily) and its algorithms chosen before anything is recorded
                    program.body(fed, checks)
                    for v, b in zip(kept, before, strict=True):
                        xp.copyto(v, b)
                    graph, static_loss = _capture(xp, stream,
                                                  lambda: program.body(fed, checks))
                graph.launch(stream)
                same = all(bool(xp.allclose(g, w, rtol=1e-5, atol=1e-7, equal_nan=True))
                           for g, w in zip([*targets, static_loss], plain, strict=True))
                if not same:
                    note = "not captured: the replay differed from plain launches"
        except Exception as e:  # noqa: BLE001 - any failure means plain launches, reported
            note = f"not captured: {type(e).__name__}: {e}"[:300]
        program.gemm_note = state.gemm_note or program.gemm_note
        if loss is None:
            return None, note, None
        # the step completes on the caller's stream whatever happened to the capture
        if note != "captured" and plain is not None:
            for v, w in zip(targets, plain[:-1], strict=True):
                xp.copyto(v, w)
        elif plain is None:                     # failed between its forward and the copy
            xp.copyto(slot, program.body(feeds, checks))
            loss = slot
        try:
            _leave(xp, stream, events[1])
        except Exception as e:  # noqa: BLE001 - then wait for it from the host, once
            note = f"not captured: {type(e).__name__}: {e}"[:300]
            with contextlib.suppress(Exception):
                stream.synchronize()
        if program.reduce is not None:      # data parallel: average, as a plain step does
            buf = program.exe.plan.direct.get("loss")   # the loss in the flat buffer
            if buf is not None:
                xp.copyto(buf, slot)
            program.reduce(slot if buf is None else buf)
            if buf is not None:
                xp.copyto(slot, buf)
        if program.flat:
            program.update(state.optimizer)
        if note != "captured":
            return None, note, slot
        replay = GraphReplay(program, stream, graph, pool, static, static_loss, events)
        return replay, note, plain[-1]

    def __call__(self, feeds):
        xp, program = self.program.state.xp, self.program
        _enter(xp, self.stream, self.events[0])
        with self.stream:
            for k, buf in self.static.items():
                xp.copyto(buf, xp.asarray(feeds[k]))
            self.graph.launch(self.stream)
            if program.reduce is not None:    # the allreduce, after the captured backward
                program.reduce(self.loss)
            if program.flat:
                program.update(program.state.optimizer)
            loss = program.loss_slot()
            xp.copyto(loss, self.loss)
        _leave(xp, self.stream, self.events[1])
        return loss


@contextlib.contextmanager
def capture_gemm(program):
    """While capturing: the step's matmuls through the capture-safe GEMM
    (runtime.capture_gemm, probed once per state); CuPy's matmul where there is none."""
    state = program.state
    plan, gemm = program.exe.plan, state.gemm
    plan.gemm = gemm
    if gemm is not None:
        gemm.active = True
    try:
        yield state.gemm_note
    finally:
        if gemm is not None:
            gemm.active = False


def _enter(xp, stream, event) -> None:
    """``stream`` waits for what the caller's stream has queued (no host wait)."""
    event.record(xp.cuda.get_current_stream())
    stream.wait_event(event)


def _leave(xp, stream, event) -> None:
    """The caller's stream waits for what ``stream`` has queued (no host wait)."""
    event.record(stream)
    xp.cuda.get_current_stream().wait_event(event)


class GradientBuckets:
    """Data parallelism over a flat gradient buffer (``flat``: the gradients, and the loss
    in its last element when the step wrote it there): the buffer split into buckets of at
    most ``bucket_bytes``, each scaled by 1/world_size and allreduced in place, one
    collective a bucket (the CPU rewrite's order: scale as packed, then sum). ``extra``
    views (batch statistics not synchronised in the graph, the loss when ``loss_apart``)
    are averaged one by one."""

    def __init__(self, flat, extra: list, loss_apart: bool, bucket_bytes: int,
                 world_size: int, comm, xp):
        step = max(1, int(bucket_bytes) // flat.dtype.itemsize)
        self.buckets = [flat[i:i + step] for i in range(0, flat.size, step)]
        self.extra, self.loss_apart = list(extra), loss_apart
        self.scale, self.comm, self.xp = 1.0 / world_size, comm, xp

    def __call__(self, loss) -> None:
        xp, comm, scale = self.xp, self.comm, self.scale
        for buf in self.buckets + self.extra + ([loss] if self.loss_apart else []):
            xp.multiply(buf, scale, out=buf)
            comm.allreduce_(buf, "sum")


class FlatUpdate:
    """The flat SGD / Adam update (ops/cuda/optim.cu's sgd_update, adam_update) over a
    DeviceState's buffers, its launch prepared once (source, options, grid, buffers): a step
    only builds the scalar arguments (a fifth of a small step's host time went to checks and
    lookups when each step prepared it)."""

    def __init__(self, state: DeviceState):
        flat = state.flat
        p = flat["param"]
        gpu_ops.check_flat(*flat.values())
        self.kind, self.t = state.kind, p.dtype.type
        self.code = gpu_ops.source("optim.cu")
        self.options = (f"-DSG_T={gpu_ops.CTYPES[str(p.dtype)]}",)
        self.grid, n = gpu_ops.blocks(p.size), np.int64(p.size)
        if self.kind == "sgd":
            self.name = "sgd_update"
            self.head = (p, flat["grad"], flat.get("momentum_buffer", p), n)
        else:
            self.name = "adam_update"
            self.head = (p, flat["grad"], flat["exp_avg"], flat["exp_avg_sq"], n)

    def __call__(self, opt: Optimizer) -> None:
        t = self.t
        if self.kind == "sgd":
            tail = (t(opt.lr), t(opt.momentum), t(opt.weight_decay), np.int32(bool(opt.nesterov)))
        else:
            b1, b2, step = t(opt.b1), t(opt.b2), t(opt.t + 1)
            tail = (t(opt.lr), b1, b2, t(opt.eps), t(opt.weight_decay), t(1) - b1 ** step,
                    t(1) - b2 ** step, np.int32(bool(opt.decoupled)))
        gpu_ops.launch(self.code, self.name, self.options, self.grid, gpu_ops.BLOCK,
                       self.head + tail)


__all__ = ["DeviceProgram", "DeviceState", "FlatUpdate", "GradientBuckets", "GraphReplay",
           "StepLoss", "flat_kind"]
