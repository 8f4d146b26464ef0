"""The compiled CPU step's intra-op pool (runtime/pool.c) and its Python side
(runtime/native.py), found by review: a job runs on the threads it asks for, however many a
wider job started; BLAS's thread count is the user's again after steps, also when threads
run steps at once; an input's temporary contiguous copy lives until the C call returns;
fed arrays are not kept alive by the address caches.
"""

import ctypes
import gc
import threading
import time
import weakref

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import shardgrad as sg
from shardgrad.graph.ir import Graph, leaf
from shardgrad.ops.registry import apply
from shardgrad.runtime import native
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter

pytestmark = [pytest.mark.hostcc,   # .ci/run forbids a hostcc test to skip
              pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")]


@pytest.fixture
def c_on(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_CACHE", str(tmp_path))


TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong)
PARALLEL_FOR = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, TASK,
                                ctypes.c_void_p)


def test_a_job_runs_on_the_threads_it_asks_for(c_on):
    run = PARALLEL_FOR(native.runtime().parallel_for)
    seen, ran = set(), []

    def part(_ctx, b, e):
        seen.add(threading.get_native_id())
        ran.extend(range(b, e))
        time.sleep(0.005)            # a part that takes a while (the GIL is released)
    task = TASK(part)
    run(6, 12, 1, task, None)        # a wide job: 5 workers exist from now on
    assert sorted(ran) == list(range(12))
    for _ in range(3):
        seen.clear()
        ran.clear()
        run(2, 8, 1, task, None)
        assert sorted(ran) == list(range(8))       # each part once
        assert 1 <= len(seen) <= 2, seen           # the wider job's workers stay out


def matmul_program(threads):
    a = leaf("input", (256, 256), "float32", name="a")
    b = leaf("input", (256, 256), "float32", name="b")
    graph = Graph({"y": apply("neg", apply("matmul", a, b))})
    return graph, compile(graph, threads=threads)


def blas_counts():
    return [i["num_threads"] for i in threadpool_info() if i.get("internal_api") == "openblas"]


def test_blas_threads_are_the_users_again_after_steps(c_on):
    before = sg.get_num_threads()
    try:
        sg.set_num_threads(2)
        graph, _ = matmul_program(2)
        feeds = {"a": np.ones((256, 256), np.float32), "b": np.ones((256, 256), np.float32)}
        programs = [compile(graph, threads=2) for _ in range(3)]

        def work(p):
            for _ in range(100):
                p.run(feeds)
        threads = [threading.Thread(target=work, args=(p,)) for p in programs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert sg.get_num_threads() == 2
        assert compile(graph).native.threads == 2
        assert native.blas() is None or 2 in blas_counts()
    finally:
        sg.set_num_threads(before)


def test_many_strided_inputs_stay_alive_through_the_call(c_on):
    """Each strided input of a fused group is copied to a contiguous array; every copy must
    live until the C loop has read it (12 inputs: more than any fixed number kept)."""
    k, shape = 12, (256, 256)
    xs = [leaf("input", shape, "float32", name=f"x{j}") for j in range(k)]
    y = xs[0]
    for x in xs[1:]:
        y = apply("add", y, x)
    program = compile(Graph({"y": apply("neg", y)}), threads=1)
    assert program.native.groups == 1, program.native
    rng = np.random.default_rng(0)
    for _ in range(3):
        wide = [rng.standard_normal((shape[0], 2 * shape[1])).astype(np.float32)
                for _ in range(k)]
        feeds = {f"x{j}": wide[j][:, ::2] for j in range(k)}
        want = -sum(feeds[f"x{j}"].astype(np.float64) for j in range(k))
        np.testing.assert_allclose(program.run(feeds)["y"], want, rtol=1e-4, atol=1e-4)


def test_fed_arrays_are_not_kept_alive(c_on):
    shape = (256, 1024)
    x = leaf("input", shape, "float32", name="x")
    w = leaf("input", (1024, 64), "float32", name="w")
    program = compile(Graph({"y": apply("neg", apply("matmul", apply("exp", x), w)),
                             "z": apply("exp", apply("neg", x))}), threads=1)
    assert program.c_steps and program.native.groups, program.native
    refs, wv = [], np.ones((1024, 64), np.float32)
    for _ in range(20):
        xv = np.ones(shape, np.float32)
        refs.append(weakref.ref(xv))
        program.run({"x": xv, "w": wv})
        del xv
    gc.collect()
    assert sum(r() is not None for r in refs) <= 1     # the program's last slot at most


@pytest.mark.parametrize("geometry", [((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (0, 0))])
def test_pool_gradient_where_no_element_is_the_maximum(c_on, geometry):
    """A window none of whose elements equals the given maximum sends no gradient, as the
    reference: on the overlapping path as on the disjoint one."""
    kernel, stride, padding = geometry
    a = {"kernel": kernel, "stride": stride, "padding": padding}
    x = leaf("input", (2, 3, 8, 8), "float32", name="x")
    shape = apply("max_pool2d", x, **a).shape
    top = leaf("input", shape, "float32", name="top")
    gy = leaf("input", shape, "float32", name="gy")
    graph = Graph({"gx": apply("neg", apply("max_pool2d_grad", gy, x, top, **a))})
    program = compile(graph, threads=1)
    assert "max_pool2d_grad" in program.c_steps
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32),
             "top": np.full(shape, 10.0, np.float32), "gy": np.ones(shape, np.float32)}
    np.testing.assert_array_equal(program.run(feeds)["gx"], Interpreter(graph).run(feeds)["gx"])
