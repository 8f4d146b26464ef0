"""Data parallelism from a Python script, as Horovod and PyTorch DDP users write it
(``sg.distributed``)::

    comm = sg.distributed.init()        # MPI's world under mpirun, else this one process
    step = sg.distributed.data_parallel_step(model, F.cross_entropy, opt)
    sampler = sg.distributed.DistributedSampler(len(x), comm.world_size, comm.rank)
    for xb, yb in sg.distributed.batches(x, y, sampler, batch_size=64):   # global batch
        loss = step(xb, yb)             # each rank its share; the loss is the global mean

    mpirun -n 2 python train.py

The step is ``compile_step`` with the DataParallel rewrite (gradients, loss and batch
statistics averaged over the ranks, in static buckets) run on the MPI communicator; its first
call checks that every rank runs the same step and takes rank 0's parameters and optimizer
state. An uncaught exception on one rank prints ``rank R failed: ...`` and aborts the job,
as under ``shardgrad train``. Imports graph, partition and runtime.
"""

from __future__ import annotations

from collections.abc import Callable

from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer
from shardgrad.partition.data_parallel import DataParallel
from shardgrad.runtime import dp, world
from shardgrad.runtime.comm import Communicator
from shardgrad.runtime.data import DistributedSampler, batches
from shardgrad.runtime.step import Executor, TrainStep, _batch, device_of, executor_for


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


class DataParallelStep(TrainStep):
    """A TrainStep whose graph averages over ``comm``'s ranks. Each call takes this rank's
    share of the global batch (all ranks the same size) and returns the global mean loss."""

    def __init__(self, model: Module, loss_fn: Callable, optimizer: Optimizer,
                 comm: Communicator, transform: DataParallel | None,
                 executor: Executor | None):
        # a GPU model on the default executor keeps its state on the device and reduces its
        # flat gradient buffer itself (runtime.gpu_step), on ``comm``
        resident = executor is None and device_of(model).is_cuda
        super().__init__(model, loss_fn, optimizer,
                         None if resident else dp.bound_executor(executor_for(model)
                                                                 if executor is None
                                                                 else executor, comm),
                         transform, comm=comm if resident else None)
        self.comm = comm
        self._synced = comm.world_size == 1

    def __call__(self, x, y) -> float:
        if not self._synced:
            x, y = _batch(x), _batch(y)
            dp.synchronize(self.comm, self.model, self.optimizer, self, x, y)
            self._synced = True
        return super().__call__(x, y)


def data_parallel_step(model: Module, loss_fn: Callable, optimizer: Optimizer,
                       comm: Communicator | None = None, *, bucket_mb: float = 25.0,
                       sync_batchnorm: bool = True, deterministic: bool = False,
                       chunks: int = 4, executor: Executor | None = None) -> DataParallelStep:
    """``compile_step`` over ``comm`` (default: ``init()``): see the module docstring.
    ``sync_batchnorm`` takes batch statistics over the global batch (PyTorch's
    SyncBatchNorm); ``deterministic`` gives bit-identical parameters for any number of
    ranks (the global batch must then split into ``chunks``, a multiple of the ranks).
    A model on a GPU (``model.to("cuda")``) runs there with its state on the device (as
    ``compile_step``'s), its flat gradient buffer allreduced a bucket at a time, staged
    through pinned host memory."""
    comm = comm or init()
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb = {bucket_mb}: must be > 0")
    if deterministic and (chunks < 1 or chunks % comm.world_size):
        raise ValueError(f"chunks = {chunks} must be a positive multiple of the "
                         f"{comm.world_size} rank(s) in deterministic mode")
    on_gpu = device_of(model).is_cuda
    if on_gpu:
        comm = world.device_comm(comm, "cuda")
    transform = dp.rewrite(comm.world_size, bucket_mb, deterministic, chunks,
                           sync_batchnorm=sync_batchnorm)
    return DataParallelStep(model, loss_fn, optimizer, comm, transform, executor)


__all__ = ["DataParallelStep", "DistributedSampler", "batches", "data_parallel_step", "init",
           "rank", "world_size"]
