"""``sg.save`` / ``sg.load``: what torch.save and torch.load are for (a state dict, or a whole
checkpoint such as ``{"model": ..., "optimizer": ..., "epoch": 3}``), as one safetensors
file, no pickle: arrays and tensors (host copies) are stored as tensors, nested dicts by keys
joined with "/", numbers, strings, booleans, None and lists of them as JSON in the header.
Written atomically: a reader sees the old file or the new one. Imports graph (device, tensor).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
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
CHECKSUMS = "__sha256__"           # header key: {tensor name: SHA-256 of its bytes}


class FileError(ValueError):
    """A file that is not what it should be (not a safetensors file, a directory, a tensor
    whose bytes do not match the checksum stored with it): the message names the file."""


class WriteError(OSError):
    """A file could not be written (disk full, read-only, ...): the message names the file;
    the file it would have replaced is untouched."""

    def __str__(self) -> str:
        return self.args[1] if len(self.args) > 1 else super().__str__()


def tensor_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order, little endian (as safetensors stores them)."""
    return hashlib.sha256(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
                          ).hexdigest()


def save_file(path: str, arrays: Mapping[str, np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
    """``arrays`` and ``metadata`` as a safetensors file at ``path``, written atomically,
    with each array's SHA-256 in the header (``read_file`` checks them)."""
    header = dict(metadata or {})
    header[CHECKSUMS] = json.dumps({k: tensor_sha256(v) for k, v in arrays.items()},
                                   sort_keys=True)
    write_atomic(path, lambda tmp: safetensors.numpy.save_file(dict(arrays), tmp, header))


def read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of the safetensors file at ``path``, each array checked
    against the SHA-256 stored with it (files written without checksums, e.g. by other
    tools, are read as they are). FileError naming the file when it is a directory, not a
    safetensors file, or an array's bytes changed since it was written."""
    if os.path.isdir(path):
        raise FileError(f"{path} is a directory, not a safetensors file")
    try:
        with safetensors.safe_open(path, "np") as f:
            metadata = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except safetensors.SafetensorError as e:
        raise FileError(f"{path} is not a readable safetensors file ({e})") from None
    except (ValueError, TypeError) as e:   # e.g. a dtype NumPy has no name for
        raise FileError(f"{path} is not a readable safetensors file ({e})") from None
    if CHECKSUMS in metadata:
        try:
            sums = json.loads(metadata.pop(CHECKSUMS))
            assert isinstance(sums, dict)
        except (ValueError, AssertionError):
            raise FileError(f"{path}: its header's {CHECKSUMS} is not a JSON object of "
                            f"checksums") from None
        odd = sorted(set(sums) ^ set(arrays))
        if odd:
            raise FileError(f"{path}: tensor {odd[0]!r} is "
                            f"{'missing' if odd[0] in sums else 'not covered by a checksum'}: "
                            f"the file was altered after it was written")
        for name, a in arrays.items():
            if sums[name] != tensor_sha256(a):
                raise FileError(f"{path}: tensor {name!r} does not match its SHA-256 checksum "
                                f"(its bytes changed after it was written: a damaged disk or "
                                f"copy)")
    return arrays, metadata


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
    save_file(path, arrays, {_FORMAT: json.dumps({"version": 1, "single": single,
                                                  "values": values})})


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
    except (OSError, safetensors.SafetensorError) as e:
        raise _write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_error(path: str, e: BaseException) -> WriteError:
    code = getattr(e, "errno", None)
    if code is None:   # safetensors (Rust) reports "... (os error N)"
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code is not None else str(e)
    kept = " (the file already there is unchanged)" if os.path.exists(path) else ""
    return WriteError(code or errno.EIO, f"cannot write {path}: {reason}{kept}")


def load(path: str | os.PathLike) -> Any:
    """What ``save`` wrote to ``path``: nested dicts of NumPy arrays and plain values (or the
    lone array). A plain safetensors file (e.g. a run's final.safetensors) loads as a flat
    dict of arrays."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"sg.load: no such file: {path}")
    try:
        arrays, header = read_file(path)
    except FileError as e:
        raise FileError(f"sg.load: {e}") from None
    info = _format(path, header)
    out: dict[str, Any] = {}
    for key, v in [*info["values"].items(), *arrays.items()]:
        *parents, leaf = key.split(SEP) if info.get("version") else [key]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FileError(f"sg.load: {path}: entry {key!r} lies under {p!r}, which holds "
                                f"a value, not a dict: the file was not written by sg.save")
        if not (isinstance(v, dict) and leaf in node):
            node[leaf] = v
    if info["single"] and _SINGLE not in out:
        raise FileError(f"sg.load: {path}: marked as one saved array but holds no "
                        f"{_SINGLE!r} entry")
    return out[_SINGLE] if info["single"] else out


def _format(path: str, header: Mapping[str, str]) -> dict:
    try:
        info = json.loads(header.get(_FORMAT, '{"single": false, "values": {}}'))
        ok = (isinstance(info, dict) and isinstance(info.get("values"), dict)
              and isinstance(info.get("single"), bool))
    except ValueError:
        ok = False
    if not ok:
        raise FileError(f"sg.load: {path}: its header's {_FORMAT} entry is not what sg.save "
                        f"writes (a JSON object with 'single' and 'values')")
    return info


__all__ = ["CHECKSUMS", "FileError", "WriteError", "load", "read_file", "save", "save_file",
           "tensor_sha256", "write_atomic"]
