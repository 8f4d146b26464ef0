"""The Ray launcher's slots on a real local two-node Ray cluster with fake GPUs (one for the
module; ``ray.cluster_utils.Cluster``, two raylets of 2 CPUs and 2 GPUs each): each rank sees
exactly the GPUs Ray gave its slot, a job the cluster cannot hold is refused in one line, and
a pp = 2 x dp = 2 job puts each pipeline on one node and each stage's replicas on both."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.cluster_utils as cluster_utils

from shardgrad.cluster import ray_launch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import SMALL, toml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ray_testing import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.mpi, pytest.mark.timeout(150),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = toml({**SMALL, "train.epochs": 1})
SLOT = re.compile(r"shardgrad ray: rank (\d+): node (\S+) \(id (\w+)\)(?:, GPU ([\d,]+))?")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two fake nodes; yields the launcher's environment, a config path and the node ids
    (head first)."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "gcs_server_port": free_port(), "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=2)
    try:
        ray.init(address=c.address, logging_level="ERROR")
        ids = [c.head_node.node_id] + [n.node_id for n in c.worker_nodes]
        path = tmp_path_factory.mktemp("ray") / "mlp.toml"
        path.write_text(CONFIG)
        env = dict(os.environ, RAY_ADDRESS=c.address, SHARDGRAD_PROGRESS="0")
        yield env, str(path), ids
    finally:
        ray.shutdown()
        c.shutdown()


def slots(stderr):
    """{rank: (node id prefix, GPUs)} from the launcher's lines."""
    return {int(m[1]): (m[3], m[4]) for m in SLOT.finditer(stderr)}


def test_gpus_per_rank_defaults_to_one_on_cuda_else_none():
    def config(gpus, device):
        return {"cluster": {"gpus_per_rank": gpus}, "device": {"type": device}}
    assert ray_launch.gpus_per_rank(config(-1, "cuda")) == 1
    assert ray_launch.gpus_per_rank(config(-1, "cuda:1")) == 1
    assert ray_launch.gpus_per_rank(config(-1, "cpu")) == 0
    assert ray_launch.gpus_per_rank(config(2, "cpu")) == 2


def test_each_rank_sees_the_gpus_ray_gave_its_slot(cluster):
    env, _, ids = cluster
    show = ("import os; print('seen', os.environ['OMPI_COMM_WORLD_RANK'], "
            "os.environ.get('CUDA_VISIBLE_DEVICES'), os.getpriority(os.PRIO_PROCESS, 0), "
            "flush=True)")
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "launch", "-n", "4", "--launcher",
                          "ray", "--set", "cluster.gpus_per_rank=1", "--set",
                          "cluster.cpus_per_rank=0.5", "--", sys.executable, "-c", show],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert ran.returncode == 0, ran.stdout + ran.stderr
    given = slots(ran.stderr)
    found = re.findall(r"^seen (\d+) (\S+) (-?\d+)$", ran.stdout, re.M)
    seen = {int(r): g for r, g, _ in found}
    assert sorted(given) == sorted(seen) == [0, 1, 2, 3], ran.stdout + ran.stderr
    assert all(seen[r] == given[r][1] for r in seen), (seen, given)
    # four GPUs of two nodes: each (node, GPU) pair once
    assert len(set(given.values())) == 4
    assert {node for node, _ in given.values()} == {i[:8] for i in ids}
    # the ranks run at the raylets' priority (this process's), not Ray's worker niceness 15,
    # which made their steps 10x slower than mpirun's on a busy machine
    assert {int(n) for _, _, n in found} == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_too_many_gpus_are_refused_in_one_line(cluster):
    env, config, _ = cluster
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "train", config, "--launcher",
                          "ray", "--set", "parallel.dp=3", "--set", "cluster.gpus_per_rank=2",
                          "--set", "cluster.start_timeout_s=1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == (
        "shardgrad train: error: could not reserve 3 slots of 1 CPU + 2 GPU (PACK, rank 0 on "
        "this node) within cluster.start_timeout_s = 1 s; the cluster has 4 CPUs, 4 free; "
        "4 GPUs, 4 free")


def test_pipelines_packed_a_node_each_and_stage_replicas_spread(cluster, tmp_path):
    env, config, ids = cluster
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "train", config, "--out",
                          str(tmp_path), "--launcher", "ray", "--set", "parallel.pp=2",
                          "--set", "parallel.dp=2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    where = {rank: node for rank, (node, _) in slots(ran.stderr).items()}
    head, other = ids[0][:8], ids[1][:8]
    # ranks d * pp + s: replica 0 (ranks 0, 1) on the launcher's node, replica 1 on the other
    assert where == {0: head, 1: head, 2: other, 3: other}, ran.stderr
    assert (tmp_path / "summary.json").exists()


def test_a_diverged_pipeline_across_nodes_is_not_restarted(cluster, tmp_path):
    """The ranks on both nodes run under host actors, whose notes tell the launcher that the
    run diverged: `cluster.max_restarts` does not restart it into the same divergence."""
    env, config, _ = cluster
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "train", config, "--out",
                          str(tmp_path), "--launcher", "ray", "--set", "parallel.pp=2",
                          "--set", "parallel.dp=2", "--set", "train.lr=1e200", "--set",
                          "cluster.max_restarts=1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    lines = ran.stderr.splitlines()
    assert "then mpirun starts the ranks here" not in ran.stderr, ran.stderr   # not direct
    assert sum(line.startswith("shardgrad ray: attempt ") for line in lines) == 1, ran.stderr
    assert any(line.startswith("shardgrad train: error: the training loss is nan at step ")
               and line.endswith("training diverged (lower train.lr, or check the data for NaN)")
               for line in lines), ran.stderr
    assert lines[-1].endswith("; not restarted: the training diverged, and a restart would "
                              "diverge again"), ran.stderr
    assert os.listdir(tmp_path / "checkpoints") == []


def test_plan_shows_the_placement_it_would_ask_for(cluster):
    env, config, ids = cluster
    ran = subprocess.run([sys.executable, "-m", "shardgrad", "plan", config, "--launcher", "ray",
                          "--set", "parallel.pp=2", "--set", "parallel.dp=2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    at = lines.index("Ray placement: 4 slots of 1 CPU, one per rank (rank = replica * 2 + stage)")
    assert re.fullmatch(rf"  node \S+ \(id {ids[0][:8]}\): ranks 0 1 = replica 0 stage 0, "
                        r"replica 0 stage 1", lines[at + 1])
    assert re.fullmatch(rf"  node \S+ \(id {ids[1][:8]}\): ranks 2 3 = replica 1 stage 0, "
                        r"replica 1 stage 1", lines[at + 2])
