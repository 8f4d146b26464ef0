"""The CPU's generated C (runtime.native) against NumPy, op by op: every elementwise op of the
op harness (test_op_cases.CASES), forward and gradient graphs together in one program per
dtype, the C path forced on for every group whatever its size, against the interpreter.
Arithmetic is bitwise NumPy's in float64 and float32; the math functions (libmvec's vector
forms) are within float tolerances.
"""

import numpy as np
import pytest
from op_harness import _diff_inputs, _objective, _tuple, draw
from test_op_cases import CASES

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, leaf
from shardgrad.ops import REGISTRY
from shardgrad.runtime import native
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter

pytestmark = [pytest.mark.hostcc,   # .ci/run forbids a hostcc test to skip
              pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")]

# ops whose C form calls a math function (exp, log, tanh, erf, pow, sin, cos): not bitwise
MATH = {"exp", "log", "tanh", "sin", "cos", "pow", "erf", "gelu", "sigmoid", "gelu_erf"}


def elementwise_cases():
    return [c for c in CASES if c.op in REGISTRY and REGISTRY[c.op].elementwise
            and REGISTRY[c.op].cuda_expr]


@pytest.fixture
def c_everywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "MIN_SIZE", 1)        # every group, however small
    monkeypatch.setattr(native, "PARALLEL_FROM", 8)   # and the OpenMP split with it


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_c_path_equals_numpy_path_for_every_elementwise_op(c_everywhere, dtype):
    cases = elementwise_cases()
    assert len(cases) > 20
    outputs, feeds, exact = {}, {}, {}
    for k, case in enumerate(cases):
        arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in draw(case)]
        xs = [leaf("input", a.shape, str(a.dtype), name=f"c{k}x{i}")
              for i, a in enumerate(arrays)]
        outs = _tuple(case.fn(*xs))
        names = {f"o{j}": o for j, o in enumerate(outs)}
        # gradients in float64 (the objective's cotangents are float64 constants)
        wrt = _diff_inputs(arrays) if case.grad and dtype == "float64" else []
        g = Graph(names)
        if wrt:
            g = autodiff.grad(Graph({**names, "L": _objective(outs, 1)[0]}),
                              [xs[i] for i in wrt], output="L")
        feeds.update({x.name: a for x, a in zip(xs, arrays, strict=True)})
        for name, node in g.outputs.items():
            outputs[f"c{k}/{name}"] = node
            exact[f"c{k}/{name}"] = case.op not in MATH and not any(
                n.op in MATH for n in Graph({name: node}).nodes)
    graph = Graph(outputs)
    program = compile(graph, native=True)
    assert program.native is not None and not program.native.reason, program.native
    fused_ops = {s[0] for n in program.graph.nodes if n.op == "fused"
                 for s in n.attrs["steps"]}
    covered = {c.op for c in cases} & fused_ops
    assert len(covered) >= 0.8 * len({c.op for c in cases}), sorted(
        {c.op for c in cases} - fused_ops)
    got = program.run(feeds)
    want = Interpreter(graph).run(feeds)
    for key, w in want.items():
        g = np.asarray(got[key])
        assert g.dtype == np.asarray(w).dtype, key
        if exact[key]:
            np.testing.assert_array_equal(g, w, err_msg=key)
        elif dtype == "float32":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15, err_msg=key)
