"""Faults from outside a real ``mpirun`` job: Ctrl-C (SIGINT) to one rank stops every rank
naming it, and ``--resume`` then ends where the uninterrupted run ends; a diverged run and a
pipeline stage's injected fault stop the job the same way."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shardgrad.cluster.commands import failed_rank
from shardgrad.runtime import train as tr

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, SMALL, blobs_config, mpi_env, rank_pids, toml  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

CONFIG = toml({**SMALL, "train.epochs": 2, "train.lr": 0.1, "train.momentum": 0.9})
ENV = mpi_env()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("faults_mpi"), CONFIG)


def _cmd(config, ranks, *args):
    return MPIRUN + ["-n", str(ranks), sys.executable, "-m", "shardgrad", "train", config,
                     *args]


def _sets(*items):
    return [a for s in items for a in ("--set", s)]


def test_ctrl_c_on_one_rank_stops_the_job_and_resume_matches_the_whole_run(config, tmp_path):
    out, tag = tmp_path / "cut", uuid.uuid4().hex
    proc = subprocess.Popen(_cmd(config, 2, "--out", str(out), *_sets(
        "parallel.dp=2", "train.epochs=1000")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(ENV, SHARDGRAD_TEST_TAG=tag))
    try:
        deadline = time.monotonic() + 60
        while tr.latest_checkpoint(str(out)) is None or rank_pids(tag).get(1) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(rank_pids(tag).get(1), signal.SIGINT)
        t = time.perf_counter()
        _, stderr = proc.communicate(timeout=30)
        assert time.perf_counter() - t < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "rank 1 failed: interrupted (KeyboardInterrupt)" in stderr, stderr
    names = os.listdir(out / "checkpoints")
    assert all(tr.CHECKPOINT.match(n) for n in names), names   # no half-written file left
    epochs = max(int(tr.CHECKPOINT.match(n).group(1)) for n in names) + 1

    runs = {}
    for name, args in (("cut", ["--resume", str(out)]), ("whole", ["--out", str(tmp_path)])):
        done = subprocess.run(_cmd(config, 2, *args, *_sets("parallel.dp=2",
                                                            f"train.epochs={epochs}")),
                              capture_output=True, text=True, timeout=60, env=ENV)
        assert done.returncode == 0, done.stderr
        runs[name] = done.stdout
    assert '"params_sha256"' in runs["cut"]
    pick = lambda s: s[s.index('"params_sha256"'):].split(",")[0]
    assert pick(runs["cut"]) == pick(runs["whole"])


def test_a_diverged_data_parallel_run_stops_every_rank_naming_the_step(config, tmp_path):
    """One line, as a bad input's: every rank meets the same averaged loss (each used to
    print `rank R failed: Diverged: ...` and MPI_Abort's banner, after NumPy's overflow
    warnings), exit 1; the same line alone, 1 rank or 2, under `shardgrad train`."""
    said = ("shardgrad train: error: the training loss is nan at step 2 (epoch 1, lr 1e+200): "
            "training diverged (lower train.lr, or check the data for NaN)")
    proc = subprocess.run(_cmd(config, 2, "--out", str(tmp_path), *_sets(
        "parallel.dp=2", "train.lr=1e200", "train.lr_schedule='constant'")),
        capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines.count(said) == 1 and "MPI_ABORT" not in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr and "was terminated" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path / "checkpoints") == []
    for n in (["-n", "2"], []):
        proc = subprocess.run([sys.executable, "-m", "shardgrad", "train", *n, config, "--out",
                               str(tmp_path / f"n{len(n)}"), *_sets("train.lr=1e200",
                               "train.lr_schedule='constant'")],
                              capture_output=True, text=True, timeout=60, env=ENV)
        assert proc.returncode == 1 and proc.stderr.splitlines() == [said], proc.stderr


def test_debug_fail_at_step_reaches_a_pipeline_stage(config, tmp_path):
    proc = subprocess.run(_cmd(config, 2, "--out", str(tmp_path), *_sets(
        "parallel.pp=2", "debug.fail_at_step=3", "debug.fail_rank=1")), capture_output=True,
        text=True, timeout=60, env=ENV)
    assert proc.returncode != 0
    assert ("rank 1 failed: InjectedFault: injected fault at step 3 (debug.fail_at_step=3, "
            "debug.fail_rank=1)") in proc.stderr, proc.stderr
    assert not (tmp_path / "final.safetensors").exists()


def test_a_rank_that_never_starts_ends_the_job_after_start_timeout_s(config, tmp_path):
    train = " ".join([sys.executable, "-m", "shardgrad", "train", config, "--out",
                      str(tmp_path), *_sets("parallel.dp=2", "parallel.start_timeout_s=3")])
    script = f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exec sleep 600; fi; exec {train}'
    t = time.perf_counter()
    proc = subprocess.run(MPIRUN + ["-n", "2", "bash", "-c", script], capture_output=True,
                          text=True, timeout=60, env=ENV)
    assert time.perf_counter() - t < 30
    assert proc.returncode != 0
    assert "Timeout (0:00:03)!" in proc.stderr and "in _start_mpi" in proc.stderr, proc.stderr


@pytest.mark.parametrize("ranks,stopped", [(2, 1), (3, 2), (4, 0)])
def test_a_stopped_rank_is_named_by_its_peers(config, tmp_path, ranks, stopped):
    """SIGSTOP (a hang the rank cannot report itself): a peer's watchdog reads the stopped
    rank's heartbeat in shared memory and names it; the job ends within timeout_s + 5 s."""
    out, tag = tmp_path / "run", uuid.uuid4().hex
    proc = subprocess.Popen(_cmd(config, ranks, "--out", str(out), *_sets(
        f"parallel.dp={ranks}", "train.epochs=100000", "train.batch_size=60",
        "parallel.timeout_s=3")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(ENV, SHARDGRAD_TEST_TAG=tag))
    try:
        deadline = time.monotonic() + 60
        while tr.latest_checkpoint(str(out)) is None or rank_pids(tag).get(stopped) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(rank_pids(tag).get(stopped), signal.SIGSTOP)
        t = time.perf_counter()
        _, stderr = proc.communicate(timeout=30)
        assert time.perf_counter() - t < 3 + 5, stderr
    finally:
        if proc.poll() is None:
            pid = rank_pids(tag).get(stopped)
            if pid:
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert re.search(rf"rank \d+ failed: CommError: .* did not complete within 3 s "
                     rf"\(parallel.timeout_s\): rank {stopped} hangs: no heartbeat from its pid "
                     rf"\d+ for \d+\.\d s \(stopped", stderr), stderr
    assert failed_rank(stderr) == stopped
    assert "OSC UCX" not in stderr
