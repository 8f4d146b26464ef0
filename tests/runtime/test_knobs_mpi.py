"""The training knobs under real ``mpirun`` pipelines: gradient clipping (its global norm
over every stage), accumulation, label smoothing, warm-up with a multistep or cosine
schedule, AdamW and keep_checkpoints, on pp = 2 and on a dp = 2 x pp = 2 mesh, end with the
single-process run's parameters (float64, 1e-9 relative). One mpirun each, bounded by a
timeout."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from shardgrad.runtime import train as tr
from shardgrad.runtime.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")
COMMON = ["train.epochs=2", "train.dtype=\"float64\"", "model.batchnorm=false",
          "model.hidden=[32, 32]", "device.threads=1", "train.batch_size=16",
          "train.grad_clip=0.05", "train.accumulate=2", "train.label_smoothing=0.1",
          "train.warmup_steps=5", "train.keep_checkpoints=1", "parallel.microbatches=2"]
KNOBS = {
    2: ["parallel.pp=2", "train.lr_schedule=\"multistep\"", "train.lr_milestones=[1]"],
    4: ["parallel.dp=2", "parallel.pp=2", "train.lr_schedule=\"cosine\"",
        "train.optimizer=\"adamw\"", "train.lr=0.003", "train.weight_decay=0.01"],
}

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ranks", sorted(KNOBS))
def test_knobs_under_a_pipeline_equal_the_local_run(ranks, tmp_path):
    knobs = COMMON + KNOBS[ranks]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
           sys.executable, "-m", "shardgrad.cli", "train", MLP, "--out", str(tmp_path / "pp"),
           *sets(knobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    local = [k for k in knobs if not k.startswith(("parallel.dp", "parallel.pp"))]
    tr.train(load_config(MLP, local), str(tmp_path / "local"))
    got = safetensors.numpy.load_file(tmp_path / "pp" / "final.safetensors")
    want = safetensors.numpy.load_file(tmp_path / "local" / "final.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.max(np.abs(got[k] - want[k])) <= 1e-9 * np.max(np.abs(want[k])), k
    assert os.listdir(tmp_path / "pp" / "checkpoints") == ["epoch_2.safetensors"]
    tr.train(load_config(MLP, local + ["train.grad_clip=0"]), str(tmp_path / "free"))
    free = safetensors.numpy.load_file(tmp_path / "free" / "final.safetensors")
    assert max(np.max(np.abs(free[k] - want[k])) for k in want) > 1e-3   # clipping acts
