"""A data set a training run takes milliseconds on: ten Gaussian blobs as 8x8 uint8 IDX images,
written without scikit-learn (each MPI rank would import it), a config file reading it, and
the CLI run in-process as the error-line tests read it."""

import re
from pathlib import Path

import numpy as np

from shardgrad.runtime.data import write_idx

DATA = """[data]
dataset = "idx"
train_images = "{dir}/images.idx"
train_labels = "{dir}/labels.idx"
"""


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
