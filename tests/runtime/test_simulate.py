"""``shardgrad simulate``: the alpha-beta model, the prediction's fields for dp, pp and
dp x pp, link presets and node boundaries, ``--recommend``, and bad shapes in one line."""

import json
import os
import shutil
import statistics

import pytest

from shardgrad import cli
from shardgrad.runtime import simulate as sim
from shardgrad.runtime.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")
SETS = ["--set", "device.threads=1"]
KEYS = {"step_time_s", "compute_s", "comm_s", "bubble", "bytes_sent_per_rank",
        "peak_memory_bytes", "samples_per_s", "dp", "pp", "microbatches"}


def _json(capsys, *argv):
    assert cli.main(["simulate", MLP, *argv, *SETS, "--json", "--set",
                     "parallel.sync_batchnorm=false"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ring_allreduce_and_send_costs():
    link = sim.Link(1e-5, 1e-9, "test")
    assert sim.ring_allreduce_s(1e6, 1, link) == 0.0
    assert sim.ring_allreduce_s(1e6, 2, link) == pytest.approx(2 * 1e-5 + 1e6 * 1e-9)
    assert sim.ring_allreduce_s(1e6, 4, link) == pytest.approx(6 * 1e-5 + 1.5 * 1e6 * 1e-9)
    assert sim.p2p_s(1000, link) == pytest.approx(1e-5 + 1e-6)
    assert set(sim.LINKS) == {"shm", "nvlink", "infiniband", "ethernet"}
    assert all(lk.source for lk in sim.LINKS.values())


def test_data_parallel_prediction(capsys):
    one = _json(capsys, "--ranks", "1")
    two = _json(capsys, "--ranks", "2")
    assert KEYS <= set(one) and (one["dp"], two["dp"]) == (1, 2)
    assert one["comm_s"] == 0 and one["bytes_sent_per_rank"] == 0
    # gradients of 0.weight ... 3.bias, batch norm's running mean and variance, the loss
    reduced = 4 * (256 * 64 + 256 + 256 + 256 + 10 * 256 + 10 + 2 * 256 + 1)
    assert two["bytes_sent_per_rank"] == reduced           # ring: 2 (p-1)/p of the bucket
    assert two["comm_s"] == pytest.approx(sim.ring_allreduce_s(reduced, 2, sim.LINKS["shm"]))
    assert two["step_time_s"] == pytest.approx(two["compute_s"] + two["comm_s"])
    assert one["step_time_s"] > 0 and one["samples_per_s"] == pytest.approx(
        32 / one["step_time_s"])


def test_pipeline_and_dp_x_pp_predictions(capsys):
    pp = _json(capsys, "--ranks", "2", "--pp", "2", "--microbatches", "4")
    mesh = _json(capsys, "--ranks", "4", "--pp", "2", "--microbatches", "4")
    assert (pp["dp"], pp["pp"], mesh["dp"], mesh["pp"]) == (1, 2, 2, 2)
    assert 0 < pp["bubble"] < 1 and len(pp["per_stage"]) == 2
    assert pp["comm_s"] == 0 and mesh["comm_s"] > 0       # the replicas' gradient allreduce
    assert pp["bytes_sent_per_rank"] > 0


def test_pipeline_with_grad_clip_times_the_norms_allreduce_on_one_process(capsys):
    # each stage's update allreduces its sum of squares: timed here without a communicator
    pp = _json(capsys, "--ranks", "2", "--pp", "2", "--set", "train.grad_clip=1.0")
    assert pp["pp"] == 2 and all(s["update_s"] > 0 for s in pp["per_stage"])


def test_a_slower_link_between_nodes_costs_more(capsys):
    fast = _json(capsys, "--ranks", "4", "--gpus-per-node", "1", "--link", "infiniband")
    slow = _json(capsys, "--ranks", "4", "--gpus-per-node", "1", "--link", "ethernet")
    inside = _json(capsys, "--ranks", "4", "--gpus-per-node", "4", "--link", "ethernet")
    assert slow["comm_s"] > fast["comm_s"] and slow["nodes"] == 4 and inside["nodes"] == 1
    assert inside["comm_s"] == pytest.approx(
        sim.ring_allreduce_s(inside["bytes_sent_per_rank"] * 4 / 6, 4, sim.LINKS["shm"]))


def test_recommend_ranks_every_shape_fastest_first(capsys):
    out = _json(capsys, "--ranks", "2", "--recommend")
    times = [c["step_time_s"] for c in out["candidates"]]
    assert times == sorted(times) and out["step_time_s"] == times[0]
    shapes = {(c["dp"], c["pp"], c["microbatches"]) for c in out["candidates"]}
    assert (2, 1, 1) in shapes and (1, 2, 4) in shapes
    assert (out["dp"], out["pp"]) == (out["recommended"]["dp"], out["recommended"]["pp"])


def test_recommend_skips_shapes_the_model_cannot_take(capsys):
    """README's ``--ranks 8 --recommend``: dp=4 x pp=2 with 8 micro-batches gives batch norm
    one row each, which it cannot train on; that shape is left out, not the whole command."""
    assert cli.main(["simulate", MLP, "--ranks", "8", "--recommend", "--json", *SETS,
                     "--set", "model.hidden=[16]"]) == 0
    out = json.loads(capsys.readouterr().out)
    shapes = {(c["dp"], c["pp"], c["microbatches"]) for c in out["candidates"]}
    assert (8, 1, 1) in shapes and (4, 2, 4) in shapes and (4, 2, 8) not in shapes


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "3", "--pp", "2"], "--ranks 3 must be a positive multiple of --pp 2"),
    (["--ranks", "2", "--pp", "2", "--microbatches", "3"], "must be a multiple of dp x"),
])
def test_bad_shapes_are_one_line(argv, message, capsys):
    assert cli.main(["simulate", MLP, *argv, *SETS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_simulate_uses_the_configs_shape_by_default():
    config = load_config(MLP, ["device.threads=1", "parallel.pp=2", "parallel.microbatches=2"])
    r = sim.simulate(config, 2, repeats=3)
    assert (r["dp"], r["pp"], r["microbatches"]) == (1, 2, 2)


def test_contention_shares_the_cores_and_waits_for_the_slowest_rank():
    alone = sim.Contention(1, 1, 2, 0.0)
    assert alone.stretch == 1.0 and alone.sync_quantile == 0.5
    assert sim.Contention(2, 1, 2, 0.0).stretch == 1.0          # a core each
    assert sim.Contention(4, 1, 2, 0.0).stretch == 2.0          # two ranks a core
    # ten other threads ready: alone 11 share 2 cores, with a second rank 12 do
    assert sim.Contention(2, 1, 2, 10.0).stretch == pytest.approx(12 / 11)
    two = sim.Contention(2, 1, 2, 0.0)
    assert two.sync_quantile == pytest.approx(0.5 ** 0.5)
    assert two.slowest([1.0] * 5 + [2.0] * 5) == 2.0            # the 70.7% quantile
    assert sim.cores() >= 1 and sim.runnable_elsewhere() >= 0


@pytest.mark.parametrize("sets, rank, spans", [
    (["parallel.dp=2"], 1, 0),
    (["parallel.pp=2", "parallel.microbatches=4"], 1, 4),
    (["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"], 2, 2),
])
def test_measure_rank_runs_the_ranks_own_step_without_communication(sets, rank, spans):
    """The step ``shardgrad train`` builds for that rank (data-parallel rewrite, pipeline
    stage) runs in this process on a Loopback communicator, timed as the loop times it."""
    config = load_config(MLP, ["device.threads=1", "model.hidden=[16]", *sets])
    r = sim.measure_rank(config, rank, steps=5, warmup=1)
    assert len(r.times) == 5 and all(t > 0 for t in r.times) and len(r.elsewhere) == 5
    assert len(r.forward) == len(r.backward) == 5 * spans
    assert len(r.actions) == (5 if spans else 0)
    if spans:   # the actions phase holds the computes, the step holds the actions
        assert statistics.median(r.actions) >= spans * statistics.median(r.forward)
        assert r.step_s >= statistics.median(r.actions)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_measure_link_times_the_hand_over_between_two_ranks(capsys):
    link = sim.measure_link(100e-6, 3, seconds=0.3)   # an odd rank only computes
    assert link.alpha > 0 and link.beta == sim.LINKS["shm"].beta
    assert "measured now" in link.source
    r = _json(capsys, "--ranks", "2", "--pp", "2", "--microbatches", "2", "--measure-link")
    two = _json(capsys, "--ranks", "2", "--measure-link")   # data parallel: the preset
    assert two["alpha_s"] == sim.LINKS["shm"].alpha
    swap = sim.measure_link(100e-6, 2, seconds=0.3, exchange=True)
    assert swap.alpha > 0 and "swaps" in swap.source
    assert r["p2p_alpha_s"] > 0 and r["step_time_s"] > 0
    assert _json(capsys, "--ranks", "2", "--pp", "2", "--microbatches", "2")[
        "p2p_alpha_s"] == sim.LINKS["shm"].alpha
