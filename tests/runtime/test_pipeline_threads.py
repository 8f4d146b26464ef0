"""Pipeline execution in one process, one thread per rank: the pipelined training steps end
with the same parameters as the local reference run (float64, 1e-9 relative), for the
digits MLP and CNN, pp = 2 and 4, dp = 2 x pp = 2, GPipe and 1F1B, with and without
gradient clipping (the global norm over the stages); plus the runner's memory and loss
bookkeeping."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.trace import trace_step
from shardgrad.partition.pipeline import pipeline
from shardgrad.runtime.pipeline import StageRunner
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_cases as cases  # noqa: E402

REFERENCE: dict[str, dict] = {}


def reference(kind):
    if kind not in REFERENCE:
        REFERENCE[kind] = cases.reference(kind)
    return REFERENCE[kind]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("kind,dp,pp,m", [
    ("mlp", 1, 2, 4), ("cnn", 1, 2, 4), ("mlp4", 1, 4, 2), ("mlp4", 1, 4, 8),
    ("mlp", 2, 2, 2), ("cnn", 2, 2, 2), ("mlpclip", 1, 2, 4), ("mlp4clip", 1, 4, 2),
    ("cnnclip", 2, 2, 2)])
def test_pipelined_steps_equal_the_local_run(kind, dp, pp, m, schedule):
    finals = run_ranks(dp * pp, lambda comm: cases.pipelined(comm, kind, dp, pp, m, schedule),
                       timeout_s=30)
    want = reference(kind)
    for got in finals:
        assert cases.max_rel_err(got, want) < 1e-9


@pytest.mark.timeout(60)
def test_stages_run_by_the_compiled_executor_equal_the_local_run():
    # GPipe keeps all 4 micro-batches alive for backward: buffers the compiled Program
    # reuses on its next runs must have been copied.
    from shardgrad.runtime.compiled import Program

    finals = run_ranks(2, lambda comm: cases.pipelined(comm, "cnn", 1, 2, 4, "gpipe", Program),
                       timeout_s=30)
    for got in finals:
        assert cases.max_rel_err(got, reference("cnn")) < 1e-9


@pytest.mark.timeout(60)
def test_profiled_balance_is_measured_once_and_shared():
    # rank 0 times the kernels and broadcasts: every rank cuts at the same nodes
    finals = run_ranks(4, lambda comm: cases.pipelined(comm, "mlp4", 1, 4, 4, "1f1b",
                                                       balance="profile"), timeout_s=30)
    for got in finals:
        assert cases.max_rel_err(got, reference("mlp4")) < 1e-9


def _deep_step(m, pp=4, width=16, batch=16):
    sg.set_default_dtype("float64")
    sg.manual_seed(0)
    layers = []
    for _ in range(pp):
        layers += [sg.nn.Linear(width, width), sg.nn.Tanh()]
    model = sg.nn.Sequential(*layers)
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    mse = lambda out, y: ((out - y) ** 2).mean()
    graph = trace_step(model, mse, opt, ((batch // m, width), "float64"),
                       ((batch // m, width), "float64"))
    sg.set_default_dtype("float32")
    state = {n: p.numpy() for n, p in model.named_parameters()}
    return graph, state


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schedule,peaks", [("gpipe", [8, 8, 8, 8]), ("1f1b", [4, 3, 2, 1])])
def test_activations_alive_per_stage(schedule, peaks):
    m, pp = 8, 4
    graph, state = _deep_step(m, pp)
    plan = pipeline(graph, pp, micro_batches=m, schedule=schedule)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))

    def rank(comm):
        st = plan.stages[comm.rank]
        runner = StageRunner(plan, comm.rank, comm)
        loss, out = runner.step({k: state[k] for k in st.params}, x, y, lr=np.float64(0.1))
        return loss, runner.stats

    results = run_ranks(pp, rank, timeout_s=30)
    assert [s.peak_live for _, s in results] == peaks
    # the loss program gives every stage the loss stage's mean, bit for bit
    assert len({float(loss) for loss, _ in results}) == 1
    assert np.isfinite(float(results[-1][0]))
    assert all(len(s.spans) == 2 * m for _, s in results)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused():
    graph, state = _deep_step(4, pp=2)
    plan = pipeline(graph, 2, micro_batches=4)

    def rank(comm):
        runner = StageRunner(plan, comm.rank, comm)
        runner.step({k: state[k] for k in plan.stages[comm.rank].params},
                    np.zeros((10, 16)), np.zeros((10, 16)), lr=np.float64(0.1))

    with pytest.raises(RuntimeError, match="cannot be cut into 4 equal micro-batches"):
        run_ranks(2, rank, timeout_s=10)


def test_a_failing_stage_names_its_stage_and_rank_and_the_others_stop():
    graph, state = _deep_step(2, pp=2)
    plan = pipeline(graph, 2, ["2.weight"], micro_batches=2)

    def rank(comm):
        mine = {k: state[k] for k in plan.stages[comm.rank].params}
        if comm.rank == 1:
            mine["2.weight"] = mine["2.weight"][:, :3]
        StageRunner(plan, comm.rank, comm).step(mine, np.zeros((16, 16)), np.zeros((16, 16)),
                                                lr=np.float64(0.1))

    # stage 0 waits for a gradient that never comes: its receive times out (3 s) instead of
    # hanging, and the report is stage 1's error
    with pytest.raises(RuntimeError, match=r"rank 1 failed: ExecutionError: pipeline stage 1, "
                       r"forward of micro-batch 0, on rank 1: param '2.weight' expects "
                       r"f64\[16,16\], got f64\[16,3\]"):
        run_ranks(2, rank, timeout_s=3)


@pytest.mark.timeout(60)
def test_batch_norm_statistics_are_per_micro_batch_and_their_updates_averaged():
    # one micro-batch: the local run exactly; four: BatchNorm normalises each micro-batch
    # by its own statistics (parameters differ), and the running mean, the average of the
    # micro-batches' updates, is the full batch's (equal-sized micro-batches)
    finals = run_ranks(2, lambda comm: cases.pipelined(comm, "mlpbn", 1, 2, 1, "1f1b"),
                       timeout_s=30)
    assert cases.max_rel_err(finals[0], reference("mlpbn")) < 1e-9
    one = run_ranks(2, lambda comm: cases.pipelined(comm, "mlpbn", 1, 2, 4, "gpipe", steps=1),
                    timeout_s=30)[0]
    want = cases.reference("mlpbn", steps=1)
    assert np.allclose(one["1.running_mean"], want["1.running_mean"], rtol=1e-12, atol=0)
    assert cases.max_rel_err(one, want) > 1e-6


@pytest.mark.timeout(60)
def test_clipping_with_a_stage_that_holds_no_parameters():
    # stage 1 is the tanh alone: no gradients of its own, yet it joins the norm's allreduce
    model, opt, _ = cases.build("mlpclip")
    graph = trace_step(model, sg.nn.functional.cross_entropy, opt,
                       ((cases.BATCH // 2, 64), "float64"), ((cases.BATCH // 2,), "int64"))
    tanh = next(graph.names()[n.id] for n in graph.nodes if n.op == "tanh")
    split = [tanh, "2.weight"]
    assert [s.params for s in pipeline(graph, 3, split, 2).stages][1] == []
    finals = run_ranks(3, lambda comm: cases.pipelined(comm, "mlpclip", 1, 3, 2, "1f1b",
                                                       balance=split), timeout_s=30)
    for got in finals:
        assert cases.max_rel_err(got, reference("mlpclip")) < 1e-9
