"""Collective ops on N in-process ranks (threads): forward values, VJPs built by autodiff
and run, the bucket helpers, and the errors for bad shapes or a missing communicator."""

import numpy as np
import pytest

from shardgrad.graph.autodiff import backprop
from shardgrad.graph.ir import Graph, ShapeError, const, leaf
from shardgrad.ops import collective as C
from shardgrad.ops.reduce import sum as rsum
from shardgrad.ops.registry import apply, get
from shardgrad.runtime.interpreter import ExecutionError, Interpreter, run
from shardgrad.runtime.threadcomm import run_ranks

pytestmark = pytest.mark.timeout(60)


def on_ranks(n, build):
    """``build(rank) -> (graph, feeds)`` run on ``n`` threaded ranks; outputs per rank."""
    def body(comm):
        graph, feeds = build(comm.rank)
        with C.bind(comm):
            return Interpreter(graph).run(feeds)
    return run_ranks(n, body, timeout_s=20)


def test_running_a_collective_with_no_communicator_bound_is_a_clear_error():
    x = leaf("input", (3,), "float64", name="x")
    with pytest.raises(ExecutionError, match="allreduce needs a communicator and none is bound"):
        run(Graph({"y": C.allreduce(x)}), {"x": np.ones(3)})


def test_allreduce_sums_over_ranks_and_its_vjp_is_an_allreduce():
    n = 3

    def build(rank):
        x = leaf("input", (2, 3), "float64", name="x")
        c = leaf("input", (2, 3), "float64", name="c")
        y = C.allreduce(x)
        loss = rsum(y * c)
        (gx,) = backprop([loss], [const(1.0, "float64")], [x])
        return Graph({"y": y, "gx": gx}), {"x": np.full((2, 3), rank + 1.0),
                                           "c": np.full((2, 3), 10.0 ** rank)}

    outs = on_ranks(n, build)
    for out in outs:
        np.testing.assert_array_equal(out["y"], np.full((2, 3), 6.0))
        np.testing.assert_array_equal(out["gx"], np.full((2, 3), 111.0))  # sum of the c's
    x = leaf("input", (2,), "float64", name="x")
    assert get("allreduce").vjp(x, x, C.allreduce(x))[0].op == "allreduce"


@pytest.mark.parametrize("op,expect", [("max", 3.0), ("min", 1.0)])
def test_allreduce_max_min(op, expect):
    def build(rank):
        x = leaf("input", (2,), "float64", name="x")
        return Graph({"y": C.allreduce(x, op)}), {"x": np.full(2, rank + 1.0)}
    assert all((o["y"] == expect).all() for o in on_ranks(3, build))


def test_allreduce_leaves_its_input_alone_unless_inplace():
    fed = [np.full(4, float(r)) for r in range(2)]

    def build(rank):
        x = leaf("input", (4,), "float64", name="x")
        return Graph({"y": C.allreduce(x)}), {"x": fed[rank]}

    on_ranks(2, build)
    assert (fed[0] == 0).all() and (fed[1] == 1).all()


def test_allreduce_start_wait_equals_blocking_allreduce():
    def build(rank):
        x = leaf("input", (5,), "float64", name="x")
        flat = C.pack([x * 1.0], scale=0.5)
        started = apply("allreduce_start", flat, tag=3, inplace=True)
        done = apply("allreduce_wait", started, tag=3)
        return Graph({"y": done, "z": C.allreduce(x)}), {"x": np.arange(5.0) * (rank + 1)}

    for out in on_ranks(2, build):
        np.testing.assert_array_equal(out["y"], np.arange(5.0) * 1.5)


def test_allgather_stacks_in_rank_order_and_is_the_adjoint_of_reduce_scatter():
    n, rng = 3, np.random.default_rng(0)
    xs, gs = rng.normal(size=(n, 2, 4)), rng.normal(size=(n, 2 * n, 4))

    def build(rank):
        x = leaf("input", (2, 4), "float64", name="x")
        g = leaf("input", (2 * n, 4), "float64", name="g")
        y = C.allgather(x, n)
        (gx,) = backprop([y], [g], [x])
        return Graph({"y": y, "gx": gx, "rs": C.reduce_scatter(g, n)}), {"x": xs[rank],
                                                                          "g": gs[rank]}

    outs = on_ranks(n, build)
    for r, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], xs.reshape(2 * n, 4))
        block = gs.sum(axis=0)[2 * r:2 * r + 2]
        np.testing.assert_allclose(out["gx"], block, rtol=1e-15)
        np.testing.assert_allclose(out["rs"], block, rtol=1e-15)
    # <allgather(x), g> summed over ranks == <x, reduce_scatter(g)> summed over ranks
    lhs = sum(float((outs[r]["y"] * gs[r]).sum()) for r in range(n))
    rhs = sum(float((xs[r] * outs[r]["rs"]).sum()) for r in range(n))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_send_recv_and_their_vjps_carry_values_both_ways():
    value, cot = np.arange(6.0).reshape(2, 3), np.full((2, 3), 7.0)

    def build(rank):
        if rank == 0:
            x = leaf("input", (2, 3), "float64", name="x")
            tok = C.send(x, dest=1, tag=5)
            (gx,) = get("send").vjp(C.token("float64"), x, tok, **tok.attrs)  # a recv from 1
            return Graph({"tok": tok, "gx": gx}), {"x": value}
        y = C.recv(C.token("float64"), (2, 3), "float64", source=0, tag=5)
        g = leaf("input", (2, 3), "float64", name="g")
        (gtok,) = get("recv").vjp(g, y.inputs[0], y, **y.attrs)  # a send back to 0
        return Graph({"y": y, "gtok": gtok}), {"g": cot}

    out0, out1 = on_ranks(2, build)
    np.testing.assert_array_equal(out1["y"], value)
    np.testing.assert_array_equal(out0["gx"], cot)
    assert out0["tok"].shape == (0,) and out1["gtok"].shape == (0,)


def test_pack_unpack_round_trip_scale_views_and_gradients():
    shapes = [(), (3,), (2, 2)]
    xs = [leaf("input", s, "float64", name=f"x{i}") for i, s in enumerate(shapes)]
    flat = C.pack(xs, scale=0.5)
    assert flat.shape == (8,)
    parts, off = [], 0
    for x in xs:
        parts.append(C.unpack(flat, off, x.shape))
        off += x.size
    w = leaf("input", (8,), "float64", name="w")
    grads = backprop([rsum(flat * w)], [const(1.0, "float64")], xs)
    feeds = {"x0": np.array(2.0), "x1": np.arange(3.0), "x2": np.ones((2, 2)),
             "w": np.arange(8.0)}
    out = run(Graph({"flat": flat, "g0": grads[0], "g1": grads[1], "g2": grads[2],
                     **{f"p{i}": p for i, p in enumerate(parts)}}), feeds)
    np.testing.assert_array_equal(out["flat"], 0.5 * np.array([2, 0, 1, 2, 1, 1, 1, 1.0]))
    for i in range(3):
        np.testing.assert_array_equal(out[f"p{i}"], 0.5 * feeds[f"x{i}"])
    np.testing.assert_array_equal(out["g1"], 0.5 * np.arange(1.0, 4.0))
    np.testing.assert_array_equal(out["g2"], 0.5 * np.arange(4.0, 8.0).reshape(2, 2))
    (gflat,) = backprop([rsum(parts[1])], [const(1.0, "float64")], [flat])
    np.testing.assert_array_equal(run(Graph({"g": gflat}), feeds)["g"],
                                  [0, 1, 1, 1, 0, 0, 0, 0.0])
    whole = Interpreter(Graph({"flat": flat, "p2": parts[2]})).run(feeds)
    assert np.shares_memory(whole["flat"], whole["p2"])


def test_batch_chunk_takes_strided_rows_as_a_contiguous_copy():
    x = leaf("input", (6, 2), "float64", name="x")
    value = np.arange(12.0).reshape(6, 2)
    out = run(Graph({"c": C.batch_chunk(x, 1, 3)}), {"x": value})["c"]
    np.testing.assert_array_equal(out, value[1::3])
    assert out.flags.c_contiguous


@pytest.mark.parametrize("build,match", [
    (lambda x: C.allreduce(x, "mean"), "op must be one of"),
    (lambda x: C.reduce_scatter(x, 4), "not divisible by world_size 4"),
    (lambda x: C.recv(x, (2,), "float64", 0), "must be a token"),
    (lambda x: C.unpack(C.pack([x]), 4, (3,)), "is not inside a flat buffer"),
    (lambda x: C.batch_chunk(x, 0, 4), "cannot take chunk"),
])
def test_bad_collectives_are_shape_errors_that_name_the_op(build, match):
    x = leaf("input", (6,), "float64", name="x")
    with pytest.raises(ShapeError, match=match):
        build(x)
