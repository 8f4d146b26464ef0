"""partition.pipeline without processes: the cost-balanced cut is optimal (checked against
brute force), the mechanism's programs are well formed, skip connections and shared
parameters are sent straight to the stages that use them, and bad requests fail clearly."""

import itertools
import re

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.ir import verify
from shardgrad.graph.trace import trace_step
from shardgrad.ops import REGISTRY
from shardgrad.partition.pipeline import (
    BANDWIDTH,
    PartitionError,
    Parts,
    balanced_starts,
    cut,
    pipeline,
)

DT = "float64"


@pytest.fixture(autouse=True)
def float64():
    saved = sg.get_default_dtype()
    sg.set_default_dtype(DT)
    yield
    sg.set_default_dtype(saved)


def mse(out, y):
    return ((out - y) ** 2).mean()


def mlp_step(widths=(6, 8, 8, 8, 3), batch=4, optimizer=sg.optim.SGD, **opt):
    sg.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [sg.nn.Linear(a, b), sg.nn.Tanh()]
    model = sg.nn.Sequential(*layers[:-1])
    opt = optimizer(model.parameters(), lr=0.1, **opt)
    return trace_step(model, mse, opt, ((batch, widths[0]), DT), ((batch, widths[-1]), DT))


class Skip(sg.nn.Module):
    """h0 feeds the last layer directly: a skip connection across the middle stages."""

    def __init__(self):
        super().__init__()
        self.a, self.b = sg.nn.Linear(5, 6), sg.nn.Linear(6, 6)
        self.c, self.d = sg.nn.Linear(6, 6), sg.nn.Linear(6, 2)

    def forward(self, x):
        h0 = self.a(x).tanh()
        h2 = self.c(self.b(h0).tanh()).tanh()
        return self.d(h2 + h0)


def skip_step():
    sg.manual_seed(1)
    model = Skip()
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return trace_step(model, mse, opt, ((4, 5), DT), ((4, 2), DT))


# ---- the dynamic programme ---------------------------------------------------------------


def brute_force(n, pp, cost):
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), pp - 1):
        bounds = (0,) + cuts + (n,)
        best = min(best, max(cost(bounds[k], bounds[k + 1] - 1) for k in range(pp)))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_balanced_starts_is_optimal_on_random_costs(seed):
    rng = np.random.default_rng(seed)
    n, pp = int(rng.integers(1, 10)), int(rng.integers(1, 5))
    pp = min(pp, n)
    w = rng.uniform(0, 10, n)
    cut_cost = rng.uniform(0, 20, n + 1) * (rng.uniform(size=n + 1) < 0.5)
    cost = lambda i, j: float(w[i:j + 1].sum() + cut_cost[i] + cut_cost[j + 1])
    starts = balanced_starts(n, pp, cost)
    bounds = starts + [n]
    got = max(cost(bounds[k], bounds[k + 1] - 1) for k in range(pp))
    assert len(starts) == pp and starts[0] == 0
    assert all(a < b for a, b in itertools.pairwise(bounds))
    assert got == pytest.approx(brute_force(n, pp, cost))


def stage_seconds(plan, times):
    """An independent stage cost from what the mechanism built: node times plus the bytes of
    the distinct values each stage receives and sends, doubled when a gradient comes back."""
    out = []
    for st in plan.stages:
        sent = {t.name: t for t in plan.transfers if t.src == st.index}
        got = {t.name: t for t in plan.transfers if t.dst == st.index}
        nbytes = sum(t.nbytes * (2 if t.grad else 1) for t in [*sent.values(), *got.values()])
        out.append(sum(times[n.id] for n in st.nodes) + nbytes / BANDWIDTH)
    return out


@pytest.mark.parametrize("pp", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_cost_balance_is_optimal_on_a_graph_with_known_costs(pp, seed):
    graph = mlp_step(widths=(3, 4, 4, 2), batch=2)
    parts = Parts.of(graph)
    rng = np.random.default_rng(seed)
    # known node times, comparable to the transfer costs so the cuts matter
    times = {n.id: float(rng.uniform(0, 4e-8)) for n in parts.compute}
    plan = pipeline(graph, pp, "profile", node_times=times)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(parts.compute)), pp - 1):
        starts = (0,) + cuts
        stage_of = {n.id: sum(i >= s for s in starts[1:]) for i, n in enumerate(parts.compute)}
        if any(stage_of[x.id] > stage_of[n.id] for n in parts.compute for x in n.inputs
               if x.inputs):
            continue
        best = min(best, max(stage_seconds(cut(graph, pp, stage_of), times)))
    assert max(stage_seconds(plan, times)) == pytest.approx(best, rel=1e-9)


def test_cost_balance_splits_equal_layers_evenly():
    plan = pipeline(mlp_step(widths=(64,) * 9, batch=32), 4)
    per_stage = [sum(n.op == "matmul" for n in st.nodes) for st in plan.stages]
    assert per_stage == [2, 2, 2, 2]
    assert plan.stage_of[plan.graph.outputs["loss"].id] == 3


# ---- the mechanism -------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_programs_are_well_formed_and_params_live_with_their_stage(schedule):
    graph = mlp_step(optimizer=sg.optim.Adam)
    plan = pipeline(graph, 3, micro_batches=4, schedule=schedule)
    owner = plan.owner()
    assert sorted(owner) == sorted(graph.meta["params"] + graph.meta["states"])
    for st in plan.stages:
        for g in (st.forward, st.backward, st.update, plan.shard(st.index)):
            verify(g, known_ops=REGISTRY.__contains__)
        for p in st.params:
            assert {f"grad/{p}", f"param/{p}", f"state/optim/{p}/exp_avg"} <= set(st.update.outputs)
            assert f"grad/{p}" in st.backward.outputs
        assert {n.name for n in st.forward.params} == set(st.params)
    assert "loss" in plan.stages[-1].forward.outputs
    assert [(t.src, t.dst) for t in plan.transfers] == [(0, 1), (1, 2)]
    shard = plan.shard(1)
    assert [n.attrs["source"] for n in shard.nodes if n.op == "recv"] == [0, 2]
    assert sorted(n.attrs["dest"] for n in shard.nodes if n.op == "isend") == [0, 2]
    text = str(plan)
    assert "stage 2:" in text and schedule in text and "F0" in text


@pytest.mark.parametrize("dp", [1, 2])
def test_rank_programs_hold_the_communication_as_nodes(dp):
    """Every message of a stage's schedule is a recv or isend graph of its rank program
    (group "pp", the schedule's tag and peer); with dp > 1 the gradient sum over replicas is
    an allreduce node (group "dp") feeding the update; the shard joins micro-batch 0's."""
    plan = pipeline(mlp_step(batch=2), 3, micro_batches=4, dp=dp)
    for s in range(plan.pp):
        prog = plan.program(s)
        assert prog.actions is plan.schedule.actions[s]
        for a in prog.actions:
            g = prog.graphs[prog.action_graph(a)]
            verify(g, known_ops=REGISTRY.__contains__)
            if a.op in ("SEND", "RECV"):
                (node,) = [n for n in g.nodes if n.inputs and n.op != "const"]
                assert node.op == ("isend" if a.op == "SEND" else "recv")
                assert node.attrs["tag"] == a.msg.tag and node.attrs["group"] == "pp"
                peer = node.attrs["dest" if a.op == "SEND" else "source"]
                assert peer == (a.msg.dst if a.op == "SEND" else a.msg.src)
        reduce = prog.graphs.get("reduce")
        allreduces = [n for n in (reduce.nodes if reduce else []) if n.op == "allreduce"]
        assert [n.attrs["group"] for n in allreduces] == ["dp"] * (dp > 1)
        if dp > 1:
            assert set(reduce.outputs) == {f"grad/{p}" for p in plan.stages[s].params}
        comm = lambda nodes: sorted((n.op, n.attrs.get("tag", -1), n.attrs["group"])
                                    for n in nodes if n.op in ("isend", "recv", "allreduce"))
        # the step's loss: the loss stage's micro-batch mean, summed over "pp" (the other
        # stages add 0) and averaged over "dp", on every stage
        loss = prog.graphs["loss"]
        verify(loss, known_ops=REGISTRY.__contains__)
        assert [n.attrs["group"] for n in loss.nodes if n.op == "allreduce"] == \
            ["pp"] + ["dp"] * (dp > 1)
        here = s == plan.loss_stage
        assert sorted(n.name for n in loss.inputs) == (
            [f"loss/{mb}" for mb in range(4)] if here else [])
        assert plan.shard(s).outputs["loss"].op == ("div" if dp > 1 else "allreduce")
        first = [prog.graphs[prog.action_graph(a)] for a in prog.actions
                 if a.mb == 0 and a.op in ("SEND", "RECV")] + ([reduce] if reduce else []) + [
                     loss]
        assert comm(plan.shard(s).nodes) == comm(n for g in first for n in g.nodes)
    assert "rank program:" in str(plan)


def test_skip_connection_is_sent_straight_to_its_stage():
    graph = skip_step()
    names = {n.name: n for n in graph.params}
    plan = pipeline(graph, 3, ["b.weight", "c.weight"], micro_batches=2)
    pairs = sorted((t.src, t.dst) for t in plan.transfers)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    skip = [t for t in plan.transfers if (t.src, t.dst) == (0, 2)][0]
    # stage 0 gets the skip's gradient from stage 2 directly and adds it to stage 1's
    assert {n.name for n in plan.stages[0].backward.inputs if n.name.startswith("gact/")} == {
        f"gact/{skip.name}/2", f"gact/{[t for t in plan.transfers if t.dst == 1][0].name}/1"}
    assert plan.owner()["a.weight"] == 0 and plan.owner()["d.weight"] == 2
    assert names["d.weight"].shape == (2, 6)


def test_a_parameter_used_by_two_stages_is_sent_and_its_gradient_summed_at_home():
    class Tied(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = sg.nn.Linear(4, 4), sg.nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x).tanh() @ self.a.weight).tanh()

    sg.manual_seed(2)
    model = Tied()
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    graph = trace_step(model, mse, opt, ((3, 4), DT), ((3, 4), DT))
    names = graph.names()
    second_use = next(n for n in graph.nodes if n.op == "matmul"
                      and any(x.name == "a.weight" for x in n.inputs))
    plan = pipeline(graph, 2, [names[second_use.id]])
    assert ("a.weight", 0, 1) in [(t.name, t.src, t.dst) for t in plan.transfers]
    assert plan.owner()["a.weight"] == 0
    assert "gact/a.weight/1" in {n.name for n in plan.stages[0].backward.inputs}


# ---- bad requests ---------------------------------------------------------------------------


def test_impossible_requests_fail_clearly():
    graph = mlp_step(widths=(3, 2), batch=2)
    n = len(Parts.of(graph).compute)
    with pytest.raises(PartitionError, match=f"cannot cut {n} forward nodes into {n + 1} stages"):
        pipeline(graph, n + 1)
    with pytest.raises(PartitionError, match="pp must be an integer >= 1, got 0"):
        pipeline(graph, 0)
    with pytest.raises(PartitionError, match="pp must be an integer >= 1, got -2"):
        pipeline(graph, -2)
    with pytest.raises(PartitionError, match="split point '%999' is not a node of the graph"):
        pipeline(graph, 2, ["%999"])
    with pytest.raises(PartitionError, match="split point 'fc9.weight' is not a node"):
        pipeline(graph, 2, ["fc9.weight"])
    backward = graph.names()[graph.outputs["grad/0.weight"].id]
    with pytest.raises(PartitionError, match=f"split point {backward!r} is not a forward node"):
        pipeline(graph, 2, [backward])
    with pytest.raises(PartitionError, match="3 stages need 2 split points, got 1"):
        pipeline(graph, 3, ["%2"])
    with pytest.raises(PartitionError, match="does not come after"):
        pipeline(graph, 3, ["%3", "%1"])
    with pytest.raises(PartitionError, match="micro_batches must be an integer >= 1"):
        pipeline(graph, 2, micro_batches=0)
    with pytest.raises(PartitionError, match="unknown schedule 'interleaved'"):
        pipeline(graph, 2, schedule="interleaved")
    with pytest.raises(PartitionError, match="unknown balance 'params'"):
        pipeline(graph, 2, "params")
    with pytest.raises(PartitionError, match="needs measured node_times"):
        pipeline(graph, 2, "profile")
    parts = Parts.of(graph)
    backwards = {n.id: len(parts.compute) - 1 - i for i, n in enumerate(parts.compute)}
    with pytest.raises(PartitionError, match="only flow to the same or a later stage"):
        cut(graph, 2, lambda node: min(backwards[node.id], 1))
    with pytest.raises(PartitionError, match=r"stages \[1\] get no forward node"):
        cut(graph, 2, lambda node: 0)


def test_batch_norm_buffers_are_updated_on_the_stage_that_computes_them():
    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(3, 4), sg.nn.Tanh(), sg.nn.Linear(4, 4),
                             sg.nn.BatchNorm1d(4), sg.nn.Linear(4, 2))
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    graph = trace_step(model, mse, opt, ((4, 3), DT), ((4, 2), DT))
    plan = pipeline(graph, 2, ["2.weight"], micro_batches=2)
    assert {"state/3.running_mean", "state/3.running_var"} <= set(plan.stages[1].forward.outputs)
    assert plan.owner()["3.running_mean"] == 1


def test_dot_colours_stages_and_draws_each_send_to_its_recv():
    from shardgrad.partition.pipeline import STAGE_COLOURS

    plan = pipeline(skip_step(), 3, ["b.weight", "c.weight"], micro_batches=2)
    src = plan.to_dot().source
    red = [line for line in src.splitlines() if " color=red " in line]
    pairs = sum(2 if t.grad else 1 for t in plan.transfers)
    assert pairs == 6 and len(red) == pairs
    labels = dict(re.findall(r'^\s*(n\d+) \[label="(\S+) = (?:\S+)', src, re.M))
    for line in red:
        send, recv = re.match(r"\s*(n\d+) -> (n\d+)", line).groups()
        assert send in labels and recv in labels
    for s in range(3):
        assert f'fillcolor="{STAGE_COLOURS[s]}"' in src and f"stage {s}" in src


@pytest.mark.parametrize("dp, micro_batches", [(1, 4), (2, 2), (1, 1)])
def test_every_node_a_stage_runs_has_the_name_the_drawing_shows(dp, micro_batches):
    """``node_names`` names each computing node of every graph of a rank program (later
    micro-batches' receives and sends as micro-batch 0's) by a box ``to_dot`` draws with the
    same op: a node on a stage's timeline is found on the plan's drawing."""
    plan = pipeline(mlp_step(batch=4), 2, micro_batches=micro_batches, dp=dp)
    src = plan.to_dot().source
    drawn = set(re.findall(r'label="(s\d+:%\d+) = (\w+)', src))
    assert len({name for name, _ in drawn}) == len(drawn)       # one box a name
    for s in range(plan.pp):
        prog, names = plan.program(s), plan.node_names(s)
        assert set(names) == set(prog.graphs)
        for key, g in prog.graphs.items():
            if key == "accumulate" and micro_batches == 1:
                continue                                        # never runs: not drawn
            for n in g.nodes:
                if n.inputs:
                    assert (names[key][n.id], n.op) in drawn, (key, n)
                    assert names[key][n.id].startswith(f"s{s}:")
    assert {op for _, op in drawn} >= {"matmul", "isend", "recv"}
