"""The compiled CPU step with generated C (runtime.native) against the reference interpreter:
the exact-GELU MLP and the CNN training steps, one and two threads; and every way the C path
is off (SHARDGRAD_NATIVE=0, no compiler, a compiler that fails), where the step is NumPy's,
bit for bit the interpreter's, and ``program.native`` says why.
"""

import os
import stat

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.runtime import compiled, config, device, native
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter


# hostcc: .ci/run forbids these to skip, so a CI machine without a compiler fails loudly
def needs_cc(test):
    return pytest.mark.hostcc(
        pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")(test))


@pytest.fixture
def c_on(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_CACHE", str(tmp_path / "cache"))


def gelu_step(batch=16):
    sg.manual_seed(0)
    nn = sg.nn
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10))

    def mse(out, y):
        d = out - y
        return (d * d).mean()

    step = sg.compile_step(model, mse, sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 64)).astype(np.float32)
    y = rng.standard_normal((batch, 10)).astype(np.float32)
    return step, x, y


def cnn_step(batch=4):
    sg.manual_seed(0)
    nn = sg.nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 11 * 11, 10))
    step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                           sg.optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(0)
    return step, rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(
        0, 10, batch)


def run_steps(graph, feeds, program, n=3):
    """n steps, each step's new parameters and states fed to the next; the outputs of each."""
    feeds = dict(feeds)
    seen = []
    for _ in range(n):
        out = {k: np.array(v) for k, v in program.run(feeds).items()}
        seen.append(out)
        for k, v in out.items():
            if k.startswith(("param/", "state/")):
                feeds[k.split("/", 1)[1]] = v
    return seen


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("make, exact", [(gelu_step, False), (cnn_step, True)],
                         ids=["gelu_mlp", "cnn"])
def test_steps_match_interpreter(c_on, monkeypatch, make, exact, threads):
    monkeypatch.setattr(native, "threads", lambda: threads)
    monkeypatch.setattr(native, "PARALLEL_FROM", 1024)   # split this test's small arrays too
    monkeypatch.setattr(compiled, "SPLIT_FROM", 1024)    # and its window ops by rows
    step, x, y = make()
    graph, _ = step.graph_for(x, y)
    feeds = step.feeds(x, y)
    program = compile(graph)
    info = program.native
    assert not info.reason and info.groups >= 2 and info.threads == threads, info
    assert "fused" in {n.op for n in program.graph.nodes}
    assert program.threads == threads
    assert program.split == 0                            # no Python rows: the pool's C
    if make is gelu_step:      # a multi-output group's parts: views of its buffer, made once
        parts = sum(n.op == "unpack" for n in program.graph.nodes)   # (but those of a buffer
        assert 0 < sum(n.op == "unpack" for n in program.step_nodes) < parts  # that alternates)
    want_c = {"matmul"} | ({"im2col", "col2im", "max_pool2d", "max_pool2d_grad"}
                           if make is cnn_step else set())
    assert want_c <= set(program.c_steps) and info.c_steps is program.c_steps, info
    got = run_steps(graph, feeds, program)
    want = run_steps(graph, feeds, Interpreter(graph))
    for g, w in zip(got, want, strict=True):
        for k in w:
            if exact:      # relu, its mask, bias adds, SGD: arithmetic only, so NumPy's bits
                np.testing.assert_array_equal(g[k], w[k], err_msg=k)
            else:          # erf and exp: libmvec's, within float32 rounding of NumPy's
                np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-6, err_msg=k)


@needs_cc
def test_library_is_built_once_and_cached(c_on, tmp_path, monkeypatch):
    step, x, y = cnn_step()
    graph, _ = step.graph_for(x, y)
    native.runtime()                # the pool's library: built once per process (elsewhere)
    compile(graph)
    built = sorted((tmp_path / "cache").glob("sg_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._loaded.clear()
    calls = []
    monkeypatch.setattr(native, "_compile", lambda *a: calls.append(a))
    assert not compile(graph).native.reason        # loaded from the cache, not rebuilt
    assert calls == [] and built[0].stat().st_mtime_ns == stamp


def fake_cc(tmp_path, body: str) -> str:
    path = tmp_path / "fakecc"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("how", ["off", "no_compiler", "failing_compiler"])
def test_numpy_path_when_c_is_off(c_on, tmp_path, monkeypatch, how):
    if how == "off":
        monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
        reason = "SHARDGRAD_NATIVE=0"
    elif how == "no_compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no" / "such" / "cc"))
        reason = "no C compiler"
    else:
        monkeypatch.setenv("CC", fake_cc(
            tmp_path, 'if [ "$1" = --version ]; then echo fakecc 1.0; exit 0; fi\n'
                      'echo "fakecc: internal error" >&2; exit 1'))
        reason = "fakecc: internal error"
    step, x, y = cnn_step()
    graph, _ = step.graph_for(x, y)
    feeds = step.feeds(x, y)
    program = compile(graph)
    assert program.native.reason and reason in program.native.reason, program.native
    assert str(program.native).startswith("NumPy kernels")
    assert "fused" not in {n.op for n in program.graph.nodes}
    got, want = run_steps(graph, feeds, program), run_steps(graph, feeds, Interpreter(graph))
    for g, w in zip(got, want, strict=True):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert not os.path.exists(tmp_path / "cache") or not list(
        (tmp_path / "cache").glob("sg_*.so"))


def test_rows_split_over_threads_without_c(monkeypatch):
    """The window ops' split by rows is NumPy's own kernels on slices: bitwise the same."""
    monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
    monkeypatch.setattr(compiled, "SPLIT_FROM", 1024)
    step, x, y = cnn_step(batch=5)                     # rows 3 + 2 on two threads
    graph, _ = step.graph_for(x, y)
    program = compile(graph, threads=2)
    assert program.split >= 4 and program.native.reason
    splits = {n.op for n in program.graph.nodes if n.op in (
        "im2col", "col2im", "max_pool2d", "max_pool2d_grad")}
    assert splits == {"im2col", "col2im", "max_pool2d", "max_pool2d_grad"}
    feeds = step.feeds(x, y)
    got, want = run_steps(graph, feeds, program), run_steps(graph, feeds, Interpreter(graph))
    for g, w in zip(got, want, strict=True):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_a_failing_row_reraises(monkeypatch):
    pool = native.Pool.of(2)

    def boom():
        raise ValueError("row failed")
    ran = []
    with pytest.raises(ValueError, match="row failed"):
        pool.run([lambda: ran.append(0), boom])
    assert ran == [0]


def test_compile_native_false_keeps_numpy_kernels(c_on):
    step, x, y = cnn_step()
    graph, _ = step.graph_for(x, y)
    program = compile(graph, native=False)
    assert program.native is None
    assert "fused" not in {n.op for n in program.graph.nodes}


@needs_cc
def test_pool_threads_follow_blas_and_are_shared_among_local_ranks(c_on, monkeypatch):
    monkeypatch.delenv("SHARDGRAD_NATIVE_THREADS", raising=False)
    for name in config.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    before = sg.get_num_threads()
    monkeypatch.setattr(device, "cores", lambda: 4)
    try:
        sg.set_num_threads(3)                     # as torch.set_num_threads
        assert sg.get_num_threads() == 3 and native.threads() == 3
        sg.set_num_threads(4)                     # BLAS's default, every core ...
        assert native.threads() == 4
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
        assert native.threads() == 2              # ... shared by mpirun's 2 ranks here
        sg.set_num_threads(3)                     # a count the user chose is kept
        assert native.threads() == 3
        monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", "5")
        assert native.threads() == 5
        for bad in (0, -1, 1.5, "2", True):
            with pytest.raises(sg.runtime.config.ConfigError, match="set_num_threads"):
                sg.set_num_threads(bad)
    finally:
        sg.set_num_threads(before)


def test_pool_threads_are_one_without_c_and_set_by_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
    monkeypatch.delenv("SHARDGRAD_NATIVE_THREADS", raising=False)
    assert native.threads() == 1                  # NumPy's kernels: the step stays on one
    monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", "2")
    assert native.threads() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", bad)
        with pytest.raises(sg.runtime.config.ConfigError, match="SHARDGRAD_NATIVE_THREADS"):
            native.threads()


@needs_cc
def test_gemms_call_the_openblas_wheel_or_numpys_on_request(c_on, monkeypatch):
    rt = native.runtime()           # built (once a process) before the setting changes below
    monkeypatch.setattr(native, "_gemm_blas", [])
    monkeypatch.delenv("SHARDGRAD_BLAS", raising=False)
    wheel = native.gemm_blas()          # scipy-openblas64 is a dependency
    assert wheel is not None and "scipy_openblas64" in wheel.path, wheel
    assert wheel.path != native.blas().path
    monkeypatch.setattr(native, "_gemm_blas", [])
    monkeypatch.setenv("SHARDGRAD_BLAS", "numpy")
    assert native.gemm_blas() is native.blas()
    # either library's GEMM gives NumPy's values within float32 rounding (not its bits:
    # OpenBLAS 0.3.31 and 0.3.34 block a K of 784 differently)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((64, 784), (784, 96)))
    for lib in (wheel, native.blas()):
        monkeypatch.setattr(rt, "gemm", lib)
        out = np.empty((64, 96), np.float32)
        rt.lib.sg_gemm((native.ctypes.c_longlong * 17)(*native._gemm_args(rt, 2, a, b, out)))
        np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)


@needs_cc
def test_gemm_blocks_stay_single_threaded_whatever_threadpoolctl_sets(c_on):
    """sg.set_num_threads (threadpoolctl) sets every BLAS loaded, the wheel's too: the pool's
    blocks would each start BLAS threads of their own beside the pool's. sg_gemm sets the
    GEMM library back to one thread; NumPy's keeps the user's count."""
    rt = native.runtime()
    assert rt.gemm is not rt.blas, "scipy-openblas64, a dependency, is not installed"
    before = sg.get_num_threads()
    try:
        sg.set_num_threads(2)
        assert rt.gemm.get_threads() == 2 and sg.get_num_threads() == 2   # threadpoolctl's
        a = np.ones((64, 64), np.float32)
        out = np.empty((64, 64), np.float32)
        rt.lib.sg_gemm((native.ctypes.c_longlong * 17)(*native._gemm_args(rt, 2, a, a, out)))
        assert out[0, 0] == 64 and rt.gemm.get_threads() == 1 and sg.get_num_threads() == 2
    finally:
        sg.set_num_threads(before)


@pytest.fixture
def eager_gemms(c_on, monkeypatch):
    """The eager GEMMs run_eager hands to the pool, counted; ``threads`` settable."""
    calls = []
    real = native._gemm_args

    def spy(rt, n, a, b, out):
        got = real(rt, n, a, b, out)
        calls.append((n, a.shape, b.shape, got is not None))
        return got
    monkeypatch.setattr(native, "_gemm_args", spy)
    monkeypatch.setattr(native, "_eager", {})
    return calls


@needs_cc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eager_gemms_run_on_the_pool(eager_gemms, monkeypatch, dtype):
    monkeypatch.setattr(native, "threads", lambda: 2)
    rng = np.random.default_rng(1)
    a, w = (rng.standard_normal(s).astype(dtype) for s in ((32, 300), (200, 300)))
    x, wt = sg.tensor(a, requires_grad=True), sg.tensor(w, requires_grad=True)
    out = x @ wt.T                                   # as nn.Linear: W transposed
    (out * out).sum().backward()
    assert [c[0] for c in eager_gemms] == [2, 2, 2] and all(c[3] for c in eager_gemms)
    tol = 1e-4 if dtype == "float32" else 1e-12
    want = a @ w.T
    np.testing.assert_allclose(out.numpy(), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(x.grad.numpy(), 2 * want @ w, rtol=tol, atol=tol)
    np.testing.assert_allclose(wt.grad.numpy(), 2 * want.T @ a, rtol=tol, atol=tol)
    assert out.dtype == dtype
    eager_gemms.clear()             # sum's gradient is a broadcast: BLAS cannot read its zero
    (x @ wt.T).sum().backward()     # strides, so NumPy's matmul runs the two backward GEMMs
    assert [c[3] for c in eager_gemms] == [True, False, False]


@needs_cc
def test_eager_gemms_stay_numpys_where_c_gains_nothing(eager_gemms, monkeypatch):
    monkeypatch.setattr(native, "threads", lambda: 1)
    small = sg.tensor(np.ones((8, 8), np.float32))
    assert (small @ small).numpy()[0, 0] == 8 and not eager_gemms   # one thread, tiny
    big = sg.tensor(np.ones((256, 256), np.float32))
    assert (big @ big).numpy()[0, 0] == 256 and len(eager_gemms) == 1   # 2^24 multiply-adds
    ints = sg.tensor(np.arange(6).reshape(2, 3))
    monkeypatch.setattr(native, "threads", lambda: 2)
    monkeypatch.setattr(native, "_eager", {})
    np.testing.assert_array_equal((ints @ ints.T).numpy(), [[5, 14], [14, 50]])
    assert len(eager_gemms) == 1                     # integers: NumPy's matmul
    monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
    assert (big @ big).numpy()[0, 0] == 256 and len(eager_gemms) == 1


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_eager_convolution_and_pooling_run_the_window_kernels(c_on, monkeypatch, threads):
    """An eager CNN forward and backward gives the NumPy path's values (the window kernels'
    bits; the GEMMs' within rounding), the image arriving strided (a transposed view)."""
    monkeypatch.setattr(native, "threads", lambda: threads)
    monkeypatch.setattr(native, "_eager", {})
    ran = []
    real = native._window_step
    monkeypatch.setattr(native, "_window_step",
                        lambda rt, kern, *a: ran.append(kern.name) or real(rt, kern, *a))
    rng = np.random.default_rng(2)
    image = rng.standard_normal((4, 3, 20, 20)).astype(np.float32).transpose(0, 1, 3, 2)
    sg.manual_seed(0)
    nn = sg.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def run():
        x = sg.tensor(image, requires_grad=True)
        out = model(x)
        (out * out).sum().backward()
        grads = [x.grad.numpy().copy(), *(p.grad.numpy().copy() for p in model.parameters())]
        for p in model.parameters():
            p.grad = None
        return out.numpy().copy(), grads
    got, got_grads = run()
    assert {"im2col", "maxpool", "maxpool_grad", "col2im"} <= set(ran), ran
    monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
    want, want_grads = run()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# ---- the optimizers' fused updates (ops/cpu/update.c over the pool) ------------------------

def _by_ops(cls):
    """``cls`` with its rule run op by op (a subclass's rule is never the fused one's)."""
    return type(f"{cls.__name__}ByOps", (cls,), {"rule": lambda self, *a: cls.rule(self, *a)})


@needs_cc
@pytest.mark.parametrize("make", [
    lambda c, ps: c(ps, lr=0.1),
    lambda c, ps: c(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda c, ps: c(ps, lr=0.1, momentum=0.9, nesterov=True)], ids=["plain", "mom-wd", "nest"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_sgd_is_the_rule_bit_for_bit_in_place(make, threads, dtype, monkeypatch):
    _fused_matches_rule(sg.optim.SGD, make, threads, dtype, monkeypatch)


@needs_cc
@pytest.mark.parametrize("cls,kw", [(sg.optim.Adam, {}), (sg.optim.Adam, {"weight_decay": 0.1}),
                                    (sg.optim.AdamW, {}),
                                    (sg.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6})],
                         ids=["adam", "adam-l2", "adamw", "betas"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_adam_is_the_rule_bit_for_bit_in_place(cls, kw, threads, dtype, monkeypatch):
    _fused_matches_rule(cls, lambda c, ps: c(ps, lr=1e-2, **kw), threads, dtype, monkeypatch)


def _fused_matches_rule(cls, make, threads, dtype, monkeypatch):
    """Parameters of 77k, 257, 33k and 130 elements: the pool's parts (32k elements) start
    and end inside tensors and span tensor boundaries at 2 threads."""
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", str(threads))
    ran = []
    update = native._update
    monkeypatch.setattr(native, "_update", lambda *a: ran.append(update(*a)) or ran[-1])
    models = []
    for _ in range(2):
        sg.manual_seed(5)
        m = sg.nn.Sequential(sg.nn.Linear(300, 257), sg.nn.Tanh(), sg.nn.Linear(257, 130))
        models.append(m.double() if dtype == "float64" else m)
    fused, ops = make(cls, models[0].parameters()), make(_by_ops(cls), models[1].parameters())
    arrays = [p.data for p in models[0].parameters()]
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.standard_normal((16, 300)).astype(dtype)
        y = rng.standard_normal((16, 130)).astype(dtype)
        for m, opt in zip(models, (fused, ops), strict=True):
            opt.zero_grad()
            d = m(sg.tensor(x)) - sg.tensor(y)
            (d * d).mean().backward()
            opt.step()
    assert ran == [True] * 4                    # the C update ran, once a step
    for a, p, q in zip(arrays, models[0].parameters(), models[1].parameters(), strict=True):
        assert p.data is a and p.dtype == dtype     # in place
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    for sf, so in zip(fused.state, ops.state, strict=True):
        for k in sf:
            np.testing.assert_array_equal(sf[k].numpy(), so[k].numpy())


def test_without_c_sgd_updates_in_place_with_numpy_and_adam_runs_its_rule(monkeypatch):
    """SHARDGRAD_NATIVE=0: the fused update reports it cannot run; SGD then runs its float ops
    with NumPy in place, Adam its rule op by op; both give the rule's values."""
    monkeypatch.setenv("SHARDGRAD_NATIVE", "0")
    p = np.ones(4, np.float32)
    assert native.sgd_multi_([p], [p.copy()], None, lr=0.5) is False
    np.testing.assert_array_equal(p, 1.0)                   # nothing done
    for cls, make in ((sg.optim.SGD, lambda c, ps: c(ps, lr=0.1, momentum=0.9)),
                      (sg.optim.Adam, lambda c, ps: c(ps, lr=1e-2))):
        ws = [sg.nn.Parameter(np.arange(6, dtype=np.float32).reshape(2, 3)) for _ in range(2)]
        opts = [make(cls, [ws[0]]), make(_by_ops(cls), [ws[1]])]
        kept = ws[0].data
        for _ in range(3):
            for w, opt in zip(ws, opts, strict=True):
                opt.zero_grad()
                (w * w).sum().backward()
                opt.step()
        np.testing.assert_array_equal(ws[0].numpy(), ws[1].numpy())
        assert (ws[0].data is kept) == (cls is sg.optim.SGD)


@needs_cc
def test_fused_update_names_bad_arrays(monkeypatch):
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        native.sgd_multi_([p], [np.zeros(4, np.float64)], None, lr=0.1)
    with pytest.raises(ValueError, match="the size of its parameter"):
        native.sgd_multi_([p], [np.zeros(3, np.float32)], None, lr=0.1)
    with pytest.raises(ValueError, match="momentum needs momentum buffers"):
        native.sgd_multi_([p], [p.copy()], None, lr=0.1, momentum=0.9)


# ---- eager elementwise kernels (ops.codegen.eager_source over the pool) --------------------

def _bits_equal(a, b):
    ia, ib = a.view(f"u{a.itemsize}"), np.asarray(b, a.dtype).view(f"u{a.itemsize}")
    return bool(np.all((ia == ib) | (np.isnan(a) & np.isnan(b))))


def _with_specials(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    if flat.size >= 24:
        flat[:24:3] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.0, 2.0]
    return a


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eager_elementwise_kernels_give_numpys_bits(threads, dtype, monkeypatch):
    """Every op the runtime carries an eager kernel for, on operands as eager code meets
    them (same shape, a bias row, a (C, 1, 1) bias, a scalar, a transposed view) with NaN,
    infinities, signed zeros and subnormals among them: NumPy's values bit for bit, whether
    the C kernel ran or (a layout it does not read, too little work) NumPy did."""
    from shardgrad.graph.ir import Node
    from shardgrad.ops.registry import get
    monkeypatch.setenv("SHARDGRAD_NATIVE", "1")
    monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", str(threads))
    rng = np.random.default_rng(0)
    ran = []
    elementwise = native.run_elementwise

    def spy(node, args):
        got = elementwise(node, args)
        ran.append(got is not None)
        return got
    monkeypatch.setattr(native, "run_elementwise", spy)
    for op, arity in native.EAGER_ELEMENTWISE.items():
        opdef = get(op)
        cases = [[(512, 512)]] if arity == 1 else [
            [(512, 512)] * 2, [(512, 512), (512,)], [(64, 16, 26, 26), (16, 1, 1)],
            [(512, 512), ()], [(), (512, 512)], [(512, 512), "T"], [(40, 32), (40, 32)]]
        for shapes in cases:
            args = [_with_specials(rng, s, dtype) for s in shapes if s != "T"]
            if shapes[-1] == "T":
                args.append(_with_specials(rng, (512, 512), dtype).T)   # strided
            out = np.broadcast_shapes(*[a.shape for a in args])
            node = Node(op, tuple(Node("input", (), {}, a.shape, dtype) for a in args), {},
                        out, dtype)
            with np.errstate(all="ignore"):
                got = native.run_eager(node, args)
                ref = opdef.forward(np, *args)
            if got is None:
                continue
            assert got.shape == out and got.dtype == dtype, (op, shapes)
            assert _bits_equal(got, ref), (op, dtype, shapes)
    assert any(ran)
    if threads == 2:                # every big layout above but the transposed one ran in C
        assert sum(ran) >= len(native.EAGER_ELEMENTWISE) * 2


@needs_cc
def test_eager_relu_network_on_two_threads_matches_numpy(monkeypatch):
    """Through the public API: a conv-sized activation's bias add, relu and its gradient on
    two threads (the C kernels) give what they give with C off."""
    monkeypatch.setenv("SHARDGRAD_NATIVE_THREADS", "2")
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((32, 16, 26, 26)).astype(np.float32)
    b0 = rng.standard_normal((16, 1, 1)).astype(np.float32)
    results = []
    for native_on in ("1", "0"):
        monkeypatch.setenv("SHARDGRAD_NATIVE", native_on)
        x, b = sg.tensor(x0, requires_grad=True), sg.tensor(b0, requires_grad=True)
        y = (x * 2.0 + b).relu()
        (y * y).sum().backward()
        results.append((y.numpy(), x.grad.numpy(), b.grad.numpy()))
    for a, b in zip(*results, strict=True):
        assert _bits_equal(a, b)
