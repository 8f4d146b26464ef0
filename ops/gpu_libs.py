"""Optional GPU libraries beside the own kernels: cuBLASLt through nvmath-python (a GEMM with
its bias + activation epilogue) and cuDNN through nvidia-cudnn-frontend, both the
``gpu-libs`` extra. Each is imported lazily, once (``probe``); an op's kernel asks
``choose`` to run one call shape, which times the own kernel against the library the first
time that shape runs and keeps the faster (as torch's ``cudnn.benchmark``), the own kernel
staying where the library is missing, fails, disagrees or is slower. Imports nothing of
shardgrad: ops.gpu asks it.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

# the library behind each name, and the module imported to reach it
MODULES = {"cublaslt": "nvmath.linalg.advanced", "cudnn": "cudnn"}
PACKAGES = {"cublaslt": "nvmath-python", "cudnn": "nvidia-cudnn-frontend"}
INSTALL = "pip install -e '.[gpu-libs]'"
# timed calls a side at the first use of a shape, after one warm call each: the median of 5
# is what torch's benchmark mode and nvmath's autotuning spend per candidate (a few calls)
REPS = 5
# the library's result against the own kernel's at the first use of a shape, the largest
# difference over the largest magnitude: both sum the same products in float32 or float64 in
# orders that differ (1e-6 relative seen on the CPU); TF32 (10-bit mantissa) would exceed it
RTOL = {"float32": 1e-4, "float64": 1e-10}

_probed: dict[str, tuple[Any, str]] = {}
_choices: dict[tuple[str, tuple], dict[str, Any]] = {}
_plans: dict[tuple, Any] = {}     # cuBLASLt plans and cuDNN graphs, per shape and layout


def probe(lib: str) -> tuple[Any, str]:
    """``(module, note)`` for library ``lib`` ("cublaslt" or "cudnn"): the module imported once
    (None where it is missing or fails to import) and a line saying which."""
    if lib not in _probed:
        try:
            mod = importlib.import_module(MODULES[lib])
            top = importlib.import_module(MODULES[lib].split(".")[0])
            note = f"available ({PACKAGES[lib]} {getattr(top, '__version__', '?')})"
        except Exception as e:      # a missing package, or one whose native libraries fail
            mod = None
            note = f"absent ({type(e).__name__}: {e}): {INSTALL}"
        _probed[lib] = (mod, note)
    return _probed[lib]


def reset() -> None:
    """Forget the probes, choices and plans (a test injecting a fake library calls it)."""
    _probed.clear()
    _choices.clear()
    _plans.clear()


def install(lib: str, module: Any, note: str = "injected") -> None:
    """Use ``module`` as library ``lib`` (tests: a fake with the calls used here; None: absent),
    forgetting every choice and plan made so far (the other library's probe stays)."""
    _choices.clear()
    _plans.clear()
    _probed[lib] = (module, note)


def _capturing(xp) -> bool:
    stream = xp.cuda.get_current_stream()
    return bool(getattr(stream, "is_capturing", lambda: False)())


def _host_timer(xp, fn: Callable[[], Any]) -> float:
    xp.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    fn()
    xp.cuda.get_current_stream().synchronize()
    return time.perf_counter() - t0


def _event_timer(xp, fn: Callable[[], Any]) -> float:
    start, end = xp.cuda.Event(), xp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return xp.cuda.get_elapsed_time(start, end) / 1e3


def timer(xp, fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on the device: CUDA events where CuPy has them (a GPU), else the
    host clock around a synchronize (the stand-in). Tests replace it."""
    return (_event_timer if hasattr(xp.cuda, "Event") else _host_timer)(xp, fn)


def _median_time(xp, fn) -> float:
    return sorted(timer(xp, fn) for _ in range(REPS))[REPS // 2]


def choose(lib: str, key: tuple, xp, out, own: Callable[[], Any],
           library: Callable[[], Any]) -> Any:
    """Run one call of shape ``key`` into ``out`` through the own kernel (``own()``) or library
    ``lib`` (``library()``), whichever won at the first call of ``key``: the library is used
    only where it imports, runs, agrees with the own kernel (RTOL) and is faster. The first
    call of a shape measures (it synchronizes: the warm-up steps, before any CUDA Graph
    capture; a shape first met inside a capture takes the own kernel there). A library that
    fails later hands the shape to the own kernel for good."""
    choice = _choices.get((lib, key))
    if choice is None:
        mod, note = probe(lib)
        if mod is None:
            choice = {"path": "own", "why": note}
        elif _capturing(xp):
            return own()
        else:
            _choices[(lib, key)] = _measure(lib, xp, out, own, library)
            return out                          # the own kernel's result, written last
        _choices[(lib, key)] = choice
    if choice["path"] == "own":
        return own()
    try:
        return library()
    except Exception as e:
        choice.update(path="own", why=f"{lib} failed: {type(e).__name__}: {e}")
        return own()


def _measure(lib: str, xp, out, own, library) -> dict[str, Any]:
    """The choice for one shape; ``out`` holds the own kernel's result when it returns."""
    try:
        library()
        got = out.copy()
    except Exception as e:
        own()
        return {"path": "own", "why": f"{lib} failed: {type(e).__name__}: {e}"}
    own()
    if out.size:
        # relative to the result's largest magnitude: a long reduction's small elements
        # carry the rounding of its large terms (a weight gradient sums N*OH*OW products)
        err, scale = float(xp.abs(got - out).max()), float(xp.abs(out).max())
        if not err <= RTOL.get(str(out.dtype), 1e-2) * max(scale, 1e-30):
            return {"path": "own", "why": f"{lib} differs from the own kernel (max abs "
                                          f"{err:.3g}, largest value {scale:.3g})"}
    t_own, t_lib = _median_time(xp, own), _median_time(xp, library)
    own()        # out holds the own kernel's result: the call's caller may read it now
    return {"path": lib if t_lib < t_own else "own", "own_us": round(t_own * 1e6, 2),
            f"{lib}_us": round(t_lib * 1e6, 2), "why": "measured"}


def report() -> dict[str, Any]:
    """Per library: its probe line and the choice made for each call shape met so far."""
    out: dict[str, Any] = {}
    for lib in MODULES:
        note = _probed[lib][1] if lib in _probed else "not probed"
        choices = {" ".join(map(str, key)): dict(c) for (name, key), c in _choices.items()
                   if name == lib}
        out[lib] = {"probe": note, "choices": choices}
    return out


# ---- cuBLASLt: GEMM + bias + activation in one kernel ----------------------------------------

EPILOGUES = {"none": "BIAS", "relu": "RELU_BIAS", "gelu": "GELU_BIAS"}


def _address(a) -> int:
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data     # CuPy, or a host stand-in


def cublaslt_bias_act(xp, x, w, b, act: str, out) -> Any:
    """``out = act(x @ w + b)`` (x (M, K), w (K, N), b (N,)) as one cuBLASLt matmul with the
    bias/activation epilogue (nvmath-python's Matmul; GELU is the tanh form, as the op's).
    cuBLASLt broadcasts the bias along the result's columns, so the product computed is the
    transposed one, out^T (N, M) = w^T @ x^T, each operand read through its transposed view,
    and copied into ``out``. One plan a shape, layout and set of operand addresses (a
    planned step's are fixed), reused."""
    adv = probe("cublaslt")[0]
    key = tuple((a.shape, a.strides, _address(a)) for a in (x, w, b)) + (str(x.dtype), act)
    plan = _plans.get(key)
    stream = xp.cuda.get_current_stream()
    if plan is None:
        plan = adv.Matmul(w.T, x.T, stream=stream)
        plan.plan(epilog=getattr(adv.MatmulEpilog, EPILOGUES[act]), epilog_inputs={"bias": b})
        _plans[key] = plan
    xp.copyto(out, plan.execute(stream=stream).T)
    return out


# ---- cuDNN: convolutions through its frontend's graph API ------------------------------------

_handles: dict[int, Any] = {}


def _strides(a) -> list[int]:
    return [st // a.itemsize for st in a.strides]


def cudnn_conv(xp, kind: str, a, b, out, stride, padding) -> Any:
    """One cuDNN convolution into ``out``: ``kind`` "fprop" (a = x, b = w, out = y), "dgrad"
    (a = dy, b = w, out = dx) or "wgrad" (a = x, b = dy, out = dw), NCHW. One graph a
    shape, layout and dtype, built once (heuristics A, then the fallback) with its workspace;
    operands go in as device addresses, on the current stream."""
    cudnn = probe("cudnn")[0]
    key = ("conv", kind, str(out.dtype), tuple(stride), tuple(padding)) + tuple(
        (v.shape, v.strides) for v in (a, b, out))
    entry = _plans.get(key)
    if entry is None:
        device = xp.cuda.Device().id
        if device not in _handles:
            _handles[device] = cudnn.create_handle()
        handle = _handles[device]
        dt = {"float32": cudnn.data_type.FLOAT, "float64": cudnn.data_type.DOUBLE}[str(out.dtype)]
        graph = cudnn.pygraph(handle=handle, io_data_type=dt, intermediate_data_type=dt,
                              compute_data_type=dt)
        ta = graph.tensor(name="a", dim=list(a.shape), stride=_strides(a), data_type=dt)
        tb = graph.tensor(name="b", dim=list(b.shape), stride=_strides(b), data_type=dt)
        window = {"padding": list(padding), "stride": list(stride), "dilation": [1, 1]}
        if kind == "fprop":
            ty = graph.conv_fprop(image=ta, weight=tb, **window)
        elif kind == "dgrad":
            ty = graph.conv_dgrad(loss=ta, filter=tb, **window)
        else:
            ty = graph.conv_wgrad(image=ta, loss=tb, **window)
        ty.set_output(True).set_dim(list(out.shape)).set_stride(_strides(out)).set_data_type(dt)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = xp.empty(max(1, int(graph.get_workspace_size())), dtype=xp.uint8)
        entry = _plans[key] = (graph, ta, tb, ty, workspace, handle)
    graph, ta, tb, ty, workspace, handle = entry
    cudnn.set_stream(handle=handle, stream=xp.cuda.get_current_stream().ptr)
    graph.execute({ta: _address(a), tb: _address(b), ty: _address(out)}, _address(workspace),
                  handle=handle)
    return out


__all__ = ["choose", "cublaslt_bias_act", "cudnn_conv", "install", "probe", "report", "reset"]
