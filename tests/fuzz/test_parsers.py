"""Parser fuzzing: whatever bytes a config, an IDX file or a checkpoint holds, shardgrad gives
a result or one line naming the problem (an exception of the kind the CLI turns into exit 2),
never a traceback. In-process and fast; the CLI path is checked on a sample of each."""

import io
import json
import os
import struct
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardgrad as sg
from shardgrad import cli
from shardgrad.runtime import config as cfg
from shardgrad.runtime import train as tr
from shardgrad.runtime.checkpoint import CheckpointError, read_meta
from shardgrad.runtime.data import DataError, read_idx, validate_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import blobs_config  # noqa: E402

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _one_line(e: BaseException) -> None:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


def _file(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# --- configs -----------------------------------------------------------------------------

SCALARS = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.booleans())
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4))
KEYS = st.sampled_from([f"{s}.{k}" for s in cfg.SCHEMA for k in cfg.SCHEMA[s]]
                       + ["train.epochz", "nosection.key", "model"])


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else
                                     "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else str(v)


@FAST
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_config_values_load_or_are_one_config_error(entries):
    text = "".join(f"[{k.split('.')[0]}]\n{k.split('.', 1)[1]} = {_toml_value(v)}\n"
                   if "." in k else f"{k} = {_toml_value(v)}\n" for k, v in entries.items())
    path = _file(text.encode(), ".toml")
    try:
        config = cfg.load_config(path)
        assert set(config) == set(cfg.SCHEMA)
    except cfg.ConfigError as e:
        _one_line(e)
    finally:
        os.remove(path)


@FAST
@given(st.binary(max_size=200))
def test_any_config_bytes_load_or_are_one_config_error(data):
    path = _file(data, ".toml")
    try:
        cfg.load_config(path)
    except cfg.ConfigError as e:
        _one_line(e)
    finally:
        os.remove(path)


@FAST
@given(st.text(max_size=40))
def test_any_set_override_loads_or_is_one_config_error(item):
    try:
        cfg.load_config(None, [item])
    except cfg.ConfigError as e:
        _one_line(e)


# --- IDX files ---------------------------------------------------------------------------

def _idx_bytes(draw_header, dims, code, body):
    return bytes(draw_header) + bytes([code, len(dims)]) + struct.pack(f">{len(dims)}I",
                                                                       *dims) + body


@FAST
@given(st.binary(max_size=64), st.lists(st.integers(0, 6), max_size=4),
       st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]), st.binary(max_size=300),
       st.booleans())
def test_any_idx_bytes_read_or_are_one_data_error(raw, dims, code, body, structured):
    data = _idx_bytes(b"\0\0", dims, code, body) if structured else raw
    path = _file(data, ".idx")
    try:
        arr = read_idx(path)
        assert arr.shape == tuple(dims)
    except DataError as e:
        _one_line(e)
        assert path in str(e)
    finally:
        os.remove(path)


@FAST
@given(st.one_of(
    st.lists(st.integers(-3, 300), min_size=1, max_size=30).map(np.array),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30
             ).map(np.array)),
    st.one_of(st.none(), st.integers(1, 20)))
def test_any_labels_are_class_indices_or_one_data_error(y, num_classes):
    try:
        classes = validate_labels(y, num_classes, "labels.idx", complete=num_classes is None)
    except DataError as e:
        _one_line(e)
        assert str(e).startswith("labels.idx: ")
        return
    assert y.dtype.kind in "iu" and (y >= 0).all()
    if num_classes is None:
        assert set(y.tolist()) == set(range(classes)) and classes == y.max() + 1
    else:
        assert classes == num_classes and y.max() < num_classes


# --- checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint's bytes, and the run directory it came from."""
    here = tmp_path_factory.mktemp("fuzz")
    config = blobs_config(here, "[model]\nhidden = [4]\n[train]\nepochs = 1\n"
                                "batch_size = 64\n[device]\nthreads = 1\n")
    os.environ["SHARDGRAD_PROGRESS"] = "0"
    tr.train(cfg.load_config(config), str(here / "run"))
    path = here / "run" / "checkpoints" / "epoch_1.safetensors"
    return path.read_bytes(), config


@FAST
@given(st.data())
def test_a_damaged_checkpoint_reads_or_is_one_checkpoint_error(checkpoint, data):
    raw = bytearray(checkpoint[0])
    how = data.draw(st.sampled_from(["flip", "truncate", "header", "bytes"]))
    if how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "header":   # a different header length, or a rewritten JSON header
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        key = data.draw(st.sampled_from(sorted(header)))
        header[key] = data.draw(st.one_of(VALUES, st.dictionaries(st.text(max_size=8),
                                                                   VALUES, max_size=3)))
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + raw[8 + n:]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    path = _file(bytes(raw), ".safetensors")
    try:
        tensors, meta = tr.load_checkpoint(path)
        read_meta(path, meta)
    except CheckpointError as e:
        _one_line(e)
        assert path in str(e)
    finally:
        os.remove(path)
    path = _file(bytes(raw), ".safetensors")
    try:
        sg.load(path)
    except ValueError as e:   # sg.load's FileError
        _one_line(e)
        assert path in str(e)
    finally:
        os.remove(path)


@FAST
@given(st.dictionaries(st.sampled_from(["epoch", "step", "config", "wall_s", "train_loss",
                                        "other"]), st.text(max_size=10), max_size=6),
       st.one_of(st.none(), st.integers(1, 10)))
def test_any_checkpoint_metadata_is_valid_or_one_checkpoint_error(meta, per_epoch):
    try:
        epoch, step, config = read_meta("ckpt/epoch_3.safetensors", meta, per_epoch)
    except CheckpointError as e:
        _one_line(e)
        return
    assert epoch == 3 and step >= 0 and isinstance(config, dict)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_resume_from_a_damaged_checkpoint_exits_0_or_2_with_one_line(checkpoint, tmp_path,
                                                                   data):
    raw = bytearray(checkpoint[0])
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3)):
        raw[i] ^= data.draw(st.integers(1, 255))
    run = Path(tempfile.mkdtemp(dir=tmp_path))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch_1.safetensors").write_bytes(bytes(raw))
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["train", checkpoint[1], "--resume", str(run), "--set",
                         "train.epochs=2"])
    lines = err.getvalue().strip().splitlines()
    assert code == 0 or (code == 2 and len(lines) == 1 and "Traceback" not in lines[0]), lines
