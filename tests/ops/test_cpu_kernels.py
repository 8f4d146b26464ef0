"""The compiled CPU step's C kernels (runtime/pool.c, ops/cpu/window.c) against the reference
interpreter: the window ops over many geometries (padding, strides, overlapping and gapped
windows, ties, NaN and inf), float32 and float64, on one thread and split over three; and
GEMMs in every layout BLAS reads (transposed, batched, broadcast, degenerate sizes). The pool
itself: tests/runtime/test_pool.py.
"""

import numpy as np
import pytest

from shardgrad.graph.ir import Graph, leaf
from shardgrad.ops.registry import apply
from shardgrad.ops.shape import transpose
from shardgrad.runtime import native
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter

pytestmark = [pytest.mark.hostcc,   # .ci/run forbids a hostcc test to skip
              pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")]

WINDOW_OPS = {"im2col", "col2im", "max_pool2d", "max_pool2d_grad"}
# (kernel, stride, padding): square and not, overlapping (stride < kernel), disjoint, with
# gaps between windows (stride > kernel), padded
GEOMETRIES = [((1, 1), (1, 1), (0, 0)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)),
              ((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (1, 0)), ((3, 3), (3, 3), (0, 0)),
              ((2, 2), (3, 3), (0, 0)), ((3, 2), (2, 1), (0, 1))]


@pytest.fixture
def c_on(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_CACHE", str(tmp_path))


def window_graph(shape, dtype, kernel, stride, padding):
    """Each window op on its own inputs, its value negated so that it lives in the arena (a
    C step) rather than in an output buffer."""
    a = {"kernel": kernel, "stride": stride, "padding": padding}
    x = leaf("input", shape, dtype, name="x")
    cols = apply("im2col", x, **a)
    c = leaf("input", cols.shape, dtype, name="c")
    top = apply("max_pool2d", x, **a)
    gy = leaf("input", top.shape, dtype, name="gy")
    outs = {"im2col": cols, "col2im": apply("col2im", c, shape=shape, **a), "max_pool2d": top,
            "max_pool2d_grad": apply("max_pool2d_grad", gy, x, top, **a)}
    return Graph({k: apply("neg", v) for k, v in outs.items()})


def window_feeds(graph, dtype, rng, specials: bool):
    feeds = {}
    for n in graph.nodes:
        if n.op == "input":
            # few distinct values: many ties, which the first maximum must break as NumPy does
            v = rng.integers(-2, 3, n.shape).astype(dtype)
            if n.name == "c":
                v = rng.standard_normal(n.shape).astype(dtype)
            if specials and n.name == "x":
                flat = v.reshape(-1)
                flat[rng.choice(flat.size, 3, replace=False)] = np.nan
                flat[rng.choice(flat.size, 3, replace=False)] = -np.inf
            if specials and n.name == "gy":
                v.reshape(-1)[0] = np.inf
            feeds[n.name] = v
    return feeds


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}".format(*g))
@pytest.mark.parametrize("threads", [1, 3])
def test_window_kernels_equal_the_reference(c_on, dtype, geometry, threads):
    kernel, stride, padding = geometry
    graph = window_graph((5, 3, 8, 9), dtype, kernel, stride, padding)
    program = compile(graph, threads=threads)
    assert set(program.c_steps) == WINDOW_OPS, program.native
    rng = np.random.default_rng(hash(geometry) % 2**32)
    for specials in (False, True):
        feeds = window_feeds(graph, dtype, rng, specials)
        got, want = program.run(feeds), Interpreter(graph).run(feeds)
        for k, w in want.items():         # values (NaN where NaN); 0.0 and -0.0 are equal
            np.testing.assert_array_equal(got[k], w, err_msg=f"{k} {specials}")


def gemm_graph(a_shape, b_shape, dtype, ta=False, tb=False):
    a = leaf("input", a_shape[:-2] + a_shape[:-3:-1] if ta else a_shape, dtype, name="a")
    b = leaf("input", b_shape[:-2] + b_shape[:-3:-1] if tb else b_shape, dtype, name="b")
    swap = lambda x: transpose(x, tuple(range(len(x.shape) - 2)) + (len(x.shape) - 1,
                                                                     len(x.shape) - 2))
    out = apply("matmul", swap(a) if ta else a, swap(b) if tb else b)
    return Graph({"y": apply("neg", out)})


GEMMS = [((200, 300), (300, 100)), ((1, 300), (300, 100)), ((200, 1), (1, 100)),
         ((200, 300), (300, 1)), ((6, 70, 80), (6, 80, 90)), ((70, 80), (6, 80, 90)),
         ((6, 70, 80), (80, 90)), ((1, 70, 80), (6, 80, 90)), ((3, 9, 700), (3, 700, 5)),
         ((2, 3, 40, 50), (2, 3, 50, 60)), ((40, 50), (2, 3, 50, 60)), ((2, 3, 40, 50), (50, 60))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shapes", GEMMS, ids=lambda s: f"{s[0]}@{s[1]}")
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("threads", [1, 3])
def test_gemms_equal_numpy_in_every_layout(c_on, monkeypatch, dtype, shapes, ta, tb, threads):
    made = []          # every call's BLAS arguments: None would mean np.matmul ran instead
    real = native._gemm_args
    monkeypatch.setattr(native, "_gemm_args", lambda *a: made.append(real(*a)) or made[-1])
    graph = gemm_graph(*shapes, dtype, ta, tb)
    program = compile(graph, threads=threads, simplify=False)
    assert program.c_steps == {"matmul": 1}, program.native
    rng = np.random.default_rng(0)
    feeds = {n.name: rng.standard_normal(n.shape).astype(dtype)
             for n in graph.nodes if n.op == "input"}
    got, want = program.run(feeds)["y"], Interpreter(graph).run(feeds)["y"]
    tol = 2e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)
    for _ in range(2):                    # the same feeds again: the same bits
        np.testing.assert_array_equal(program.run(feeds)["y"], got)
    assert made and None not in made


def test_a_gemm_blas_cannot_read_runs_numpy(c_on):
    """A varying operand whose layout BLAS cannot take (every other column) goes to
    np.matmul, whatever came before it."""
    a = leaf("input", (40, 60), "float32", name="a")
    b = leaf("input", (60, 30), "float32", name="b")
    graph = Graph({"y": apply("neg", apply("matmul", a, b))})
    program = compile(graph, threads=2)
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((40, 120)).astype(np.float32)
    bb = rng.standard_normal((60, 30)).astype(np.float32)
    for av in (wide[:, ::2], np.ascontiguousarray(wide[:, ::2]), wide[:, 1::2]):
        np.testing.assert_allclose(program.run({"a": av, "b": bb})["y"], -(av @ bb),
                                   rtol=1e-5, atol=1e-5)
