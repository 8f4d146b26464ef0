"""The hand-written CUDA kernels of ops/cuda, run on the CPU: host_cuda compiles each
source for the host (one thread standing for the grid) and ops.gpu's wrappers launch it on
NumPy arrays. Each op's kernel path must give its generic forward (the reference semantics):
float64 to 1e-12, float32 to 1e-5 relative; the gather kernels (col2im, the pooling backward
kernels: ops/cuda/window.cuh) sum in the reference's order, so on the host they give it bit for
bit. The same comparisons run on a real GPU in tests/ops/test_gpu_ops.py.
"""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.ops import REGISTRY, gpu
from shardgrad.ops.registry import get, kernel_for
from shardgrad.runtime.gpu_step import FlatUpdate

sys.path.insert(0, str(Path(__file__).parent.parent / "runtime"))
import host_cuda  # noqa: E402

pytestmark = [pytest.mark.hostcc,
              pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")]

DTYPES = ["float32", "float64"]
WINDOWS = [dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
           dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0)),
           dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0)),
           dict(kernel=(2, 3), stride=(1, 3), padding=(1, 1)),
           dict(kernel=(5, 4), stride=(2, 3), padding=(2, 1))]
# sums in (i, j) window order with no multiply-add to contract: equal to the reference exactly
GATHERS = ("col2im", "max_pool2d_grad", "avg_pool2d_grad")


@pytest.fixture(scope="module", autouse=True)
def host(request):
    saved = gpu.launch
    gpu.launch = host_cuda.HostLauncher()
    yield gpu.launch
    gpu.launch = saved


def close(got, want, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, **tol)


def check(name, dtype, *args, **attrs):
    want = np.asarray(get(name).forward(np, *args, **attrs))
    got = np.asarray(REGISTRY[name].cuda(np, *args, **attrs))
    close(got, want, dtype)
    if name in GATHERS:
        np.testing.assert_array_equal(got, want, err_msg=name)
    # the out= form (the GPU executor's memory plan): the same values in the given buffer
    buf = np.full(want.shape, np.nan, want.dtype)
    assert REGISTRY[name].cuda(np, *args, **attrs, out=buf) is buf, name
    np.testing.assert_array_equal(buf, got, err_msg=name)


def rand(rng, shape, dtype, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, shape).astype(dtype)


HAND_WRITTEN = ("softmax", "log_softmax", "cross_entropy", "softmax_xent_grad", "bias_act",
                "bias_act_grad", "im2col", "col2im", "max_pool2d", "max_pool2d_grad",
                "max_pool2d_gather", "avg_pool2d", "avg_pool2d_grad", "matmul_bias_act",
                "conv_fprop", "conv_dgrad", "conv_wgrad")


def test_kernels_are_found_through_kernel_for():
    """Each op with a hand-written kernel names it on its OpDef; kernel_for picks it on CUDA
    only, and no op's entry is rewritten after registration (nothing is attached at import)."""
    for name in HAND_WRITTEN:
        assert kernel_for(name, "cuda") is getattr(gpu, name), name
        assert kernel_for(name, "cuda:1") is REGISTRY[name].cuda, name
        assert kernel_for(name, "cpu") is REGISTRY[name].forward, name
    assert {n for n, d in REGISTRY.items() if d.cuda is not None} == set(HAND_WRITTEN)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (3, 1), (2, 5, 40), (4, 1500), (0, 5), (1, 1)])
def test_softmax_family(dtype, shape):
    rng = np.random.default_rng(0)
    x = rand(rng, shape, dtype, -5, 5)
    check("softmax", dtype, x, axis=len(shape) - 1)
    check("log_softmax", dtype, x, axis=len(shape) - 1)
    if x.shape[0]:
        check("softmax", dtype, x, axis=0)     # inner axis: the generic path, same answer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_and_its_gradient(dtype, reduction):
    rng = np.random.default_rng(1)
    x, y = rand(rng, (9, 11), dtype, -4, 4), rng.integers(0, 11, 9)
    check("cross_entropy", dtype, x, y, reduction=reduction)
    for scale in (rand(rng, (9, 1), dtype), rand(rng, (1, 1), dtype)):
        check("softmax_xent_grad", dtype, x, y, scale)


def test_cross_entropy_rejects_bad_labels():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="label 4 out of range for 4 classes"):
        gpu.cross_entropy(np, x, np.array([0, 4, 1]), "mean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_matmul_bias_act_own_kernels(dtype, act):
    # no GPU library here (ops.gpu_libs finds none): the GEMM and the bias_act kernel in place
    rng = np.random.default_rng(5)
    x, w, b = rand(rng, (7, 5), dtype), rand(rng, (5, 9), dtype), rand(rng, (9,), dtype)
    check("matmul_bias_act", dtype, x, w, b, act=act)
    check("matmul_bias_act", dtype, x[:0], w, b, act=act)
    check("matmul_bias_act", dtype, np.asfortranarray(x), w.T.copy().T, b, act=act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_whole_convolutions_own_kernels(dtype, window):
    # no cuDNN here (ops.gpu_libs finds none): im2col / col2im kernels and GEMMs
    rng = np.random.default_rng(6)
    kernel, attrs = window["kernel"], dict(stride=window["stride"], padding=window["padding"])
    x, w = rand(rng, (3, 2, 9, 7), dtype), rand(rng, (4, 2, *kernel), dtype)
    y = get("conv_fprop").forward(np, x, w, **attrs)
    g = rand(rng, y.shape, dtype)
    check("conv_fprop", dtype, x, w, **attrs)
    check("conv_dgrad", dtype, g, w, shape=x.shape, **attrs)
    check("conv_wgrad", dtype, x, g, kernel=kernel, **attrs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_bias_act(dtype, act):
    rng = np.random.default_rng(2)
    x, b, g = rand(rng, (6, 10), dtype), rand(rng, (10,), dtype), rand(rng, (6, 10), dtype)
    check("bias_act", dtype, x, b, act=act)
    check("bias_act_grad", dtype, g, x, b, act=act)
    x3 = rand(rng, (2, 3, 10), dtype)
    check("bias_act", dtype, x3, b, act=act)
    check("bias_act", dtype, x3[:0], b, act=act)
    check("bias_act_grad", dtype, g[:0], x[:0], b, act=act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("win", WINDOWS, ids=lambda w: "k{kernel}s{stride}p{padding}".format(**w))
def test_conv_and_pool_kernels(dtype, win):
    rng = np.random.default_rng(3)
    x = rand(rng, (2, 3, 9, 8), dtype)
    x[0, 0, :2, :2] = 1.5                     # ties: the first maximum wins, as numpy.argmax
    cols = get("im2col").forward(np, x, **win)
    check("im2col", dtype, x, **win)
    check("col2im", dtype, rand(rng, cols.shape, dtype), shape=x.shape, **win)
    out = get("max_pool2d").forward(np, x, **win)
    g = rand(rng, out.shape, dtype)
    check("max_pool2d", dtype, x, **win)
    check("max_pool2d_grad", dtype, g, x, **win)
    check("max_pool2d_grad", dtype, g, x, out, **win)    # reading the forward's maxima
    check("max_pool2d_gather", dtype, rand(rng, x.shape, dtype), x, **win)
    check("avg_pool2d", dtype, x, **win)
    check("avg_pool2d_grad", dtype, g, shape=x.shape, **win)


def test_max_pool_backward_from_the_maxima_keeps_the_first_of_ties_nan_and_inf():
    """maxpool_bwd_top finds each window's first maximum by comparing with the stored one:
    ties, NaN (the first NaN wins, as numpy.argmax) and windows of -inf and padding only."""
    x = np.array([[[[1.0, 1.0, 0.0, -np.inf],
                    [1.0, np.nan, -np.inf, -np.inf],
                    [2.0, np.nan, 5.0, 5.0],
                    [np.nan, 2.0, 5.0, 5.0]]]])
    g = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    for win in (dict(kernel=(2, 2), stride=(1, 1), padding=(0, 0)),
                dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
                dict(kernel=(2, 2), stride=(2, 2), padding=(1, 1))):
        top = get("max_pool2d").forward(np, x, **win)
        g = np.arange(1.0, 1.0 + top.size).reshape(top.shape)
        check("max_pool2d_grad", "float64", g, x, top, **win)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (0, 2, 4, 4), (2, 0, 3, 3), (1, 1, 5, 3),
                                   (3, 1, 1, 7)])
def test_conv_and_pool_kernels_at_edge_shapes(shape):
    """Sizes 0 and 1, a window as large as the image, a single row: ops.gpu's wrappers launch
    nothing for an empty output and the kernels' geometry holds at the borders."""
    rng = np.random.default_rng(7)
    x = rand(rng, shape, "float64")
    wins = [dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0)),
            dict(kernel=tuple(min(k, 2) for k in shape[2:]), stride=(1, 1), padding=(0, 0)),
            dict(kernel=tuple(shape[2:]), stride=(2, 2), padding=(0, 0)),
            dict(kernel=(3, 3), stride=(1, 2), padding=(1, 1))]
    for win in wins:
        cols = get("im2col").forward(np, x, **win)
        out = get("max_pool2d").forward(np, x, **win)
        g = rand(rng, out.shape, "float64")
        check("im2col", "float64", x, **win)
        check("col2im", "float64", rand(rng, cols.shape, "float64"), shape=x.shape, **win)
        check("max_pool2d", "float64", x, **win)
        check("max_pool2d_grad", "float64", g, x, **win)
        check("max_pool2d_grad", "float64", g, x, out, **win)
        check("max_pool2d_gather", "float64", rand(rng, x.shape, "float64"), x, **win)
        check("avg_pool2d", "float64", x, **win)
        check("avg_pool2d_grad", "float64", g, shape=x.shape, **win)


def test_kernels_take_non_contiguous_inputs():
    """Transposed and strided views (as the GPU executor may hand over) are copied to the
    C-contiguous layout the kernels index; the host launcher refuses anything else, so a
    wrapper that forgot would fail here."""
    rng = np.random.default_rng(8)
    win = WINDOWS[2]
    x = rand(rng, (3, 9, 8, 2), "float32").transpose(3, 0, 1, 2)      # (2, 3, 9, 8), strided
    assert not x.flags.c_contiguous
    g = rand(rng, get("max_pool2d").forward(np, x, **win).shape[::-1], "float32").T
    cols = rand(rng, get("im2col").forward(np, x, **win).shape[::-1], "float32").T
    for name, args, attrs in [
            ("im2col", (x,), win), ("col2im", (cols,), dict(shape=x.shape, **win)),
            ("max_pool2d", (x,), win), ("max_pool2d_grad", (g, x), win),
            ("max_pool2d_gather", (x[:, ::-1], x), win), ("avg_pool2d", (x,), win),
            ("avg_pool2d_grad", (g,), dict(shape=x.shape, **win))]:
        check(name, "float32", *args, **attrs)
    logits = rand(rng, (11, 7), "float32").T                             # (7, 11)
    y = rng.integers(0, 11, 14)[::2]
    check("softmax", "float32", logits, axis=1)
    check("log_softmax", "float32", logits, axis=1)
    check("cross_entropy", "float32", logits, y, reduction="mean")
    check("softmax_xent_grad", "float32", logits, y, rand(rng, (1, 7), "float32").T)
    b = rand(rng, (22,), "float32")[::2]
    check("bias_act", "float32", logits, b, act="gelu")
    check("bias_act_grad", "float32", logits[::-1], logits, b, act="gelu")


def test_host_launcher_checks_arguments_against_the_kernel_signature(host):
    """What x86-64 ctypes forgives and CuPy does not: CuPy packs each argument at its own size,
    so an int64 for an ``int`` parameter shifts every later one; the host launcher refuses
    it, as it refuses a wrong count or an array of the wrong element type."""
    code, opts = gpu.source("bias_act.cu"), ("-DSG_T=float",)
    x, b, out = np.ones((2, 3), np.float32), np.ones(3, np.float32), np.empty((2, 3), np.float32)
    host(code, "bias_act_fwd", opts, 1, 1, (x, b, out, np.int64(6), *gpu._i32(3, 1)))
    np.testing.assert_array_equal(out, 2.0)
    bad = {"long long n": (x, b, out, np.int32(6), *gpu._i32(3, 1)),
           "int cols": (x, b, out, np.int64(6), np.int64(3), np.int32(1)),
           "const T\\* __restrict__ b": (x, b.astype(np.float64), out, np.int64(6),
                                          *gpu._i32(3, 1)),
           "int act": (x, b, out, np.int64(6), np.int32(3), 1),
           "takes 6 arguments, got 5": (x, b, out, np.int64(6), np.int32(3))}
    for match, args in bad.items():
        with pytest.raises(TypeError, match=match):
            host(code, "bias_act_fwd", opts, 1, 1, args)
    launched = re.findall(r'run_kernel\("(\w+\.cu)", "(\w+)"', Path(gpu.__file__).read_text())
    for file, name in launched:                    # every launch is checked, none skipped
        params = host.signature(gpu.source(file), ("-DSG_T=double",), name)
        assert params and all(dtype for _, _, dtype in params), (file, name, params)


def test_uncovered_dtypes_take_the_generic_path():
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float16)
    np.testing.assert_array_equal(gpu.softmax(np, x, 1), get("softmax").forward(np, x, axis=1))


def _rule_update(opt_cls, p, g, state, t, **kw):
    """graph.optim's rule, eagerly on tensors: the semantics the flat kernels implement."""
    opt = opt_cls([sg.tensor(p)], **kw)
    new_p, new_state = opt.rule(sg.tensor(p), sg.tensor(g),
                                {k: sg.tensor(v) for k, v in state.items()}, kw["lr"],
                                sg.tensor(np.asarray(t, p.dtype)))
    return new_p.numpy(), {k: v.numpy() for k, v in new_state.items()}


def flat_update(opt, **flat) -> None:
    """The compiled GPU step's update (runtime.gpu_step.FlatUpdate) of ``opt``'s rule, in
    place on the flat buffers ``flat`` (param, grad and ``opt``'s state keys, as a
    DeviceState holds them) at step ``opt.t + 1``."""
    kind = "adam" if isinstance(opt, sg.optim.Adam) else "sgd"
    FlatUpdate(types.SimpleNamespace(kind=kind, flat=flat))(opt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9),
                                dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                dict(momentum=0.0, weight_decay=1e-2)])
def test_flat_sgd_update_matches_optim_rule(dtype, kw):
    rng = np.random.default_rng(5)
    p, g, buf = (rand(rng, (1000,), dtype) for _ in range(3))
    want_p, want_state = _rule_update(sg.optim.SGD, p, g, {"momentum_buffer": buf}
                                      if kw["momentum"] else {}, 1, lr=0.1, **kw)
    p2, buf2 = p.copy(), buf.copy()
    flat_update(sg.optim.SGD([sg.tensor(p)], lr=0.1, **kw), param=p2, grad=g,
                **({"momentum_buffer": buf2} if kw["momentum"] else {}))
    close(p2, want_p.astype(dtype), dtype)
    if kw["momentum"]:
        close(buf2, want_state["momentum_buffer"].astype(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [sg.optim.Adam, sg.optim.AdamW])
def test_flat_adam_update_matches_optim_rule(dtype, cls):
    rng = np.random.default_rng(6)
    p, g = rand(rng, (777,), dtype), rand(rng, (777,), dtype)
    m, v = rand(rng, (777,), dtype), rand(rng, (777,), dtype, 0.0, 1.0)
    want_p, want = _rule_update(cls, p, g, {"exp_avg": m, "exp_avg_sq": v}, 4, lr=0.01,
                                weight_decay=0.1)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    opt = cls([sg.tensor(p)], lr=0.01, weight_decay=0.1)
    opt.t = 3                                      # the update of step 4
    flat_update(opt, param=p2, grad=g, exp_avg=m2, exp_avg_sq=v2)
    close(p2, want_p, dtype)
    close(m2, want["exp_avg"], dtype)
    close(v2, want["exp_avg_sq"], dtype)


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "adam", "adamw"])
def test_multi_tensor_updates_equal_the_flat_ones(host, kind):
    """One multi-tensor launch per 48 tensors (the eager GPU opt.step()) gives, tensor by
    tensor, the bits of the flat update (the compiled GPU step's) run on each (the same
    __device__ update): 50 tensors of sizes 0 to 2.5 chunks."""
    rng = np.random.default_rng(9)
    sizes = [int(s) for s in rng.choice([0, 1, 7, 300, 4096, 4097, 10000], 50)]
    lists = [[rand(rng, (n,), "float64", 0.0 if k == 3 else -2.0) for n in sizes]
             for k in range(4)]
    want = [[a.copy() for a in col] for col in lists]
    before = host.launches.copy()
    if kind.startswith("sgd"):
        # Nesterov only with momentum, as graph.optim.SGD takes it (at momentum 0 the kernel
        # never reads the flag)
        kw = dict(lr=0.1, momentum=0.9 if kind == "sgd-momentum" else 0.0, weight_decay=1e-2,
                  nesterov=kind == "sgd-momentum")
        opt = sg.optim.SGD([sg.tensor(np.zeros(1))], **kw)
        for p, g, b in zip(*want[:3], strict=True):
            flat_update(opt, param=p, grad=g, **({"momentum_buffer": b} if kw["momentum"]
                                                 else {}))
        made = gpu.sgd_multi_(*lists[:2], lists[2] if kw["momentum"] else None, **kw)
        name = "sgd_multi"
    else:
        kw = dict(lr=0.01, step=3, weight_decay=0.1, decoupled=kind == "adamw")
        opt = (sg.optim.AdamW if kw["decoupled"] else sg.optim.Adam)(
            [sg.tensor(np.zeros(1))], lr=kw["lr"], weight_decay=kw["weight_decay"])
        opt.t = kw["step"] - 1
        for p, g, m, v in zip(*want, strict=True):
            flat_update(opt, param=p, grad=g, exp_avg=m, exp_avg_sq=v)
        made = gpu.adam_multi_(*lists, **kw)
        name = "adam_multi"
    assert made == 2 and host.launches[name] - before.get(name, 0) == 2
    for col, wcol in zip(lists, want, strict=True):
        for a, w in zip(col, wcol, strict=True):
            np.testing.assert_array_equal(a, w)


def test_flat_updates_check_their_buffers():
    empty = np.zeros(0, np.float32)
    one = [sg.tensor(np.zeros(1, np.float32))]
    flat_update(sg.optim.SGD(one, lr=0.1, momentum=0.9), param=empty, grad=empty.copy(),
                momentum_buffer=empty.copy())
    flat_update(sg.optim.Adam(one, lr=0.1), param=empty, grad=empty.copy(),
                exp_avg=empty.copy(), exp_avg_sq=empty.copy())
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="1-d contiguous"):
        flat_update(sg.optim.SGD(one, lr=0.1), param=p, grad=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="momentum buffer"):
        gpu.sgd_multi_([p], [p.copy()], None, lr=0.1, momentum=0.9)


def test_every_op_through_the_gpu_executor_on_the_host():
    """test_gpu_ops' comparison (float32 outputs and gradients of every op case, fused and not)
    with the GPU executor running the CUDA sources on the host: catches schedule errors (a
    fused group must run before any outside reader of its members) without a GPU."""
    from test_gpu_ops import F32_CASES, RTOL, f32_graph, rel_err

    from shardgrad.runtime.gpu import GPUExecutor
    from shardgrad.runtime.interpreter import Interpreter
    for case in F32_CASES:
        graph, feeds = f32_graph(case)
        want = Interpreter(graph, np).run(feeds)
        for fuse in (True, False):
            got = GPUExecutor(graph, fuse=fuse, xp=np).run(feeds)
            for k, w in want.items():
                w, g = np.asarray(w), np.asarray(got[k])
                assert g.dtype == w.dtype, (case.id, k)
                if w.dtype.kind == "f":
                    assert rel_err(g, w) <= RTOL, (case.id, k, fuse, rel_err(g, w))
                else:
                    np.testing.assert_array_equal(g, w, err_msg=f"{case.id} {k}")
