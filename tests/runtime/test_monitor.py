"""What a run shows: summary.json's step_time_s and samples_per_s, one line per epoch,
TensorBoard event files (``log.tensorboard``) and ``shardgrad report``'s PNG and Markdown."""

import json
import os
import struct
import subprocess
import sys

import pytest

from shardgrad import cli
from shardgrad.runtime.monitor import epoch_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")
SMALL = ["--set", "train.epochs=2", "--set", "model.hidden=[16]", "--set", "device.threads=1",
         "--set", "train.log_every=5"]


def _cli(*args, timeout=120):
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "shardgrad", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _events(path):
    """The scalar (tag, step, value) triples of a TensorBoard event file (TFRecord framing:
    length u64, its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto import event_pb2

    out, data = [], open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitor") / "run"
    r = _cli("train", MLP, "--out", str(out), *SMALL, "--set", "log.tensorboard=true")
    assert r.returncode == 0, r.stderr
    return out, r


def test_summary_has_step_time_and_samples_per_s(run):
    out, _ = run
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["step_time_s"] < s["wall_s"] / s["steps"] * 5
    assert s["samples_per_s"] == pytest.approx(s["config"]["train"]["batch_size"]
                                               / s["step_time_s"])
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 for r in steps if r["kind"] == "step")


def test_each_epoch_ends_with_one_readable_line(run):
    out, r = run
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"]
    final = json.loads((out / "summary.json").read_text())
    assert f"test_accuracy {final['test_accuracy']:.4f}" in lines[-1]
    assert "train_loss" in lines[0] and " ms" in lines[0]


def test_epoch_line_format():
    rec = {"epoch": 3, "step": 135, "train_loss": 0.21094, "test_accuracy": 0.961, "lr": 0.1,
           "wall_s": 4.214}
    assert epoch_line(rec, 10, 0.00123) == ("epoch 3/10  step 135  train_loss 0.2109  "
                                            "test_accuracy 0.9610  lr 0.1  4.21 s  step 1.23 ms")


def test_tensorboard_events_hold_the_metrics(run):
    out, _ = run
    files = os.listdir(out / "tensorboard")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents")
    events = _events(out / "tensorboard" / files[0])
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]
    assert [(s, pytest.approx(v)) for t, s, v in events if t == "train/loss"] == losses
    accs = [(r["step"], r["test_accuracy"]) for r in records if r["kind"] == "epoch"]
    assert [(s, pytest.approx(v)) for t, s, v in events if t == "epoch/test_accuracy"] == accs
    assert {t for t, _, _ in events} >= {"train/lr", "train/samples_per_s", "epoch/train_loss"}


def test_report_writes_png_and_markdown(run, capsys):
    out, _ = run
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.png"), str(out / "report.md")]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert f"| test_accuracy | {summary['test_accuracy']:.4g} |" in md
    assert "| step_time_s |" in md and "![curves](report.png)" in md
    assert md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1   # one row per epoch


def test_report_with_a_damaged_summary_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 1.0}\n')
    for text, why in [("{bad", "Expecting property name"), ("[1, 2]", "a JSON object")]:
        (tmp_path / "summary.json").write_text(text)
        assert cli.main(["report", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shardgrad report: error: {tmp_path}/summary.json: not a "
                              f"shardgrad summary (") and why in err and err.count("\n") == 1


def test_report_of_a_directory_without_a_run_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.jsonl" in err
