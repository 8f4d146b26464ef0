"""A capture-safe GEMM for the GPU step's CUDA Graph: cuBLAS called directly (ctypes) on a
handle of our own with a workspace set once, as PyTorch does (CuPy refuses its cuBLAS
wrappers while a stream is captured, cupy#6290; cuBLAS allocates inside a capture unless
given a workspace before). Side effects (CUDA libraries) live here, in runtime/; imports
nothing from shardgrad."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import numpy as np

# cuBLAS's recommended workspace on Hopper (docs: cublasSetWorkspace, 32 MiB for sm_90)
WORKSPACE_BYTES = 32 << 20
OP_N, OP_T = 0, 1
LIBRARIES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so")
_GEMM = {"float32": ("cublasSgemmStridedBatched", ctypes.c_float),
         "float64": ("cublasDgemmStridedBatched", ctypes.c_double)}
# bf16 / fp16 (precision=): cublasGemmStridedBatchedEx, operands and product in that type
# (cudaDataType CUDA_R_16BF = 14, CUDA_R_16F = 2), accumulated in float32
# (CUBLAS_COMPUTE_32F = 68, float scalars), the default algorithm (CUBLAS_GEMM_DEFAULT = -1)
_EX = {"bfloat16": 14, "float16": 2}
COMPUTE_32F, GEMM_DEFAULT = 68, -1


def _loaded_cublas() -> list[str]:
    """Paths of the libcublas mapped into this process (after CuPy loaded one)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublas.so" in line
                     and "Lt" not in line.rsplit("/", 1)[-1]}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def load_library() -> Any:
    """libcublas as a ctypes library, or None where there is none."""
    found = ctypes.util.find_library("cublas")
    for name in (*_loaded_cublas(), *LIBRARIES, *((found,) if found else ())):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _pointer(a) -> int:
    iface = getattr(a, "__cuda_array_interface__", None)     # CuPy's, and the stand-in's
    return int(iface["data"][0]) if iface is not None else int(a.ctypes.data)


def operand(x, rows: int, cols: int) -> tuple[int, int] | None:
    """How cuBLAS (column-major) reads the last two axes of row-major ``x`` (``rows`` x
    ``cols``): (0, ld) when its buffer is the transpose x^T (C order: transposed views
    included), (1, ld) when it is x itself (a transposed view of C order); None for other
    strides. Strides of axes of length 1 never matter."""
    s0, s1 = (s // x.itemsize for s in x.strides[-2:])
    if cols == 1 or s1 == 1:
        ld = s0 if rows > 1 else cols
        if ld >= max(cols, 1):
            return 0, ld
    if rows == 1 or s0 == 1:
        ld = s1 if cols > 1 else rows
        if ld >= max(rows, 1):
            return 1, ld
    return None


def batch_stride(x, batch_shape: tuple[int, ...]) -> int | None:
    """The element stride between the matrices of ``x`` over the flattened ``batch_shape``
    (0 when ``x`` is one matrix broadcast over it), or None when one stride cannot step
    through them."""
    lead = x.shape[:-2]
    if int(np.prod(lead, dtype=np.int64)) == 1:
        return 0
    if tuple(lead) != tuple(batch_shape[len(batch_shape) - len(lead):]) or (
            len(lead) < len(batch_shape) and int(np.prod(batch_shape[:-len(lead)])) > 1):
        return None
    strides = [s // x.itemsize for s in x.strides[:-2]]
    for i in range(len(lead) - 1):
        if lead[i] > 1 and strides[i] != strides[i + 1] * lead[i + 1]:
            return None
    return strides[-1]


class CaptureGemm:
    """cuBLAS strided-batched GEMMs on a handle of our own with a preset workspace. While
    ``active`` (the step's capture turns it on), ``matmul`` runs the products it covers and
    returns True; otherwise, or for a dtype or layout it does not cover, it returns False
    and the caller runs CuPy's matmul."""

    def __init__(self, lib: Any, xp, workspace_bytes: int = WORKSPACE_BYTES):
        self.lib, self.xp = lib, xp
        self.handle = ctypes.c_void_p()
        status = lib.cublasCreate_v2(ctypes.byref(self.handle))
        if status:
            raise RuntimeError(f"cublasCreate_v2 failed with status {status}")
        self.workspace = xp.empty(workspace_bytes, np.uint8)
        self._stream: int | None = None
        self.active = False
        self.calls = 0

    @classmethod
    def probe(cls, xp) -> tuple[CaptureGemm | None, str]:
        """(the GEMM, "cublas: ...") where libcublas and its calls are there, else (None, why
        CuPy's matmul stays)."""
        try:
            lib = load_library()
            if lib is None:
                return None, "cupy matmul: no libcublas found"
            for name in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
                         "cublasGemmStridedBatchedEx", *(fn for fn, _ in _GEMM.values())):
                getattr(lib, name)
            gemm = cls(lib, xp)
        except Exception as e:  # noqa: BLE001 - any failure keeps CuPy's matmul, reported
            return None, f"cupy matmul: {type(e).__name__}: {e}"[:200]
        return gemm, f"cublas direct, workspace {WORKSPACE_BYTES >> 20} MiB"

    def _bind(self) -> None:
        # cublasSetStream resets the workspace to cuBLAS's own pool: set it again after
        stream = int(self.xp.cuda.get_current_stream().ptr)
        if stream != self._stream:
            lib = self.lib
            for name, args in (("cublasSetStream_v2", (ctypes.c_void_p(stream),)),
                               ("cublasSetWorkspace_v2",
                                (ctypes.c_void_p(_pointer(self.workspace)),
                                 ctypes.c_size_t(self.workspace.nbytes)))):
                status = getattr(lib, name)(self.handle, *args)
                if status:
                    raise RuntimeError(f"{name} failed with status {status}")
            self._stream = stream

    def matmul(self, a, b, out) -> bool:
        """``out[...] = a @ b`` as one cuBLAS call when active and covered; False otherwise."""
        dtype = str(out.dtype)
        if not self.active or dtype not in (*_GEMM, *_EX) or a.dtype != out.dtype or (
                b.dtype != out.dtype) or a.ndim < 2 or b.ndim < 2 or not (
                out.flags.c_contiguous):
            return False
        m, k = a.shape[-2:]
        n = b.shape[-1]
        batch_shape = out.shape[:-2]
        batch = int(np.prod(batch_shape, dtype=np.int64))
        la, lb = operand(a, m, k), operand(b, k, n)
        sa, sb = batch_stride(a, batch_shape), batch_stride(b, batch_shape)
        if la is None or lb is None or sa is None or sb is None or not m * n * batch:
            return False
        if k == 0:
            return False
        self._bind()
        fn_name, scalar = _GEMM.get(dtype, ("cublasGemmStridedBatchedEx", ctypes.c_float))
        one, zero = scalar(1.0), scalar(0.0)
        kind = (ctypes.c_int(_EX[dtype]),) if dtype in _EX else ()
        # row-major C = A B is column-major C^T = B^T A^T: cuBLAS's "A" is our b
        args = [self.handle, ctypes.c_int(lb[0]), ctypes.c_int(la[0]), ctypes.c_int(n),
                ctypes.c_int(m), ctypes.c_int(k), ctypes.byref(one),
                ctypes.c_void_p(_pointer(b)), *kind, ctypes.c_int(lb[1]),
                ctypes.c_longlong(sb), ctypes.c_void_p(_pointer(a)), *kind,
                ctypes.c_int(la[1]), ctypes.c_longlong(sa), ctypes.byref(zero),
                ctypes.c_void_p(_pointer(out)), *kind, ctypes.c_int(n),
                ctypes.c_longlong(m * n), ctypes.c_int(batch)]
        if kind:
            args += [ctypes.c_int(COMPUTE_32F), ctypes.c_int(GEMM_DEFAULT)]
        status = getattr(self.lib, fn_name)(*args)
        if status:
            raise RuntimeError(f"{fn_name} failed with status {status}")
        self.calls += 1
        return True


__all__ = ["CaptureGemm", "WORKSPACE_BYTES", "batch_stride", "load_library", "operand"]
