"""On a GPU: every op of the op table (test_op_cases.CASES), forward and gradients, in float32,
run by the GPU executor (fused elementwise kernels, the hand-written CUDA kernels, cuBLAS)
against the reference interpreter on NumPy: each output within 1e-5 relative (norm-wise).
Also the hand-written kernels directly against the generic forward on the same GPU, and the
flat optimizer updates. Skipped where CuPy or a CUDA device is missing.
"""

import types

import numpy as np
import pytest
from op_harness import build, draw
from test_op_cases import CASES

import shardgrad as sg
from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, const
from shardgrad.ops import REGISTRY, gpu
from shardgrad.ops.reduce import sum as rsum
from shardgrad.ops.registry import get
from shardgrad.runtime.device import cuda_available
from shardgrad.runtime.gpu_step import FlatUpdate
from shardgrad.runtime.interpreter import Interpreter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")]
RTOL = 1e-5


def rel_err(got, want) -> float:
    got = np.asarray(got.get() if hasattr(got, "get") else got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    both_nan = np.isnan(got) & np.isnan(want)
    got, want = np.where(both_nan, 0, got), np.where(both_nan, 0, want)
    same_inf = np.isinf(want) & (got == want)
    got, want = np.where(same_inf, 0, got), np.where(same_inf, 0, want)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def f32_graph(case, seed=0):
    """The case's outputs and (for differentiable cases) the gradients of a random projection
    of them, with float inputs in float32; returns (graph, feeds)."""
    arrays = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in draw(case, seed)]
    xs, outs = build(case, arrays)
    names = {f"o{k}": o for k, o in enumerate(outs)}
    wrt = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"] if case.grad else []
    floats = [o for o in outs if o.dtype == "float32"]
    if wrt and floats:
        rng = np.random.default_rng(seed + 1)
        total = None
        for o in floats:
            term = rsum(o * const(rng.standard_normal(o.shape).astype(np.float32)))
            total = term if total is None else total + term
        graph = autodiff.grad(Graph({**names, "L": total}), [xs[i] for i in wrt], output="L")
    else:
        graph = Graph(names)
    return graph, {f"x{i}": a for i, a in enumerate(arrays)}


F32_CASES = [c for c in CASES if c.extra.get("f32", True)]


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_op_on_gpu_matches_cpu(case):
    from shardgrad.runtime.gpu import GPUExecutor
    graph, feeds = f32_graph(case)
    want = Interpreter(graph, np).run(feeds)
    for fuse in (True, False):
        got = GPUExecutor(graph, fuse=fuse).run(feeds)
        for k, w in want.items():
            w = np.asarray(w)
            g = got[k].get()
            assert g.dtype == w.dtype, (case.id, k)
            if w.dtype.kind in "fc":
                assert rel_err(g, w) <= RTOL, (case.id, k, fuse, rel_err(g, w))
            else:
                np.testing.assert_array_equal(g, w, err_msg=f"{case.id} {k}")


WINDOWS = [dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
           dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0)),
           dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hand_written_kernels_match_generic_forward_on_gpu(dtype):
    import cupy as cp
    rng = np.random.default_rng(0)
    tol = RTOL if dtype == "float32" else 1e-12

    def check(name, *args, **attrs):
        dev = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        want = get(name).forward(np, *args, **attrs)
        got = REGISTRY[name].cuda(cp, *dev, **attrs)
        assert rel_err(got, want) <= tol, (name, attrs, rel_err(got, want))

    for shape in [(64, 10), (5, 1000), (3, 7, 33)]:
        x = rng.uniform(-5, 5, shape).astype(dtype)
        check("softmax", x, axis=len(shape) - 1)
        check("log_softmax", x, axis=len(shape) - 1)
    x, y = rng.uniform(-4, 4, (257, 10)).astype(dtype), rng.integers(0, 10, 257)
    for r in ("mean", "sum", "none"):
        check("cross_entropy", x, y, reduction=r)
    for s in ((257, 1), (1, 1)):
        check("softmax_xent_grad", x, y, rng.uniform(-1, 1, s).astype(dtype))
    b, g = rng.uniform(-1, 1, 10).astype(dtype), rng.uniform(-1, 1, x.shape).astype(dtype)
    for act in ("relu", "gelu", "tanh"):
        check("bias_act", x, b, act=act)
        check("bias_act_grad", g, x, b, act=act)
    img = rng.uniform(-2, 2, (4, 3, 12, 10)).astype(dtype)
    for win in WINDOWS:
        cols = get("im2col").forward(np, img, **win)
        out = get("max_pool2d").forward(np, img, **win)
        gy = rng.uniform(-1, 1, out.shape).astype(dtype)
        check("im2col", img, **win)
        check("col2im", rng.uniform(-1, 1, cols.shape).astype(dtype), shape=img.shape, **win)
        check("max_pool2d", img, **win)
        check("max_pool2d_grad", gy, img, **win)
        check("max_pool2d_gather", img * 2, img, **win)
        check("avg_pool2d", img, **win)
        check("avg_pool2d_grad", gy, shape=img.shape, **win)


def test_cross_entropy_kernel_rejects_bad_labels_on_gpu():
    import cupy as cp
    with pytest.raises(ValueError, match="label 7 out of range"):
        gpu.cross_entropy(cp, cp.zeros((2, 5), cp.float32), cp.asarray([1, 7]), "mean")


def test_flat_updates_on_gpu():
    import cupy as cp
    rng = np.random.default_rng(1)
    p, g, b = (rng.standard_normal(100_003).astype(np.float32) for _ in range(3))
    dp, dg, db = cp.asarray(p), cp.asarray(g), cp.asarray(b)
    one = [sg.tensor(p[:1])]
    sgd = sg.optim.SGD(one, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    FlatUpdate(types.SimpleNamespace(kind="sgd", flat={"param": dp, "grad": dg,
                                                       "momentum_buffer": db}))(sgd)
    d = g + 1e-3 * p
    nb = 0.9 * b + d
    assert rel_err(db, nb) <= RTOL and rel_err(dp, p - 0.1 * (d + 0.9 * nb)) <= RTOL
    m, v = cp.zeros_like(dp), cp.zeros_like(dp)
    dp = cp.asarray(p)
    FlatUpdate(types.SimpleNamespace(kind="adam", flat={"param": dp, "grad": dg, "exp_avg": m,
                                                        "exp_avg_sq": v}))(
        sg.optim.Adam(one, lr=1e-3))
    assert rel_err(dp, p - 1e-3 * g / (np.abs(g) + 1e-8)) <= 1e-4
