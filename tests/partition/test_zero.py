"""partition.zero (ZeRO stage 1): the plan's communication nodes and state blocks, equivalence
of the sharded update on N threaded ranks with plain data parallelism (SGD momentum, Adam,
AdamW; uneven blocks), deterministic mode's identical bits, and the updates it refuses."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.ir import ShapeError, verify
from shardgrad.graph.trace import trace_step
from shardgrad.ops import collective as C
from shardgrad.partition.data_parallel import data_parallel
from shardgrad.partition.zero import Layout, zero1
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
from seeded import mlp  # noqa: E402

pytestmark = pytest.mark.timeout(120)

B = 12
OPTIMIZERS = {
    "sgd": lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: sg.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    "adamw": lambda ps: sg.optim.AdamW(ps, lr=0.01),
}


def step_graph(n, opt="sgd", clip=None, chunks=None):
    model = mlp(12, 16, 5)
    optimizer = OPTIMIZERS[opt](model.parameters())
    optimizer.max_grad_norm = clip
    rows = B // (chunks or n)
    graph = trace_step(model, sg.functional.cross_entropy, optimizer, ((rows, 12), "float64"),
                       ((rows,), "int64"))
    return graph, {k: v.numpy().copy() for k, v in model.named_parameters()}


def run_steps(n, plan, params, keys, steps=3, zero=False):
    """``steps`` steps of ``plan``'s graph on ``n`` threaded ranks, feeding back its params and
    state; per rank: (params, state)."""
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(steps, B, 12)), rng.integers(0, 5, size=(steps, B))
    layout = Layout.of(plan.graph.meta["zero"]) if zero else None

    def body(comm):
        p = dict(params)
        state = ({f"optim/zero/{k}": np.zeros(layout.shard) for k in keys} if zero else
                 {f"optim/{q}/{k}": np.zeros_like(v) for q, v in params.items() for k in keys})
        exe = Interpreter(plan.graph)
        for i in range(steps):
            feeds = {"x": xs[i][comm.rank::n], "y": ys[i][comm.rank::n], "lr": np.asarray(0.1),
                     "t": np.asarray(i + 1.0), "step": np.asarray(i + 1), **p, **state}
            with C.bind(comm):
                out = exe.run(feeds)
            p = {q: out[f"param/{q}"] for q in params}
            state = {k: out[f"state/{k}"] for k in state}
        return p, state

    return run_ranks(n, body, timeout_s=60)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n", [2, 3, 4])
def test_zero1_equals_data_parallel(n, opt):
    graph, params = step_graph(n, opt)
    plan = zero1(graph, n)
    verify(plan.graph)
    layout = Layout.of(plan.graph.meta["zero"])
    keys = layout.keys
    want = run_steps(n, data_parallel(graph, n), params, keys)
    got = run_steps(n, plan, params, keys, zero=True)
    numel = sum(v.size for v in params.values())
    assert layout.numel == numel and layout.shard == -(-numel // n)   # 293: uneven at 2, 3, 4
    for (p_want, _), (p_got, _) in zip(want, got, strict=True):
        for q in params:
            np.testing.assert_allclose(p_got[q], p_want[q], rtol=0, atol=1e-12)
    # rank r's block of the state is block r of the flattened per-parameter state
    for k in keys:
        whole = np.concatenate([want[0][1][f"optim/{q}/{k}"].ravel() for q in params])
        blocks = np.concatenate([got[r][1][f"optim/zero/{k}"] for r in range(n)])
        np.testing.assert_allclose(blocks[:numel], whole, rtol=0, atol=1e-12)
        assert not blocks[numel:].any()        # the padding stays zero


def test_the_plan_reduce_scatters_gradients_and_all_gathers_parameters():
    graph, params = step_graph(2, "adam")
    plan = zero1(graph, 2)
    ops = [n.op for n in plan.graph.nodes]
    assert ops.count("reduce_scatter") == 1 and ops.count("allgather") == 1
    assert ops.count("allreduce") == 1            # the loss, in its bucket
    states = {n.name: n.shape for n in plan.graph.states}
    assert states == {"optim/zero/exp_avg": (147,), "optim/zero/exp_avg_sq": (147,)}
    assert not [k for k in plan.graph.outputs if k.startswith("grad/")]
    assert set(plan.graph.outputs) >= {f"param/{q}" for q in params}
    text = str(plan)
    assert "zero1 plan: world_size=2" in text and "reduce_scatter" in text
    assert "allgather" in text and "optimizer state" in text


def test_deterministic_zero1_gives_the_bits_of_deterministic_data_parallel():
    for n in (1, 2, 4):
        graph, params = step_graph(n, "adam", chunks=4)
        keys = ("exp_avg", "exp_avg_sq")
        want = run_steps(n, data_parallel(graph, n, deterministic=True, chunks=4), params, keys)
        got = run_steps(n, zero1(graph, n, deterministic=True, chunks=4), params, keys,
                        zero=True)
        for q in params:
            assert got[0][0][q].tobytes() == want[0][0][q].tobytes(), (n, q)
        if n == 1:
            ref = got[0][0]
        for q in params:
            assert got[0][0][q].tobytes() == ref[q].tobytes(), (n, q)


def test_an_update_that_reads_every_gradient_is_refused():
    graph, _ = step_graph(2, "sgd", clip=1.0)
    with pytest.raises(ShapeError, match="gradient clipping and fp16 loss scaling are not "
                                         "supported with zero=1"):
        zero1(graph, 2)


def test_zero1_plan_prints_its_layout():
    graph, _ = step_graph(3, "adam")
    assert str(zero1(graph, 3)).splitlines()[-3:] == [   # 293 elements padded to 3 x 98
        "  gradients: f64 2,352 B (293 elements of 4 parameters), reduce_scatter: 784 B a rank",
        "  update: each rank its block of 98 elements; optimizer state 1,568 B a rank "
        "(exp_avg, exp_avg_sq)",
        "  allgather: 784 B from each rank, 2,352 B of parameters"]
    assert str(zero1(graph, 3, deterministic=True, chunks=3)).splitlines()[-3] == (
        "  gradients: f64 2,352 B (293 elements of 4 parameters), summed along the fixed tree, "
        "each rank keeps its block (shard): 784 B a rank")
