"""The compiled CPU step's intra-op pool (runtime/pool.c) and its Python side
(runtime/native.py): a job runs on the threads it asks for, however many a wider job
started; jobs come from several threads at once and after a fork; BLAS's thread count is the
user's again after steps, also when threads run steps at once; an input's temporary
contiguous copy lives until the C call returns; fed arrays are not kept alive by the
address caches (most of these found by review).
"""

import ctypes
import gc
import multiprocessing
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


def in_threads(work, items, timeout=120):
    """work(item) on a thread per item, all at once; re-raises the first failure."""
    errors = []

    def run(item):
        try:
            work(item)
        except Exception as e:           # noqa: BLE001 - re-raised below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def window_graph(shape, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
    a = {"kernel": kernel, "stride": stride, "padding": padding}
    x = leaf("input", shape, "float32", name="x")
    top = apply("max_pool2d", x, **a)
    gy = leaf("input", top.shape, "float32", name="gy")
    return Graph({"cols": apply("neg", apply("im2col", x, **a)),
                  "gx": apply("neg", apply("max_pool2d_grad", gy, x, top, **a))})


def window_run():
    graph = window_graph((16, 8, 20, 20))
    rng = np.random.default_rng(3)
    feeds = {n.name: rng.integers(-2, 3, n.shape).astype(np.float32)
             for n in graph.nodes if n.op == "input"}
    return graph, compile(graph, threads=2), feeds


def test_the_pool_serves_threads_at_once(c_on):
    """Programs run by several threads at once (ranks or stages on threads): a caller that
    finds the pool busy runs its job alone; every result is right."""
    graph, _, feeds = window_run()
    want = Interpreter(graph).run(feeds)

    def work(p):
        for _ in range(20):
            got = p.run(feeds)
            for k, w in want.items():
                np.testing.assert_array_equal(got[k], w, err_msg=k)
    in_threads(work, [compile(graph, threads=2) for _ in range(4)])


def _child_sum(q):
    _, program, feeds = window_run()
    q.put(float(sum(np.nansum(v) for v in program.run(feeds).values())))


def test_the_pool_works_in_a_forked_child(c_on):
    """A fork copies no pool thread: the child's first job starts its own."""
    _, program, feeds = window_run()
    want = float(sum(np.nansum(v) for v in program.run(feeds).values()))   # workers exist
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_sum, args=(q,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    assert q.get(timeout=10) == want


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
        in_threads(lambda p: [p.run(feeds) for _ in range(100)],
                   [compile(graph, threads=2) for _ in range(3)])
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
