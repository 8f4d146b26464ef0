"""Graph passes: dce, cse, fold_constants, simplify and fusion_groups. Every rewrite is checked
to leave its input untouched and the reference interpreter's results unchanged."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph, Node, const, leaf, verify
from shardgrad.ops import elementwise as E
from shardgrad.ops import reduce as R
from shardgrad.ops.registry import REGISTRY, OpDef, apply, is_elementwise
from shardgrad.runtime.interpreter import Interpreter

sys.path.insert(0, str(Path(__file__).parent))
from graph_cases import feeds_for, mlp_step, random_graphs  # noqa: E402


def assert_same_results(g1, g2, feeds, exact=True):
    r1, r2 = Interpreter(g1).run(feeds), Interpreter(g2).run(feeds)
    assert r1.keys() == r2.keys()
    for k in r1:
        if exact:
            np.testing.assert_array_equal(r2[k], r1[k], err_msg=k)
        else:
            np.testing.assert_allclose(r2[k], r1[k], rtol=1e-6, err_msg=k)


def snapshot(graph):
    return str(graph), list(graph.nodes), dict(graph.outputs)


# ---- dce -----------------------------------------------------------------------------------

def test_dce_drops_unneeded_nodes_and_keeps_order():
    x = leaf("input", (3,), "float32", name="x")
    unused = leaf("input", (3,), "float32", name="unused")
    dead = E.exp(x) + unused
    y = E.tanh(x) * 2.0
    g = Graph({"y": y}, nodes=sorted([x, unused, dead.inputs[0], dead, y, y.inputs[0],
                                      y.inputs[1]], key=lambda n: n.id))
    before = snapshot(g)
    out = passes.dce(g)
    assert snapshot(g) == before
    assert [n.op for n in out.nodes] == ["input", "tanh", "const", "mul"]
    assert unused not in out.nodes and dead not in out.nodes
    verify(out)


# ---- cse -----------------------------------------------------------------------------------

def test_cse_merges_same_op_inputs_and_attrs():
    x = leaf("input", (2, 3), "float32", name="x")
    a, b = x * 2.0, x * 2.0               # equal consts made separately, equal products
    s0, s1 = R.sum(a + b, axis=0), R.sum(a + b, axis=1)   # different attrs stay apart
    g = Graph({"s0": s0, "s1": s1})
    before = snapshot(g)
    out = passes.cse(g)
    assert snapshot(g) == before
    assert sum(n.op == "mul" for n in out.nodes) == 1
    assert sum(n.op == "const" for n in out.nodes) == 1
    assert sum(n.op == "add" for n in out.nodes) == 1
    assert sum(n.op == "sum" for n in out.nodes) == 2
    assert_same_results(g, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_cse_compares_constants_by_dtype_shape_and_bytes():
    c = [const(0.0, "float32"), const(-0.0, "float32"), const(0.0, "float64"),
         const(np.zeros(1, np.float32)), const(0.0, "float32")]
    g = Graph({f"c{i}": n for i, n in enumerate(c)})
    out = passes.cse(g)
    assert out.outputs["c4"] is out.outputs["c0"]
    assert len({id(n) for n in out.outputs.values()}) == 4


def test_cse_merges_equal_leaves_but_never_effectful_ops(monkeypatch):
    x1 = leaf("input", (3,), "float32", name="x")
    x2 = leaf("input", (3,), "float32", name="x")
    monkeypatch.setitem(REGISTRY, "test_noise", OpDef("test_noise", infer=lambda x: x,
                                                      forward=lambda xp, x: x, effectful=True))
    n1 = Node("test_noise", (x1,), {}, (3,), "float32")
    n2 = Node("test_noise", (x2,), {}, (3,), "float32")
    out = passes.cse(Graph({"a": n1, "b": n2}))
    assert out.outputs["a"].inputs[0] is out.outputs["b"].inputs[0]
    assert out.outputs["a"] is not out.outputs["b"]


def test_cse_on_training_step_keeps_results():
    g = mlp_step()
    out = passes.cse(g)
    assert len(out) < len(g)
    assert_same_results(g, out, feeds_for(g))


# ---- fold_constants ---------------------------------------------------------------------------

def test_fold_evaluates_constant_subgraphs_with_the_ops_own_kernels():
    x = leaf("input", (3,), "float32", name="x")
    c = E.exp(const(np.array([0.5, 1.0, 2.0], np.float32))) * 3.0 + 1.0
    g = Graph({"y": x * c, "c": c})
    before = snapshot(g)
    out = passes.fold_constants(g)
    assert snapshot(g) == before
    assert [n.op for n in out.nodes if n.op != "input"] == ["const", "mul"]
    assert out.outputs["c"].op == "const"
    assert_same_results(g, out, {"x": np.array([1, 2, 3], np.float32)})


def test_fold_respects_the_size_limit_and_leaves_broadcasts_as_views():
    big = apply("broadcast_to", const(1.0, "float32"), shape=(100, 100))
    small = apply("reshape", const(np.arange(4.0)), shape=(2, 2)) * 2.0
    g = Graph({"big": E.exp(big), "small": small})
    out = passes.fold_constants(g)
    assert out.outputs["big"].op == "exp"
    assert out.outputs["big"].inputs[0].op == "broadcast_to"
    assert out.outputs["small"].op == "const"
    assert passes.fold_constants(g, limit=2).outputs["small"].op == "mul"


def test_fold_leaves_failing_kernels_to_the_executor():
    c = const(np.arange(6.0))
    bad = Node("reshape", (c,), {"shape": (4, 4)}, (4, 4), "float64")  # bypasses shape checks
    out = passes.fold_constants(Graph({"bad": bad}))
    assert out.outputs["bad"].op == "reshape"


def test_simplify_is_the_composition_and_shrinks_the_training_step():
    g = mlp_step()
    s = passes.simplify(g)
    assert str(s) == str(passes.cse(passes.fold_constants(passes.dce(g))))
    assert len(s) < len(g)
    verify(s, known_ops=lambda op: op in REGISTRY)
    assert_same_results(g, s, feeds_for(g))


def test_schedule_consumes_each_gradient_as_soon_as_it_exists():
    g = passes.simplify(mlp_step(batch=8, sizes=(6, 5, 4, 3)))
    before = snapshot(g)
    s = passes.schedule(g)
    assert snapshot(g) == before
    assert sorted(n.id for n in s.nodes) == sorted(n.id for n in g.nodes)
    verify(s)
    assert_same_results(g, s, feeds_for(g))
    order = [n.id for n in s.nodes]
    for name in ("w0", "w1", "w2"):
        update = s.outputs[f"param/{name}"]                 # sub(w, mul(lr, matmul(...)))
        grad = update.inputs[1].inputs[1]
        assert grad.op == "matmul"
        assert order.index(update.id) - order.index(grad.id) == 2
    assert not any(n.inputs for n in s.nodes[:len([m for m in s.nodes if not m.inputs])])


def test_fold_transposes_composes_cancels_and_moves_transposes_into_matmuls():
    x = leaf("input", (3, 4), "float32", name="x")
    w = leaf("param", (5, 4), "float32", name="w")
    t = apply("transpose", apply("transpose", x, axes=(1, 0)), axes=(1, 0))
    mm = apply("transpose", apply("matmul", w, apply("transpose", x, axes=(1, 0))), axes=(1, 0))
    shared = apply("matmul", x, apply("transpose", w, axes=(1, 0)))
    g = Graph({"t": t, "mm": mm, "shared": shared, "shared_t": apply("transpose", shared,
                                                                      axes=(1, 0))})
    before = snapshot(g)
    out = passes.fold_transposes(g)
    assert snapshot(g) == before
    assert out.outputs["t"] is x
    m = out.outputs["mm"]                    # (w x^T)^T = x w^T: no transposed product
    assert m.op == "matmul" and m.inputs[0] is x and m.inputs[1].op == "transpose"
    assert out.outputs["shared_t"].op == "transpose"    # the product has another user: kept
    verify(out)
    feeds = feeds_for(g)
    r1, r2 = Interpreter(g).run(feeds), Interpreter(out).run(feeds)
    for k in r1:
        np.testing.assert_allclose(r2[k], r1[k], rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_gemm_batch_sums_makes_a_conv_weight_gradient_one_gemm(groups):
    """The conv weight gradient, a batched (N, O, P) @ (N, P, K) summed over N, becomes one
    (O, N*P) @ (N*P, K) GEMM: no (N, O, K) product is left, the values equal the unrewritten
    graph's (float64, 1e-10); a batched product that has another user is left alone."""
    from shardgrad.graph import autodiff
    from shardgrad.ops import nn

    x = leaf("input", (5, 4, 7, 7), "float64", name="x")
    w = leaf("param", (6, 4 // groups, 3, 3), "float64", name="w")
    y = nn.conv2d(x, w, padding=1, stride=(1, 2), groups=groups)
    gx, gw = autodiff.backprop([R.sum(y * y)], [const(1.0, dtype="float64")], [x, w])
    g = Graph({"gw": gw, "gx": gx})
    before = snapshot(g)
    out = passes.gemm_batch_sums(g)
    assert snapshot(g) == before
    verify(out)
    # grouped convs batch over (N, G): a 4-d product, left as it is
    summed = [n for n in g.nodes if n.op == "sum" and n.inputs[0].op == "matmul"
              and n.inputs[0].ndim == 3]
    assert len(summed) == (groups == 1)
    assert not [n for n in out.nodes if n.op == "sum" and n.inputs[0].op == "matmul"
                and n.inputs[0].ndim == 3]
    gemms = [n for n in out.nodes if n.op == "matmul" and n.ndim == 2]
    assert len(gemms) == (1 if groups == 1 else 0) + len(
        [n for n in g.nodes if n.op == "matmul" and n.ndim == 2])
    feeds = feeds_for(g)
    r1, r2 = Interpreter(g).run(feeds), Interpreter(out).run(feeds)
    for k in r1:
        np.testing.assert_allclose(r2[k], r1[k], rtol=1e-10, atol=1e-10, err_msg=k)
    a = leaf("input", (3, 2, 4), "float64", name="a")
    b = leaf("input", (3, 4, 5), "float64", name="b")
    prod = apply("matmul", a, b)
    g2 = Graph({"s": R.sum(prod, axis=0), "p": prod})
    assert passes.gemm_batch_sums(g2).outputs["s"].inputs[0] is prod


# ---- fusion_groups ------------------------------------------------------------------------------

def run_group(group, env):
    """Evaluate a FusionGroup's expression DAG as a backend would: inputs broadcast to the
    group's shape, one Step after another, with each op's NumPy forward."""
    vals = [env[x.id] for x in group.inputs]
    for s in group.expr:
        vals.append(REGISTRY[s.op].forward(np, *[vals[a] for a in s.args], **s.attrs))
    return {m.id: vals[len(group.inputs) + k] for k, m in enumerate(group.nodes)}


def all_values(graph, feeds):
    """Every node's value under the reference interpreter."""
    g = Graph({str(n.id): n for n in graph.nodes}, nodes=graph.nodes)
    return {int(k): v for k, v in Interpreter(g).run(feeds).items()}


def check_groups(graph, groups, feeds):
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    elementwise = [n for n in graph.nodes if is_elementwise(n.op)]
    members = [m.id for g in groups for m in g.nodes]
    assert sorted(members) == sorted(n.id for n in elementwise)      # a partition
    env = all_values(graph, feeds)
    out_ids = {n.id for n in graph.outputs.values()}
    group_of = {m.id: i for i, g in enumerate(groups) for m in g.nodes}
    for i, g in enumerate(groups):
        assert all(m.shape == g.shape for m in g.nodes)
        assert [pos[m.id] for m in g.nodes] == sorted(pos[m.id] for m in g.nodes)
        for x in g.inputs:
            assert np.broadcast_shapes(x.shape, g.shape) == g.shape
            assert group_of.get(x.id) != i
        for m in g.nodes:
            leaves_group = m.id in out_ids or any(group_of.get(u.id) != i for u in users[m.id])
            assert (m in g.outputs) == leaves_group
        for nid, v in run_group(g, env).items():
            np.testing.assert_array_equal(v, env[nid])
    # convex regions: the graph of groups (other nodes as themselves) has a topological order
    unit = {n.id: ("g", group_of[n.id]) if n.id in group_of else ("n", n.id)
            for n in graph.nodes}
    deps: dict = {u: set() for u in unit.values()}
    for n in graph.nodes:
        for x in n.inputs:
            if unit[x.id] != unit[n.id]:
                deps[unit[n.id]].add(unit[x.id])
    done: set = set()
    while len(done) < len(deps):
        ready = [u for u in deps if u not in done and deps[u] <= done]
        assert ready, "fusion groups form a cycle"
        done.update(ready)


def test_fusion_groups_of_the_training_step():
    g = passes.simplify(mlp_step())
    groups = passes.fusion_groups(g)
    check_groups(g, groups, feeds_for(g))
    bias_relu = next(gr for gr in groups if [s.op for s in gr.expr] == ["add", "relu"])
    assert len(bias_relu.outputs) == 2          # the pre-activation is needed by the backward
    relu_grad = next(gr for gr in groups if [s.op for s in gr.expr] == ["step", "mul"])
    assert relu_grad.expr[1].args == (1, 2)     # mul(in1, t0): upstream gradient times mask
    sgd = [gr for gr in groups if [s.op for s in gr.expr] == ["mul", "sub"]]
    assert len(sgd) == 4 and all(len(gr.outputs) == 1 for gr in sgd)
    assert "t1 = relu(t0)" in str(bias_relu)


def test_fusion_never_makes_a_cycle_through_another_op():
    x = leaf("input", (2, 2), "float32", name="x")
    w = leaf("param", (2, 2), "float32", name="w")
    a = E.exp(x)
    c = a + a @ w                          # a and c cannot share a kernel: c waits on matmul
    g = Graph({"c": E.tanh(c)})
    groups = passes.fusion_groups(g)
    assert not any(a in gr.nodes and c in gr.nodes for gr in groups)
    assert any([s.op for s in gr.expr] == ["add", "tanh"] for gr in groups)
    check_groups(g, groups, {"x": np.eye(2, dtype=np.float32), "w": np.ones((2, 2), "f4")})


def test_fusion_groups_never_depend_on_each_other_both_ways():
    """Two groups, each convex, can still read each other's values (hypothesis found it):
    {exp(x), greater, where} reads add(x, x) of {add, exp, add}, which reads exp(x). The
    graph of groups must stay acyclic, or the GPU executor cannot order the kernels."""
    x0 = leaf("input", (3, 4), "float32", name="x0")
    x1 = leaf("input", (4,), "float32", name="x1")
    e, a = E.exp(x1), x1 + x1
    ea = E.exp(a)
    gt = apply("greater", e, a)
    out = {"out0": apply("where", gt, e, a), "out1": e + ea, "out2": E.exp(x0)}
    order = [x0, x1, e, a, ea, gt, out["out0"], out["out1"], out["out2"]]   # as found
    g = Graph(out, order)
    groups = passes.fusion_groups(g)
    check_groups(g, groups, feeds_for(g))
    assert sum(len(gr.nodes) > 1 for gr in groups) >= 1      # still fused where it can be


def test_fusion_keeps_different_shapes_apart():
    x = leaf("input", (3, 4), "float32", name="x")
    b = leaf("input", (4,), "float32", name="b")
    y = E.exp(b * 2.0) + x                 # b*2 and exp are f32[4]: their own group
    groups = passes.fusion_groups(Graph({"y": y}))
    assert sorted(len(gr.nodes) for gr in groups) == [1, 2]


@settings(max_examples=60, deadline=None)
@given(random_graphs(), st.integers(0, 2**16))
def test_passes_on_random_graphs(g, seed):
    feeds = feeds_for(g, seed)
    before = snapshot(g)
    with np.errstate(all="ignore"):
        for p in (passes.dce, passes.cse, passes.fold_constants, passes.simplify,
                  passes.schedule, passes.fold_transposes, passes.gemm_batch_sums):
            out = p(g)
            verify(out, known_ops=lambda op: op in REGISTRY)
            assert_same_results(g, out, feeds, exact=p not in (passes.fold_transposes,
                                                               passes.gemm_batch_sums))
        s = passes.simplify(g)
        check_groups(s, passes.fusion_groups(s), feeds)
    assert snapshot(g) == before


@pytest.mark.parametrize("p", [passes.dce, passes.cse, passes.fold_constants, passes.simplify,
                               passes.schedule, passes.fold_transposes,
                               passes.gemm_batch_sums])
def test_passes_keep_meta(p):
    x = leaf("input", (2,), "float32", name="x")
    g = Graph({"y": x + 1.0}, meta={"grads": ["grad/x"]})
    assert p(g).meta == {"grads": ["grad/x"]}
