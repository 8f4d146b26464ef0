"""``sg.save`` / ``sg.load``: what torch.save and torch.load are for (a state dict, or a whole
checkpoint such as ``{"model": ..., "optimizer": ..., "epoch": 3}``), as one safetensors
file, no pickle: arrays and tensors (host copies) are stored as tensors, nested dicts by keys
joined with "/", numbers, strings, booleans, None and lists of them as JSON in the header.
Written atomically: a reader sees the old file or the new one. Imports graph (device, tensor).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from shardgrad.graph.device import is_device_array, to_host
from shardgrad.graph.tensor import Tensor

SEP = "/"
_FORMAT = "__shardgrad__"          # header key: the format and the plain values
_SINGLE = "tensor"                 # the key of a lone array saved without a dict


def _flatten(obj: Mapping, prefix: str, arrays: dict, values: dict) -> None:
    for key, v in obj.items():
        if not isinstance(key, str) or not key or SEP in key:
            raise ValueError(f"sg.save: key {prefix + str(key)!r}: keys must be non-empty "
                             f"strings without {SEP!r} (it joins the keys of nested dicts)")
        path = prefix + key
        if isinstance(v, Mapping):
            if not v:
                values[path] = {}
            _flatten(v, path + SEP, arrays, values)
        elif isinstance(v, Tensor | np.ndarray | np.generic) or is_device_array(v):
            arr = to_host(v.data if isinstance(v, Tensor) else v)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"sg.save: {path!r} is an array of {arr.dtype}: only bool, "
                                f"integer and floating-point arrays can be saved")
            arrays[path] = np.asarray(arr, order="C")      # (ascontiguousarray makes 0-d 1-d)
        elif _plain(v):
            values[path] = v
        else:
            raise TypeError(f"sg.save: {path!r} is a {type(v).__name__}: save arrays, tensors, "
                            f"dicts of them, and numbers, strings, booleans, None or lists "
                            f"of them (no pickled objects)")


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, bool | int | float | str):
        return True
    return isinstance(v, list | tuple) and all(_plain(x) for x in v)


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (a dict, possibly nested, or one array/tensor) to ``path``."""
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    values: dict[str, Any] = {}
    single = not isinstance(obj, Mapping)
    _flatten({_SINGLE: obj} if single else obj, "", arrays, values)
    header = {_FORMAT: json.dumps({"version": 1, "single": single, "values": values})}
    write_atomic(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp, header))


def _umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one,
    never half of one. The file gets the permissions open() would give (safetensors writes
    0600, which others sharing a run directory could not read)."""
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike) -> Any:
    """What ``save`` wrote to ``path``: nested dicts of NumPy arrays and plain values (or the
    lone array). A plain safetensors file (e.g. a run's final.safetensors) loads as a flat
    dict of arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sg.load: no such file: {path}")
    try:
        with safetensors.safe_open(path, "np") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except safetensors.SafetensorError as e:
        raise ValueError(f"sg.load: {path} is not a safetensors file ({e})") from None
    info = json.loads(header.get(_FORMAT, '{"single": false, "values": {}}'))
    out: dict[str, Any] = {}
    for key, v in [*info["values"].items(), *arrays.items()]:
        *parents, leaf = key.split(SEP) if info.get("version") else [key]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if not (isinstance(v, dict) and leaf in node):
            node[leaf] = v
    return out[_SINGLE] if info["single"] else out


__all__ = ["load", "save", "write_atomic"]
