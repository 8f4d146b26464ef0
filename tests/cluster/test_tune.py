"""``shardgrad tune`` on a real local Ray cluster (one for the module): a 6-trial digits sweep
with ASHA ends with a ranked table, tune.png and the best trial's config, which a plain
``shardgrad train`` turns into the very same parameters; an interrupted sweep resumes; and the
--search parser."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.tune  # noqa: F401 - the ray extra installs it: a missing one fails, not skips

from shardgrad.cluster import tune
from shardgrad.runtime.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import SMALL, toml  # noqa: E402

CONFIG = toml({**SMALL, "model.hidden": [32], "train.epochs": 4, "train.batch_size": 16,
               "train.dtype": None, "train.lr": 0.05})
ROW = re.compile(r"^(\d) +(\w+) +(\S+) +(\[\d+\]) +(\d) +([\d.]+) +(finished|stopped early)$",
                 re.M)


def test_search_specs():
    assert tune.parse_search("train.lr=loguniform(1e-3,1e-1)") == \
        ("train.lr", ("loguniform", [1e-3, 1e-1]))
    assert tune.parse_search("model.hidden=[[128],[256, 64]]") == \
        ("model.hidden", ("choice", [[128], [256, 64]]))
    assert tune.parse_search("train.batch_size=randint(16, 128)") == \
        ("train.batch_size", ("randint", [16, 128]))
    for bad, says in [("train.lr", "expected KEY=SPEC"),
                      ("train.lr=normal(0,1)", "unknown distribution 'normal'"),
                      ("train.lr=loguniform(0,1)", "needs low < high and low > 0"),
                      ("train.lr=uniform(1)", "uniform takes 2 numbers"),
                      ("train.nope=[1,2]", "nope"),
                      ("model.hidden=[[128],'x']", "model.hidden = 'x'"),
                      ("train.lr=0.1", "a non-empty TOML list of choices")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            tune.parse_search(bad)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    path = tmp_path_factory.mktemp("tune") / "digits.toml"
    path.write_text(CONFIG)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               SHARDGRAD_PROGRESS="0")
    yield env, str(path)
    ray.shutdown()


def finished_trials(out):
    trials = out / "trials"
    return [t for t in trials.iterdir() if (t / "summary.json").exists()] \
        if trials.exists() else []


def sweep_cmd(config, out, *args):
    return [sys.executable, "-m", "shardgrad", "tune", config, "--set", "train.dtype='float64'",
            "--search", "train.lr=loguniform(1e-4,0.3)", "--search", "model.hidden=[[16],[64]]",
            "--out", str(out), *args]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_asha_sweep_ranks_trials_and_its_best_config_trains_the_same(cluster, tmp_path):
    env, config = cluster
    out = tmp_path / "sweep"
    ran = subprocess.run(sweep_cmd(config, out, "--trials", "6", "--scheduler", "asha"),
                         env=env, capture_output=True, text=True, timeout=250)
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    rows = ROW.findall(ran.stdout)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6], ran.stdout
    accuracies = [float(r[5]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    # ASHA stopped at least one poor trial before its last epoch
    assert any(r[6] == "stopped early" and int(r[4]) < 4 for r in rows), ran.stdout
    best = rows[0]
    assert best[6] == "finished" and accuracies[0] > 0.5   # chance is 0.1
    assert (out / "tune.png").stat().st_size > 0
    assert (out / "tune.txt").read_text().splitlines()[1].split()[:2] == ["1", best[1]]

    # the best config, trained plainly, gives the best trial's parameters
    plain = subprocess.run([sys.executable, "-m", "shardgrad", "train", str(out / "best.toml"),
                            "--out", str(tmp_path / "plain")], env=env, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    trial = json.loads((out / "trials" / best[1] / "summary.json").read_text())
    assert json.loads(plain.stdout.splitlines()[-1])["params_sha256"] == trial["params_sha256"]
    assert json.loads(plain.stdout.splitlines()[-1])["test_accuracy"] == \
        pytest.approx(float(best[5]), abs=1e-4)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_interrupted_sweep_resumes_keeping_finished_trials(cluster, tmp_path):
    env, config = cluster
    out = tmp_path / "sweep"
    cmd = sweep_cmd(config, out, "--trials", "3", "--scheduler", "fifo", "--set",
                    "train.epochs=2")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not finished_trials(out) and first.poll() is None:
            assert time.monotonic() < deadline, "no trial finished within 120 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    done_before = {t.name: (t / "summary.json").stat().st_mtime for t in finished_trials(out)}
    assert done_before

    ran = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    assert f"resuming the sweep in {out}" in ran.stderr
    # the trials finished before the interruption were not run again
    assert {t: (out / "trials" / t / "summary.json").stat().st_mtime for t in done_before} == \
        done_before
    rows = ROW.findall(ran.stdout)
    assert [int(r[0]) for r in rows] == [1, 2, 3] and all(r[6] == "finished" for r in rows), \
        ran.stdout
    assert len(finished_trials(out)) == 3
