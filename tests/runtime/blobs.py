"""What the run tests share: a data set a training run takes milliseconds on (ten Gaussian
blobs as 8x8 uint8 IDX images, written without scikit-learn, which each MPI rank would
import), config files (``toml`` of dotted keys, ``blobs_config`` reading the blobs), the
mpirun command and environment of the distributed tests and their ranks' pids, and the CLI
run in-process as the error-line tests read it."""

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardgrad.runtime.data import write_idx

DATA = """[data]
dataset = "idx"
train_images = "{dir}/images.idx"
train_labels = "{dir}/labels.idx"
"""


# The small MLP most run tests train; each test adds (or with None leaves at its default)
# the keys it is about.
SMALL = {"model.hidden": [16], "train.batch_size": 64, "train.dtype": "float64",
         "device.threads": 1}


def toml(keys: Mapping[str, Any]) -> str:
    """A config file's text setting the dotted ``keys`` (``{"train.lr": 0.1}``), a [section]
    each; a key whose value is None is left out."""
    sections: dict[str, list[str]] = {}
    for name, value in keys.items():
        if value is not None:
            section, key = name.split(".", 1)
            sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}\n")
    return "".join(f"\n[{s}]\n" + "".join(lines) for s, lines in sections.items())


# mpirun as the distributed tests start it: as root in a container, more ranks than cores
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
# the marks of a test module whose ranks are mpi4py processes under mpirun
NEEDS_MPI = [
    pytest.mark.mpi,
    pytest.mark.skipif(shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
                       reason="needs mpi4py and mpirun (pip install -e .[mpi])"),
]


def rank_pids(tag: str) -> dict[int, int]:
    """The processes whose environment carries ``SHARDGRAD_TEST_TAG=tag`` (set in the mpirun
    command's), by their Open MPI rank: a test's handle on one rank to signal it."""
    pids: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SHARDGRAD_TEST_TAG") == tag.encode() and b"OMPI_COMM_WORLD_RANK" in env:
            pids.setdefault(int(env[b"OMPI_COMM_WORLD_RANK"]), int(pid))
    return pids


def mpi_env(**extra: str) -> dict[str, str]:
    """The environment the distributed tests run shardgrad in: no progress bar, one BLAS
    thread a process (the ranks share the machine's cores), and ``extra``."""
    return dict(os.environ, SHARDGRAD_PROGRESS="0", OMP_NUM_THREADS="1",
                OPENBLAS_NUM_THREADS="1", **extra)


def blobs_config(directory: Path, body: str, n: int = 600, name: str = "blobs.toml") -> str:
    """Write ``n`` blob images and labels into ``directory`` and a config there: the [data]
    section reading them, then ``body``; returns the config's path."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    x = rng.normal(size=(10, 8, 8))[y] * 40 + 128 + rng.normal(scale=30, size=(n, 8, 8))
    write_idx(directory / "images.idx", np.clip(x, 0, 255).astype(np.uint8))
    write_idx(directory / "labels.idx", y.astype(np.uint8))
    path = directory / name
    path.write_text(DATA.format(dir=directory) + body)
    return str(path)


# the one line each finished epoch prints on stderr (runtime.monitor), not an error line
EPOCH_LINE = re.compile(r"epoch \d+/\d+  step \d+  ")


def cli_main(capsys, *argv) -> tuple[int, list[str]]:
    """``shardgrad ARGV`` in this process: (exit code, its stderr lines other than the
    per-epoch progress lines)."""
    from shardgrad import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    return code, [line for line in capsys.readouterr().err.strip().splitlines()
                  if not EPOCH_LINE.match(line)]
