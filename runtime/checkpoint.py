"""What makes a training checkpoint resumable, checked before any of it is used: its metadata
(epoch, step, config) and its tensors' dtypes and shapes against the run's. The tensors' bytes
are checked against their SHA-256 when read (runtime.serialize.read_file).
Imports runtime.data (DataError).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.runtime.data import DataError

_NAME = re.compile(r"^epoch_(\d+)\.safetensors$")
_DELETE = "; delete it to resume from an earlier checkpoint"


class CheckpointError(DataError):
    """A checkpoint that cannot be resumed from (unreadable, not a training checkpoint, or
    another model's tensors): the message names the file."""


def _whole(path: str, meta: Mapping[str, str], key: str, least: int) -> int:
    if key not in meta:
        raise CheckpointError(f"{path} is not a shardgrad training checkpoint: its metadata has "
                              f"no {key!r}{_DELETE}")
    text = meta[key]
    if not re.fullmatch(r"\d+", text) or int(text) < least:
        raise CheckpointError(f"{path}: its metadata {key} = {text!r} is not a whole number "
                              f">= {least}{_DELETE}")
    return int(text)


def read_meta(path: str, meta: Mapping[str, str], steps_per_epoch: int | None = None
              ) -> tuple[int, int, dict[str, Any]]:
    """``(epoch, step, config)`` from a checkpoint's metadata; CheckpointError naming the file
    and the entry when one is missing or out of range: epoch >= 1 and the file's own
    ``epoch_<k>`` (when so named), step = epoch x ``steps_per_epoch`` (when given), a config
    that is a JSON object, wall_s and train_loss numbers."""
    if "config" not in meta:
        raise CheckpointError(f"{path} is not a shardgrad training checkpoint: its metadata has "
                              f"no 'config'{_DELETE}")
    try:
        config = json.loads(meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata config is not JSON ({e}){_DELETE}"
                              ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its metadata config is not a JSON object{_DELETE}")
    epoch = _whole(path, meta, "epoch", 1)
    step = _whole(path, meta, "step", 0)
    m = _NAME.match(os.path.basename(path))
    if m and int(m.group(1)) != epoch:
        raise CheckpointError(f"{path}: its metadata epoch = {epoch} but the file is named for "
                              f"epoch {int(m.group(1))}{_DELETE}")
    if steps_per_epoch is not None and step != epoch * steps_per_epoch:
        raise CheckpointError(f"{path}: its metadata step = {step} but epoch {epoch} of this "
                              f"config ends at step {epoch * steps_per_epoch} "
                              f"({steps_per_epoch} per epoch){_DELETE}")
    for key, finite in (("wall_s", True), ("train_loss", False)):
        try:
            value = float(meta.get(key, "0"))
        except ValueError:
            value = None
        if value is None or (finite and not (math.isfinite(value) and value >= 0)):
            raise CheckpointError(f"{path}: its metadata {key} = {meta[key]!r} is not "
                                  f"{'a finite number >= 0' if finite else 'a number'}{_DELETE}")
    return epoch, step, config


def check_tensors(path: str, tensors: Mapping[str, np.ndarray],
                  expected: Mapping[str, np.ndarray], dtype: str) -> None:
    """Every tensor the run expects is there with its dtype and shape (a float32 checkpoint is
    not cast into a float64 run); CheckpointError naming the first that differs."""
    for name, want in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path} does not fit this model: it has no tensor {name!r}")
        got = tensors[name]
        if got.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {got.dtype} but this run's is "
                                  f"{want.dtype} (train.dtype = {dtype!r}); a checkpoint "
                                  f"resumes only in its own dtype")
        if got.shape != want.shape:
            raise CheckpointError(f"{path} does not fit this model: tensor {name!r} has shape "
                                  f"{got.shape}, this run's {want.shape}")


__all__ = ["CheckpointError", "check_tensors", "read_meta"]
