"""Running a data-parallel plan: ``ParallelStep``, the one data-parallel (and ZeRO-1) step
that ``shardgrad train`` and ``sg.distributed`` both build; executors bound to a
Communicator, parameters broadcast from rank 0, the start-up check that every rank runs the
same program, and the fault-injection knob (``debug.*``) the fail-fast tests use. Imports
graph, partition and runtime (the binding of collectives lives in runtime.step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardgrad.graph.device import array_module
from shardgrad.graph.ir import Graph
from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer
from shardgrad.partition.data_parallel import DataParallel
from shardgrad.partition.plan import graph_hash
from shardgrad.partition.zero import Layout, Zero1
from shardgrad.runtime import config as cfg
from shardgrad.runtime.comm import Communicator
from shardgrad.runtime.config import ConfigError
from shardgrad.runtime.step import (
    Executor,
    TrainStep,
    as_batch,
    bound_executor,
    device_of,
    executor_for,
    resident_parallel,
)


class ReplicaMismatch(RuntimeError):
    """Ranks that should run the same step do not: the message names the first rank that
    differs from rank 0 and how."""


class InjectedFault(RuntimeError):
    """The failure ``debug.fail_at_step`` asked for."""


class Faulted:
    """Runs ``inner`` after calling ``fault`` with the 1-based run count (fault injection
    for an executor that binds its own communicators, as the pipeline's does)."""

    def __init__(self, inner: Any, fault: Callable[[int], None]):
        self.inner, self.fault, self.runs = inner, fault, 0

    def run(self, feeds):
        self.runs += 1
        self.fault(self.runs)
        return self.inner.run(feeds)


def broadcast_state(model: Module, optimizer: Optimizer, comm: Communicator, root: int = 0
                    ) -> None:
    """Overwrite parameters, buffers and optimizer state with rank ``root``'s."""
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    tensors += [v for st in optimizer.state for v in st.values()]
    for t in tensors:
        buf = array_module(t.data).array(t.data, copy=True, order="C")   # host or GPU
        t.data = comm.bcast_(buf, root)
    optimizer.t = comm.bcast_obj(optimizer.t, root)


def check_replicas(comm: Communicator, graph: Graph, model: Module) -> None:
    """Raise ReplicaMismatch on every rank unless all ranks have rank 0's parameter names,
    shapes and dtypes and the same step graph (``graph_hash``)."""
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    everyone = comm.allgather_obj((graph_hash(graph), shapes))
    ref_hash, ref_shapes = everyone[0]
    for r, (h, theirs) in enumerate(everyone):
        if theirs != ref_shapes:
            diff = next((f"{a} vs {b}" for a, b in zip(ref_shapes, theirs, strict=False)
                         if a != b), f"{len(ref_shapes)} vs {len(theirs)} parameters")
            raise ReplicaMismatch(f"rank {r}'s parameters differ from rank 0's ({diff}): every "
                                  f"rank must build the same model from the same config")
        if h != ref_hash:
            raise ReplicaMismatch(f"rank {r}'s training-step graph differs from rank 0's (hash "
                                  f"{h[:12]} vs {ref_hash[:12]}): every rank must run the same "
                                  f"code, config and local batch shape")


_DEFAULT = cfg.ParallelConfig()


@dataclass(frozen=True)
class Parallel:
    """How a step is spread over data-parallel ranks (``parallel.*`` of a config, or
    ``sg.distributed.data_parallel_step``'s arguments)."""

    bucket_mb: float = _DEFAULT.bucket_mb      # parallel.*'s defaults: one definition
    deterministic: bool = _DEFAULT.deterministic
    chunks: int = _DEFAULT.chunks
    overlap: bool = _DEFAULT.overlap
    sync_batchnorm: bool = _DEFAULT.sync_batchnorm
    zero: int = _DEFAULT.zero

    @classmethod
    def of(cls, p: cfg.ParallelConfig) -> Parallel:
        return cls(p.bucket_mb, p.deterministic, p.chunks, p.overlap, p.sync_batchnorm, p.zero)


def rewrite(world_size: int, parallel: Parallel) -> DataParallel | None:
    """The data-parallel step transform for ``world_size`` ranks, or None when it would
    change nothing (one rank, not deterministic, no ZeRO)."""
    if world_size == 1 and not parallel.deterministic and not parallel.zero:
        return None
    kind = Zero1 if parallel.zero else DataParallel
    return kind(world_size, int(parallel.bucket_mb * 2**20), parallel.deterministic,
                parallel.chunks, parallel.overlap, sync_batchnorm=parallel.sync_batchnorm)


class ParallelStep(TrainStep):
    """The data-parallel training step over ``comm``'s ranks, the one ``shardgrad train`` and
    ``sg.distributed.data_parallel_step`` build. Each call takes this rank's share of the
    global batch (all ranks the same size) and returns the global mean loss. Before the
    first step (``synchronize``, or the first call) every rank checks that all traced the
    same step and takes rank 0's parameters, buffers and optimizer state.

    With ``parallel.zero`` = 1 (ZeRO stage 1) the optimizer's per-parameter state is held
    only as this rank's block of it (``optim/zero/<key>`` states of the step graph): taken
    from the optimizer's whole state before a step, after which the whole state holds no
    memory (a zero-stride view of its shape); ``consolidate()``, which every rank must call
    (``to_host()`` does), gathers the blocks back into the optimizer's whole state, for
    ``state_dict()`` and checkpoints."""

    def __init__(self, model: Module, loss_fn: Callable, optimizer: Optimizer,
                 comm: Communicator, parallel: Parallel | None = None,
                 executor: Executor | None = None,
                 fault: Callable[[int], None] | None = None, precision: str = "fp32"):
        self.parallel = parallel or Parallel()
        transform = rewrite(comm.world_size, self.parallel)
        if (executor is None and fault is None and device_of(model).is_cuda
                and (transform is None or resident_parallel(transform))):
            # a GPU model on the default executor keeps its state on the device and reduces
            # its flat gradient buffer itself (runtime.gpu_step), on ``comm`` (one process:
            # nothing to reduce, compile_step's own GPU step)
            super().__init__(model, loss_fn, optimizer, None, transform, precision, comm=comm)
        else:
            super().__init__(model, loss_fn, optimizer,
                             bound_executor(executor or executor_for(model), comm, fault),
                             transform, precision)
        self.comm = comm
        self._synced = comm.world_size == 1
        self._layout: Layout | None = None
        self._blocks: dict[str, Any] | None = None   # this rank's ZeRO state blocks, by key
        self._released: list[Any] = []              # the zero-stride stand-ins it left

    def synchronize(self, x, y) -> None:
        """Check that every rank traced the same step for local batch ``x``, ``y``, then
        give every rank rank 0's parameters, buffers and optimizer state."""
        synchronize(self.comm, self.model, self.optimizer, self, as_batch(x), as_batch(y))
        self._synced = True

    def __call__(self, x, y):
        if not self._synced:
            self.synchronize(x, y)
        return super().__call__(x, y)

    def graph_for(self, x, y) -> tuple[Graph, Any]:
        graph, program = super().graph_for(x, y)
        meta = graph.meta.get("zero")
        self._layout = None if meta is None else Layout.of(meta)
        return graph, program

    def feeds(self, x, y) -> dict[str, Any]:
        feeds = super().feeds(x, y)
        if self._layout is not None:
            self._take_blocks(self._layout)
            for n in self._sharded(self._layout):
                del feeds[n]
            feeds.update((f"optim/zero/{k}", b) for k, b in self._blocks.items())
        return feeds

    def load_outputs(self, out: Mapping[str, Any]) -> None:
        super().load_outputs(out)
        if self._blocks is not None:
            for k in self._blocks:
                if f"state/optim/zero/{k}" in out:
                    self._blocks[k] = out[f"state/optim/zero/{k}"]

    @staticmethod
    def _sharded(layout: Layout) -> list[str]:
        return [f"optim/{p}/{k}" for p, _, _ in layout.params for k in layout.keys]

    def _take_blocks(self, layout: Layout) -> None:
        """This rank's block of the optimizer's whole state, unless it holds it already (the
        whole state is current at the start, after a resume, ``load_state_dict`` or
        ``consolidate``: the state tensors then hold other arrays than the stand-ins)."""
        tensors = dict(self._opt_states)
        owned = [tensors[n] for n in self._sharded(layout)]
        if self._blocks is not None and len(owned) == len(self._released) and all(
                t.data is v for t, v in zip(owned, self._released, strict=True)):
            return
        xp = array_module(owned[0].data) if owned else np
        lo, m = self.comm.rank * layout.shard, layout.shard
        blocks = {}
        for k in layout.keys:
            block = xp.zeros(m, layout.dtype)
            for p, off, shape in layout.params:   # the part of p inside [lo, lo + m)
                size = int(np.prod(shape, dtype=np.int64))
                a, b = max(off, lo), min(off + size, lo + m)
                if a < b:
                    block[a - lo:b - lo] = tensors[f"optim/{p}/{k}"].data.reshape(-1)[
                        a - off:b - off]
            blocks[k] = block
        for t in owned:
            t._set_leaf(xp.broadcast_to(xp.zeros((), layout.dtype), t.shape))
        self._blocks, self._released = blocks, [t.data for t in owned]

    def consolidate(self) -> None:
        """Gather every rank's ZeRO blocks into the optimizer's whole state (a collective:
        every rank calls it). Nothing to do without ZeRO or before the first step."""
        if self._blocks is None or self._layout is None:
            return
        layout, tensors = self._layout, dict(self._opt_states)
        for k, block in self._blocks.items():
            xp = array_module(block)
            whole = self.comm.allgather_(xp.ascontiguousarray(block),
                                         xp.empty(layout.padded, layout.dtype))
            for p, off, shape in layout.params:
                size = int(np.prod(shape, dtype=np.int64))
                tensors[f"optim/{p}/{k}"]._set_leaf(whole[off:off + size].reshape(shape).copy())
        self._blocks, self._released = None, []

    def to_host(self) -> None:
        self.consolidate()
        super().to_host()

    def optimizer_state_bytes(self) -> int:
        if self._layout is None:
            return super().optimizer_state_bytes()
        sharded = set(self._sharded(self._layout))
        return self._layout.state_bytes() + sum(
            int(t.data.nbytes) for n, t in self._opt_states if n not in sharded)


def synchronize(comm: Communicator, model: Module, optimizer: Optimizer, step: TrainStep,
                x, y) -> None:
    """Before the first step of a data-parallel job (``shardgrad train`` and
    ``sg.distributed`` alike): check that every rank traced the same step for a local batch
    ``x``, ``y``, then give every rank rank 0's parameters, buffers and optimizer state."""
    if comm.world_size > 1:
        # a batch on the GPU stays there: only its shape and dtype are read
        graph, _ = step.graph_for(*(v if hasattr(v, "dtype") else np.asarray(v) for v in (x, y)))
        check_replicas(comm, graph, model)
        broadcast_state(model, optimizer, comm)


def fault_injector(config: cfg.ConfigLike, rank: int, world_size: int | None = None
                   ) -> Callable[[int], None] | None:
    """The ``debug.fail_at_step`` / ``debug.fail_rank`` / ``debug.fail_mode`` knob: on that
    rank, before that step (1-based) runs, raise InjectedFault ("raise") or stop responding
    ("hang", which the collective timeout or the launcher must catch). None when unset.
    ConfigError when ``debug.fail_rank`` is not a rank of a ``world_size`` job (no fault
    would fire, and a fault test would pass for nothing)."""
    config = cfg.from_dict(config)
    d = config.debug
    at, who, mode = d.fail_at_step, d.fail_rank, d.fail_mode
    if at and world_size is not None and who >= world_size:
        raise ConfigError(f"debug.fail_rank = {who} but this job has {world_size} process(es), "
                          f"ranks 0..{world_size - 1}")
    if at and mode == "hang" and world_size == 1:
        raise ConfigError("debug.fail_mode = 'hang' in a single process would hang for good: "
                          "only a peer's collective timeout (parallel.timeout_s) ends it; run "
                          "2 or more ranks, or use 'raise'")
    if not at or who != rank:
        return None

    def fault(step: int) -> None:
        if step != at:
            return
        if mode == "hang":
            while True:
                time.sleep(3600)
        raise InjectedFault(f"injected fault at step {at} (debug.fail_at_step={at}, "
                            f"debug.fail_rank={who})")
    return fault


def step_options(config: cfg.ConfigLike, comm: Communicator,
                 executor: Callable[[Graph], Any] | None = None) -> dict[str, Any]:
    """The data-parallel hook of ``runtime.train``: ``make_step(model, loss_fn, optimizer,
    precision)``, building the ParallelStep (with ``executor`` bound to ``comm``),
    ``transform`` (its rewrite, or None when there is nothing to rewrite) and
    ``prepare(model, optimizer, step, x, y)``, to call once before training with a local
    batch: it checks that every rank runs the same step, then broadcasts rank 0's state."""
    config = cfg.from_dict(config)
    p = config.parallel
    if p.dp != comm.world_size:
        raise ConfigError(f"parallel.dp = {p.dp} but this job has {comm.world_size} "
                          f"process(es): start it with `mpirun -n {p.dp} shardgrad train ...` "
                          f"(as root add --allow-run-as-root --oversubscribe), or set "
                          f"parallel.dp = {comm.world_size}")
    if p.deterministic and p.chunks % comm.world_size:
        raise ConfigError(f"parallel.chunks = {p.chunks} must be a multiple of parallel.dp = "
                          f"{comm.world_size} in deterministic mode")
    batch = config.train.batch_size
    if p.deterministic and batch % p.chunks:
        raise ConfigError(f"train.batch_size = {batch} must be a multiple of parallel.chunks = "
                          f"{p.chunks} in deterministic mode")
    check_zero(config)
    parallel = Parallel.of(p)
    fault = fault_injector(config, comm.rank, comm.world_size)

    def make_step(model: Module, loss_fn: Callable, optimizer: Optimizer,
                  precision: str = "fp32") -> ParallelStep:
        return ParallelStep(model, loss_fn, optimizer, comm, parallel, executor, fault,
                            precision)

    def prepare(model: Module, optimizer: Optimizer, step: ParallelStep, x, y) -> None:
        step.synchronize(x, y)

    return {"make_step": make_step, "prepare": prepare,
            "transform": rewrite(comm.world_size, parallel)}


def check_zero(config: cfg.ConfigLike) -> None:
    """ConfigError for what ``parallel.zero`` = 1 does not run with (one line each)."""
    config = cfg.from_dict(config)
    p, t = config.parallel, config.train
    if not p.zero:
        return
    if p.pp > 1:
        raise ConfigError("parallel.zero = 1 shards the optimizer over data-parallel ranks; it "
                          "runs with parallel.pp = 1 for now")
    if p.overlap:
        raise ConfigError("parallel.overlap = true overlaps the gradient allreduce, which "
                          "parallel.zero = 1 replaces by one reduce_scatter: set one of them off")
    if t.grad_clip:
        raise ConfigError("train.grad_clip needs the norm of the whole gradient, which no rank "
                          "holds with parallel.zero = 1: set one of them off")
    if t.precision == "fp16":
        raise ConfigError("train.precision = 'fp16' (dynamic loss scaling) does not run with "
                          "parallel.zero = 1: use 'bf16'")
