"""The pipeline from a config: ``shardgrad plan``, ``shardgrad graph`` with parallel.pp > 1,
config errors (exit 2), and ``mpirun -n 4 ... train`` on a dp = 2 x pp = 2 mesh ending with
the single-process run's parameters (float64, 1e-9 relative)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from shardgrad import cli
from shardgrad.partition.pipeline import STAGE_COLOURS
from shardgrad.runtime import train as tr
from shardgrad.runtime.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")
PIPE = ["parallel.pp=2", "parallel.microbatches=4", "model.batchnorm=false",
        "model.hidden=[32, 32]"]


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def test_plan_prints_stages_transfers_and_the_grid(capsys):
    assert cli.main(["plan", MLP, *sets(*PIPE, 'parallel.schedule="gpipe"')]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipeline: 2 stages x 4 micro-batches, gpipe, dp=1")
    for text in ("stage 0:", "stage 1:", "ops:", "activations", "params", "-> 1",
                 "stage 0: F0 F1 F2 F3 .  .  B0 B1 B2 B3"):
        assert text in out


def test_graph_with_stages_colours_them_and_draws_sends(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)    # no Graphviz binary
    out = tmp_path / "plan.dot"
    assert cli.main(["graph", MLP, "--out", str(out), *sets(*PIPE)]) == 0
    text = out.read_text()
    assert text.startswith("digraph pipeline")
    assert STAGE_COLOURS[0] in text and STAGE_COLOURS[1] in text
    assert "= isend" in text and "= recv" in text and " color=red " in text


@pytest.mark.parametrize("extra,message", [
    (["parallel.balance=[\"9.weight\"]"], "split point '9.weight' is not a node"),
    (["parallel.pp=500"], "cannot cut"),
    (["parallel.microbatches=5"], "multiple of parallel.dp x parallel.microbatches"),
    (["parallel.balance=3"], "expected str or list"),
    (["parallel.schedule=\"zb\""], "must be one of '1f1b', 'gpipe'"),
])
def test_bad_pipeline_configs_exit_2_with_one_line(extra, message, capsys):
    assert cli.main(["plan", MLP, *sets(*PIPE, *extra)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.mpi
@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_mpirun_train_on_a_dp2_x_pp2_mesh_equals_the_local_run(tmp_path):
    common = ["train.epochs=1", "train.dtype=\"float64\"", "model.batchnorm=false",
              "device.threads=1"]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "4", sys.executable, "-m",
           "shardgrad.cli", "train", MLP, "--out", str(tmp_path / "pp"),
           *sets(*common, "parallel.dp=2", "parallel.pp=2", "parallel.microbatches=4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    tr.train(load_config(MLP, common), str(tmp_path / "local"))
    got = safetensors.numpy.load_file(tmp_path / "pp" / "final.safetensors")
    want = safetensors.numpy.load_file(tmp_path / "local" / "final.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.max(np.abs(got[k] - want[k])) <= 1e-9 * np.max(np.abs(want[k])), k


@pytest.mark.mpi
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_mpirun_pipeline_checkpoints_the_whole_model_and_resumes_exactly(tmp_path):
    # stages keep their parameters between steps; the checkpoints and final parameters are
    # the whole model (the local run's, optimizer state included), and a pipeline run killed
    # in epoch 2 and resumed from epoch 1's checkpoint ends with the uninterrupted run's bits
    common = ["train.epochs=2", "train.dtype=\"float64\"", "model.batchnorm=false",
              "model.hidden=[32, 32]", "device.threads=1"]
    pipe = ["parallel.pp=2", "parallel.microbatches=4"]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}

    def mpirun(out, *extra):
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
               "-m", "shardgrad.cli", "train", MLP, "--out", str(out),
               *sets(*common, *pipe), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env,
                              cwd=ROOT)

    proc = mpirun(tmp_path / "whole")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc = mpirun(tmp_path / "killed", *sets("debug.fail_at_step=50"))
    assert proc.returncode != 0 and "injected fault at step 50" in proc.stderr, proc.stderr
    proc = mpirun(tmp_path / "killed", "--resume", str(tmp_path / "killed"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    whole, resumed = (json.loads((tmp_path / d / "summary.json").read_text())
                      for d in ("whole", "killed"))
    assert resumed["resumed_from"].endswith("epoch_1.safetensors")
    assert resumed["params_sha256"] == whole["params_sha256"]

    local = tr.train(load_config(MLP, common), str(tmp_path / "local"))
    assert whole["test_accuracy"] == local["test_accuracy"]
    for name in ("checkpoints/epoch_1.safetensors", "final.safetensors"):
        got = safetensors.numpy.load_file(tmp_path / "whole" / name)
        want = safetensors.numpy.load_file(tmp_path / "local" / name)
        assert sorted(got) == sorted(want)
        for k in want:
            assert np.max(np.abs(got[k] - want[k])) <= 1e-9 * np.max(np.abs(want[k])), (name, k)
