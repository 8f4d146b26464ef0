"""``shardgrad train --launcher ray`` on a real local Ray cluster (one for the module): the
same parameters as ``mpirun -n 2``, a killed rank stops the job within 30 s naming the rank,
and a dead actor with ``cluster.max_restarts`` restarts the job from the latest checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from shardgrad.cluster import ray_launch
from shardgrad.runtime import config as cfg
from shardgrad.runtime.monitor import TIMINGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import SMALL, toml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ray_testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.mpi, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = toml({**SMALL, "model.hidden": [32], "train.epochs": 2, "train.lr": 0.1,
               "parallel.deterministic": True})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh local Ray cluster; yields the launcher's environment and a config path."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    path = tmp_path_factory.mktemp("ray") / "mlp.toml"
    path.write_text(CONFIG)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               SHARDGRAD_PROGRESS="0")
    yield env, str(path)
    ray.shutdown()


def shardgrad(args, env, launcher=(), background=False):
    """``shardgrad train ARGS``: finished, or running in the background."""
    cmd = [*launcher, sys.executable, "-m", "shardgrad", "train", *args]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)


def summary(out):
    with open(out / "summary.json") as f:
        return json.load(f)


def test_to_toml_round_trips():
    config = cfg.load_config(None, ["model.hidden=[64, 32]", "train.lr=1e-05",
                                    'data.train_images="a \\"b\\"\\\\c"'])
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sg-toml-{os.getpid()}.toml")
    with open(path, "w") as f:
        f.write(ray_launch.to_toml(config))
    try:
        assert cfg.load_config(path) == config
    finally:
        os.remove(path)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The summary of ``mpirun -n 2 shardgrad train CONFIG --set parallel.dp=2``."""
    env, config = cluster
    out = tmp_path_factory.mktemp("mpi")
    ran = shardgrad([config, "--out", str(out), "--set", "parallel.dp=2"], env,
                    launcher=["mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe"])

    assert ran.returncode == 0, ran.stdout + ran.stderr
    return summary(out), sorted(os.listdir(out))


def test_ray_run_matches_mpirun(cluster, reference, tmp_path):
    env, config = cluster
    ran = shardgrad([config, "--out", str(tmp_path), "--launcher", "ray", "--set",
                     "parallel.dp=2"], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # every slot is on this node: mpirun starts the ranks without waiting for the actors
    assert "then mpirun starts the ranks here" in ran.stderr, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["params_sha256"] == \
        reference[0]["params_sha256"]
    s = summary(tmp_path)
    assert {k: v for k, v in s.items() if k not in TIMINGS} == \
        {k: v for k, v in reference[0].items() if k not in TIMINGS}
    assert sorted(os.listdir(tmp_path)) == reference[1]


def test_ray_runs_a_pipeline_on_dp_times_pp_ranks(cluster, tmp_path):
    env, config = cluster
    sets = ["--set", "parallel.pp=2", "--set", "parallel.deterministic=false"]
    mpi = shardgrad([config, "--out", str(tmp_path / "mpi"), *sets], env,
                    launcher=["mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe"])
    assert mpi.returncode == 0, mpi.stdout + mpi.stderr
    ran = shardgrad([config, "--out", str(tmp_path / "ray"), "--launcher", "ray", *sets], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 ranks on" in ran.stderr
    assert summary(tmp_path / "ray")["params_sha256"] == \
        summary(tmp_path / "mpi")["params_sha256"]


def rank_process(out, rank):
    """The pid of the rank ``rank`` that writes to ``out`` (found by its MPI environment)."""
    def rank_pid():
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if str(out).encode() not in f.read():
                        continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"OMPI_COMM_WORLD_RANK={rank}\0".encode() in f.read():
                        return int(entry)
            except (OSError, ValueError):
                continue
        return None
    return wait_for(rank_pid)


def kill_rank(job, out, rank, ready=None) -> str:
    """Once ``ready()`` holds (if given), SIGKILL ``rank`` of ``job`` (the run writing to
    ``out``): the job fails within 30 s; its stderr. The job is killed whatever happens."""
    try:
        if ready is not None:
            wait_for(ready)
        os.kill(rank_process(out, rank), signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=30)
        stopped = time.monotonic() - killed
    finally:
        job.kill()
    assert job.returncode != 0 and stopped < 30
    return err


def test_killed_rank_stops_the_job_within_30s(cluster, tmp_path):
    env, config = cluster
    out = tmp_path / "killed"
    # rank 1 stops responding before its first step; then it is killed with SIGKILL
    job = shardgrad([config, "--out", str(out), "--launcher", "ray", "--set", "parallel.dp=2",
                     "--set", "debug.fail_at_step=1", "--set", "debug.fail_rank=1",
                     "--set", "debug.fail_mode='hang'"], env, background=True)
    err = kill_rank(job, out, 1)
    assert "shardgrad ray: rank 1 (host sg-" in err and "the job stopped" in err, err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_while_training_is_the_one_named(cluster, tmp_path, rank):
    env, config = cluster
    out = tmp_path / "killed"
    job = shardgrad([config, "--out", str(out), "--launcher", "ray", "--set", "parallel.dp=2",
                     "--set", "train.epochs=100000"], env, background=True)

    def started():
        assert job.poll() is None, job.communicate()
        return os.path.exists(out / "checkpoints" / "epoch_1.safetensors")
    err = kill_rank(job, out, rank, started)
    named = re.findall(r"shardgrad ray: rank (\d+) \(host sg-\S+ on .*\) failed", err)
    assert named and set(named) == {str(rank)}, err


def test_dead_actor_restarts_from_latest_checkpoint(cluster, reference, tmp_path):
    env, config = cluster
    out = tmp_path / "restarted"
    # rank 1 hangs in epoch 2 (step 30 of 44), so only a restart finishes the run; the resumed
    # process runs 22 steps, so its own step 30 never comes. deterministic = true: the same
    # parameters as the uninterrupted mpirun run.
    sets = ["--set", "parallel.dp=2", "--set", "debug.fail_at_step=30", "--set",
            "debug.fail_rank=1", "--set", "debug.fail_mode='hang'"]
    job = shardgrad([config, "--out", str(out), "--launcher", "ray", *sets,
                     "--set", "cluster.max_restarts=1"], env, background=True)
    try:
        wait_for(lambda: os.path.exists(out / "checkpoints" / "epoch_1.safetensors"))
        actor = wait_for(lambda: [a["name"] for a in ray.util.list_named_actors(True)
                                  if a["namespace"] == ray_launch.NAMESPACE
                                  and a["name"].endswith("-1")])
        ray.kill(ray.get_actor(actor[0], namespace=ray_launch.NAMESPACE))
        stdout, err = job.communicate(timeout=90)
    finally:
        job.kill()
    assert job.returncode == 0, err
    assert "its Ray actor died" in err and "restart 1 of 1" in err, err
    s = summary(out)
    assert s["resumed_from"].endswith("epoch_1.safetensors") and s["steps"] == 44
    assert s["params_sha256"] == reference[0]["params_sha256"]


def test_sigterm_to_the_launcher_stops_the_job_and_resumes_exactly(cluster, reference,
                                                                   tmp_path):
    """`ray job stop` sends the launcher SIGTERM: it stops the ranks and says so, exit 143
    (it said `interrupted`, exit 130, as for Ctrl-C); --resume then ends on the
    uninterrupted run's parameters."""
    env, config = cluster
    out = tmp_path / "stopped"
    job = shardgrad([config, "--out", str(out), "--launcher", "ray", "--set", "parallel.dp=2",
                     "--set", "debug.fail_at_step=30", "--set", "debug.fail_rank=1",
                     "--set", "debug.fail_mode='hang'"], env, background=True)
    try:
        wait_for(lambda: os.path.exists(out / "checkpoints" / "epoch_1.safetensors"))
        ranks = [rank_process(out, r) for r in (0, 1)]
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == "shardgrad train: terminated by SIGTERM", err
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in ranks), timeout=10)
    resumed = shardgrad([config, "--out", str(out), "--resume", str(out), "--launcher", "ray",
                         "--set", "parallel.dp=2"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["params_sha256"] == reference[0]["params_sha256"]


def test_bad_input_on_the_ranks_is_one_line_and_not_restarted(cluster, tmp_path):
    """A data file missing where the ranks run: the ranks' one line, the launcher's verdict,
    exit 2; `cluster.max_restarts` used to restart it twice into the same error, each time
    with Open MPI's 7-line block."""
    env, config = cluster
    missing = tmp_path / "missing.npz"
    r = shardgrad([config, "--out", str(tmp_path / "run"), "--launcher", "ray", "--set",
                   "parallel.dp=2", "--set", "cluster.max_restarts=2", "--set",
                   "data.dataset='npz'", "--set", f"data.path='{missing}'"], env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    said = f"shardgrad train: error: data.path = '{missing}': no such file"
    assert lines.count(said) == 1 and "attempt 2" not in r.stderr, r.stderr
    assert "----" not in r.stderr and "prterun" not in r.stderr, r.stderr
    assert re.search(r"shardgrad ray: rank \d \(host sg-\S+ on .*\) failed; mpirun exit code 2; "
                     r"not restarted: a bad-input error \(exit 2\) would recur$", lines[-1]), \
        r.stderr


def test_a_diverged_run_is_one_line_and_not_restarted(cluster, tmp_path):
    """A loss that becomes NaN: the ranks' one line, exit 1, and the launcher's verdict;
    `cluster.max_restarts` used to restart it into the same divergence (the same config
    from the same checkpoint diverges again)."""
    env, config = cluster
    out = tmp_path / "run"
    r = shardgrad([config, "--out", str(out), "--launcher", "ray", "--set", "parallel.dp=2",
                   "--set", "cluster.max_restarts=2", "--set", "train.lr=1e200"], env)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    said = ("shardgrad train: error: the training loss is nan at step 2 (epoch 1, lr 1e+200): "
            "training diverged (lower train.lr, or check the data for NaN)")
    assert lines.count(said) == 1, r.stderr
    assert sum(line.startswith("shardgrad ray: attempt ") for line in lines) == 1, r.stderr
    assert "----" not in r.stderr and "prterun" not in r.stderr, r.stderr
    assert re.search(r"shardgrad ray: rank \d \(host sg-\S+ on .*\) failed; mpirun exit code 1; "
                     r"not restarted: the training diverged, and a restart would diverge "
                     r"again$", lines[-1]), r.stderr
    assert os.listdir(out / "checkpoints") == []
    assert not (out / "final.safetensors").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("launcher", ["mpi", "ray"])
def test_launch_runs_a_users_script_as_ranks(cluster, launcher):
    """``shardgrad launch -n 2 [--launcher ray] -- python SCRIPT`` (a relative path: the ranks
    start in the launcher's directory) gives what the script gives in one process."""
    env, _ = cluster
    script = ["examples/digits_ddp.py", "--epochs", "1", "--dtype", "float64"]
    alone = subprocess.run([sys.executable, *script], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=90)
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "launch", "-n", "2", "--launcher",
                          launcher, "--", sys.executable, *script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert alone.returncode == 0 and ran.returncode == 0, ran.stdout + ran.stderr
    a, b = json.loads(alone.stdout), json.loads(ran.stdout.splitlines()[-1])
    assert b["world_size"] == 2
    assert b["epoch_loss"] == pytest.approx(a["epoch_loss"], rel=1e-12)
