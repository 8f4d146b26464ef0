"""The capture-safe GEMM (runtime.capture_gemm) on the CPU: a host cuBLAS stands in for
libcublas, reading and writing memory through the pointers, leading dimensions and batch
strides it is given with cuBLAS's column-major semantics, so the argument mapping (row-major
products as transposed column-major ones, transposed views read in place, batched and
broadcast operands) is checked against NumPy's matmul. Then the GPU step's capture on the
stand-in runs its matmuls through it and checks the replay against CuPy's matmul, and
``stats()["gemm"]`` says which GEMM a capture used. On a GPU the same comparison runs against
the real libcublas (``-m gpu``; bench/gpu_check.sh).
"""

import ctypes
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_gpu_step as T  # noqa: E402

import shardgrad as sg  # noqa: E402
from shardgrad.runtime import capture_gemm  # noqa: E402
from shardgrad.runtime import device as D  # noqa: E402

pytestmark = pytest.mark.timeout(120)
host, capture, launcher = T.host, T.capture, T.launcher     # the stand-in's fixtures


def _value(x):
    return x._obj.value if hasattr(x, "_obj") else getattr(x, "value", x)


class HostCublas:
    """libcublas's calls that capture_gemm makes, on host memory: the GEMM reads A, B and
    writes C exactly where cuBLAS would (column-major, ``ld``, ``stride`` between batch
    matrices); ``stream`` and ``workspace`` record what was set (cublasSetStream resets the
    workspace, as cuBLAS 12 does)."""

    def __init__(self):
        self.gemms, self.stream, self.workspace = [], None, None

    def cublasCreate_v2(self, handle):
        handle._obj.value = 1234
        return 0

    def cublasSetStream_v2(self, handle, stream):
        self.stream, self.workspace = _value(stream), None
        return 0

    def cublasSetWorkspace_v2(self, handle, ptr, size):
        self.workspace = (_value(ptr), _value(size))
        return 0

    @staticmethod
    def _matrix(ptr, rows, cols, ld, stride, batch, dtype):
        item = np.dtype(dtype).itemsize
        base = np.ctypeslib.as_array((ctypes.c_char * item).from_address(ptr)).view(dtype)
        return np.lib.stride_tricks.as_strided(
            base, (batch, rows, cols), (stride * item, item, ld * item))

    def _gemm(self, dtype, handle, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c,
              ldc, sc, batch):
        ta, tb, m, n, k = (_value(v) for v in (ta, tb, m, n, k))
        batch = _value(batch)
        assert self.workspace is not None, "a GEMM before its workspace was set"
        A = self._matrix(_value(a), *((k, m) if ta else (m, k)), _value(lda), _value(sa),
                         batch, dtype)
        B = self._matrix(_value(b), *((n, k) if tb else (k, n)), _value(ldb), _value(sb),
                         batch, dtype)
        C = self._matrix(_value(c), m, n, _value(ldc), _value(sc), batch, dtype)
        opa = A.transpose(0, 2, 1) if ta else A
        opb = B.transpose(0, 2, 1) if tb else B
        product = _value(alpha) * (opa @ opb)
        C[...] = product if _value(beta) == 0 else product + _value(beta) * C  # as cuBLAS:
        # with beta = 0, C is not read (it may hold NaN)
        self.gemms.append((ta, tb, m, n, k, batch))
        return 0

    def cublasSgemmStridedBatched(self, *args):
        return self._gemm(np.float32, *args)

    def cublasDgemmStridedBatched(self, *args):
        return self._gemm(np.float64, *args)

    def cublasGemmStridedBatchedEx(self, handle, ta, tb, m, n, k, alpha, a, atype, lda, sa, b,
                                   btype, ldb, sb, beta, c, ctype, ldc, sc, batch, compute,
                                   algo):
        """bf16 / fp16 operands and product, accumulated in float32 (compute type 68)."""
        types = {_value(t) for t in (atype, btype, ctype)}
        assert len(types) == 1 and _value(compute) == 68 and _value(algo) == -1
        dtype = {14: ml_dtypes.bfloat16, 2: np.float16}[types.pop()]
        ta, tb, m, n, k, batch = (_value(v) for v in (ta, tb, m, n, k, batch))
        A = self._matrix(_value(a), *((k, m) if ta else (m, k)), _value(lda), _value(sa),
                         batch, dtype).astype(np.float32)
        B = self._matrix(_value(b), *((n, k) if tb else (k, n)), _value(ldb), _value(sb),
                         batch, dtype).astype(np.float32)
        C = self._matrix(_value(c), m, n, _value(ldc), _value(sc), batch, dtype)
        opa = A.transpose(0, 2, 1) if ta else A
        opb = B.transpose(0, 2, 1) if tb else B
        C[...] = (_value(alpha) * (opa @ opb)).astype(dtype)
        self.gemms.append((ta, tb, m, n, k, batch))
        return 0


@pytest.fixture
def cublas(monkeypatch):
    lib = HostCublas()
    monkeypatch.setattr(capture_gemm, "load_library", lambda: lib)
    return lib


def _layouts(rng, dtype):
    """(a, b) pairs: C order, transposed views, batched, broadcast, degenerate sizes."""
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    return [
        (r(5, 7), r(7, 3)),
        (r(7, 5).T, r(7, 3)),                       # a transposed view (weight gradients)
        (r(5, 7), r(3, 7).T),                       # b transposed (x @ W^T)
        (r(7, 5).T, r(3, 7).T),
        (r(1, 7), r(7, 1)), (r(6, 1), r(1, 4)),     # rows / columns of one element
        (r(4, 9), r(8, 9, 6)),                      # conv: weights @ columns, broadcast
        (r(8, 6, 9), r(9, 4)),
        (r(8, 5, 9), r(8, 9, 6)),                   # batched
        (r(8, 9, 5).transpose(0, 2, 1), r(8, 9, 6)),
        (r(2, 3, 5, 4), r(2, 3, 4, 6)),             # two batch axes, flattened
    ]


def on_device(xp, x):
    """``x`` on the device with its layout: C order, or (a transposed view) the last two axes
    swapped over a C-order copy."""
    if x.flags.c_contiguous:
        return xp.asarray(x)
    return xp.asarray(np.ascontiguousarray(np.swapaxes(x, -1, -2))).swapaxes(-1, -2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_gemm_equals_numpy_matmul_for_every_layout(host, cublas, dtype):
    gemm, note = capture_gemm.CaptureGemm.probe(host)
    assert gemm is not None and note == "cublas direct, workspace 32 MiB", note
    gemm.active = True
    rng = np.random.default_rng(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    layouts = _layouts(rng, dtype)
    for a, b in layouts:
        want = np.matmul(a, b)
        out = host.asarray(np.full(want.shape, np.nan, dtype))
        da, db = on_device(host, a), on_device(host, b)
        assert da.strides == a.strides and db.strides == b.strides
        assert gemm.matmul(da, db, out), (a.shape, a.strides, b.shape, b.strides)
        np.testing.assert_allclose(out.get(), want, **tol, err_msg=str((a.shape, b.shape)))
    assert len(cublas.gemms) == len(layouts) == gemm.calls
    assert cublas.workspace == (gemm.workspace.ctypes.data, capture_gemm.WORKSPACE_BYTES)


def test_what_the_gemm_does_not_cover_is_left_to_cupy(host, cublas):
    gemm, _ = capture_gemm.CaptureGemm.probe(host)
    a, b = (host.asarray(np.ones(s, np.float32)) for s in ((4, 5), (5, 3)))
    out = host.empty((4, 3), np.float32)
    assert not gemm.matmul(a, b, out)                       # not active: outside a capture
    gemm.active = True
    assert gemm.matmul(a, b, out)
    assert not gemm.matmul(a.astype(np.float16), b, out)     # mixed dtypes
    assert not gemm.matmul(a[:, ::2], b[::2], host.empty((4, 3), np.float32))   # strided
    assert not gemm.matmul(a, b, host.empty((3, 4), np.float32).T)     # a transposed output


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_products_accumulate_in_float32(host, cublas, dtype):
    """precision="bf16" / "fp16": the product of bf16 / fp16 operands, accumulated in
    float32 and rounded once (cublasGemmStridedBatchedEx), as CuPy's matmul gives it."""
    gemm, _ = capture_gemm.CaptureGemm.probe(host)
    gemm.active = True
    low = np.dtype(dtype)
    for a, b in _layouts(np.random.default_rng(1), "float32"):
        a, b = a.astype(low), b.astype(low)
        want = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(low)
        out = host.empty(want.shape, low)
        assert gemm.matmul(on_device(host, a), on_device(host, b), out), (a.shape, b.shape)
        np.testing.assert_array_equal(out.get().astype(np.float32), want.astype(np.float32))


def test_without_libcublas_the_probe_says_why(host, monkeypatch):
    monkeypatch.setattr(capture_gemm, "load_library", lambda: None)
    assert capture_gemm.CaptureGemm.probe(host) == (None, "cupy matmul: no libcublas found")


@pytest.mark.parametrize("make, shape", [(T.mlp, (16, 20)), (T.cnn, (8, 1, 8, 8))])
def test_a_captured_step_runs_its_matmuls_through_the_gemm(host, capture, cublas, make, shape,
                                                           monkeypatch):
    """The capture (emulated on the stand-in) runs the step's matmuls through the
    capture-safe GEMM, whose replay is checked against the plain step's CuPy matmuls; the
    trajectory is the CPU step's."""
    gemms = []
    probe = capture_gemm.CaptureGemm.probe.__func__
    monkeypatch.setattr(capture_gemm.CaptureGemm, "probe", classmethod(
        lambda cls, xp: (lambda r: gemms.append(r[0]) or r)(probe(cls, xp))))
    launch = T._Graph.launch

    def replay(self, stream=None):      # what was captured: the GEMM's calls, replayed
        (gemm,) = gemms
        gemm.active = True
        try:
            launch(self, stream)
        finally:
            gemm.active = False
    monkeypatch.setattr(T._Graph, "launch", replay)
    out = T.run_both(host, make, T.OPTIMIZERS["momentum-wd"], T.batches(shape, n=5))
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    stats = out["cuda"][3].stats()
    assert stats["graph"] == "captured" and stats["gemm"] == "cublas direct, workspace 32 MiB"
    n_matmuls = sum(n.op == "matmul" for n in out["cuda"][3]._program.exe.graph.nodes)
    (graph,) = capture["made"]
    # a run before the capture (its kernels loaded outside it), the first replay (checked
    # against the plain step) and 2 more, each every matmul
    assert graph.launches == 3
    assert len(cublas.gemms) == 4 * n_matmuls and n_matmuls >= 6, (cublas.gemms, n_matmuls)
    want, got = out["cpu"][1].state_dict(), out["cuda"][1].state_dict()
    for k in want:
        assert T.rel(got[k], want[k]) < 1e-5, k


def test_stats_say_no_capture_was_tried(host):
    model = T.mlp().to("cuda")
    step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                           sg.optim.SGD(model.parameters(), lr=0.1), cuda_graph=False)
    for x, y in T.batches((16, 20), n=3):
        step(x, y)
    assert step.stats()["gemm"] == "not probed (no capture tried)"


@pytest.mark.gpu
def test_the_gemm_equals_cupy_matmul_on_a_gpu():
    if not D.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy

    gemm, note = capture_gemm.CaptureGemm.probe(cupy)
    assert gemm is not None, note
    gemm.active = True
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        for a, b in _layouts(rng, dtype):
            out = cupy.empty(np.matmul(a, b).shape, dtype)
            assert gemm.matmul(on_device(cupy, a), on_device(cupy, b), out), (a.shape, b.shape)
            tol = 1e-4 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(out.get(), np.matmul(a, b), rtol=tol, atol=tol)
    for dtype in ("bfloat16", "float16"):          # against CuPy's own low-precision GEMM
        for a, b in _layouts(rng, "float32"):
            da, db = on_device(cupy, a).astype(dtype), on_device(cupy, b).astype(dtype)
            out = cupy.empty(np.matmul(a, b).shape, dtype)
            assert gemm.matmul(da, db, out), (a.shape, b.shape)
            np.testing.assert_allclose(out.astype(np.float32).get(),
                                       cupy.matmul(da, db).astype(np.float32).get(),
                                       rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("make, shape", [(T.mlp, (64, 20)), (T.cnn, (16, 1, 8, 8))])
def test_a_step_is_captured_on_a_gpu(make, shape):
    """On a real GPU: the compiled step captures (the capture-safe GEMM standing in for
    CuPy's refused cuBLAS calls) and its replays follow the plain launches' trajectory."""
    if not D.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy

    data = [(cupy.asarray(x), cupy.asarray(y)) for x, y in T.batches(shape, n=6)]
    runs = {}
    for graph in (False, True):
        model = make().to("cuda")
        step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                               T.OPTIMIZERS["momentum-wd"](model.parameters()),
                               cuda_graph=graph)
        runs[graph] = ([float(step(x, y)) for x, y in data], model.state_dict(), step)
    stats = runs[True][2].stats()
    assert stats["cuda_graph"] and stats["graph"] == "captured", stats
    assert stats["gemm"] == "cublas direct, workspace 32 MiB", stats
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        assert T.rel(runs[True][1][k], v) < 1e-5, k
