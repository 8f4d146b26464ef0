"""Data parallelism end to end: ``mpirun -n N shardgrad train`` against the local run
(float64 equivalence, deterministic mode's bit-identical parameters), and fail-fast with
faults injected into real runs: an exception, a hang, ``kill -9`` of one rank, a bad dp."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, SMALL, blobs_config, mpi_env, rank_pids, toml  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

CONFIG = toml({**SMALL, "model.kind": "mlp", "model.hidden": [32], "train.epochs": 2,
               "train.lr": 0.1, "train.momentum": 0.9, "train.log_every": 5,
               "device.threads": None})
ENV = mpi_env()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("dp"), CONFIG, n=1200, name="blobs_mlp.toml")


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n") if line]


def train(config, out, ranks=None, sets=(), timeout=60, env=None):
    """``shardgrad train`` (under ``mpirun -n ranks`` unless None); the finished process."""
    cmd = [sys.executable, "-m", "shardgrad", "train", config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    if ranks is not None:
        cmd = MPIRUN + ["-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)


def finished(proc, out):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return summary, safetensors.numpy.load_file(str(out / "final.safetensors"))


@pytest.fixture(scope="module")
def local_run(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp1")
    return (*finished(train(config, out), out), out)


@pytest.mark.parametrize("ranks", [2, 4])
def test_mpirun_dp_matches_the_local_run_in_float64(config, local_run, tmp_path, ranks):
    summary, params = finished(train(config, tmp_path, ranks, [f"parallel.dp={ranks}"]),
                               tmp_path)
    ref_summary, ref, ref_dir = local_run
    assert set(params) == set(ref)
    for k in ref:
        rel = np.abs(params[k] - ref[k]).max() / np.abs(ref[k]).max()
        assert rel < 1e-9, (k, rel)
    assert summary["world_size"] == ranks and summary["steps"] == ref_summary["steps"]
    assert summary["train_loss"] == pytest.approx(ref_summary["train_loss"], rel=1e-9)
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]
    mine, ref_records = records(tmp_path), records(ref_dir)
    assert [(r["kind"], r["step"]) for r in mine] == [(r["kind"], r["step"]) for r in ref_records]
    for r, q in zip(mine, ref_records, strict=True):  # the logged loss is the global batch's
        assert r.get("loss", 0) == pytest.approx(q.get("loss", 0), rel=1e-9)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_1.safetensors",
                                                            "epoch_2.safetensors"]


def test_deterministic_mode_gives_the_same_bits_for_dp_1_2_4(config, local_run, tmp_path):
    shas = {}  # three separate runs (processes) agreeing also shows run-to-run stability
    for ranks in (None, 2, 4):
        out = tmp_path / str(ranks)
        sets = ["parallel.deterministic=true", f"parallel.dp={ranks or 1}"]
        summary, params = finished(train(config, out, ranks, sets), out)
        shas[ranks] = summary["params_sha256"]
    assert len(set(shas.values())) == 1, shas
    ref = local_run[1]  # and it trains the same model as the default mode, up to rounding
    assert max(np.abs(params[k] - ref[k]).max() / np.abs(ref[k]).max() for k in ref) < 1e-9


def test_an_exception_on_one_rank_stops_every_rank_fast_and_names_it(config, tmp_path):
    t = time.perf_counter()
    proc = train(config, tmp_path, 2, ["parallel.dp=2", "debug.fail_at_step=3",
                                       "debug.fail_rank=1"])
    assert proc.returncode != 0
    assert ("rank 1 failed: InjectedFault: injected fault at step 3 (debug.fail_at_step=3, "
            "debug.fail_rank=1)") in proc.stderr, proc.stderr
    assert time.perf_counter() - t < 30
    assert not (tmp_path / "final.safetensors").exists()


def test_a_hung_rank_is_caught_by_the_collective_timeout(config, tmp_path):
    t = time.perf_counter()
    proc = train(config, tmp_path, 2, ["parallel.dp=2", "debug.fail_at_step=3",
                                       "debug.fail_rank=1", 'debug.fail_mode="hang"',
                                       "parallel.timeout_s=3"])
    assert proc.returncode != 0
    assert "rank 0 failed: CommError: allreduce(sum)" in proc.stderr, proc.stderr
    assert "did not complete within 3 s (parallel.timeout_s)" in proc.stderr
    assert time.perf_counter() - t < 30


def test_kill_9_of_one_rank_makes_the_job_exit_within_30_s(config, tmp_path):
    tag = uuid.uuid4().hex
    env = dict(ENV, SHARDGRAD_TEST_TAG=tag)
    cmd = MPIRUN + ["-n", "2", sys.executable, "-m", "shardgrad", "train", config, "--out",
                    str(tmp_path), "--set", "parallel.dp=2", "--set", "train.epochs=500",
                    "--set", "train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 60
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        pids = rank_pids(tag)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        t = time.perf_counter()
        _, stderr = proc.communicate(timeout=30)
        assert time.perf_counter() - t < 30
        assert proc.returncode != 0
        assert "exited on" in stderr and "signal 9" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_parallel_dp_must_match_the_number_of_processes(config, tmp_path):
    proc = train(config, tmp_path, 2, ["parallel.dp=3"])
    assert proc.returncode != 0
    assert "parallel.dp = 3 but this job has 2 process(es)" in proc.stderr, proc.stderr
    local = train(config, tmp_path, None, ["parallel.dp=2"])
    assert local.returncode == 2
    assert "start it with `mpirun -n 2 shardgrad train ...`" in local.stderr, local.stderr
