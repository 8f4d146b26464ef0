"""Timelines (``debug.trace = true``): per-rank Chrome-trace files whose node names are the
ones ``shardgrad graph`` draws, communication with its bytes and peer, data loading, copies,
checkpoints, GPU steps by CUDA events, and ``shardgrad trace``'s per-rank sums."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_cupy  # noqa: E402

from shardgrad import cli  # noqa: E402
from shardgrad.runtime import trace  # noqa: E402
from shardgrad.runtime import train as tr  # noqa: E402
from shardgrad.runtime.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "examples" / "digits_mlp.toml")
SMALL = ["train.epochs=2", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
         "debug.trace=true"]


def _events(path):
    return json.loads(Path(path).read_text())["traceEvents"]


def _drawn(config, tmp_path):
    """(name, op) of each node box ``shardgrad graph`` draws for ``config``."""
    dot = tmp_path / "step.dot"
    sets = [a for s in config for a in ("--set", s)]
    assert cli.main(["graph", MLP, "--out", str(dot), *sets]) == 0
    return set(re.findall(r'label="((?:s\d+:)?%\d+) = (\w+)', dot.read_text()))


def _step_nodes(events):
    return {(e["args"]["node"], e["args"]["op"]) for e in events
            if e.get("tid") == trace.TRACKS["op"] and e["args"].get("in") == "step"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "run"
    summary = tr.train(load_config(MLP, SMALL), str(out))
    return out, summary


def test_one_rank_writes_ops_data_copies_and_checkpoints(run):
    out, summary = run
    events = _events(out / "trace" / "rank0.json")
    spans = [e for e in events if e["ph"] == "X"]
    by = lambda cat: [e for e in spans if e["cat"] == cat]
    assert len(by("step")) == summary["steps"] and len(by("data")) == summary["steps"]
    assert [e["args"]["step"] for e in by("step")] == list(range(1, summary["steps"] + 1))
    assert len([e for e in by("io") if e["name"] == "checkpoint"]) == 2
    assert len(by("copy")) == 2 and {e["name"] for e in by("host")} >= {"evaluate"}
    ops = by("op")
    assert {"matmul", "cross_entropy"} <= {e["args"]["op"] for e in ops}
    assert all(e["dur"] >= 0 and e["name"] == f"{e['args']['node']} {e['args']['op']}"
               for e in ops)
    # every step ran every kernel node of the step graph once
    per_step = len([e for e in ops if e["args"].get("in") == "step"]) / summary["steps"]
    assert per_step == int(per_step) > 20
    assert trace.current() is None               # uninstalled after the run


def test_node_names_are_the_ones_shardgrad_graph_draws(run, tmp_path):
    out, _ = run
    seen = _step_nodes(_events(out / "trace" / "rank0.json"))
    drawn = _drawn(SMALL, tmp_path)
    assert seen and seen <= drawn


def test_interpreter_runs_are_traced_too(tmp_path):
    sets = [*SMALL, "train.epochs=1", 'train.executor="interpreter"']
    tr.train(load_config(MLP, sets), str(tmp_path / "r"))
    events = _events(tmp_path / "r" / "trace" / "rank0.json")
    assert len([e for e in events if e.get("cat") == "op"]) > 100


def test_trace_command_merges_and_sums(run, capsys):
    out, summary = run
    assert cli.main(["trace", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"merged 1 rank(s) into {out / 'trace' / 'all.json'}"
    png = out / "trace" / "timeline.png"
    assert lines[1].endswith(f"drawn in {png}") and png.read_bytes()[:4] == b"\x89PNG"
    assert lines[2].split()[:6] == ["rank", "steps", "step", "ms", "compute", "ms"]
    row = lines[3].split()
    assert row[0] == "0" and int(row[1]) == summary["steps"] - 1    # the first step excluded
    events = _events(out / "trace" / "all.json")
    stats = trace.summarize(events)[0]
    assert stats["compute_ms"] > 0 and stats["comm_ms"] == 0 and stats["idle_ms"] > 0
    steps = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "step")[1:]
    total = stats["compute_ms"] + stats["comm_ms"] + stats["idle_ms"]
    assert total == pytest.approx(sum(d for _, d in steps) / 1e3)


def test_trace_of_a_run_without_traces_is_one_line(tmp_path, capsys):
    assert cli.main(["trace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "debug.trace=true" in err


def test_trace_cut_short_is_one_line_naming_the_file(tmp_path, capsys):
    """A rank killed while writing its timeline leaves it cut short: named, not a traceback."""
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "rank0.json").write_text('{"traceEvents": [{"name": "st')
    assert cli.main(["trace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shardgrad trace: error: {tmp_path}/trace/rank0.json: not a "
                          f"readable trace (JSONDecodeError: ") and err.count("\n") == 1, err


def test_gpu_steps_are_timed_with_cuda_events(tmp_path, monkeypatch):
    """On the CuPy stand-in: a CUDA event pair per step, read when the trace is written."""
    cupy = host_cupy.module()
    recorded = []

    class Event:
        def record(self):
            recorded.append(self)

        def synchronize(self):
            pass

    class Stream:   # the prefetching copier's; host copies are synchronous
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def synchronize(self):
            pass

    cupy.cuda.Event, cupy.cuda.Stream = Event, Stream
    cupy.cuda.get_elapsed_time = lambda a, b: 0.25
    host_cupy.install(cupy, monkeypatch)
    summary = tr.train(load_config(MLP, [*SMALL, "train.epochs=1", 'device.type="cuda"']),
                       str(tmp_path / "g"))
    gpu = [e for e in _events(tmp_path / "g" / "trace" / "rank0.json") if e.get("cat") == "gpu"]
    assert len(gpu) == summary["steps"] and len(recorded) == 2 * summary["steps"]
    assert all(e["dur"] == 250.0 and e["args"]["device_ms"] == 0.25 for e in gpu)
    copies = [e for e in _events(tmp_path / "g" / "trace" / "rank0.json")
              if e.get("name") == "copy to GPU"]
    assert len(copies) == 2 * summary["steps"] and all(e["args"]["bytes"] > 0 for e in copies)


def _mpirun(n, out, *sets, timeout=140):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable,
           "-m", "shardgrad", "train", MLP, "--out", str(out)]
    for s in [*SMALL, *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.mpi
@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_two_data_parallel_ranks_trace_their_allreduces(tmp_path, capsys):
    _mpirun(2, tmp_path / "dp2", "parallel.dp=2", "train.epochs=1")
    for rank in (0, 1):
        events = _events(tmp_path / "dp2" / "trace" / f"rank{rank}.json")
        calls = [e for e in events if e.get("cat") == "comm"
                 and e["tid"] == trace.TRACKS["comm"] and e["args"]["kind"] == "allreduce"]
        assert calls and max(e["args"]["bytes"] for e in calls) >= 4 * 16 * 64
        nodes = [e for e in events if e.get("cat") == "comm" and e["tid"] == trace.TRACKS["op"]]
        assert {e["args"]["op"] for e in nodes} >= {"allreduce"}
        assert _step_nodes(events) <= _drawn([*SMALL, "parallel.dp=2"], tmp_path)
    capsys.readouterr()
    assert cli.main(["trace", str(tmp_path / "dp2")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {int(ln.split()[0]): ln.split() for ln in out[3:5]}
    assert set(rows) == {0, 1} and all(float(r[5]) > 0 for r in rows.values())   # comm ms


@pytest.mark.mpi
@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_pipeline_stages_trace_micro_batches_sends_and_the_bubble(tmp_path, capsys):
    shape = ["parallel.pp=2", "parallel.microbatches=4", "train.epochs=1"]
    _mpirun(2, tmp_path / "pp2", *shape)
    drawn = _drawn([*SMALL, *shape], tmp_path)
    for rank in (0, 1):
        events = _events(tmp_path / "pp2" / "trace" / f"rank{rank}.json")
        ops = [e for e in events if e.get("cat") == "op" and "stage" in e["args"]]
        assert {e["args"]["stage"] for e in ops} == {rank}
        assert {e["args"]["mb"] for e in ops if e["args"]["action"] == "forward"} == {0, 1, 2, 3}
        sends = [e for e in events if e.get("cat") == "comm" and e["args"].get("kind") in
                 ("isend", "recv")]
        assert sends and all(e["args"]["peer"] == 1 - rank and e["args"]["bytes"] > 0
                             for e in sends)
        # every node the stage ran (forward, backward, sums, sends, receives, update) is a
        # box of the plan `shardgrad graph` draws, with the same op
        nodes = {(e["args"]["node"], e["args"]["op"]) for e in events
                 if e.get("tid") == trace.TRACKS["op"] and "stage" in e["args"]}
        assert {e["args"]["action"] for e in events if "action" in e.get("args", {})} >= {
            "forward", "backward", "update", "accumulate"}
        assert nodes and nodes <= drawn, nodes - drawn
        assert all(name.startswith(f"s{rank}:") for name, _ in nodes)
    assert cli.main(["trace", str(tmp_path / "pp2")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"pipeline bubble: measured \d+% \(mean over 2 stage rank\(s\): "
                        r"\d+%, \d+%\), plan predicts \d+% \(1f1b, 2 stages x 4 micro-batches, "
                        r"op cost estimates\)", last), last
