"""Elastic restarts under ``--launcher ray`` (``cluster.min_ranks``) on a real local Ray cluster
of two fake nodes (``ray.cluster_utils.Cluster``, 2 CPUs each): a dp = 4 job that loses the
node holding two of its ranks restarts from its latest checkpoint at dp = 2 and ends with the
parameters of an uninterrupted dp = 2 run (deterministic float64); with cluster.min_ranks
above what is left it stops with one line saying so. Each run bounded by a timeout."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.cluster_utils as cluster_utils

from shardgrad.cluster import ray_launch
from shardgrad.runtime.config import ParallelConfig

sys.path.insert(0, str(Path(__file__).parent))
from ray_testing import free_port, wait_for  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.mpi, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

CONFIG = """
[model]
hidden = [32]

[train]
epochs = 2
batch_size = 64
dtype = "float64"
lr = 0.1

[parallel]
deterministic = true

[device]
threads = 1
"""
# rank 1 hangs in epoch 2 (step 30 of 44 at dp = 4), so the job is still running when the
# added node goes (with rank 1 or not); the resumed process runs 22 steps, so its own step 30
# never comes
HANG = ["debug.fail_at_step=30", "debug.fail_rank=1", "debug.fail_mode='hang'"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of 2 CPUs (each test adds the node it removes); yields the Cluster, the
    launcher's environment and a config path."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "gcs_server_port": free_port(), "include_dashboard": False})
    try:
        ray.init(address=c.address, logging_level="ERROR")
        path = tmp_path_factory.mktemp("ray") / "mlp.toml"
        path.write_text(CONFIG)
        env = dict(os.environ, RAY_ADDRESS=c.address, SHARDGRAD_PROGRESS="0")
        yield c, env, str(path)
    finally:
        ray.shutdown()
        c.shutdown()


def train(config, out, sets, env, launcher=None):
    """``shardgrad train`` in the background: under ``launcher`` (mpirun's argv), else Ray's."""
    cmd = [*(launcher or ()), sys.executable, "-m", "shardgrad", "train", config, "--out",
           str(out), *(() if launcher else ("--launcher", "ray"))]
    cmd += [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)



def kill_leftovers(out):
    """SIGKILL the ranks still writing to ``out`` (those of a removed fake node are orphans on
    this machine; on a real lost node they would be gone with it)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(out).encode() in f.read() and int(entry) != os.getpid():
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def lose_the_added_node(c, job, out):
    """Once the job's first checkpoint is written, remove the fake node this test added (its
    raylet and workers stop, as when a node is lost). Which ranks' slots Ray put there is
    its choice (dp has no placement of its own): it must hold some, as the head holds two."""
    def checkpointed():
        assert job.poll() is None, job.communicate()
        return os.path.exists(out / "checkpoints" / "epoch_1.safetensors")
    wait_for(checkpointed, timeout=120.0)
    names = wait_for(lambda: [a["name"] for a in ray.util.list_named_actors(True)
                              if a["namespace"] == ray_launch.NAMESPACE], timeout=120.0)
    on = {ray.get(ray.get_actor(n, namespace=ray_launch.NAMESPACE).info.remote(),
                  timeout=30)["node_id"] for n in names}
    added = [n for n in c.worker_nodes if n.node_id in on]
    assert len(added) == 1, f"no rank's slot is on the added node: {on}"
    c.remove_node(added[0])


def finish(job, timeout):
    """(stdout, stderr) of ``job`` once it ends, within ``timeout`` s."""
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job did not finish within {timeout} s:\n"
                             f"{job.communicate()[1]}") from None


def run_losing_a_node(cluster, out, sets, timeout):
    """``shardgrad train --launcher ray`` with ``sets`` and HANG on the head and a node added
    for it, which goes once the first checkpoint is written (lose_the_added_node): (job,
    stderr) once the job ends, within ``timeout`` s, its leftover ranks killed."""
    c, env, config = cluster
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    job = train(config, out, [*sets, *HANG], env)
    try:
        lose_the_added_node(c, job, out)
        _, err = finish(job, timeout)
    finally:
        job.kill()
        kill_leftovers(out)
    return job, err


def test_a_lost_node_restarts_the_job_with_fewer_ranks(cluster, tmp_path):
    _, env, config = cluster
    # the uninterrupted run at the new size: mpirun -n 2, dp = 2
    ref = train(config, tmp_path / "ref", ["parallel.dp=2"], env,
                launcher=["mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe"])
    _, err = finish(ref, 120)
    assert ref.returncode == 0, err
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())

    out = tmp_path / "elastic"
    job, err = run_losing_a_node(
        cluster, out, ["parallel.dp=4", "cluster.max_restarts=1", "cluster.min_ranks=2"], 150)
    assert job.returncode == 0, err
    assert re.search(r"restart 1 of 1 with 2 ranks \(parallel\.dp 4 -> 2; cluster\.min_ranks = "
                     r"2\): the live nodes \(1\) hold 2 slot\(s\) of 1 CPU", err), err
    assert "attempt 2: 2 ranks on" in err and "resuming from" in err, err
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == reference["steps"] == 44
    assert s["resumed_from"].endswith("epoch_1.safetensors")
    assert s["params_sha256"] == reference["params_sha256"]


def test_too_few_ranks_left_stops_with_one_line(cluster, tmp_path):
    job, err = run_losing_a_node(
        cluster, tmp_path / "stopped",
        ["parallel.dp=4", "cluster.max_restarts=2", "cluster.min_ranks=3"], 120)
    assert job.returncode != 0
    lines = [line for line in err.splitlines() if "cluster.min_ranks" in line]
    assert len(lines) == 1, err
    assert re.search(r"cannot restart with fewer ranks: cluster\.min_ranks = 3 but the live "
                     r"nodes \(1\) hold 2 slot\(s\) of 1 CPU; the job stopped$", lines[0]), err
    assert "restart 1 of 2" not in err, err


def test_min_ranks_above_the_job_is_refused(cluster, tmp_path):
    _, env, config = cluster
    job = train(config, tmp_path / "x", ["parallel.dp=2", "cluster.min_ranks=3"], env)
    _, err = finish(job, 60)
    assert job.returncode == 2
    assert err.strip().splitlines()[-1] == (
        "shardgrad train: error: cluster.min_ranks = 3 is more than the job's 2 ranks "
        "(parallel.dp x parallel.pp = 2 x 1)"), err


def test_shrunk_dp_keeps_the_global_batch_divisible():
    par = ParallelConfig(dp=4, pp=1, deterministic=True, chunks=4, microbatches=1)
    loose = dataclasses.replace(par, deterministic=False)
    assert ray_launch.shrunk_dp(par, 64, 4) == 4
    assert ray_launch.shrunk_dp(par, 64, 3) == 2       # chunks = 4 over dp = 3 would not do
    assert ray_launch.shrunk_dp(loose, 63, 3) == 3
    assert ray_launch.shrunk_dp(loose, 64, 3) == 2
    assert ray_launch.shrunk_dp(par, 64, 0) == 0
    pipe = dataclasses.replace(par, pp=2, microbatches=4)
    assert ray_launch.shrunk_dp(pipe, 64, 7) == 2      # 2 pipelines of 2 stages in 7 slots
    assert ray_launch.shrunk_dp(pipe, 8, 8) == 2       # 8 / (dp x 4 micro-batches)
