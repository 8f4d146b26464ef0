"""The launch files in cluster/: the SLURM script builds the mpirun command from the
allocation (run with MPIRUN printing instead of running), and the Ray cluster YAML passes
Ray's own cluster-config validation."""

import os
import shutil
import subprocess

import pytest

CLUSTER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_runs_one_rank_per_task():
    env = dict(os.environ, SLURM_NTASKS="4", SLURM_JOB_ID="77", SLURM_CPUS_PER_TASK="2",
               MPIRUN="printf %s\\n")
    ran = subprocess.run(["bash", os.path.join(CLUSTER, "slurm.sh"), "c.toml", "--set",
                          "train.epochs=3"], env=env, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:-1] == [
        "-n", "4", "-x", "SHARDGRAD_PROGRESS", "python", "-m", "shardgrad", "train", "c.toml",
        "--out", "runs/slurm-77", "--set", "parallel.dp=4", "--set", "device.threads=2",
        "--set", "train.epochs=3"]


def test_slurm_script_needs_a_config():
    ran = subprocess.run(["bash", os.path.join(CLUSTER, "slurm.sh")], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, SLURM_NTASKS="1"))
    assert ran.returncode != 0 and "usage: sbatch cluster/slurm.sh CONFIG" in ran.stderr


def test_ray_cluster_yaml_is_a_valid_cluster_config():
    import yaml
    from ray.autoscaler._private import util
    with open(os.path.join(CLUSTER, "ray-cluster.yaml")) as f:
        config = util.prepare_config(yaml.safe_load(f))
    util.validate_config(config)
    assert config["provider"]["type"] == "local"
