"""partition.data_parallel: the bucket plan (order, sizes, placement), and equivalence of the
rewritten step on N threaded ranks with the single-process step, in both modes."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.ir import ShapeError, verify
from shardgrad.graph.trace import trace_step
from shardgrad.ops.registry import REGISTRY
from shardgrad.partition.data_parallel import DataParallel, data_parallel
from shardgrad.partition.plan import graph_hash
from shardgrad.runtime.dp import bound_executor
from shardgrad.runtime.step import compile_step
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
from seeded import float64_seeded  # noqa: E402

pytestmark = pytest.mark.timeout(120)

B, STEPS = 16, 3


def make(seed=0, batchnorm=False, sizes=(12, 16, 16, 5)):
    with float64_seeded(seed):
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(sg.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += ([sg.nn.BatchNorm1d(b)] if batchnorm else []) + [sg.nn.ReLU()]
        model = sg.nn.Sequential(*layers)
    return model, sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def data(steps=STEPS):
    rng = np.random.default_rng(1)
    return rng.normal(size=(steps, B, 12)), rng.integers(0, 5, size=(steps, B))


def step_graph(batch=B, **kw):
    model, opt = make(**kw)
    return trace_step(model, sg.functional.cross_entropy, opt, ((batch, 12), "float64"),
                      ((batch,), "int64"))


def train_on_ranks(world, **dp):
    """Models are built here, not on the threads: parameter init draws from a global RNG."""
    batchnorm, steps = dp.pop("batchnorm", False), dp.pop("steps", STEPS)
    pairs = [make(batchnorm=batchnorm) for _ in range(world)]
    xs, ys = data(steps)

    def body(comm):
        model, opt = pairs[comm.rank]
        step = compile_step(model, sg.functional.cross_entropy, opt,
                            executor=bound_executor(None, comm),
                            transform=DataParallel(world, **dp))
        losses = [step(x[comm.rank::world], y[comm.rank::world]) for x, y in zip(xs, ys,
                                                                                  strict=True)]
        state = {k: v.copy() for k, v in model.state_dict().items()}
        return state, losses, step

    return run_ranks(world, body, timeout_s=60)


@pytest.fixture(scope="module")
def reference():
    model, opt = make()
    step = compile_step(model, sg.functional.cross_entropy, opt)
    xs, ys = data()
    losses = [step(x, y) for x, y in zip(xs, ys, strict=True)]
    return {k: v.copy() for k, v in model.state_dict().items()}, losses


def rel_err(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


def test_buckets_hold_each_averaged_value_once_in_ready_order_under_the_size_cap():
    graph = step_graph()
    plan = data_parallel(graph, 2, bucket_bytes=600)
    names = [k for b in plan.buckets for k in b.names]
    params = graph.meta["params"]
    assert names == ["loss"] + [f"grad/{p}" for p in reversed(params)]
    for b in plan.buckets:
        assert b.nbytes <= 600 or len(b.names) == 1
    reduces = [n for n in plan.graph.nodes if n.op == "allreduce"]
    assert len(reduces) == len(plan.buckets) and all(n.attrs["inplace"] for n in reduces)
    verify(plan.graph, known_ops=REGISTRY.__contains__)
    assert "bucket 0: f64" in str(plan) and "world_size=2" in str(plan)
    one = data_parallel(graph, 2)
    assert len(one.buckets) == 1 and one.buckets[0].nbytes == 8 * (1 + sum(
        graph.outputs[f"grad/{p}"].size for p in params))


def test_a_bucket_is_issued_as_soon_as_its_last_gradient_is_ready():
    graph = step_graph()
    plan = data_parallel(graph, 2, bucket_bytes=600)
    nodes = plan.graph.nodes
    pos = {n.id: i for i, n in enumerate(nodes)}
    packs = [n for n in nodes if n.op == "pack"]
    reduces = [n for n in nodes if n.op == "allreduce"]
    assert [r.inputs[0] for r in reduces] == packs
    for p, r in zip(packs, reduces, strict=True):
        ready = max(pos[x.id] for x in p.inputs)
        assert pos[p.id] == ready + 1 and pos[r.id] == ready + 2
    grads = [pos[x.id] for p in packs for x in p.inputs]
    assert pos[reduces[0].id] < max(grads)  # the last layer's bucket goes before backward ends
    updates = [pos[plan.graph.outputs[f"param/{p}"].id] for p in graph.meta["params"]]
    assert pos[reduces[-1].id] < min(updates)
    # nn.Linear's weight gradient is built as the product g^T X (ops.linalg's matmul VJP for
    # y = W^T), not a transpose of X^T g, so it is packed with a plain copy
    assert graph.outputs["grad/0.weight"].op == "matmul"
    assert all(x.op != "transpose" for p in packs for x in p.inputs)
    assert plan.graph.outputs["grad/0.weight"].op == "unpack"


def test_overlap_starts_when_ready_and_waits_just_before_the_first_update():
    graph = step_graph()
    plan = data_parallel(graph, 2, bucket_bytes=600, overlap=True)
    nodes = plan.graph.nodes
    pos = {n.id: i for i, n in enumerate(nodes)}
    grads = [pos[x.id] for n in nodes if n.op == "pack" for x in n.inputs]
    starts = [pos[n.id] for n in nodes if n.op == "allreduce_start"]
    waits = [pos[n.id] for n in nodes if n.op == "allreduce_wait"]
    assert len(starts) == len(waits) == len(plan.buckets)
    assert starts[0] < max(grads) < min(waits)
    for w in (n for n in nodes if n.op == "allreduce_wait"):  # waited for at its first reader
        readers = [pos[u.id] for u in nodes if any(x.inputs and x.inputs[0] is w
                                                   for x in u.inputs)]
        assert min(readers) - pos[w.id] <= 4


@pytest.mark.parametrize("world,options", [(2, {}), (4, {}), (2, {"bucket_bytes": 600}),
                                           (4, {"overlap": True, "bucket_bytes": 600})])
def test_data_parallel_steps_match_the_single_process_run(reference, world, options):
    ref_state, ref_losses = reference
    results = train_on_ranks(world, **options)
    for state, losses, _ in results:
        assert rel_err(state, ref_state) < 1e-12
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)  # the global-batch loss
    for state, _, _ in results[1:]:
        for k in state:
            np.testing.assert_array_equal(state[k], results[0][0][k])


def test_deterministic_mode_is_bit_identical_for_any_world_size(reference):
    states = {w: train_on_ranks(w, deterministic=True, chunks=4)[0][0] for w in (1, 2, 4)}
    for w in (2, 4):
        for k in states[1]:
            np.testing.assert_array_equal(states[w][k], states[1][k])
    assert rel_err(states[1], reference[0]) < 1e-12


@pytest.mark.parametrize("world", [2, 4])
def test_batch_norm_is_synchronized_so_ranks_match_the_single_process_run(world):
    model, opt = make(batchnorm=True)
    step = compile_step(model, sg.functional.cross_entropy, opt)
    for x, y in zip(*data(), strict=True):
        step(x, y)
    ref = model.state_dict()
    results = train_on_ranks(world, batchnorm=True)
    for state, _, dp_step in results:
        assert rel_err(state, ref) < 1e-12          # running statistics included
        assert dp_step.graph.meta["batch_stats_synced"]
        assert any(n.op == "allreduce" and n.shape == (1, 16) for n in dp_step.graph.nodes)


def test_unsynchronized_batch_statistics_are_averaged_over_ranks():
    model, opt = make(batchnorm=True)
    x, y = data(1)
    compile_step(model, sg.functional.cross_entropy, opt)(x[0], y[0])
    # the first norm layer sees the same inputs either way (later ones see locally normalized
    # activations), so its running mean is the global one
    ref = {"1.running_mean": model.state_dict()["1.running_mean"]}
    state = train_on_ranks(2, batchnorm=True, steps=1, sync_batchnorm=False)[0][0]
    assert rel_err({k: state[k] for k in ref}, ref) < 1e-12  # the mean of the local means
    plan = data_parallel(step_graph(batchnorm=True), 2)
    assert any(k.startswith("state/") and "running_mean" in k for k in plan.buckets[0].names)


def test_one_rank_and_default_mode_leaves_the_graph_alone():
    graph = step_graph()
    assert data_parallel(graph, 1).graph is graph


def test_the_graph_hash_is_structural():
    a, b, c = step_graph(), step_graph(seed=3), step_graph(batch=8)
    assert graph_hash(a) == graph_hash(b) != graph_hash(c)
    assert graph_hash(data_parallel(a, 2).graph) == graph_hash(data_parallel(b, 2).graph)


def test_plan_errors_name_what_is_wrong():
    graph = step_graph()
    with pytest.raises(ValueError, match="chunks \\(3\\) to be a positive multiple"):
        data_parallel(graph, 2, deterministic=True, chunks=3)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        data_parallel(graph, 0)
    forward = sg.Graph({"loss": graph.outputs["loss"]}, meta={"params": ["0.weight"]})
    with pytest.raises(ShapeError, match="missing \\['grad/0.weight'\\]"):
        data_parallel(forward, 2)
