"""The executor core (graph.walk): every executor is a backend of the one walk, values are
dropped after their last use, and a failure names the node, op and user line on every
backend (eager keeps the kernel's own exception type and adds the same words as a note)."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, leaf
from shardgrad.graph.walk import EnvWalk, ExecutionError, Walk, last_uses
from shardgrad.ops import elementwise as E
from shardgrad.ops import loss as L
from shardgrad.ops import reduce as R
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.executors import EXECUTORS, choose_executor
from shardgrad.runtime.gpu import GPUExecutor
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.pipeline import profile_times

sys.path.insert(0, str(Path(__file__).parent))
from graph_cases import feeds_for, mlp_step  # noqa: E402

BACKENDS = {"interpreter": Interpreter, "compiled": compile,
            "gpu-program": lambda g: GPUExecutor(g, xp=np, fuse=False)}


def test_last_uses_drop_each_value_at_its_last_reader_but_never_an_output():
    # steps read: 0: (), 1: (a,), 2: (a, b), 3: (c,)
    assert last_uses([(), (1,), (1, 2), (3,)], keep=[3]) == [[], [], [1, 2], []]


@pytest.mark.parametrize("name", BACKENDS)
def test_every_executor_is_a_backend_of_the_walk(name):
    g = mlp_step()
    exe = BACKENDS[name](g)
    assert isinstance(exe, Walk)
    want = Interpreter(g).run(feeds_for(g))
    got = exe.run(feeds_for(g))
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-12, atol=1e-12)


def test_env_walk_frees_after_last_use_and_keeps_nothing_after_a_run():
    g = mlp_step()
    interp = Interpreter(g)
    live = []
    steps = list(interp.steps)
    interp.steps = [lambda s=s: (s(), live.append(len(interp.env)))[0] for s in steps]
    interp.run(feeds_for(g))
    # a chain of n nodes needs far fewer than n values alive at once
    assert max(live) < len(g.nodes) / 2
    assert interp.env == {}


def _bad_graph():
    x = leaf("input", (3, 4), "float64", name="x")
    y = leaf("input", (3,), "int64", name="y")
    return Graph({"loss": L.cross_entropy(E.exp(x), y)})        # line named in the error


@pytest.mark.parametrize("name", BACKENDS)
def test_failures_name_node_op_and_user_line_on_every_backend(name):
    exe = BACKENDS[name](_bad_graph())
    feeds = {"x": np.zeros((3, 4)), "y": np.array([0, 9, 1])}
    with pytest.raises(ExecutionError) as e:
        exe.run(feeds)
    msg = str(e.value)
    assert "while executing %" in msg and "= cross_entropy(" in msg, msg
    assert "test_walk.py" in msg and "label 9 out of range" in msg, msg
    assert e.value.node.op == "cross_entropy"


def test_eager_failures_keep_their_type_and_name_the_node():
    x = sg.tensor(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="label 9 out of range") as e:
        sg.nn.functional.cross_entropy(x, sg.tensor(np.array([0, 9, 1])))
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "while executing %" in notes and "cross_entropy(" in notes, notes
    assert "test_walk.py" in notes, notes


def test_profile_times_walks_every_compute_nodes_vjp():
    x = leaf("input", (8, 5), "float64", name="x")
    w = leaf("param", (5, 3), "float64", name="w")
    g = autodiff.grad(Graph({"loss": R.sum(E.tanh(x @ w))}), wrt=["w"])
    times = profile_times(g, repeats=1)
    assert times and all(t > 0 for t in times.values())
    assert {n.op for n in g.nodes if n.id in times} >= {"matmul", "tanh", "sum"}


def test_one_chooser_for_every_executor():
    assert choose_executor("compiled") is EXECUTORS["compiled"] is compile
    assert choose_executor("interpreter", "cpu") is Interpreter
    gpu = choose_executor("compiled", "cuda", rank=3)
    assert gpu.func is GPUExecutor and gpu.keywords["rank"] == 3
    with pytest.raises(ValueError, match="unknown executor 'jit'"):
        choose_executor("jit")


def test_a_custom_backend_only_builds_steps():
    g = mlp_step()
    calls = []

    class Counting(EnvWalk):
        def __init__(self, graph):
            super().__init__(graph)
            self.feeds = {}
            self.add_nodes(graph.nodes, np, lambda n: self.feeds[n.name]
                           if n.op != "const" else n.attrs["value"], "cpu")
            self.finish(n.id for n in graph.outputs.values())

        def run(self, feeds):
            self.feeds = feeds
            calls.append(len(self.steps))
            env = self.run_env()
            return {k: env[v.id] for k, v in self.graph.outputs.items()}

    got = Counting(g).run(feeds_for(g))
    want = Interpreter(g).run(feeds_for(g))
    assert calls == [len(g.nodes)]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
