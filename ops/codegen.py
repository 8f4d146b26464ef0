"""CUDA C source for a fused elementwise group: one kernel that reads the group's inputs once,
keeps every intermediate in registers and writes only the values needed outside the group.

Pure text generation (no CUDA call): the group is anything shaped like graph.passes'
FusionGroup (``inputs``, ``nodes``, ``outputs``, ``shape``, ``expr`` of Steps). Shapes are
static, so the element count and every broadcast index map are compiled in as constants.
Imports ops.registry only: each op's C expression is its OpDef's ``cuda_expr`` (built with
the helpers here), found through ``kernel_for(op, "cuda", "expr")``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardgrad.ops.registry import REGISTRY, CudaExpr, kernel_for

CTYPES = {"float32": "float", "float64": "double", "int8": "signed char", "uint8": "unsigned char",
          "int16": "short", "int32": "int", "int64": "long long", "uint32": "unsigned int",
          "uint64": "unsigned long long", "bool": "bool"}
FLOATS = ("float32", "float64")
# int indices while i + the grid stride cannot overflow (the stride is below 2^24 threads)
INT_INDEX_LIMIT = 2**31 - 2**24


class Unsupported(ValueError):
    """The group uses an op or dtype this generator has no C form for: run it op by op."""


@dataclass(frozen=True)
class KernelSource:
    """``code`` defines ``extern "C" __global__ void name(in..., out...)``; ``args`` are the
    indices into the group's inputs that are passed (in order; constants of one element are
    compiled in), followed by one pointer per group output. ``size`` elements, one per
    thread-iteration of a grid-stride loop."""

    name: str
    code: str
    args: tuple[int, ...]
    size: int


def literal(value: Any, dtype: str) -> str:
    """A C literal of ``value`` in ``dtype``, exact (shortest round-trip digits)."""
    v = np.asarray(value).astype(dtype).item()
    if dtype == "bool":
        return "true" if v else "false"
    if dtype in FLOATS:
        if math.isnan(v) or math.isinf(v):
            bits = "0x7fc00000" if math.isnan(v) else "0x7f800000"
            inf = f"__int_as_float({bits})"
            return f"(({CTYPES[dtype]}){'-' if v < 0 else ''}{inf})"
        text = repr(float(v))
        return f"{text}f" if dtype == "float32" else text
    return f"(({CTYPES[dtype]}){int(v)}LL)" if dtype != "uint64" else f"{int(v)}ULL"


def cmath(dtype: str, name: str) -> str:
    """The C math function ``name`` for ``dtype`` (``expf`` for float32, ``exp`` for float64)."""
    return f"{name}f" if dtype == "float32" else name


def float_only(dtype: str, op: str) -> None:
    """Raise Unsupported unless ``dtype`` is float32 or float64."""
    if dtype not in FLOATS:
        raise Unsupported(f"{op} of {dtype}: only float32/float64 have a C form here")


def binary_expr(sym: str) -> CudaExpr:
    """The C expression of an op that is the C operator ``sym``."""
    return lambda a, dts, dt, attrs: f"({a[0]} {sym} {a[1]})"


def unary_fn_expr(fn: str) -> CudaExpr:
    """The C expression of a float op that is the C math function ``fn``."""
    def make(a, dts, dt, attrs):
        float_only(dt, fn)
        return f"{cmath(dt, fn)}({a[0]})"
    return make


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for s in reversed(tuple(shape)):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def index_terms(in_shape: Sequence[int], out_shape: Sequence[int],
                strides: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """How an input of ``in_shape`` with element ``strides`` (default C-contiguous; a
    transposed view's are permuted) is read at the output's linear index ``i`` under NumPy
    broadcasting: offset = sum over the terms (div, mod, stride) of ``(i / div % mod) *
    stride``, ``mod`` 0 meaning no modulo. An empty list: offset 0."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(in_shape) > len(out_shape):
        raise ValueError(f"{in_shape} has more dimensions than {out_shape}")
    strides = contiguous_strides(in_shape) if strides is None else tuple(strides)
    if len(strides) != len(in_shape):
        raise ValueError(f"strides {strides} do not match shape {in_shape}")
    pad = len(out_shape) - len(in_shape)
    padded, padded_strides = (1,) * pad + in_shape, (0,) * pad + strides
    terms = []
    out_div = 1
    for d in reversed(range(len(out_shape))):
        if padded[d] not in (1, out_shape[d]):
            raise ValueError(f"{in_shape} does not broadcast to {out_shape}")
        if padded[d] != 1:
            mod = 0 if all(s == 1 for s in out_shape[:d]) else out_shape[d]
            terms.append((out_div, mod, padded_strides[d]))
        out_div *= out_shape[d]
    # merge runs of dimensions read contiguously: (i / a % m1) * s + (i / (a m1) % m2) * s m1
    merged: list[tuple[int, int, int]] = []
    for div, mod, stride in terms:
        if merged:
            pdiv, pmod, pstride = merged[-1]
            if pmod and div == pdiv * pmod and stride == pstride * pmod:
                merged[-1] = (pdiv, mod * pmod if mod else 0, pstride)
                continue
        merged.append((div, mod, stride))
    return merged


def offsets(in_shape: Sequence[int], out_shape: Sequence[int],
            strides: Sequence[int] | None = None) -> np.ndarray:
    """The flat input offset read for every output element (NumPy, for tests): what the
    generated C index expression computes."""
    i = np.arange(int(np.prod(out_shape, dtype=np.int64)), dtype=np.int64)
    off = np.zeros_like(i)
    for div, mod, stride in index_terms(in_shape, out_shape, strides):
        q = i // div
        off += (q % mod if mod else q) * stride
    return off


def _index_expr(terms: list[tuple[int, int, int]]) -> str:
    if not terms:
        return "0"
    parts = []
    for div, mod, stride in terms:
        e = "i" if div == 1 else f"(i / {div})"
        if mod:
            e = f"({e} % {mod})"
        parts.append(e if stride == 1 else f"{e} * {stride}")
    return " + ".join(parts)


def read_through(x) -> tuple[Any, tuple[int, ...], tuple[int, ...] | None]:
    """(source, shape, strides): a ``broadcast_to`` or ``transpose`` node read as the view it
    is of its operand (C-contiguous, ``strides`` in elements; None: the operand's own), so a
    fused kernel reads the operand in place; any other node is read as itself."""
    if x.op == "broadcast_to":
        return x.inputs[0], x.inputs[0].shape, None
    if x.op == "transpose":
        base = contiguous_strides(x.inputs[0].shape)
        return x.inputs[0], x.shape, tuple(base[a] for a in x.attrs["axes"])
    return x, x.shape, None


def _is_inline_const(x) -> bool:
    return x.op == "const" and x.size == 1 and x.dtype in CTYPES


def _kernel_parts(group, shapes, strides):
    """What the CUDA and the CPU kernels of ``group`` share: (params, hoisted, loads, body,
    stores, passed input indices, size, index type), each line of C over the index ``i``."""
    shapes = [tuple(x.shape) for x in group.inputs] if shapes is None else [
        tuple(s) for s in shapes]
    strides = [None] * len(shapes) if strides is None else list(strides)
    out_shape = tuple(group.shape)
    size = int(np.prod(out_shape, dtype=np.int64))
    for x in (*group.inputs, *group.nodes):
        if x.dtype not in CTYPES:
            raise Unsupported(f"dtype {x.dtype} has no C type here")
    ctype = lambda n: CTYPES[n.dtype]
    itype = "int" if size <= INT_INDEX_LIMIT else "long long"

    names: list[str] = []
    params: list[str] = []
    loads: list[str] = []
    hoisted: list[str] = []
    passed: list[int] = []
    for j, (x, shape, stride) in enumerate(zip(group.inputs, shapes, strides, strict=True)):
        if _is_inline_const(x):
            names.append(literal(np.asarray(x.attrs["value"]).reshape(()), x.dtype))
            continue
        passed.append(j)
        params.append(f"const {ctype(x)}* __restrict__ in{j}")
        terms = index_terms(shape, out_shape, stride)
        if not terms:
            hoisted.append(f"    const {ctype(x)} a{j} = in{j}[0];")
        else:
            loads.append(f"        const {ctype(x)} a{j} = in{j}[{_index_expr(terms)}];")
        names.append(f"a{j}")
    body: list[str] = []
    dts = [x.dtype for x in group.inputs]
    for m, (node, step) in enumerate(zip(group.nodes, group.expr, strict=True)):
        opdef = REGISTRY.get(step.op)
        expr_of = None if opdef is None else kernel_for(opdef, "cuda", "expr")
        if expr_of is None:
            raise Unsupported(f"no C form for op {step.op!r}")
        args = [names[a] for a in step.args]
        expr = expr_of(args, [dts[a] for a in step.args], node.dtype, step.attrs)
        body.append(f"        const {ctype(node)} t{m} = {expr};")
        names.append(f"t{m}")
        dts.append(node.dtype)
    stores = []
    for o, out in enumerate(group.outputs):
        m = group.nodes.index(out)
        params.append(f"{ctype(out)}* __restrict__ out{o}")
        stores.append(f"        out{o}[i] = t{m};")
    return params, hoisted, loads, body, stores, tuple(passed), size, itype


def _name(kind: str, group, parts) -> str:
    text = "\n".join(parts[0] + parts[1] + parts[2] + parts[3] + parts[4])
    return f"sg_{kind}_" + hashlib.sha1(f"{tuple(group.shape)}\n{text}".encode()).hexdigest()[:16]


def fused_source(group, shapes: Sequence[tuple[int, ...]] | None = None,
                 strides: Sequence[tuple[int, ...] | None] | None = None) -> KernelSource:
    """The CUDA C kernel computing ``group``. Input j is read from the C-contiguous array
    passed for it as a view of shape ``shapes[j]`` (default: the input node's shape) with
    element ``strides[j]`` into that array (default, or None: the array's own); the view
    must broadcast to ``group.shape``. So an executor may pass the operand of a broadcast_to
    or of a transpose instead of materializing the view. Raises Unsupported for an op or
    dtype without a C form."""
    parts = _kernel_parts(group, shapes, strides)
    params, hoisted, loads, body, stores, passed, size, itype = parts
    name = _name("fused", group, parts)
    code = "\n".join([
        f'extern "C" __global__ void {name}(' + ",\n        ".join(params) + ") {",
        *hoisted,
        f"    for ({itype} i = blockIdx.x * ({itype})blockDim.x + threadIdx.x; i < {size};",
        f"         i += ({itype})blockDim.x * gridDim.x) {{",
        *loads, *body, *stores,
        "    }",
        "}",
        "",
    ])
    return KernelSource(name, code, passed, size)


# The C the CPU kernels are compiled with (runtime.native): the CUDA expressions' spellings
# in C99, and the math functions glibc's libmvec has in vector form declared SIMD-callable
# (its math.h declares them so only under -ffast-math, whose other licences we do not take):
# a vectorized erff made the exact-GELU forward 10x faster than scalar erff.
C_PRELUDE = r"""#include <math.h>
#include <stdbool.h>
#define __restrict__ restrict
static inline float __int_as_float(int i) { union { int i; float f; } u; u.i = i; return u.f; }
#if defined(__x86_64__) && defined(SG_LIBMVEC)
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
double log(double);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
double tanh(double);
#pragma omp declare simd notinbranch
float erff(float);
#pragma omp declare simd notinbranch
double erf(double);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
double sin(double);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
double cos(double);
#pragma omp declare simd notinbranch
float powf(float, float);
#pragma omp declare simd notinbranch
double pow(double, double);
#endif
"""

# What a generated CPU loop is split with: the intra-op pool's entry (runtime/pool.c's
# sg_parallel_for), set by the runtime once the library is loaded; null runs it whole.
CPU_POOL = r"""
void (*sg_par)(int, long long, long long, void (*)(void*, long long, long long), void*);
"""


def cpu_source(group, shapes: Sequence[tuple[int, ...]] | None = None,
               strides: Sequence[tuple[int, ...] | None] | None = None,
               parallel_from: int = 1 << 16, grain: int = 1 << 15) -> KernelSource:
    """The C99 function computing ``group`` on the CPU (compile it after ``C_PRELUDE`` and
    ``CPU_POOL``): ``void name(in..., out..., int threads)``, the same loads, expressions and
    stores as ``fused_source``'s kernel, one vectorized loop over the elements that
    ``sg_par`` (the intra-op pool, runtime/pool.c) splits over ``threads`` threads in parts of
    ``grain`` or more, from ``parallel_from`` elements on. Inputs as ``fused_source`` takes
    them; raises Unsupported likewise."""
    parts = _kernel_parts(group, shapes, strides)
    params, hoisted, loads, body, stores, passed, size, itype = parts
    name = _name("cpu", group, parts)
    names = [p.split()[-1] for p in params]
    code = "\n".join([
        "typedef struct { " + " ".join(p.replace(" __restrict__", "") + ";" for p in params)
        + f" }} {name}_args;",
        f"static void {name}_range(void* ctx, long long b, long long e) {{",
        f"    const {name}_args* A = (const {name}_args*)ctx;",
        *(f"    {p} = A->{n};" for p, n in zip(params, names, strict=True)),
        *hoisted,
        "    #pragma omp simd",
        f"    for ({itype} i = ({itype})b; i < ({itype})e; ++i) {{",
        *loads, *body, *stores,
        "    }",
        "}",
        f"void {name}(" + ",\n        ".join([*params, "int threads"]) + ") {",
        f"    {name}_args A = {{{', '.join(names)}}};",
        f"    if (threads > 1 && {size}LL >= {parallel_from}LL && sg_par)",
        f"        sg_par(threads, {size}LL, {grain}LL, {name}_range, &A);",
        "    else",
        f"        {name}_range(&A, 0, {size}LL);",
        "}",
        "",
    ])
    return KernelSource(name, code, passed, size)


def eager_source(op: str, expr: CudaExpr, dtype: str, arity: int) -> tuple[str, str]:
    """(name, C source) of the eager kernel of elementwise ``op`` (its C expression ``expr``,
    no attributes) on ``arity`` operands of ``dtype``: ``void name(void** p, const long long*
    g, long long b, long long e)`` writes elements [b, e) of the C-contiguous output p[0] from
    the operands p[1..], each read through the geometry g: the output as (D0, D1, L) (its
    dimensions merged), L = g[0], D1 = g[1], then each operand's strides (s0, s1, sL) in
    elements, sL 0 (broadcast along rows) or 1. The intra-op pool (runtime/pool.c) splits
    [0, D0 * D1 * L) over threads. Raises Unsupported where ``expr`` does not take ``dtype``."""
    t = CTYPES[dtype]
    name = f"sg_ew_{op}_{dtype}"
    rows = [f"const {t}* x{k} = (const {t}*)p[{k + 1}] + i0 * g[{2 + 3 * k}] + "
            f"i1 * g[{3 + 3 * k}] + j * g[{4 + 3 * k}];" for k in range(arity)]
    # a loop per combination of operands read along the row (stride 1) or held (stride 0),
    # so that each vectorizes
    loops = []
    for mask in range(1 << arity):
        along = [bool(mask >> k & 1) for k in range(arity)]
        body = expr([f"x{k}[i]" if a else f"v{k}" for k, a in enumerate(along)],
                    [dtype] * arity, dtype, {})
        cond = " && ".join(f"{'' if a else '!'}g[{4 + 3 * k}]" for k, a in enumerate(along))
        held = "".join(f" const {t} v{k} = x{k}[0];" for k, a in enumerate(along) if not a)
        loops.append(f"        {'if' if not loops else 'else if'} ({cond}) {{{held}\n"
                     f"            _Pragma(\"omp simd\")\n"
                     f"            for (long long i = 0; i < n; ++i) out[i] = {body};\n"
                     f"        }}")
    code = "\n".join([
        f"void {name}(void** p, const long long* g, long long b, long long e) {{",
        "    const long long L = g[0], D1 = g[1];",
        "    long long r = b / L, j = b - r * L;",
        "    while (b < e) {",
        "        const long long n = L - j < e - b ? L - j : e - b, i0 = r / D1, i1 = r % D1;",
        f"        {t}* out = ({t}*)p[0] + b;",
        *(f"        {row}" for row in rows),
        *loops,
        "        b += n;",
        "        ++r;",
        "        j = 0;",
        "    }",
        "}",
        "",
    ])
    return name, code


__all__ = ["CPU_POOL", "C_PRELUDE", "KernelSource", "Unsupported", "binary_expr", "cmath",
           "contiguous_strides", "cpu_source", "eager_source", "float_only", "fused_source",
           "index_terms", "literal", "offsets", "read_through", "unary_fn_expr"]
