"""Running a data-parallel plan: executors bound to a Communicator, parameters broadcast from
rank 0, the start-up check that every rank runs the same program, and the fault-injection
knob (``debug.*``) the fail-fast tests use. Imports graph, ops, partition and runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shardgrad.graph.device import array_module
from shardgrad.graph.ir import Graph
from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer
from shardgrad.ops import collective
from shardgrad.partition.data_parallel import DataParallel
from shardgrad.partition.plan import graph_hash
from shardgrad.runtime.comm import Communicator
from shardgrad.runtime.config import ConfigError
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.step import TrainStep


class ReplicaMismatch(RuntimeError):
    """Ranks that should run the same step do not: the message names the first rank that
    differs from rank 0 and how."""


class InjectedFault(RuntimeError):
    """The failure ``debug.fail_at_step`` asked for."""


class Bound:
    """Runs ``inner`` (anything with ``run(feeds)``) inside ``collective.bind(comm, **groups)``,
    so the graph's collective ops reach ``comm``. ``fault`` is called before each run with
    the 1-based run count (fault injection)."""

    def __init__(self, inner: Any, comm: Communicator, groups: Mapping[str, Communicator],
                 fault: Callable[[int], None] | None = None):
        self.inner, self.comm, self.groups, self.fault = inner, comm, dict(groups), fault
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        if self.fault is not None:
            self.fault(self.runs)
        with collective.bind(self.comm, **self.groups):
            return self.inner.run(feeds)


class Faulted:
    """Runs ``inner`` after calling ``fault`` with the 1-based run count (fault injection
    for an executor that binds its own communicators, as the pipeline's does)."""

    def __init__(self, inner: Any, fault: Callable[[int], None]):
        self.inner, self.fault, self.runs = inner, fault, 0

    def run(self, feeds):
        self.runs += 1
        self.fault(self.runs)
        return self.inner.run(feeds)


def bound_executor(executor: Callable[[Graph], Any] | None, comm: Communicator,
                   fault: Callable[[int], None] | None = None, **groups: Communicator
                   ) -> Callable[[Graph], Bound]:
    """``executor`` (default: the reference Interpreter) whose runs see ``comm``."""
    make = executor or Interpreter
    return lambda graph: Bound(make(graph), comm, groups, fault)


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


def rewrite(world_size: int, bucket_mb: float, deterministic: bool, chunks: int,
            overlap: bool = False, sync_batchnorm: bool = True) -> DataParallel | None:
    """The data-parallel step transform for ``world_size`` ranks (``shardgrad train`` and
    ``sg.distributed`` alike), or None when it would change nothing (one rank, not
    deterministic)."""
    if world_size == 1 and not deterministic:
        return None
    return DataParallel(world_size, int(bucket_mb * 2**20), deterministic, chunks, overlap,
                        sync_batchnorm=sync_batchnorm)


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


def fault_injector(config: Mapping, rank: int, world_size: int | None = None
                   ) -> Callable[[int], None] | None:
    """The ``debug.fail_at_step`` / ``debug.fail_rank`` / ``debug.fail_mode`` knob: on that
    rank, before that step (1-based) runs, raise InjectedFault ("raise") or stop responding
    ("hang", which the collective timeout or the launcher must catch). None when unset.
    ConfigError when ``debug.fail_rank`` is not a rank of a ``world_size`` job (no fault
    would fire, and a fault test would pass for nothing)."""
    d = config.get("debug", {})
    at, who, mode = d.get("fail_at_step", 0), d.get("fail_rank", 0), d.get("fail_mode", "raise")
    if at and world_size is not None and who >= world_size:
        raise ConfigError(f"debug.fail_rank = {who} but this job has {world_size} process(es), "
                          f"ranks 0..{world_size - 1}")
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


def step_options(config: Mapping, comm: Communicator,
                 executor: Callable[[Graph], Any] | None = None) -> dict[str, Any]:
    """The data-parallel hook of ``runtime.train``: ``transform`` (the DataParallel rewrite,
    or None when there is nothing to rewrite), ``executor`` (``executor`` bound to ``comm``)
    and ``prepare(model, optimizer, step, x, y)``, to call once before training with a local
    batch: it checks that every rank runs the same step, then broadcasts rank 0's state."""
    p = config["parallel"]
    if p["dp"] != comm.world_size:
        raise ConfigError(f"parallel.dp = {p['dp']} but this job has {comm.world_size} "
                          f"process(es): start it with `mpirun -n {p['dp']} shardgrad train ...` "
                          f"(as root add --allow-run-as-root --oversubscribe), or set "
                          f"parallel.dp = {comm.world_size}")
    if p["deterministic"] and p["chunks"] % comm.world_size:
        raise ConfigError(f"parallel.chunks = {p['chunks']} must be a multiple of parallel.dp = "
                          f"{comm.world_size} in deterministic mode")
    batch = config["train"]["batch_size"]
    if p["deterministic"] and batch % p["chunks"]:
        raise ConfigError(f"train.batch_size = {batch} must be a multiple of parallel.chunks = "
                          f"{p['chunks']} in deterministic mode")
    transform = rewrite(comm.world_size, p["bucket_mb"], p["deterministic"], p["chunks"],
                        p["overlap"], p["sync_batchnorm"])

    def prepare(model: Module, optimizer: Optimizer, step: TrainStep, x, y) -> None:
        synchronize(comm, model, optimizer, step, x, y)

    fault = fault_injector(config, comm.rank, comm.world_size)
    return {"transform": transform, "prepare": prepare,
            "executor": bound_executor(executor, comm, fault)}
