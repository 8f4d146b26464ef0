"""Checkpoints are verified before a run resumes from them, and every way they can be wrong
is one line and exit 2 naming the file: a flipped bit in a tensor (SHA-256 per tensor, on
--resume and sg.load), metadata out of range, a dtype other than the run's, a directory named
like a checkpoint; a disk that fills during a checkpoint names the path and leaves the earlier
checkpoint usable."""

import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import shardgrad as sg
from shardgrad.runtime import serialize
from shardgrad.runtime import train as tr
from shardgrad.runtime.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from blobs import SMALL, blobs_config, toml  # noqa: E402
from blobs import cli_main as _main

CONFIG = toml({**SMALL, "train.epochs": 2, "train.lr": 0.1, "train.momentum": 0.9})


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("verify"), CONFIG)


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    """A finished 2-epoch run: its directory and summary (copied per test)."""
    out = tmp_path_factory.mktemp("verify_run") / "run"
    return out, tr.train(load_config(config), str(out))


@pytest.fixture
def used(run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")


def _flip_a_bit(path, tensor):
    """Flip one bit in the first byte of ``tensor``'s data, leaving the header as it is."""
    raw = bytearray(Path(path).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + start] ^= 0x04
    Path(path).write_bytes(bytes(raw))


def _rewrite(path, edit_meta=None, edit_tensors=None):
    """Rewrite a checkpoint with changed metadata or tensors and fresh checksums (what a
    tool that knows the format would write)."""
    tensors, meta = tr.load_checkpoint(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    serialize.save_file(str(path), tensors, meta)


def test_a_flipped_bit_in_a_tensor_is_refused_on_resume(config, used, capsys):
    path = used / "checkpoints" / "epoch_2.safetensors"
    _flip_a_bit(path, "0.weight")
    code, err = _main(capsys, "train", config, "--resume", str(used),
                      "--set", "train.epochs=3")
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"shardgrad train: error: {path}: tensor '0.weight' does not match its "
                      f"SHA-256 checksum (its bytes changed after it was written: a damaged "
                      f"disk or copy); delete it to resume from an earlier checkpoint")


def test_a_flipped_bit_is_refused_by_sg_load(tmp_path):
    path = tmp_path / "state.safetensors"
    sg.save({"w": np.arange(6.0), "nested": {"b": np.ones(3, np.float32)}, "epoch": 3}, path)
    assert sg.load(path)["epoch"] == 3
    _flip_a_bit(path, "nested/b")
    with pytest.raises(ValueError, match=rf"sg.load: {path}: tensor 'nested/b' does not match "
                                         rf"its SHA-256 checksum"):
        sg.load(path)


def test_final_parameters_carry_checksums_too(run):
    out, summary = run
    arrays, meta = serialize.read_file(str(out / "final.safetensors"))
    with safetensors.safe_open(str(out / "final.safetensors"), "np") as f:
        sums = json.loads(f.metadata()[serialize.CHECKSUMS])
    assert sums == {k: serialize.tensor_sha256(v) for k, v in arrays.items()}


def test_a_file_without_checksums_still_loads(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"a": np.arange(3.0)}, str(path))   # another tool's file
    np.testing.assert_array_equal(sg.load(path)["a"], np.arange(3.0))


@pytest.mark.parametrize("key,value,says", [
    ("epoch", "0", "its metadata epoch = '0' is not a whole number >= 1"),
    ("epoch", "-5", "its metadata epoch = '-5' is not a whole number >= 1"),
    ("epoch", "1", "its metadata epoch = 1 but the file is named for epoch 2"),
    ("step", "-100", "its metadata step = '-100' is not a whole number >= 0"),
    ("step", "7", "its metadata step = 7 but epoch 2 of this config ends at step 14 "
                  "(7 per epoch)"),
    ("wall_s", "nan", "its metadata wall_s = 'nan' is not a finite number >= 0"),
    ("config", "[1]", "its metadata config is not a JSON object"),
])
def test_metadata_out_of_range_is_one_line_naming_the_entry(config, used, capsys, key, value,
                                                          says):
    path = used / "checkpoints" / "epoch_2.safetensors"
    _rewrite(path, edit_meta=lambda m: m.__setitem__(key, value))
    code, err = _main(capsys, "train", config, "--resume", str(used),
                      "--set", "train.epochs=3")
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"shardgrad train: error: {path}: {says}; delete it to resume from an "
                      f"earlier checkpoint")


def test_a_missing_metadata_entry_is_named(config, used, capsys):
    path = used / "checkpoints" / "epoch_2.safetensors"
    _rewrite(path, edit_meta=lambda m: m.pop("step"))
    code, err = _main(capsys, "train", config, "--resume", str(used), "--set", "train.epochs=3")
    assert code == 2 and err == [f"shardgrad train: error: {path} is not a shardgrad training "
                                 f"checkpoint: its metadata has no 'step'; delete it to resume "
                                 f"from an earlier checkpoint"], err


def test_float32_tensors_are_not_cast_into_a_float64_run(config, used, capsys):
    path = used / "checkpoints" / "epoch_2.safetensors"

    def to_f32(tensors):
        for k, v in tensors.items():
            if v.dtype == np.float64:
                tensors[k] = v.astype(np.float32)
    _rewrite(path, edit_tensors=to_f32)
    code, err = _main(capsys, "train", config, "--resume", str(used), "--set", "train.epochs=3")
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"shardgrad train: error: {path}: tensor '0.weight' is float32 but this "
                      f"run's is float64 (train.dtype = 'float64'); a checkpoint resumes only "
                      f"in its own dtype")


def test_a_directory_named_like_a_checkpoint(config, used, capsys):
    (used / "checkpoints" / "epoch_9.safetensors").mkdir()
    code, err = _main(capsys, "train", config, "--resume", str(used),
                      "--set", "train.epochs=10")
    assert code == 2 and err == [
        f"shardgrad train: error: {used / 'checkpoints' / 'epoch_9.safetensors'} is a "
        f"directory, not a safetensors file; delete it to resume from an earlier checkpoint"]


def test_sg_load_of_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match=rf"^sg.load: {tmp_path} is a directory, not a "
                                         rf"safetensors file$"):
        sg.load(tmp_path)


@contextlib.contextmanager
def _small_disk(where: Path, size: int):
    """A tmpfs of ``size`` bytes at ``where``, or None where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.timeout(120)
def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_earlier_one(
        config, run, tmp_path, capsys, monkeypatch):
    size = os.path.getsize(run[0] / "checkpoints" / "epoch_1.safetensors")
    disk = tmp_path / "disk"
    # room for the first checkpoint and the metrics, not for a second checkpoint beside it
    with _small_disk(disk, (size * 3 // 2 // 4096 + 1) * 4096) as mounted:
        if not mounted:   # no tmpfs without CAP_SYS_ADMIN: the disk fills at epoch 2 instead
            real = safetensors.numpy.save_file

            def save_file(tensors, tmp, metadata=None):
                if "epoch_2" in tmp:
                    raise safetensors.SafetensorError("No space left on device (os error 28)")
                real(tensors, tmp, metadata)
            monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
        out = disk / "run"
        code, err = _main(capsys, "train", config, "--out", str(out))
        assert code == 2 and len(err) == 1, err
        assert err[0] == (f"shardgrad train: error: cannot write {out}/checkpoints/"
                          f"epoch_2.safetensors: No space left on device"), err
        assert sorted(os.listdir(out / "checkpoints")) == ["epoch_1.safetensors"]  # no tmp left
        monkeypatch.undo()
        monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
        resumed = tr.train(load_config(config), str(tmp_path / "resumed"), resume=str(out))
    assert resumed["params_sha256"] == run[1]["params_sha256"]
