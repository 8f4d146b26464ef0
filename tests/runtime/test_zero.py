"""ZeRO stage 1 in the one data-parallel step (runtime.dp.ParallelStep) on threaded ranks:
through ``sg.distributed.data_parallel_step`` and ``shardgrad train``'s run, equal to plain
data parallelism, 1/dp of the optimizer state on each rank, the whole state gathered back
for ``state_dict()`` and checkpoints, and the settings it refuses (one line each)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import shardgrad as sg
from shardgrad.runtime import config as cfg
from shardgrad.runtime import dp
from shardgrad.runtime.threadcomm import run_ranks
from shardgrad.runtime.train import train

sys.path.insert(0, str(Path(__file__).parent))
from blobs import blobs_config, cli_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
from seeded import mlp  # noqa: E402

pytestmark = pytest.mark.timeout(120)

B, STEPS = 12, 4


def make(opt):
    model = mlp(12, 16, 5)
    if opt == "adamw":
        return model, sg.optim.AdamW(model.parameters(), lr=0.01)
    if opt == "rmsprop":
        return model, sg.optim.RMSprop(model.parameters(), momentum=0.9, centered=True)
    if opt == "adagrad":      # a state that starts non-zero: its blocks are sharded as given
        return model, sg.optim.Adagrad(model.parameters(), lr_decay=0.01,
                                       initial_accumulator_value=0.1)
    return model, sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_steps(n, zero, opt):
    pairs = [make(opt) for _ in range(n)]
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(STEPS, B, 12)), rng.integers(0, 5, size=(STEPS, B))

    def body(comm):
        model, optimizer = pairs[comm.rank]
        step = sg.distributed.data_parallel_step(model, sg.functional.cross_entropy, optimizer,
                                                 comm, zero=zero)
        losses = [step(x[comm.rank::n], y[comm.rank::n]) for x, y in zip(xs, ys, strict=True)]
        held = step.optimizer_state_bytes()
        step.consolidate()
        return (losses, {k: v.copy() for k, v in model.state_dict().items()},
                optimizer.state_dict(), held, step)

    return run_ranks(n, body, timeout_s=60)


@pytest.mark.parametrize("opt", ["sgd", "adamw", "rmsprop", "adagrad"])
@pytest.mark.parametrize("n", [2, 3])
def test_zero1_step_equals_the_data_parallel_step(n, opt):
    plain, sharded = train_steps(n, 0, opt), train_steps(n, 1, opt)
    whole = plain[0][3]
    for (losses, params, state, _, _), (z_losses, z_params, z_state, held, step) in zip(
            plain, sharded, strict=True):
        np.testing.assert_allclose(z_losses, losses, rtol=1e-12)
        for k in params:
            np.testing.assert_allclose(z_params[k], params[k], rtol=0, atol=1e-12)
        assert set(z_state) == set(state)
        for k in state:     # consolidate() gave back the whole state
            np.testing.assert_allclose(z_state[k], state[k], rtol=0, atol=1e-12)
        assert isinstance(step, sg.distributed.DataParallelStep)
        assert held <= whole / n * 1.05, (held, whole)
        assert [n_.op for n_ in step.graph.nodes].count("reduce_scatter") == 1


def test_the_whole_state_holds_no_memory_between_steps():
    model, opt = make("adamw")
    comm = sg.distributed.init()            # one process: a block is the whole state
    step = sg.distributed.data_parallel_step(model, sg.functional.cross_entropy, opt, comm,
                                             zero=1)
    x, y = np.ones((4, 12)), np.zeros(4, np.int64)
    step(x, y)
    assert all(v.data.strides == (0,) * v.data.ndim for st in opt.state for v in st.values())
    before = {k: v.copy() for k, v in model.state_dict().items()}
    step.to_host()                          # consolidates: the state is whole again
    assert all(v.data.strides != (0,) * v.data.ndim for st in opt.state for v in st.values())
    opt2 = make("adamw")[1]
    opt2.load_state_dict(opt.state_dict())
    step(x, y)                              # and the next step takes its block again
    assert any((before[k] != v).any() for k, v in model.state_dict().items())


def conf(**sets):
    return cfg.load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


@pytest.mark.parametrize("sets,match", [
    ({"parallel.zero": 1, "parallel.pp": 2, "parallel.dp": 1},
     "parallel.zero = 1 shards the optimizer over data-parallel ranks; it runs with "
     "parallel.pp = 1"),
    ({"parallel.zero": 1, "parallel.overlap": True}, "parallel.overlap = true overlaps"),
    ({"parallel.zero": 1, "train.grad_clip": 1.0}, "train.grad_clip needs the norm"),
    ({"parallel.zero": 2}, "parallel.zero = 2: must be <= 1"),
])
def test_what_zero1_does_not_run_with_is_one_config_error(sets, match):
    with pytest.raises(cfg.ConfigError, match=match):
        dp.check_zero(conf(**sets))


def test_train_with_zero1_on_threaded_ranks_matches_plain_dp(tmp_path):
    base = {"model.hidden": [16], "train.epochs": 2, "train.batch_size": 32,
            "train.dtype": "float64", "train.optimizer": "adam", "train.lr": 0.01,
            "data.dataset": "digits", "parallel.dp": 2}

    def run(zero):
        config = conf(**base, **{"parallel.zero": zero})
        return run_ranks(2, lambda comm: train(config, str(tmp_path / f"z{zero}")
                                               if comm.rank == 0 else None, comm),
                         timeout_s=100)

    plain, sharded = run(0), run(1)
    assert sharded[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-10)
    whole = plain[0]["optimizer_state_bytes_per_rank"]
    assert whole == 2 * 8 * sharded[0]["num_params"]          # Adam: two float64 moments
    assert sharded[0]["optimizer_state_bytes_per_rank"] <= whole / 2 * 1.05
    written = json.loads((tmp_path / "z1" / "summary.json").read_text())
    assert written["optimizer_state_bytes_per_rank"] == sharded[0][
        "optimizer_state_bytes_per_rank"]
    # the checkpoint holds the whole optimizer state, equal to plain dp's
    a = safetensors.numpy.load_file(str(tmp_path / "z0" / "checkpoints" / "epoch_2.safetensors"))
    b = safetensors.numpy.load_file(str(tmp_path / "z1" / "checkpoints" / "epoch_2.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-12)


def test_plan_and_graph_show_the_reduce_scatter_and_allgather(tmp_path, capsys):
    from shardgrad import cli

    config = blobs_config(tmp_path, "[model]\nhidden = [16]\n")
    sets = ["--set", "parallel.zero=1", "--set", "parallel.dp=2"]
    capsys.readouterr()
    assert cli.main(["plan", config, *sets]) == 0
    out = capsys.readouterr().out
    assert "zero1 plan: world_size=2" in out and "reduce_scatter" in out and "allgather" in out
    assert cli.main(["graph", config, *sets, "--out", str(tmp_path / "g.dot")]) == 0
    dot = (tmp_path / "g.dot").read_text()
    assert "= reduce_scatter" in dot and "= allgather" in dot
    code, err = cli_main(capsys, "plan", config, *sets, "--set", "train.grad_clip=1.0")
    assert code == 2 and err == ["shardgrad plan: error: train.grad_clip needs the norm of the "
                                 "whole gradient, which no rank holds with parallel.zero = 1: "
                                 "set one of them off"]
    code, err = cli_main(capsys, "plan", config, *sets, "--set", "parallel.pp=2")
    assert code == 2 and err == ["shardgrad plan: error: parallel.zero = 1 shards the optimizer "
                                 "over data-parallel ranks; it runs with parallel.pp = 1 for now"]


def test_simulate_gives_zero1_the_traffic_of_an_allreduce_and_1_dp_of_the_state():
    from shardgrad.runtime.simulate import recommend, simulate

    base = {"model.hidden": [16], "train.batch_size": 32, "train.optimizer": "adam",
            "data.dataset": "digits"}
    plain = simulate(conf(**base), 4, repeats=2)
    zero = simulate(conf(**base, **{"parallel.zero": 1}), 4, repeats=2)
    # reduce_scatter + allgather move what the allreduce moved (its two halves); ZeRO's
    # buffer is padded to a multiple of 4 elements
    assert abs(zero["bytes_sent_per_rank"] - plain["bytes_sent_per_rank"]) <= 3 * 4 * 2
    assert zero["comm_s"] > 0
    whole = plain["optimizer_state_bytes_per_rank"]
    assert zero["optimizer_state_bytes_per_rank"] <= whole / 4 * 1.05
    assert zero["peak_memory_bytes"] < plain["peak_memory_bytes"]
    with pytest.raises(cfg.ConfigError, match="it runs with pp = 1 \\(not --pp 2\\)"):
        simulate(conf(**base, **{"parallel.zero": 1}), 4, pp=2, repeats=1)
    assert {r["pp"] for r in recommend(conf(**base, **{"parallel.zero": 1}), 4,
                                       repeats=1)} == {1}
