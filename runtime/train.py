"""A training run from a config: data, model, optimizer, the compiled step, epochs over a
DistributedSampler, metrics, checkpoints, resume, and the final summary.

The loop knows ranks only through a Communicator (default SingleProcess) and stays free of
MPI: data parallelism plugs in through ``step_options`` (or train's ``transform`` /
``executor`` arguments). With ``device.type`` "cuda" the step runs on runtime.gpu's executor,
its state stays on the GPU between steps and device buffers cross ranks through
runtime.gpu_comm; evaluation, checkpoints and the summary use host copies (evaluation on
``train.executor``). Only rank 0 writes files. Imports graph and runtime.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from shardgrad.graph import optim
from shardgrad.graph.device import xp_for
from shardgrad.graph.ir import ShapeError
from shardgrad.graph.nn import Module, functional, manual_seed
from shardgrad.graph.tensor import get_default_dtype, set_default_dtype
from shardgrad.graph.trace import trace_step
from shardgrad.partition.pipeline import PipelinePlan
from shardgrad.partition.pipeline import pipeline as partition_pipeline
from shardgrad.partition.plan import Plan
from shardgrad.runtime import checkpoint, datasets, dp, pipeline, rundir, serialize, trace, world
from shardgrad.runtime import config as cfg
from shardgrad.runtime import device as dev
from shardgrad.runtime.checkpoint import CheckpointError
from shardgrad.runtime.comm import Communicator, SingleProcess
from shardgrad.runtime.data import (
    DataError,
    Dataset,
    DistributedSampler,
    batches,
    load_digits,
    load_idx_dataset,
    load_text,
    num_batches,
)
from shardgrad.runtime.executors import EXECUTORS, choose_executor
from shardgrad.runtime.models import build_model, image_input, vocab_size
from shardgrad.runtime.monitor import Monitor, traced_comm
from shardgrad.runtime.prefetch import Augment, device_copier, epoch_batches, prefetch
from shardgrad.runtime.serialize import write_atomic
from shardgrad.runtime.step import TrainStep, accuracy, compile_step, resident_parallel

# Keys a resumed run may change: they do not alter the trajectory up to the checkpoint, and
# after it only how long it runs and how it is run, or never reach training at all: the Ray
# launcher's cluster.* and the fault injection debug.* (a run a fault stopped resumes without).
# Checkpoints hold the whole model, so a run resumes at any world size and on any device.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.eval_batch_size",
                     "train.executor", "device.threads", "parallel.timeout_s",
                     "parallel.start_timeout_s", "cluster.*", "debug.*", "log.*", "parallel.dp",
                     "parallel.pp", "parallel.microbatches", "parallel.schedule",
                     "parallel.balance", "device.type", "device.comm", "device.cuda_aware_mpi",
                     "parallel.zero")


def resumable(key: str) -> bool:
    """Whether a resumed run may change the dotted config ``key`` (RESUMABLE_CHANGES)."""
    return key in RESUMABLE_CHANGES or f"{key.partition('.')[0]}.*" in RESUMABLE_CHANGES


CHECKPOINT = re.compile(r"^epoch_(\d+)\.safetensors$")


class Diverged(RuntimeError):
    """The training loss or the parameters became NaN or infinite: the message names the
    step. Raised instead of training on (and checkpointing) garbage."""


def make_executor(name: str):
    """The CPU executor named ``name`` (runtime.executors chooses)."""
    return choose_executor(name)


def step_options(config: cfg.ConfigLike, comm: Communicator) -> dict[str, Any]:
    """How to run the step on this communicator: the data-parallel (or pipeline) hook.

    Returns a dict with any of ``make_step(model, loss_fn, optimizer, precision)`` (the step
    to train with: data parallelism's runtime.dp.ParallelStep, shared with sg.distributed),
    ``transform`` (Graph -> Graph, e.g. inserting gradient allreduce), ``executor`` (Graph ->
    runnable, e.g. one that executes collectives on ``comm``), ``prepare(model, optimizer,
    step, x, y)`` (called once before the first step with a local batch, e.g. to check
    replicas and broadcast rank 0's state), ``gather(step)`` (called on every rank before the
    model is read: evaluation, checkpoints, the summary; a pipeline assembles its stages'
    parameters there), ``data_rank`` and ``data_world_size`` (which shard of the data this
    process reads; default ``comm.rank`` / ``comm.world_size``), ``loss_is_global`` (the
    step's loss is already the mean over every rank: logged without another allreduce). A
    single process needs nothing.
    """
    config = cfg.from_dict(config)
    # on a GPU: the current one, which open_device chose for this rank
    kind = "cuda" if dev.Device.parse(config.device.type).is_cuda else "cpu"
    chosen = choose_executor(config.train.executor, kind, comm.rank)
    xp = xp_for(kind)

    def executor(graph, **names):
        # a pipeline stage names its rank and shard; the GPU executor's errors the rank only
        return chosen(graph) if kind == "cuda" or not names else chosen(graph, **names)

    dp.check_zero(config)
    if config.parallel.pp > 1:
        return pipeline.step_options(config, comm, executor, xp)
    options = dp.step_options(config, comm, executor)
    if dev.Device.parse(config.device.type).is_cuda and not config.debug.fail_at_step:
        if options["transform"] is None and comm.world_size == 1:
            # one GPU: compile_step's own path (the model on the device, the state owned there)
            return {"device": dev.resolve(config.device.type)}
        if resident_parallel(options["transform"]):
            # data parallel: the same, its flat gradient buffer allreduced on the GPU comm
            options = dict(dp.step_options(config, comm, None),
                           device=dev.resolve(config.device.type))
    return options


def open_device(config: cfg.ConfigLike, comm: Communicator) -> Communicator:
    """Make ``device.type`` current for this rank (``"cuda"``: the GPU of its local rank) and
    return the communicator its step uses: on a GPU with several ranks, ``comm`` carrying
    device buffers as ``device.comm`` / ``device.cuda_aware_mpi`` say. Raises ConfigError
    when CuPy or the GPU is missing."""
    config = cfg.from_dict(config)
    spec = config.device.type
    if not dev.Device.parse(spec).is_cuda:
        return comm
    if config.parallel.pp > 1 and config.device.comm == "nccl":
        raise cfg.ConfigError("device.comm = 'nccl' carries data parallelism only (NCCL matches "
                              "sends by order, not tag): set device.comm = 'mpi' for a "
                              "pipeline (parallel.pp > 1)")
    try:
        dev.use(dev.resolve(spec))
    except dev.DeviceError as e:
        raise cfg.ConfigError(f"device.type = {spec!r} but {e}") from None
    return world.device_comm(comm, spec, config.device.comm,
                             config.device.cuda_aware_mpi)


def load_data(config: cfg.ConfigLike) -> Dataset:
    config = cfg.from_dict(config)
    d, dtype = config.data, config.train.dtype
    image = image_input(config)
    if d.dataset == "text":
        return load_text(test_fraction=d.test_fraction, seed=d.split_seed)
    if d.dataset == "digits":
        return load_digits(dtype, image=image, test_fraction=d.test_fraction,
                           seed=d.split_seed)
    if d.dataset != "idx":
        return load_named(config)
    for key in ("train_images", "train_labels"):
        if not d[key]:
            raise cfg.ConfigError(f"data.dataset = 'idx' needs data.{key} (a file path)")
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        path = d[key]
        if path and not os.path.isfile(path):
            where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
            raise cfg.ConfigError(f"data.{key} = {path!r}: "
                                  f"{'is a directory' if os.path.isdir(path) else 'no such file'}"
                                  f"{where}")
    data = load_idx_dataset(d.train_images, d.train_labels, d.test_images or None,
                            d.test_labels or None, dtype=dtype, image=image,
                            test_fraction=d.test_fraction, seed=d.split_seed)
    return datasets.finish(data.x_train, data.y_train, data.x_test, data.y_test,
                           d.num_classes or None, d.train_labels)


def load_named(config: cfg.ConfigLike) -> Dataset:
    """mnist5k, the downloaded sets, a folder of images or an .npz file (runtime.datasets)."""
    config = cfg.from_dict(config)
    d, dtype = config.data, config.train.dtype
    image, classes = image_input(config), d.num_classes or None
    split_args = {"test_fraction": d.test_fraction, "seed": d.split_seed}
    name = d.dataset
    if name == "mnist5k":
        return datasets.load_mnist5k(dtype, image, num_classes=classes, **split_args)
    if name in ("mnist", "fashion_mnist"):
        return datasets.load_idx_download(name, dtype, image, classes)
    if name == "cifar10":
        return datasets.load_cifar10(dtype, image, classes)
    if not d.path:
        raise cfg.ConfigError(f"data.dataset = {name!r} needs data.path (a "
                              f"{'directory' if name == 'folder' else '.npz file'})")
    if name == "folder":
        return datasets.load_folder(d.path, dtype, image, num_classes=classes,
                                    **split_args)[0]
    return datasets.load_npz(d.path, dtype, image, num_classes=classes, **split_args)


def make_optimizer(config: cfg.ConfigLike, params) -> optim.Optimizer:
    config = cfg.from_dict(config)
    t = config.train
    if t.optimizer == "sgd":
        if t.nesterov and t.momentum <= 0:
            raise cfg.ConfigError("train.nesterov = true needs train.momentum > 0")
        return optim.SGD(params, lr=t.lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, nesterov=t.nesterov)
    if t.optimizer == "rmsprop":
        return optim.RMSprop(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "adagrad": optim.Adagrad}[t.optimizer]
    return opt_cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(config: cfg.ConfigLike, step: int, total_steps: int) -> float:
    """The learning rate of the step that follows ``step`` completed steps (of
    ``total_steps``): a linear warm-up over ``train.warmup_steps``, then ``train.lr_schedule``
    over the rest (step and multistep count epochs of total_steps / train.epochs steps)."""
    config = cfg.from_dict(config)
    t = config.train
    warm, lr = t.warmup_steps, t.lr
    if step < warm:
        return lr * (step + 1) / warm
    s, span = step - warm, max(total_steps - warm, 1)
    kind = t.lr_schedule
    if kind == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * s / span))
    if kind == "linear":
        return lr * max(0.0, 1.0 - s / span)
    if kind in ("step", "multistep"):
        epoch = step // max(total_steps // t.epochs, 1)
        decays = (epoch // t.lr_step_size if kind == "step"
                  else sum(epoch >= m for m in t.lr_milestones))
        return lr * t.lr_gamma ** decays
    return lr


def accumulated(config: cfg.Config) -> cfg.Config:
    """``config`` with ``train.accumulate`` = k folded into how the step runs: each optimizer
    step takes k batches of ``train.batch_size`` at once (the loop's batch is k times larger)
    and the step graph, traced on one of them, runs k times and sums the gradients: as k more
    pipeline micro-batches (pp > 1), or k times the chunks of deterministic data parallelism
    (the dp ranks' chunks, one each, when it was off)."""
    if config.train.precision == "bf16" and not importlib.util.find_spec("ml_dtypes"):
        raise cfg.ConfigError("train.precision = 'bf16' needs ml_dtypes: pip install "
                              "'shardgrad[gpu]' (or pip install ml_dtypes)")
    p = config.parallel
    if config.train.precision == "fp16" and (
            p.dp > 1 or p.pp > 1 or p.deterministic or config.train.accumulate > 1):
        # the skip decision reads each rank's (each chunk's) own gradients: they could disagree
        raise cfg.ConfigError("train.precision = 'fp16' (dynamic loss scaling) runs in one "
                              "process, without accumulation, for now: use 'bf16'")
    k = config.train.accumulate
    if k == 1:
        return config
    if p.pp > 1:
        folded = {"parallel.microbatches": p.microbatches * k}
    else:
        folded = {"parallel.chunks": (p.chunks if p.deterministic else p.dp) * k,
                  "parallel.deterministic": True}
    return config.replace({"train.batch_size": config.train.batch_size * k, **folded})


def loss_function(config: cfg.ConfigLike) -> Callable:
    """Cross-entropy, with ``train.label_smoothing`` when set."""
    config = cfg.from_dict(config)
    eps = config.train.label_smoothing
    if not eps:
        return functional.cross_entropy
    return functools.partial(functional.cross_entropy, label_smoothing=eps)


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    saved = get_default_dtype()
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(saved)


# ranks on threads (sg.distributed's thread communicator, the tests) share sg.nn's seeded
# generator and the default dtype: each draws its parameters alone, as mpirun's processes do
_DRAW = threading.Lock()


def setup(config: cfg.ConfigLike, options: Mapping | None = None
          ) -> tuple[Module, optim.Optimizer, TrainStep, Dataset]:
    """Data, model (parameters drawn after ``manual_seed(train.seed)``, so identical on every
    rank), optimizer, and the compiled step (traced on its first call)."""
    config = cfg.from_dict(config)
    options = options or {}
    data = load_data(config)
    with _DRAW, default_dtype(config.train.dtype):
        manual_seed(config.train.seed)
        model = build_model(config, data.input_shape, data.num_classes,
                            vocab_size(data.x_train))
    if options.get("device") is not None:
        model.to(options["device"])
    optimizer = make_optimizer(config, model.parameters())
    optimizer.max_grad_norm = config.train.grad_clip or None
    precision = config.train.precision
    if options.get("make_step") is not None:     # data parallel: runtime.dp's ParallelStep
        step = options["make_step"](model, loss_function(config), optimizer, precision)
    else:
        step = compile_step(model, loss_function(config), optimizer,
                            executor=None if options.get("device") is not None else (
                                options.get("executor")
                                or make_executor(config.train.executor)),
                            transform=options.get("transform"), precision=precision)
    return model, optimizer, step, data


def plan_for_config(config: cfg.ConfigLike) -> PipelinePlan | Plan:
    """The plan ``shardgrad train CONFIG`` runs with ``parallel.pp`` stages (built here in
    one process: "profile" times this machine), or with ``parallel.zero`` = 1 its ZeRO-1
    data-parallel plan."""
    config = cfg.from_dict(config)
    dp.check_zero(config)
    if config.parallel.zero:
        return _zero_plan(config)
    replicas, pp, m = pipeline.mesh_shape(config)
    model, optimizer, _, data = setup(config)
    rows = config.train.batch_size // (replicas * m)
    graph = trace_step(model, functional.cross_entropy, optimizer,
                       ((rows,) + data.input_shape, config.train.dtype),
                       ((rows,), str(data.y_train.dtype)))
    balance = config.parallel.balance
    times = pipeline.profile_times(graph) if balance == "profile" else None
    with pipeline.as_config_error():
        return partition_pipeline(graph, pp, balance, m, config.parallel.schedule, replicas,
                                  times)


def _zero_plan(config: cfg.Config) -> Plan:
    run = accumulated(config)
    world = run.parallel.dp
    transform = dp.rewrite(world, dp.Parallel.of(run.parallel))
    model, optimizer, _, data = setup(config)
    rows = run.train.batch_size // world // transform.split
    with transform.trace_context():
        graph = trace_step(model, loss_function(config), optimizer,
                           ((rows,) + data.input_shape, config.train.dtype),
                           ((rows,), str(data.y_train.dtype)))
    try:
        return transform.plan(graph)
    except ShapeError as e:
        raise _unfit(e) from e


def params_sha256(model: Module) -> str:
    """SHA-256 over the parameters in ``named_parameters()`` order: each array's bytes in C
    order, little endian."""
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        a = np.asarray(p.numpy())
        h.update(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def model_tensors(model: Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, order="C") for k, v in model.state_dict().items()}


def save_checkpoint(path: str, model: Module, optimizer: optim.Optimizer,
                    meta: Mapping[str, Any]) -> None:
    """Parameters and buffers by name, optimizer state as ``optim.<key>``, and ``meta`` (as
    strings) in the safetensors header; written atomically."""
    tensors = model_tensors(model)
    tensors.update({f"optim.{k}": np.asarray(v, order="C")
                    for k, v in optimizer.state_dict().items()})
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    with trace.span("checkpoint", "io", path=os.path.basename(path)):
        serialize.save_file(path, tensors, metadata)


def load_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; CheckpointError when it is not one
    (truncated, overwritten, another format, a directory) or a tensor does not match the
    checksum stored with it."""
    try:
        return serialize.read_file(path)   # checks each tensor's SHA-256
    except serialize.FileError as e:
        raise CheckpointError(f"{e}; delete it to resume from an earlier checkpoint") from None


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of each checkpoint in ``run_dir/checkpoints``, by epoch."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(ckpt_dir, name))
                  for name in os.listdir(ckpt_dir) if (m := CHECKPOINT.match(name)))


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint with the highest epoch in ``run_dir/checkpoints``, or None."""
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def _make_run_dir(out_dir: str) -> None:
    """Create ``out_dir/checkpoints``, or a ConfigError naming the run directory (rather than
    an OSError at the first checkpoint, after the first epoch's work)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        if not os.access(ckpt_dir, os.W_OK | os.X_OK) or not os.access(out_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise cfg.ConfigError(f"cannot write the run directory {out_dir!r} (--out): "
                              f"{e.strerror or e}") from None


def _clear_stale(out_dir: str, after_epoch: int) -> None:
    """Remove checkpoints past ``after_epoch`` (an earlier run's, which a later --resume would
    otherwise take for this run's), temporary files a killed writer left, and with
    ``after_epoch`` 0 an earlier run's final parameters and summary."""
    def remove(path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:   # e.g. a directory of that name: the bare errno named no cause
            raise cfg.ConfigError(f"cannot remove {path}, an earlier run's file in the run "
                                  f"directory (--out {out_dir}): {e.strerror or e}") from None

    for epoch, path in _checkpoints(out_dir):
        if epoch > after_epoch:
            remove(path)
    for name in ("final.safetensors", "summary.json") if after_epoch == 0 else ():
        remove(os.path.join(out_dir, name))
    for where in (out_dir, os.path.join(out_dir, "checkpoints")):
        for name in os.listdir(where):
            if name.startswith(".") and ".tmp-" in name:   # write_atomic's names
                remove(os.path.join(where, name))


def _keep_last(out_dir: str, keep: int) -> None:
    """Remove all but the ``keep`` latest epoch checkpoints (``keep`` 0: keep all)."""
    if keep:
        for _, path in _checkpoints(out_dir)[:-keep]:
            os.remove(path)


def _restore(config: cfg.Config, resume: str, model: Module, optimizer: optim.Optimizer,
             per_epoch: int | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    path = latest_checkpoint(resume)
    if path is None:
        raise FileNotFoundError(f"--resume {resume}: no checkpoints/epoch_<k>.safetensors "
                                f"there to resume from")
    tensors, meta = load_checkpoint(path)
    _, _, saved = checkpoint.read_meta(path, meta, per_epoch)
    try:   # keys added to the schema since the checkpoint was written take their defaults
        saved = cfg.from_dict(saved)
    except (cfg.ConfigError, AttributeError) as e:
        raise CheckpointError(f"{path} holds a config this version cannot use: {e}") from None
    changed = [k for k in cfg.diff(saved, config) if not resumable(k)]
    if changed:
        raise cfg.ConfigError(f"--resume {resume}: the config differs from the checkpoint's in "
                              f"{', '.join(changed)}; only {', '.join(RESUMABLE_CHANGES)} may "
                              f"change on resume")
    if int(meta["epoch"]) > config.train.epochs:
        raise cfg.ConfigError(f"--resume {resume}: train.epochs = {config.train.epochs} "
                              f"but {path} is from epoch {meta['epoch']}; set train.epochs >= "
                              f"{meta['epoch']}")
    expected = model_tensors(model)
    expected.update({f"optim.{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    checkpoint.check_tensors(path, tensors, expected, config.train.dtype)
    try:
        _load_state(tensors, model, optimizer)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model: "
                              f"{e.args[0] if e.args else e}") from None
    return tensors, meta, path


def _load_state(tensors: Mapping[str, np.ndarray], model: Module,
                optimizer: optim.Optimizer) -> None:
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    optimizer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})


def _record(line: str) -> dict | None:
    """One metrics.jsonl line as a record, or None for a blank line or one torn by a run
    killed while appending it."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class _Metrics:
    """metrics.jsonl on rank 0 (other ranks write nothing); each record also goes to
    ``on_record``."""

    def __init__(self, path: str | None, on_record: Callable[[dict], None] | None):
        self.path, self.on_record = path, on_record

    def keep_until(self, source: str, step: int) -> None:
        """Start from ``source``'s records up to ``step`` (a resumed run's history)."""
        if self.path is None:
            return
        kept = []
        if os.path.exists(source):
            with open(source) as f:
                for line in f:
                    record = _record(line)
                    if record is not None and record["step"] <= step:
                        kept.append(line.rstrip("\n") + "\n")
        _write_text(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        self.last = record
        if self.path is not None:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:   # e.g. the disk filled: name the file (a torn line is read
                raise serialize.WriteError(   # back as none, see _record)
                    e.errno, f"cannot write {self.path}: {e.strerror or e}") from None
        if self.on_record is not None:
            self.on_record(record)


def _unfit(e: ShapeError) -> cfg.ConfigError:
    """A step that cannot be traced for the config's model and batches (e.g. batch norm over
    one sample) is a config error, like a bad key: one line, exit 2."""
    return cfg.ConfigError(f"the model this config builds cannot train on its batches: {e}")


def _check_finite(model: Module, steps_done: int, epoch: int) -> None:
    """Diverged unless every parameter and buffer is finite (before it is checkpointed)."""
    for name, a in model_tensors(model).items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise Diverged(f"{name} holds NaN or infinite values after step {steps_done} "
                           f"(epoch {epoch + 1}): training diverged; try a lower train.lr")


def loader_options(config: cfg.Config, data: Dataset) -> tuple[Augment, Any]:
    """The training batches' augmentation and, on a GPU, their copy to the device."""
    d = config.data
    augment = Augment(len(data.y_train), d.random_crop, d.hflip, config.train.seed)
    if augment and data.x_train.ndim != 4:
        raise cfg.ConfigError(f"data.random_crop / data.hflip augment images (N, C, H, W), but "
                              f"model.kind = {config.model.kind!r} takes the data as "
                              f"shape {data.x_train.shape}: use an image model (cnn, resnet)")
    spec = dev.Device.parse(config.device.type)
    return augment, device_copier(dev.resolve(spec) if spec.is_cuda else None)


def _read_losses(losses: list, first: int, epoch: int, config: cfg.Config, total: int) -> None:
    """Turn an epoch's losses into floats in place (a GPU step's loss is a device Tensor, read
    only when logged: one sync), Diverged at the first that is not finite."""
    for i, v in enumerate(losses):
        v = losses[i] = float(v)
        if not math.isfinite(v):
            raise Diverged(f"the training loss is {v} at step {first + i} (epoch {epoch + 1}, "
                           f"lr {lr_at(config, first + i - 1, total):g}): training diverged "
                           f"(lower train.lr, or check the data for NaN)")


def _mean_over_ranks(comm: Communicator, value: float) -> float:
    buf = np.asarray([value], dtype=np.float64)
    return float(comm.allreduce_(buf)[0]) / comm.world_size


def train(config: cfg.ConfigLike, out_dir: str | None, comm: Communicator | None = None,
          resume: str | None = None, transform: Callable | None = None,
          executor: Callable | None = None,
          on_record: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (on every rank).

    Writes, on rank 0 and when ``out_dir`` is given: ``metrics.jsonl`` (a ``"kind": "step"``
    record every ``train.log_every`` steps and a ``"kind": "epoch"`` record per epoch, with
    test accuracy), ``checkpoints/epoch_<k>.safetensors`` after epoch k, ``final.safetensors``
    and ``summary.json``. ``resume`` is a run directory: training continues from its latest
    checkpoint and ends with the same parameters as an uninterrupted run. ``transform`` and
    ``executor`` override ``step_options(config, comm)``; ``on_record`` sees every record.
    """
    config = cfg.from_dict(config)
    threads = config.device.threads
    comm = comm or SingleProcess()
    # rank 0 writes the run directory: it holds the directory's lock for the whole run
    with threadpool_limits(threads or None, user_api="blas"), \
            rundir.hold(out_dir if comm.rank == 0 else None):
        return _train(config, out_dir, comm, resume, transform, executor, on_record)


@dataclass
class _Run:
    """One training run: the parts building made (config -> data, model, optimizer, step
    and how it is parallelised), where the run stands, and its metrics."""

    config: cfg.Config
    comm: Communicator
    out_dir: str | None
    writer: bool                # rank 0 with a run directory: the one that writes files
    options: dict[str, Any]     # step_options' hooks (prepare, gather, data_rank, ...)
    model: Module
    optimizer: optim.Optimizer
    step: TrainStep
    data: Dataset
    sampler: DistributedSampler
    batch: int                  # the loop's batch (train.batch_size x train.accumulate)
    per_epoch: int
    metrics: _Metrics
    start_epoch: int = 0
    steps_done: int = 0
    wall_before: float = 0.0
    train_loss: float = float("nan")
    resumed_from: str | None = None
    acc: float | None = None
    t0: float = field(default_factory=time.perf_counter)

    @property
    def total(self) -> int:
        return self.per_epoch * self.config.train.epochs

    def wall(self) -> float:
        return round(self.wall_before + time.perf_counter() - self.t0, 3)

    def evaluate(self) -> float:
        t = self.config.train
        acc = accuracy(self.model, self.data.x_test, self.data.y_test, t.eval_batch_size,
                       make_executor(t.executor)) if self.comm.rank == 0 else None
        return self.comm.bcast_obj(acc)


def _build(config: cfg.Config, out_dir: str | None, comm: Communicator,
           transform: Callable | None, executor: Callable | None,
           on_record: Callable[[dict], None] | None) -> _Run:
    """Everything a run needs before its first step: the device, the step's parallel hooks,
    data, model, optimizer, compiled step, the sampler of this rank's share, the metrics."""
    comm = traced_comm(config, open_device(config, comm))
    run = accumulated(config)
    options = dict(step_options(run, comm) if transform is None and executor is None
                   else {"transform": transform, "executor": executor})
    rank = options.get("data_rank", comm.rank)
    world = options.get("data_world_size", comm.world_size)
    t = config.train
    batch = run.train.batch_size    # train.accumulate batches of train.batch_size
    if t.batch_size % world:
        raise cfg.ConfigError(f"train.batch_size = {t.batch_size} (the global batch) must be "
                              f"a multiple of the data-parallel world size {world}")
    writer = comm.rank == 0 and out_dir is not None
    if writer:
        _make_run_dir(out_dir)
    metrics = _Metrics(os.path.join(out_dir, "metrics.jsonl") if writer else None, on_record)
    model, optimizer, step, data = setup(config, options)
    sampler = DistributedSampler(len(data.y_train), world, rank, shuffle=True, seed=t.seed)
    per_epoch = num_batches(len(data.y_train), batch)
    if per_epoch == 0:
        raise cfg.ConfigError(f"train.batch_size = {t.batch_size} (x train.accumulate = "
                              f"{t.accumulate}) is larger than the {len(data.y_train)} "
                              f"training samples")
    return _Run(config, comm, out_dir, writer, options, model, optimizer, step, data, sampler,
                batch, per_epoch, metrics)


def _resume(r: _Run, resume: str | None) -> None:
    """Continue from ``resume``'s latest checkpoint (read on rank 0, sent to every rank), or
    start afresh; then clear what an earlier run left in the run directory."""
    if resume is not None:
        state = None
        if r.comm.rank == 0:
            try:
                state = _restore(r.config, resume, r.model, r.optimizer, r.per_epoch)
            except (cfg.ConfigError, DataError, OSError) as e:   # every rank raises it
                state = e
        state = r.comm.bcast_obj(state)
        if isinstance(state, Exception):
            raise state
        tensors, meta, r.resumed_from = state
        if r.comm.rank != 0:
            _load_state(tensors, r.model, r.optimizer)
        r.start_epoch, r.steps_done = int(meta["epoch"]), int(meta["step"])
        r.wall_before = float(meta.get("wall_s", 0.0))
        r.train_loss = float(meta.get("train_loss", "nan"))
        r.metrics.keep_until(os.path.join(resume, "metrics.jsonl"), r.steps_done)
    elif r.writer:
        _write_text(r.metrics.path, "")
    if r.writer:   # keep the checkpoints this run resumes along, none of another run's
        same = resume is not None and os.path.realpath(resume) == os.path.realpath(r.out_dir)
        _clear_stale(r.out_dir, r.start_epoch if same else 0)


def _prepare(r: _Run) -> None:
    """The parallel hook's start-up (check the ranks traced the same step, share rank 0's
    state) on this rank's first batch."""
    prepare = r.options.get("prepare")
    if prepare is not None:
        r.sampler.set_epoch(r.start_epoch)
        x0, y0 = next(batches(r.data.x_train, r.data.y_train, r.sampler, r.batch))
        try:
            prepare(r.model, r.optimizer, r.step, x0, y0)
        except ShapeError as e:
            raise _unfit(e) from e


def _epoch(r: _Run, epoch: int, mon: Monitor, augment: Augment, to_device: Any) -> None:
    """One epoch's steps, a step record every ``train.log_every``; sets ``r.train_loss``."""
    t, config = r.config.train, r.config
    losses: list = []
    # a pipeline's loss is the global mean on every rank already (its loss program's IR)
    mean = (lambda v: v) if r.options.get("loss_is_global") else functools.partial(
        _mean_over_ranks, r.comm)
    read_losses = functools.partial(_read_losses, losses, r.steps_done + 1, epoch, config,
                                    r.total)
    for x, y in mon.data(prefetch(epoch_batches(r.data.x_train, r.data.y_train, r.sampler,
                                                r.batch, epoch, augment, to_device),
                                  config.data.prefetch)):
        lr = lr_at(config, r.steps_done, r.total)
        r.optimizer.lr = lr
        mon.step_begin()
        loss = r.step(x, y)
        mon.step_end()
        r.steps_done += 1
        losses.append(loss)
        if isinstance(loss, float) and not math.isfinite(loss):
            read_losses()
        if r.steps_done % t.log_every == 0:
            read_losses()
            r.metrics.write({"kind": "step", "epoch": epoch + 1, "step": r.steps_done,
                             "loss": mean(losses[-1]), "lr": lr,
                             "wall_s": r.wall(), "samples_per_s": mon.rate(r.steps_done)})
            mon.record(r.metrics.last)
    read_losses()
    r.train_loss = mean(float(np.mean(losses)))


def _end_epoch(r: _Run, epoch: int, mon: Monitor) -> None:
    """After an epoch: the whole model on every rank, its test accuracy, the checkpoint
    (rank 0) and the epoch record."""
    config, t = r.config, r.config.train
    with mon.span("to_host", "copy"):
        r.step.to_host()
    with mon.span("gather"):
        (r.options.get("gather") or (lambda step: None))(r.step)   # a pipeline's stages
    with mon.span("evaluate"):
        r.acc = r.evaluate()
    if r.writer:
        _check_finite(r.model, r.steps_done, epoch)
        save_checkpoint(
            os.path.join(r.out_dir, "checkpoints", f"epoch_{epoch + 1}.safetensors"),
            r.model, r.optimizer,
            {"epoch": str(epoch + 1), "step": str(r.steps_done), "wall_s": str(r.wall()),
             "train_loss": repr(r.train_loss),
             "config_hash": cfg.config_hash(config, [f"{s}.{k}" for s in config
                                                     for k in config[s]
                                                     if resumable(f"{s}.{k}")]),
             "config": json.dumps(config.to_dict(), sort_keys=True)})
        _keep_last(r.out_dir, t.keep_checkpoints)
    r.metrics.write({"kind": "epoch", "epoch": epoch + 1, "step": r.steps_done,
                     "train_loss": r.train_loss, "test_accuracy": r.acc,
                     "lr": lr_at(config, r.steps_done, r.total), "wall_s": r.wall()})
    mon.record(r.metrics.last)


def _finish(r: _Run, mon: Monitor) -> dict[str, Any]:
    """The summary (every rank); rank 0 writes final.safetensors and summary.json."""
    if r.acc is None:
        r.acc = r.evaluate()
    config = r.config
    summary = {
        "test_accuracy": r.acc, "train_loss": r.train_loss, "steps": r.steps_done,
        "epochs": config.train.epochs, "wall_s": r.wall(),
        "world_size": r.comm.world_size, "params_sha256": params_sha256(r.model),
        "num_params": int(sum(p.size for p in r.model.parameters())),
        "resumed_from": r.resumed_from, "config_hash": cfg.config_hash(config),
        "optimizer_state_bytes_per_rank": r.step.optimizer_state_bytes(),
        **mon.summary(), "config": config.to_dict(),
    }
    if r.writer:
        serialize.save_file(os.path.join(r.out_dir, "final.safetensors"),
                            model_tensors(r.model))
        _write_text(os.path.join(r.out_dir, "summary.json"),
                    json.dumps(summary, indent=2) + "\n")
    return summary


def _train(config: cfg.Config, out_dir: str | None, comm: Communicator, resume: str | None,
           transform: Callable | None, executor: Callable | None,
           on_record: Callable[[dict], None] | None) -> dict[str, Any]:
    r = _build(config, out_dir, comm, transform, executor, on_record)
    _resume(r, resume)
    _prepare(r)
    augment, to_device = loader_options(config, r.data)
    r.t0 = time.perf_counter()
    mon = Monitor(config, out_dir, r.comm.rank, r.total, r.steps_done, r.comm.world_size)
    try:
        for epoch in range(r.start_epoch, config.train.epochs):
            mon.epoch_begin(epoch)
            _epoch(r, epoch, mon, augment, to_device)
            _end_epoch(r, epoch, mon)
    except ShapeError as e:
        raise _unfit(e) from e
    finally:
        mon.close()
    return _finish(r, mon)


__all__ = ["EXECUTORS", "CheckpointError", "Diverged", "latest_checkpoint", "load_checkpoint",
           "load_data", "loader_options", "lr_at", "make_executor", "make_optimizer", "open_device",
           "params_sha256", "plan_for_config", "save_checkpoint", "setup", "step_options",
           "train"]
