"""Bad input from outside ends in one line and exit 2, never a traceback: IDX labels that are
negative, fractional or stray (200 among 0..9), an IDX file with no images, a model too large
for the memory the process may allocate (estimated before anything is allocated, naming the
bytes), and a float32 model that is built without a float64 copy of its parameters."""

import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from shardgrad import cli
from shardgrad.graph import nn
from shardgrad.graph.tensor import get_default_dtype, set_default_dtype
from shardgrad.runtime.data import write_idx

sys.path.insert(0, str(Path(__file__).parent))
from blobs import SMALL, blobs_config, mpi_env, toml  # noqa: E402

CONFIG = toml({**SMALL, "train.dtype": None, "train.epochs": 1})


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    return blobs_config(tmp_path, CONFIG)


def _main(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def _labels(tmp_path, y):
    write_idx(tmp_path / "labels.idx", np.asarray(y))


@pytest.mark.parametrize("y,says", [
    (np.r_[np.arange(10), -1].astype(np.int8), "label -1 at index 10 is negative; labels must "
                                               "be class indices in [0, num_classes)"),
    (np.r_[np.arange(10), 3.7], "label 3.7 at index 10 is not a whole number; labels must be "
                                "integers (class indices)"),
    (np.r_[np.arange(10), 200].astype(np.uint8), "label 200 at index 10, but 190 class(es) "
                                                 "below it never occur (first: 10); labels "
                                                 "must be 0..K-1 with every class present"),
])
def test_bad_labels_are_one_line_naming_file_and_value(config, tmp_path, capsys, y, says):
    n = 600                              # blobs_config's images: the bad label comes last
    _labels(tmp_path, np.r_[np.resize(np.arange(10), n - len(y)), y].astype(y.dtype))
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1, err
    path = tmp_path / "labels.idx"
    index = n - len(y) + 10
    assert err[0] == f"shardgrad train: error: {path}: " + says.replace(
        "at index 10", f"at index {index}"), err


def test_a_test_label_outside_the_training_classes_is_named(config, tmp_path, capsys):
    write_idx(tmp_path / "test_images.idx", np.zeros((3, 8, 8), np.uint8))
    write_idx(tmp_path / "test_labels.idx", np.array([1, 12, 3], np.uint8))
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "run"),
                      "--set", f"data.test_images='{tmp_path / 'test_images.idx'}'",
                      "--set", f"data.test_labels='{tmp_path / 'test_labels.idx'}'")
    assert code == 2 and err == [f"shardgrad train: error: {tmp_path / 'test_labels.idx'}: "
                                 f"label 12 at index 1 is out of range for 10 classes (labels "
                                 f"must be in [0, 10))"], err


def test_an_idx_file_with_no_images(config, tmp_path, capsys):
    write_idx(tmp_path / "images.idx", np.zeros((0, 8, 8), np.uint8))
    write_idx(tmp_path / "labels.idx", np.zeros(0, np.uint8))
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "run"))
    assert code == 2 and err == [f"shardgrad train: error: {tmp_path / 'images.idx'} holds no "
                                 f"images (its first dimension is 0)"], err


@pytest.mark.timeout(120)
def test_a_model_too_large_is_refused_naming_the_bytes_before_allocating(config, tmp_path):
    def limit():   # 4 GB of address space, as `ulimit -v 4000000`
        resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, resource.RLIM_INFINITY))
    run = subprocess.run([sys.executable, "-m", "shardgrad", "train", config, "--out",
                          str(tmp_path / "run"), "--set", "model.hidden=[100000000]"],
                         capture_output=True, text=True, timeout=100, preexec_fn=limit,
                         env=mpi_env())
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    count = 64 * 100_000_000 + 100_000_000 + 100_000_000 * 10 + 10   # no batch norm here
    need = count * 4 * 2        # float32 parameters and gradients (SGD without momentum)
    assert lines[0].startswith(
        f"shardgrad train: error: model.kind = 'mlp' with model.hidden = [100000000] makes "
        f"{count:,} parameters: {need:,} bytes ({need / 2**30:.1f} GiB) for them, their "
        f"gradients and the optimizer's state in float32, more than the "), lines
    assert lines[0].endswith("this process may allocate (free memory, ulimit -v)")


def test_a_float32_layer_is_built_without_a_float64_copy():
    saved = get_default_dtype()
    set_default_dtype("float32")
    try:
        tracemalloc.start()
        layer = nn.Linear(2048, 2048)          # 16 MiB of float32 weights
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        set_default_dtype(saved)
    weight = layer.weight.numpy()
    assert weight.dtype == np.float32
    # the weights, the copy sg.tensor() takes of them, one 8 MiB float64 chunk: 40 MiB at
    # most; with a float64 copy of the whole weight it was 64 MiB
    assert peak < 2 * weight.nbytes + 9 * 2**20, peak
