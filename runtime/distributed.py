"""Data parallelism from a Python script, as Horovod and PyTorch DDP users write it
(``sg.distributed``)::

    comm = sg.distributed.init()        # MPI's world under mpirun, else this one process
    step = sg.distributed.data_parallel_step(model, F.cross_entropy, opt)
    sampler = sg.distributed.DistributedSampler(len(x), comm.world_size, comm.rank)
    for xb, yb in sg.distributed.batches(x, y, sampler, batch_size=64):   # global batch
        loss = step(xb, yb)             # each rank its share; the loss is the global mean

    mpirun -n 2 python train.py

The step is runtime.dp's ParallelStep, the one ``shardgrad train`` runs: ``compile_step``
with the DataParallel rewrite (gradients, loss and batch statistics averaged over the ranks,
in static buckets; or ZeRO-1) run on the MPI communicator; its first call checks that every
rank runs the same step and takes rank 0's parameters and optimizer state. An uncaught
exception on one rank prints ``rank R failed: ...`` and aborts the job, as under
``shardgrad train``. Imports graph and runtime.
"""

from __future__ import annotations

from collections.abc import Callable

from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer
from shardgrad.runtime import dp, world
from shardgrad.runtime.comm import Communicator
from shardgrad.runtime.data import DistributedSampler, batches
from shardgrad.runtime.step import Executor, device_of


def init(timeout_s: float = 300.0) -> Communicator:
    """This process's communicator, made on the first call (``runtime.world.start``, as
    ``shardgrad train`` does): MPI's world when an MPI launcher started the process (a
    collective blocked ``timeout_s`` seconds aborts the job; 0: never), else a single
    process. Under MPI an uncaught exception then aborts every rank."""
    return world.start(timeout_s)


def rank() -> int:
    return init().rank


def world_size() -> int:
    return init().world_size


DataParallelStep = dp.ParallelStep   # the step ``shardgrad train`` runs too


def data_parallel_step(model: Module, loss_fn: Callable, optimizer: Optimizer,
                       comm: Communicator | None = None, *,
                       bucket_mb: float = dp.Parallel.bucket_mb,
                       sync_batchnorm: bool = dp.Parallel.sync_batchnorm,
                       deterministic: bool = dp.Parallel.deterministic,
                       chunks: int = dp.Parallel.chunks, zero: int = dp.Parallel.zero,
                       overlap: bool = dp.Parallel.overlap,
                       executor: Executor | None = None) -> dp.ParallelStep:
    """``compile_step`` over ``comm`` (default: ``init()``): see the module docstring.
    ``sync_batchnorm`` takes batch statistics over the global batch (PyTorch's
    SyncBatchNorm); ``deterministic`` gives bit-identical parameters for any number of
    ranks (the global batch must then split into ``chunks``, a multiple of the ranks);
    ``zero=1`` keeps 1/world_size of the optimizer state on each rank (ZeRO stage 1: call
    ``step.consolidate()`` on every rank before reading ``optimizer.state_dict()``);
    ``overlap`` issues each bucket's allreduce non-blocking (``parallel.overlap``; not with zero).
    A model on a GPU (``model.to("cuda")``) runs there with its state on the device (as
    ``compile_step``'s), its flat gradient buffer allreduced a bucket at a time, staged
    through pinned host memory (ZeRO-1 and deterministic mode: through the host-feeds step)."""
    comm = comm or init()
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb = {bucket_mb}: must be > 0")
    if deterministic and (chunks < 1 or chunks % comm.world_size):
        raise ValueError(f"chunks = {chunks} must be a positive multiple of the "
                         f"{comm.world_size} rank(s) in deterministic mode")
    if zero not in (0, 1):
        raise ValueError(f"zero = {zero}: must be 0 (off) or 1 (ZeRO stage 1)")
    if zero and overlap:
        raise ValueError("overlap = True and zero = 1: zero = 1 replaces the gradient allreduce "
                         "that overlap overlaps by one reduce_scatter; set one of them off")
    if device_of(model).is_cuda:
        comm = world.device_comm(comm, "cuda")
    parallel = dp.Parallel(bucket_mb, deterministic, chunks, overlap, sync_batchnorm, zero)
    return dp.ParallelStep(model, loss_fn, optimizer, comm, parallel, executor)


__all__ = ["DataParallelStep", "DistributedSampler", "batches", "data_parallel_step", "init",
           "rank", "world_size"]
