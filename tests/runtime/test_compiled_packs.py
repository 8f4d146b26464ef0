"""The compiled executor's pack elision (PyTorch DDP's gradient_as_bucket_view): values a pack
copies are computed straight into their slices of its buffer where that is safe, else copied;
either way the outputs equal the reference interpreter's bitwise, on ranks whose allreduce
really changes the values."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import shardgrad as sg
from shardgrad.graph.ir import Graph, leaf
from shardgrad.graph.trace import trace_step
from shardgrad.ops import collective
from shardgrad.ops import elementwise as E
from shardgrad.ops import reduce as R
from shardgrad.ops.collective import allreduce, pack, unpack
from shardgrad.ops.registry import apply
from shardgrad.partition.data_parallel import data_parallel
from shardgrad.runtime.comm import SingleProcess
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "graph"))
from graph_cases import feeds_for, random_graphs  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def mlp_dp_graph(world=2, **dp):
    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(12, 16), sg.nn.ReLU(), sg.nn.Linear(16, 16),
                             sg.nn.ReLU(), sg.nn.Linear(16, 5))
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    graph = trace_step(model, sg.functional.cross_entropy, opt, ((8, 12), "float32"),
                       ((8,), "int64"))
    return data_parallel(graph, world, **dp).graph


def rank_feeds(graph, rank):
    rng = np.random.default_rng(rank)
    return {n.name: rng.integers(0, 5, n.shape) if n.dtype == "int64"
            else rng.standard_normal(n.shape).astype(n.dtype)
            for n in graph.nodes if n.op in ("input", "param", "state")}


def run_on_ranks(graph, executors, steps=3, world=2):
    """Each executor on ``world`` threaded ranks (different data per rank), ``steps`` training
    steps feeding the updated parameters and state back; every run's outputs, copied."""
    def body(comm):
        runs = []
        for make in executors:
            ex, feeds, outs = make(graph), rank_feeds(graph, comm.rank), []
            for _ in range(steps):
                with collective.bind(comm):
                    out = ex.run(feeds)
                outs.append({k: np.array(v, copy=True) for k, v in out.items()})
                feeds.update({k.split("/", 1)[1]: v for k, v in out.items()
                              if k.startswith(("param/", "state/"))})
            runs.append(outs)
        return runs
    return run_ranks(world, body)


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("dp", [{}, {"bucket_bytes": 600}, {"overlap": True}])
def test_dp_step_gradients_are_computed_into_the_bucket_with_the_same_bits(dp):
    graph = mlp_dp_graph(**dp)
    program = compile(graph)
    stats = program.stats()
    # every weight and bias gradient is a matmul or sum writing its slice; only the loss
    # (cross_entropy's own forward, no out= kernel) is still copied
    assert (stats["packed_in_place"], stats["pack_copies"]) == (6, 1)
    assert compile(graph, elide_packs=False).stats()["packed_in_place"] == 0
    runs = run_on_ranks(graph, [Interpreter, compile, lambda g: compile(g, elide_packs=False)])
    for ref, elided, copied in runs:
        for a, b, c in zip(ref, elided, copied, strict=True):
            assert_same_bits(a, b)
            assert_same_bits(a, c)
    with collective.bind(SingleProcess()):    # rank 0 alone: its own gradient, halved
        alone = compile(graph).run(rank_feeds(graph, 0))
    assert not np.array_equal(runs[0][0][0]["grad/0.weight"], alone["grad/0.weight"])


def test_elided_values_live_in_the_pack_buffer_and_outputs_survive_the_next_run():
    graph = mlp_dp_graph()
    program = compile(graph)
    nodes, slots = program.graph.nodes, program._slots
    with collective.bind(SingleProcess()):
        first = program.run(rank_feeds(graph, 0))
        kept = {k: np.array(v, copy=True) for k, v in first.items()}
        second = program.run(rank_feeds(graph, 1))
    flat = next(slots[i] for i, n in enumerate(nodes) if n.op == "pack")
    members = [i for i, n in enumerate(nodes) if n.op in ("matmul", "sum")
               and any(u.op == "pack" for u in program.graph.users()[n.id])]
    assert len(members) == 6 and all(np.shares_memory(slots[i], flat) for i in members)
    assert_same_bits(kept, first)         # output buffers alternate: run 1's outputs survive
    assert not np.array_equal(first["grad/0.weight"], second["grad/0.weight"])


def bucket():
    """Two gradient-like values (a matmul, a sum) to pack into one bucket."""
    x = leaf("input", (4, 3), "float32", name="x")
    w = leaf("param", (3, 5), "float32", name="w")
    return x @ w, R.sum(x, axis=0)


def reduced(values, scale=0.5):
    flat = allreduce(pack(values, scale=scale), inplace=True)
    out, offset = [], 0
    for v in values:
        out.append(unpack(flat, offset, v.shape))
        offset += v.size
    return out


def case_read_after_the_allreduce():
    a, b = bucket()
    ra, rb = reduced([a, b])
    late = a * ra                    # the local a, read after the bucket was reduced
    return Graph({"ra": ra, "rb": rb, "late": late}), {"packed_in_place": 1, "pack_copies": 1}


def case_output():
    a, b = bucket()
    ra, rb = reduced([a, b])
    return Graph({"ra": ra, "rb": rb, "local_a": a}), {"packed_in_place": 1, "pack_copies": 1}


def case_packed_with_its_transpose():
    a, b = bucket()
    ra, rat, rb = reduced([a, apply("transpose", a, axes=(1, 0)), b])
    return Graph({"s": R.sum(ra) + R.sum(rat) + R.sum(rb)}), {"packed_in_place": 1,
                                                              "pack_copies": 2}


def case_packed_twice():
    a, b = bucket()
    ra, ra2, rb = reduced([a, a, b], scale=1.0)
    return Graph({"ra": ra, "ra2": ra2, "rb": rb}), {"packed_in_place": 1, "pack_copies": 2}


def case_read_before_the_pack():
    a, b = bucket()
    early = E.tanh(a) + R.sum(b)     # no dependence on the bucket: runs before the pack
    ra, rb = reduced([a, b])
    return Graph({"ra": ra, "rb": rb, "early": early * ra}), {"packed_in_place": 2,
                                                              "pack_copies": 0}


def case_in_the_arena():
    a, b = bucket()
    ra, rb = reduced([a, b])         # the bucket is no output's: its buffer is in the arena
    return Graph({"s": R.sum(ra) * rb}), {"packed_in_place": 2, "pack_copies": 0}


@pytest.mark.parametrize("case", [case_read_after_the_allreduce, case_output,
                                  case_packed_with_its_transpose, case_packed_twice,
                                  case_read_before_the_pack, case_in_the_arena])
@pytest.mark.parametrize("simplify", [True, False])
def test_values_read_where_the_reduced_bucket_would_show_are_copied(case, simplify):
    graph, expected = case()
    program = compile(graph, simplify=simplify)
    assert {k: program.stats()[k] for k in expected} == expected
    runs = run_on_ranks(graph, [Interpreter, lambda g: compile(g, simplify=simplify)])
    for ref, out in runs:
        for a, b in zip(ref, out, strict=True):
            assert_same_bits(a, b)


@settings(max_examples=100, deadline=None)
@given(random_graphs(), st.data(), st.integers(0, 2**16), st.booleans())
def test_random_graphs_with_a_bucket_match_the_interpreter(g, data, seed, simplify):
    nodes = [n for n in g.nodes if n.op not in ("input", "const") and n.dtype == "float32"]
    assume(nodes)
    members = data.draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=4))
    scale = data.draw(st.sampled_from([0.5, 1.0]))
    unpacked = reduced(members, scale)
    outputs = dict(g.outputs) if data.draw(st.booleans()) else {}  # a packed output: a copy
    outputs.update({f"r{i}": u for i, u in enumerate(unpacked)})
    late = data.draw(st.sampled_from([None, *members]))   # read again after the allreduce
    if late is not None:
        outputs["late"] = R.sum(late) * R.sum(unpacked[0])
    graph = Graph(outputs)
    feeds = feeds_for(graph, seed)
    with np.errstate(all="ignore"), collective.bind(SingleProcess()):
        ref = Interpreter(graph).run(feeds)
        program = compile(graph, simplify=simplify)
        out = program.run(feeds)
        for k in ref:
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=0, err_msg=k)
        kept = {k: np.array(v, copy=True) for k, v in out.items()}
        assert_same_bits(kept, program.run(feeds))
        if not simplify:
            assert_same_bits(ref, kept)
