"""The compiled executor against the reference interpreter: same outputs bitwise (same kernels,
same BLAS, no reassociation), on an MLP training step, colah's example and random graphs;
buffers really reused; repeated runs, fed-back outputs and caller-owned outputs all safe."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, leaf
from shardgrad.ops import elementwise as E
from shardgrad.ops import reduce as R
from shardgrad.ops.registry import REGISTRY, apply, kernel_for
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import ExecutionError, Interpreter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "graph"))
from graph_cases import feeds_for, mlp_step, random_graphs  # noqa: E402


def assert_outputs_equal(ref, out, rtol=0.0):
    """Bitwise by default; ``rtol`` where a rewrite may reorder a sum (fold_transposes swaps
    matmul operands) or a kernel's rounding depends on its operands' memory layout."""
    assert ref.keys() <= out.keys()
    for k in ref:
        assert np.shape(out[k]) == np.shape(ref[k]), k
        assert np.asarray(out[k]).dtype == np.asarray(ref[k]).dtype, k
        if rtol:
            np.testing.assert_allclose(out[k], ref[k], rtol=rtol, atol=0, err_msg=k)
        else:
            np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def snapshot(out):
    return {k: np.array(v, copy=True) for k, v in out.items()}


def test_mlp_training_step_matches_the_interpreter_bitwise():
    g = mlp_step(batch=16, sizes=(12, 10, 8, 3))
    feeds = feeds_for(g)
    ref = Interpreter(g).run(feeds)
    program = compile(g)
    first = program.run(feeds)
    kept = snapshot(first)
    assert_outputs_equal(ref, first)
    second = program.run(feeds)
    assert_outputs_equal(ref, second)
    assert_outputs_equal(kept, first)        # the previous run's outputs survive one more run
    assert_outputs_equal(ref, program.run(feeds))


def test_training_loop_feeding_outputs_back():
    g = mlp_step(batch=8, sizes=(6, 5, 4, 3))
    f_ref, f_cmp = feeds_for(g), feeds_for(g)
    interp, program = Interpreter(g), compile(g)
    losses = []
    for _ in range(6):
        ref, out = interp.run(f_ref), program.run(f_cmp)
        assert_outputs_equal(ref, out)
        losses.append(float(out["loss"]))
        f_ref.update({k[6:]: v for k, v in ref.items() if k.startswith("param/")})
        f_cmp.update({k[6:]: v for k, v in out.items() if k.startswith("param/")})
    assert losses[-1] < losses[0]


def test_colah_example():
    a = leaf("input", (), "float64", name="a")
    b = leaf("input", (), "float64", name="b")
    g = autodiff.grad(Graph({"e": (a + b) * (b + 1.0)}), wrt=["a", "b"])
    feeds = {"a": np.float64(2.0), "b": np.float64(1.0)}
    out = compile(g).run(feeds)
    assert_outputs_equal(Interpreter(g).run(feeds), out)
    assert (out["e"], out["grad/a"], out["grad/b"]) == (6.0, 2.0, 5.0)


@settings(max_examples=80, deadline=None)
@given(random_graphs(), st.integers(0, 2**16), st.booleans())
def test_random_graphs_match_the_interpreter(g, seed, simplify):
    feeds = feeds_for(g, seed)
    with np.errstate(all="ignore"):
        ref = Interpreter(g).run(feeds)
        program = compile(g, simplify=simplify)
        first = program.run(feeds)
        assert_outputs_equal(ref, first, rtol=1e-6)
        other = feeds_for(g, seed + 1)
        assert_outputs_equal(Interpreter(g).run(other), program.run(other), rtol=1e-6)
        assert_outputs_equal(snapshot(first), program.run(feeds))  # repeatable: bitwise


def test_buffers_are_reused():
    g = mlp_step(batch=32, sizes=(16, 16, 16, 4))
    program = compile(g)
    stats = program.stats()
    assert stats["buffers"] < stats["kernel_values"] < stats["nodes"]
    assert stats["lower_bound_bytes"] <= stats["planned_bytes"] <= 1.2 * stats["lower_bound_bytes"]
    x = leaf("input", (64, 64), "float32", name="x")
    y = x
    for i in range(20):
        y = E.tanh(y) * 0.5 if i % 2 else E.exp(y) + x
    program = compile(Graph({"y": R.sum(y, axis=0)}))
    # the chain runs in place: one working buffer and the output
    assert program.stats()["buffers"] == 2
    assert program.stats()["planned_bytes"] == 64 * 64 * 4 + 64 * 4
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    assert_outputs_equal(Interpreter(program.graph).run(feeds), program.run(feeds))


def test_bias_add_and_relu_run_in_place():
    x = leaf("input", (4, 3), "float32", name="x")
    w = leaf("param", (3, 5), "float32", name="w")
    b = leaf("param", (5,), "float32", name="b")
    h = E.relu(x @ w + b)
    program = compile(Graph({"out": R.sum(h @ apply("transpose", w, axes=(1, 0)))}))
    steps = [n.op for n in program.step_nodes]
    assert steps == ["matmul", "add", "relu", "transpose", "matmul", "sum"]  # w.T: a view of a feed
    slots = program._slots
    mm, add, relu = (slots[program.graph.nodes.index(n)] for n in program.step_nodes[:3])
    assert np.shares_memory(mm, add) and np.shares_memory(add, relu)


def test_views_of_changing_values_are_recomputed():
    x = leaf("input", (3, 4), "float32", name="x")
    t = apply("transpose", E.exp(x), axes=(1, 0))
    r = apply("reshape", t, shape=(12,))      # not contiguous: a copy each run, never a snapshot
    g = Graph({"r": r * 2.0, "t": t + 0.0})
    program = compile(g)
    for seed in range(3):
        feeds = feeds_for(g, seed)
        assert_outputs_equal(Interpreter(g).run(feeds), program.run(feeds))


def test_outputs_into_updates_parameters_in_place_in_one_flat_buffer():
    g = mlp_step(batch=8, sizes=(6, 5, 3))
    f_ref = feeds_for(g)
    params = [n for n in g.nodes if n.op == "param"]
    flat = np.empty(sum(p.size for p in params), np.float32)
    views, k = {}, 0
    for p in params:
        views[p.name] = flat[k:k + p.size].reshape(p.shape)
        views[p.name][...] = f_ref[p.name]
        k += p.size
    f_cmp = {**f_ref, **views}
    interp, program = Interpreter(g), compile(g)
    into = {f"param/{name}": v for name, v in views.items()}
    for _ in range(4):
        ref = interp.run(f_ref)
        out = program.run(f_cmp, outputs_into=into)
        assert_outputs_equal(ref, out)
        for name, v in views.items():
            assert out[f"param/{name}"] is v
        f_ref.update({k[6:]: v for k, v in ref.items() if k.startswith("param/")})
    assert not np.array_equal(flat, np.concatenate([feeds_for(g)[p.name].ravel()
                                                    for p in params]))


def test_outputs_into_an_array_a_later_node_still_reads_is_copied_at_the_end():
    x = leaf("input", (5,), "float64", name="x")
    g = Graph({"a": x * 2.0, "b": E.exp(x) + 1.0, "c": x * 2.0})
    xs = np.linspace(-1, 1, 5)
    ref = Interpreter(g).run({"x": xs})
    x_arr = xs.copy()
    c_arr = np.empty(5)
    out = compile(g).run({"x": x_arr}, outputs_into={"a": x_arr, "c": c_arr})
    assert_outputs_equal(ref, out)
    np.testing.assert_array_equal(x_arr, ref["a"])
    np.testing.assert_array_equal(c_arr, ref["a"])


def test_outputs_into_checks_types():
    x = leaf("input", (5,), "float64", name="x")
    program = compile(Graph({"a": x * 2.0}))
    with pytest.raises(ExecutionError, match="outputs_into"):
        program.run({"x": np.ones(5)}, outputs_into={"a": np.ones(4)})


def test_feeding_a_buffer_that_is_about_to_be_written_is_safe():
    x = leaf("input", (4,), "float64", name="x")
    g = Graph({"y": E.tanh(x) * 3.0 + x})
    program, interp = compile(g), Interpreter(g)
    first = program.run({"x": np.arange(4.0)})
    program.run({"x": np.ones(4)})
    # ``first`` lives in the buffers the third run writes: it must be read before that
    assert_outputs_equal(interp.run({"x": first["y"]}), program.run({"x": first["y"]}))


def test_outputs_that_are_leaves_consts_or_shared():
    x = leaf("input", (3,), "float32", name="x")
    y = E.exp(x)
    g = Graph({"x": x, "zero": autodiff.zeros_like(x), "y": y, "y_again": y,
               "y_view": apply("reshape", y, shape=(3, 1))})
    feeds = {"x": np.arange(3, dtype=np.float32)}
    program = compile(g)
    for _ in range(2):
        out = program.run(feeds)
        assert_outputs_equal(Interpreter(g).run(feeds), out)
        assert out["x"] is feeds["x"] and out["y"] is out["y_again"]
        assert np.shares_memory(out["y"], out["y_view"])


def test_ops_without_an_out_kernel_run_their_forward():
    x = leaf("input", (3, 4), "float32", name="x")
    g = autodiff.grad(Graph({"l": R.sum(E.gelu(x * 2.0))}), wrt=["x"])
    feeds = feeds_for(g)
    program = compile(g)
    assert "gelu" in [n.op for n in program.step_nodes]
    for _ in range(2):
        assert_outputs_equal(Interpreter(g).run(feeds), program.run(feeds))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_erf_writes_into_a_planned_buffer_bitwise(dtype, monkeypatch):
    """erf (exact GELU's core) runs its out= kernel, with the forward's results."""
    kernel, made = kernel_for("erf", "cpu", "out"), []
    monkeypatch.setitem(REGISTRY, "erf", dataclasses.replace(REGISTRY["erf"], out=kernel._replace(
        make=lambda xp, n: made.append(n) or kernel.make(xp, n))))
    x = leaf("input", (5, 7), dtype, name="x")
    g = autodiff.grad(Graph({"l": R.sum(E.erf(x * 0.7) * x)}), wrt=["x"])
    feeds = feeds_for(g)
    program = compile(g)
    assert [n.op for n in made] == ["erf"]
    for _ in range(2):
        assert_outputs_equal(Interpreter(g).run(feeds), program.run(feeds))


def test_casts_match_the_interpreter():
    """cast's out= kernel (copyto takes dst first: every cast failed with 'copyto() got an
    unexpected keyword argument out', so did max and maximum's gradients)."""
    x = leaf("input", (2, 3), "float32", name="x")
    g = Graph({"mask": E.cast(E.greater(x, 0.0), "float32") * x, "wide": E.cast(x, "float64"),
               "int": E.cast(x, "int32"), "same": E.cast(x * 2.0, "float32")})
    feeds = {"x": np.array([[1.7, -2.0, 3.0], [0.0, -0.5, 9.25]], np.float32)}
    program = compile(g)
    assert "cast" in [n.op for n in program.step_nodes]
    for _ in range(2):
        assert_outputs_equal(Interpreter(g).run(feeds), program.run(feeds))


def test_front_end_step_with_max_and_maximum_matches_the_interpreter():
    import shardgrad as sg

    def run(executor):
        sg.manual_seed(0)
        model = sg.nn.Sequential(sg.nn.Linear(6, 8), sg.nn.Linear(8, 3))
        optim = sg.optim.SGD(model.parameters(), lr=0.05)

        def loss(out, y):                    # leaky ReLU on the logits, a hand-made logsumexp
            out = sg.maximum(out, 0.1 * out)
            top = out.max(axis=1, keepdims=True)
            lse = (out - top).exp().sum(axis=1).log() + top.reshape(-1)
            return (lse - (out * y).sum(axis=1)).mean()

        step = sg.compile_step(model, loss, optim, executor=executor)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 6)), np.eye(3)[rng.integers(0, 3, 16)]
        losses = [step(x.astype(np.float32), y.astype(np.float32)) for _ in range(3)]
        return losses, model.state_dict()

    ref_losses, ref_params = run(Interpreter)
    losses, params = run(compile)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_errors_name_the_node_and_source_line():
    x = leaf("input", (3,), "float64", name="x")
    y = E.log(x * 2.0)
    program = compile(Graph({"y": y + 1.0}))
    with np.errstate(all="raise"), pytest.raises(ExecutionError) as err:
        program.run({"x": np.array([1.0, -1.0, 2.0])})
    assert err.value.node.op == "log" and err.value.node.where == y.where
    assert "while executing" in str(err.value) and "log(" in str(err.value)
    assert "test_compiled.py" in str(err.value)
    with pytest.raises(ExecutionError, match="no value fed"):
        program.run({})
    with pytest.raises(ExecutionError, match="expects f64"):
        program.run({"x": np.ones(3, np.float32)})


def test_rank_and_shard_appear_in_errors():
    x = leaf("input", (2,), "float64", name="x")
    program = compile(Graph({"y": E.sqrt(x)}), rank=3, shard="stage1")
    with np.errstate(all="raise"), pytest.raises(ExecutionError, match="shard stage1 on rank 3"):
        program.run({"x": np.array([-1.0, 1.0])})


@pytest.mark.parametrize("opt", ["SGD", "Adam"])
def test_front_end_training_matches_the_interpreter(opt):
    import shardgrad as sg

    def run(executor):
        sg.manual_seed(0)
        model = sg.nn.Sequential(sg.nn.Linear(6, 8), sg.nn.ReLU(), sg.nn.Linear(8, 3))
        optim = getattr(sg.optim, opt)(model.parameters(), lr=0.05)
        step = sg.compile_step(model, lambda out, y: ((out - y) * (out - y)).mean(), optim,
                               executor=executor)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 6)), rng.normal(size=(16, 3))
        losses = [step(x.astype(np.float32), y.astype(np.float32)) for _ in range(5)]
        return losses, {k: np.array(v) for k, v in model.state_dict().items()}

    ref_losses, ref_params = run(None)
    losses, params = run(compile)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_window_ops_write_into_planned_buffers(stride, padding):
    """im2col, col2im, max_pool2d and its gradient take out=: they run as planned kernels (no
    fresh array per step), bitwise equal to their forward, with and without padding, on
    disjoint and overlapping pooling windows."""
    from shardgrad.ops import nn
    from shardgrad.runtime.compiled import _plan

    x = leaf("input", (2, 3, 9, 9), "float64", name="x")
    w = leaf("param", (4, 3, 3, 3), "float64", name="w")
    w2 = leaf("param", (5, 4, 2, 2), "float64", name="w2")
    h = E.relu(nn.conv2d(x, w, stride=stride, padding=padding))
    h = nn.max_pool2d(h, 3, 2, 1) if padding else nn.max_pool2d(h, 2)
    g = autodiff.grad(Graph({"l": R.sum(nn.conv2d(h, w2, padding=padding) ** 2.0)}),
                      wrt=["x", "w", "w2"])
    program = compile(g)
    kinds = {n.op: v.kind for n, v in zip(program.graph.nodes, _plan(program.graph)[0],
                                          strict=True)}
    assert {kinds[op] for op in ("im2col", "col2im", "max_pool2d", "max_pool2d_grad")} == {
        "kernel"}
    for seed in range(2):
        feeds = feeds_for(g, seed)
        assert_outputs_equal(Interpreter(g).run(feeds), program.run(feeds))
