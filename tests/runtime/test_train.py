"""runtime.train and the CLI: the files a run writes, resume equivalence, atomic
checkpoints, and ``shardgrad graph``."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from shardgrad import cli
from shardgrad.runtime import train as tr
from shardgrad.runtime.comm import SingleProcess
from shardgrad.runtime.config import ConfigError, load_config
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.monitor import TIMINGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")
SMALL = ["train.epochs=3", "train.batch_size=128", "model.hidden=[16]", "train.log_every=5",
         "device.threads=1"]


def _cli(*args, timeout=120):
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "shardgrad", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cli_train_writes_run_files(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", MLP, "--out", str(out), "--set", "train.epochs=2", "--set",
             "model.hidden=[32]", "--set", "train.log_every=10")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "train_loss", "steps", "epochs", "wall_s", "world_size",
                "params_sha256", "config"):
        assert key in summary
    assert summary["epochs"] == 2 and summary["world_size"] == 1
    assert summary["steps"] == 2 * (1438 // 32) and printed["steps"] == summary["steps"]
    assert summary["config"]["model"]["hidden"] == [32]
    model, _, _, data = tr.setup(summary["config"])   # the final parameters, evaluated anew
    model.load_state_dict(safetensors.numpy.load_file(out / "final.safetensors"))
    t = summary["config"]["train"]
    assert summary["test_accuracy"] == tr.accuracy(model, data.x_test, data.y_test,
                                                   t["eval_batch_size"],
                                                   tr.make_executor(t["executor"]))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(10, summary["steps"] + 1, 10))
    assert set(steps[0]) >= {"step", "epoch", "loss", "lr", "wall_s"}
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["test_accuracy"] == summary["test_accuracy"]

    final = safetensors.numpy.load_file(out / "final.safetensors")
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert set(final) == set(names) | {"1.running_mean", "1.running_var"}
    sha = hashlib.sha256()
    for n in names:
        sha.update(np.ascontiguousarray(final[n], final[n].dtype.newbyteorder("<")).tobytes())
    assert sha.hexdigest() == summary["params_sha256"]

    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["epoch_1.safetensors", "epoch_2.safetensors"]
    tensors, meta = tr.load_checkpoint(str(out / "checkpoints" / "epoch_2.safetensors"))
    assert meta["epoch"] == "2" and meta["step"] == str(summary["steps"])
    assert "config_hash" in meta and json.loads(meta["config"]) == summary["config"]
    assert {k for k in tensors if k.startswith("optim.")} == {
        "optim.step", *(f"optim.{i}.momentum_buffer" for i in range(6))}
    assert int(tensors["optim.step"]) == summary["steps"]


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("train", MLP, "--set", "train.epochz=1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "unknown config key 'train.epochz'" in lines[0] and "train.epochs" in lines[0]
    assert cli.main(["train", str(tmp_path / "missing.toml")]) == 2
    assert cli.main(["train", MLP, "--resume", str(tmp_path / "norun")]) == 2
    assert cli.main(["train", MLP, "--set", "model.kind=cnn", "--set",
                     "model.channels=[4,4,4,4]", "--out", str(tmp_path / "c")]) == 2
    assert cli.main(["graph", MLP, "--out", str(tmp_path / "g.dot"),
                     "--set", "data.dataset=idx"]) == 2


def _run(tmp_path, name, sets, **kw):
    return tr.train(load_config(MLP, SMALL + sets), str(tmp_path / name), **kw)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [("epoch", 1), ("step", 15)])
def test_resume_gives_the_same_parameters(tmp_path, monkeypatch, stop_at):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    sets = ["train.optimizer=adam", "train.lr=0.01", "train.lr_schedule=cosine",
            "model.batchnorm=true", "model.dropout=0.2"]
    whole = _run(tmp_path, "whole", sets)
    kind, at = stop_at

    def interrupt(record):
        if record["kind"] == kind and record[kind] == at:
            raise _Stop

    with pytest.raises(_Stop):
        _run(tmp_path, "cut", sets, on_record=interrupt)
    assert tr.latest_checkpoint(str(tmp_path / "cut")).endswith("epoch_1.safetensors")
    resumed = _run(tmp_path, "cut", sets, resume=str(tmp_path / "cut"))
    assert resumed["params_sha256"] == whole["params_sha256"]
    assert resumed["steps"] == whole["steps"] and resumed["train_loss"] == whole["train_loss"]
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")



@pytest.mark.parametrize("name, sets, keys", [
    ("rmsprop", ["train.lr=0.01", "train.momentum=0.5", "train.weight_decay=0.001"],
     {"square_avg", "momentum_buffer"}),
    ("adagrad", ["train.lr=0.1", "train.weight_decay=0.001"], {"sum"})])
def test_cli_trains_with_rmsprop_and_adagrad_and_resumes(tmp_path, monkeypatch, name, sets,
                                                         keys):
    """``train.optimizer = "rmsprop" | "adagrad"`` from the CLI: torch's optimizer with the
    config's lr, weight decay (and momentum), its state checkpointed, and a resumed run equal
    to the uninterrupted one."""
    sets = [f"train.optimizer={name}", *sets]
    opt = tr.make_optimizer(load_config(MLP, SMALL + sets),
                            tr.setup(load_config(MLP, SMALL + sets))[0].parameters())
    assert type(opt).__name__ == {"rmsprop": "RMSprop", "adagrad": "Adagrad"}[name]
    assert f"train.lr={opt.lr}" in sets and opt.weight_decay == 0.001
    assert getattr(opt, "momentum", 0.5) == 0.5
    r = _cli("train", MLP, "--out", str(tmp_path / "cli"), "--set", "train.epochs=1",
             "--set", "model.hidden=[16]", "--set", "train.batch_size=128",
             *(a for kv in sets for a in ("--set", kv)))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5, summary
    tensors, _ = tr.load_checkpoint(str(tmp_path / "cli" / "checkpoints" / "epoch_1.safetensors"))
    assert {k.split(".")[-1] for k in tensors if k.startswith("optim.")} == keys | {"step"}

    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    whole = _run(tmp_path, "whole", sets)

    def interrupt(record):
        if record["kind"] == "epoch" and record["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        _run(tmp_path, "cut", sets, on_record=interrupt)
    resumed = _run(tmp_path, "cut", sets, resume=str(tmp_path / "cut"))
    assert resumed["params_sha256"] == whole["params_sha256"]

def _records(run_dir):
    """metrics.jsonl without the wall-clock times (and the rates measured with them)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS}
            for x in lines]


def test_resume_extends_epochs_and_rejects_other_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    const = ["train.lr_schedule=constant"]     # a cosine schedule depends on train.epochs
    whole = _run(tmp_path, "whole", const)
    _run(tmp_path, "short", const + ["train.epochs=2"])
    resumed = _run(tmp_path, "short", const, resume=str(tmp_path / "short"))
    assert resumed["params_sha256"] == whole["params_sha256"]
    with pytest.raises(ConfigError, match="differs from the checkpoint's in train.lr"):
        _run(tmp_path, "other", const + ["train.lr=0.5"], resume=str(tmp_path / "short"))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        _run(tmp_path, "other", [], resume=str(tmp_path / "nothing"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    _run(tmp_path, "run", ["train.epochs=1"])
    path = tmp_path / "run" / "checkpoints" / "epoch_1.safetensors"
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    model, optimizer, _, _ = tr.setup(load_config(MLP, SMALL))
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(str(path), model, optimizer, {"epoch": "1"})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["epoch_1.safetensors"]


class _FakeRanks(SingleProcess):
    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def allreduce_(self, buf, op="sum"):
        buf *= self.world_size            # as if every rank held the same value
        return buf


def test_world_size_needs_a_transform_and_shards_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    c = load_config(MLP, SMALL + ["train.epochs=1"])
    with pytest.raises(ConfigError):       # parallel.dp = 1 does not match 2 ranks
        tr.train(c, None, comm=_FakeRanks(1, 2))
    seen = []
    s = tr.train(c, str(tmp_path / "r1"), comm=_FakeRanks(1, 2), transform=lambda g: g,
                 executor=lambda g: seen.append(g.inputs[0].shape) or Interpreter(g))
    assert s["world_size"] == 2 and s["steps"] == 1438 // 128
    assert seen[0] == (64, 64)                      # local batch = global 128 / 2 ranks
    assert not (tmp_path / "r1").exists()           # only rank 0 writes
    with pytest.raises(ConfigError, match="multiple of the data-parallel world size 3"):
        tr.train(c, None, comm=_FakeRanks(0, 3), transform=lambda g: g)


def test_graph_command_writes_dot(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)    # no Graphviz binary
    out = tmp_path / "g" / "step.dot"
    assert cli.main(["graph", MLP, "--out", str(out), "--set", "model.hidden=[8]"]) == 0
    assert os.listdir(out.parent) == ["step.dot"]
    text = out.read_text()
    assert text.startswith("digraph step")
    from shardgrad.graph.dot import STEP_PALETTE
    for role in ("forward", "backward", "update", "leaf"):
        assert STEP_PALETTE[role] in text
    assert "cross_entropy" in text and "param/0.weight" in text and "grad/0.weight" in text
