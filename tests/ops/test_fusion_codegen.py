"""The fused-kernel generator (ops.codegen) on the CPU: broadcast index maps against NumPy,
a NumPy evaluation of each group's expression tree (through those index maps) against the
reference interpreter, and the generated CUDA C itself compiled for the host
(host_cuda) and run on NumPy arrays against the interpreter. nvcc compilation of the
same sources is in test_cuda_compile.py.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_cases import elementwise_graph, training_graphs

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph
from shardgrad.ops import codegen
from shardgrad.ops.registry import get

sys.path.insert(0, str(Path(__file__).parent.parent / "runtime"))
import host_cuda  # noqa: E402

from shardgrad.runtime.interpreter import Interpreter

needs_cxx = pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")
# the module-wide mark lets CI fail a run whose compiler-less tests skipped
pytestmark = pytest.mark.hostcc


def graphs():
    return {"elementwise": elementwise_graph(), **training_graphs()}


@pytest.fixture(scope="module")
def cases():
    return graphs()


@pytest.fixture(scope="module")
def launcher():
    if host_cuda.compiler() is None:
        pytest.skip("no host C++ compiler")
    return host_cuda.HostLauncher()


def values(graph: Graph, feeds) -> dict[int, np.ndarray]:
    """Every node's value on the reference interpreter, by node id."""
    out = Interpreter(Graph({str(n.id): n for n in graph.nodes}), np).run(feeds)
    return {int(k): np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("in_shape,out_shape", [
    ((3,), (4, 3)), ((4, 1), (4, 3)), ((), (2, 3)), ((1, 3), (2, 4, 3)), ((2, 1, 3), (2, 4, 3)),
    ((5, 1, 1), (5, 2, 3)), ((1,), (7,)), ((2, 3, 4), (2, 3, 4)), ((1, 4, 1), (3, 4, 5)),
    ((3, 1, 5), (2, 3, 4, 5)),
])
def test_index_map_matches_numpy_broadcast(in_shape, out_shape):
    src = np.arange(int(np.prod(in_shape)), dtype=np.int64).reshape(in_shape)
    want = np.broadcast_to(src, out_shape).ravel()
    np.testing.assert_array_equal(src.ravel()[codegen.offsets(in_shape, out_shape)], want)


@pytest.mark.parametrize("base,axes,out_shape", [
    ((3, 4), (1, 0), (4, 3)), ((3, 4), (1, 0), (2, 4, 3)), ((2, 3, 5), (1, 0, 2), (3, 2, 5)),
    ((2, 3, 4, 5), (1, 0, 2, 3), (3, 2, 4, 5)), ((2, 3, 4), (2, 0, 1), (4, 2, 3)),
    ((4, 1), (1, 0), (3, 1, 4)), ((7, 5), (1, 0), (5, 7)),
])
def test_index_map_of_a_transposed_view_matches_numpy(base, axes, out_shape):
    src = np.arange(int(np.prod(base)), dtype=np.int64).reshape(base)
    view = src.transpose(axes)
    strides = tuple(codegen.contiguous_strides(base)[a] for a in axes)
    want = np.broadcast_to(view, out_shape).ravel()
    np.testing.assert_array_equal(src.ravel()[codegen.offsets(view.shape, out_shape, strides)],
                                  want)


def test_index_map_merges_contiguous_dims():
    assert codegen.index_terms((2, 3, 4), (2, 3, 4)) == [(1, 0, 1)]
    assert codegen.index_terms((3, 4), (2, 3, 4)) == [(1, 12, 1)]
    assert codegen.index_terms((4, 1), (4, 3)) == [(3, 0, 1)]
    assert codegen.index_terms((), (4, 3)) == []
    assert codegen.index_terms((4, 3), (4, 3), (1, 4)) == [(1, 3, 4), (3, 0, 1)]
    assert codegen.index_terms((2, 3, 4), (2, 3, 4), (12, 4, 1)) == [(1, 0, 1)]
    with pytest.raises(ValueError, match="does not broadcast"):
        codegen.index_terms((2,), (4, 3))


@pytest.mark.parametrize("value,dtype", [
    (0.1, "float32"), (1e-30, "float32"), (-3.5, "float64"), (np.pi, "float64"),
    (float("inf"), "float32"), (-float("inf"), "float64"), (7, "int64"), (-2, "int32"),
    (True, "bool"), (3, "uint64"),
])
def test_literals_round_trip(value, dtype):
    text = codegen.literal(value, dtype)
    if dtype == "bool":
        assert text == "true"
    elif "__int_as_float(0x7f800000)" in text:
        assert np.isinf(value) and ("-" in text) == (value < 0)
    else:
        num = re.search(r"[-+]?[0-9][0-9.]*(e[-+]?[0-9]+)?", text).group(0)
        parsed = float(num) if np.dtype(dtype).kind == "f" else int(num)
        assert np.asarray(parsed).astype(dtype) == np.asarray(value).astype(dtype), text


def _evaluate_numpy(group, env):
    """The group's expression tree in NumPy, inputs read through the kernel's index maps."""
    size = int(np.prod(group.shape))
    vals = [np.ascontiguousarray(env[x.id]).ravel()[codegen.offsets(x.shape, group.shape)]
            if size else np.zeros(0, x.dtype) for x in group.inputs]
    for step in group.expr:
        vals.append(np.asarray(get(step.op).forward(np, *[vals[a] for a in step.args],
                                                    **step.attrs)))
    k = len(group.inputs)
    return [vals[k + group.nodes.index(o)].reshape(o.shape) for o in group.outputs]


def test_expression_tree_evaluation_matches_interpreter(cases):
    checked = 0
    for name, (graph, feeds) in cases.items():
        env = values(graph, feeds)
        for group in passes.fusion_groups(graph):
            for o, got in zip(group.outputs, _evaluate_numpy(group, env), strict=True):
                np.testing.assert_allclose(got, env[o.id], rtol=1e-6, atol=1e-7,
                                           err_msg=f"{name}: {group}")
                checked += 1
    assert checked > 20


def test_every_group_of_the_test_graphs_has_a_c_form(cases):
    for name, (graph, _) in cases.items():
        for group in passes.fusion_groups(graph):
            src = codegen.fused_source(group)
            assert src.name in src.code and src.size == int(np.prod(group.shape)), name
            assert "#include" not in src.code


def test_unsupported_dtype_is_reported():
    from shardgrad.graph.ir import leaf
    from shardgrad.ops import elementwise as E
    x = leaf("input", (3,), "float16", name="x")
    (group,) = passes.fusion_groups(Graph({"y": E.exp(x) + 1.0}))
    with pytest.raises(codegen.Unsupported, match="float16"):
        codegen.fused_source(group)


def test_integer_division_has_no_c_form():
    from shardgrad.graph.ir import leaf
    from shardgrad.ops import elementwise as E
    i = leaf("input", (3,), "int64", name="i")
    (group,) = passes.fusion_groups(Graph({"y": E.exp(i / 2) + 1.0}))   # C's / would truncate
    with pytest.raises(codegen.Unsupported, match="div of int64"):
        codegen.fused_source(group)


def test_index_type_widens_where_the_grid_stride_could_overflow_int():
    """int indices only while i + the grid stride stays below 2^31: the stride is what ops.gpu
    launches (at most MAX_BLOCKS blocks of BLOCK threads), so the two modules' constants must
    agree. A 1024 x 512 x 28 x 28 activation indexes with int, 4 x 512 x 1024 x 1024 with
    long long (and its broadcast bias's index terms with it)."""
    from shardgrad.graph.ir import leaf
    from shardgrad.ops import elementwise as E
    from shardgrad.ops import gpu
    assert gpu.MAX_BLOCKS * gpu.BLOCK <= 2**31 - codegen.INT_INDEX_LIMIT
    limit = codegen.INT_INDEX_LIMIT
    for shape, itype in [((1024, 512, 28, 28), "int"), ((4, 512, 1024, 1024), "long long"),
                         ((limit,), "int"), ((limit + 1,), "long long")]:
        x = leaf("input", shape, "float32", name="x")
        b = leaf("input", shape[1:2] + (1,) * (len(shape) - 2), "float32", name="b")
        (group,) = passes.fusion_groups(Graph({"y": E.exp(x + b) + 1.0}))
        code = codegen.fused_source(group).code
        assert f"for ({itype} i = " in code and f"i < {int(np.prod(shape))};" in code, shape


@needs_cxx
def test_generated_kernels_run_on_the_host_match_interpreter(cases, launcher):
    """Each group's CUDA C, compiled for the host and run on the interpreter's input values,
    gives the interpreter's outputs (float32 to 1e-5 relative, integers and bools exactly)."""
    n = 0
    for name, (graph, feeds) in cases.items():
        env = values(graph, feeds)
        for group in passes.fusion_groups(graph):
            src = codegen.fused_source(group)
            ins = [np.ascontiguousarray(env[group.inputs[j].id]) for j in src.args]
            outs = [np.full(o.shape, 77, o.dtype) for o in group.outputs]
            launcher(src.code, src.name, (), 1, 1, (*ins, *outs))
            assert len(launcher.signature(src.code, (), src.name)) == len(ins) + len(outs)
            for o, got in zip(group.outputs, outs, strict=True):
                want = env[o.id]
                if want.dtype.kind == "f":
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                               err_msg=f"{name}: {group}")
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{name}: {group}")
                n += 1
    assert n > 20
