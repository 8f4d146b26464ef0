"""Elementwise ops: arithmetic, transcendental functions, activations, comparisons, where.

Each op is one stanza: forward kernel against ``xp``, VJP with its math, JVP where it is one
line, then ``register``, then the public builder. Imports only ops.registry and graph.ir.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from shardgrad.graph.ir import Node, const
from shardgrad.ops.codegen import (
    CTYPES,
    FLOATS,
    Unsupported,
    binary_expr,
    cmath,
    float_only,
    literal,
    unary_fn_expr,
)
from shardgrad.ops.registry import (
    FLOAT_DTYPES,
    OpDef,
    OutKernel,
    apply,
    as_node,
    broadcast_infer,
    builder,
    const_value,
    elementwise_cost,
    float_unary_infer,
    register,
    same_dtype,
    same_infer,
    ufunc_out,
    unbroadcast,
)


def _sum_tangents(*terms: Node | None) -> Node | None:
    live = [t for t in terms if t is not None]
    if not live:
        return None
    out = live[0]
    for t in live[1:]:
        out = out + t
    return out


def _t(t: Node | None, out: Node) -> Node | None:
    """A tangent broadcast to the output's shape (None stays None: a zero tangent)."""
    return t if t is None or t.shape == out.shape else apply("broadcast_to", t, shape=out.shape)


def _t_or_zero(t: Node | None, out: Node) -> Node:
    return _t(t, out) if t is not None else out * 0.0


# ---- binary arithmetic -------------------------------------------------------------------------

def _add_vjp(g, x, y, out):
    return unbroadcast(g, x.shape), unbroadcast(g, y.shape)          # d(x+y) = dx + dy


register(OpDef("add", infer=broadcast_infer, forward=lambda xp, x, y: x + y, vjp=_add_vjp,
               jvp=lambda ts, x, y, out: _sum_tangents(_t(ts[0], out), _t(ts[1], out)),
               cost=elementwise_cost, out=ufunc_out("add", "fiu"), cuda_expr=binary_expr("+"),
               elementwise=True))


@builder("add")
def add(x, y) -> Node:
    return apply("add", x, y)


def _sub_vjp(g, x, y, out):
    return unbroadcast(g, x.shape), unbroadcast(-g, y.shape)         # d(x-y) = dx - dy


def _sub_jvp(ts, x, y, out):
    return _sum_tangents(_t(ts[0], out), None if ts[1] is None else -_t(ts[1], out))


register(OpDef("sub", infer=broadcast_infer, forward=lambda xp, x, y: x - y, vjp=_sub_vjp,
               jvp=_sub_jvp, cost=elementwise_cost, out=ufunc_out("subtract", "fiu"),
               cuda_expr=binary_expr("-"), elementwise=True))


@builder("sub")
def sub(x, y) -> Node:
    return apply("sub", x, y)


def _mul_vjp(g, x, y, out):
    return unbroadcast(g * y, x.shape), unbroadcast(g * x, y.shape)  # d(xy) = y dx + x dy


def _mul_jvp(ts, x, y, out):
    return _sum_tangents(None if ts[0] is None else _t(ts[0] * y, out),
                         None if ts[1] is None else _t(x * ts[1], out))


register(OpDef("mul", infer=broadcast_infer, forward=lambda xp, x, y: x * y, vjp=_mul_vjp,
               jvp=_mul_jvp, cost=elementwise_cost, out=ufunc_out("multiply", "fiu"),
               cuda_expr=binary_expr("*"), elementwise=True))


@builder("mul")
def mul(x, y) -> Node:
    return apply("mul", x, y)


def _div_vjp(g, x, y, out):
    gx = g / y                                                       # d(x/y) = dx/y - x/y^2 dy
    return unbroadcast(gx, x.shape), unbroadcast(-gx * out, y.shape)


def _div_jvp(ts, x, y, out):
    return _sum_tangents(None if ts[0] is None else _t(ts[0] / y, out),
                         None if ts[1] is None else _t(-(out * ts[1]) / y, out))


def _div_infer(x, y, **_):
    shape, dtype = broadcast_infer(x, y)
    return shape, dtype if dtype in FLOAT_DTYPES else "float64"     # NumPy's true division


def _div_c(a, dts, dt, attrs):
    for d in (dt, *dts):                # int / int is a float in NumPy but integer division in C
        float_only(d, "div")
    return f"({a[0]} / {a[1]})"


register(OpDef("div", infer=_div_infer, forward=lambda xp, x, y: x / y, vjp=_div_vjp,
               jvp=_div_jvp, cost=elementwise_cost, out=ufunc_out("divide"), cuda_expr=_div_c,
               elementwise=True))


@builder("div")
def div(x, y) -> Node:
    return apply("div", x, y)


def _pow_dx(x, y):
    """d x^y / dx = y x^(y-1), taken as 0 where y == 0 (x^-1 would give 0 * inf at x = 0)."""
    if y.op == "const" and np.all(const_value(y) != 0):
        return y * x ** const(const_value(y) - 1, dtype=y.dtype)      # fold y - 1 now
    return where(equal(y, 0.0), 0.0, y * x ** (y - 1.0))


def _pow_dy(x, out):
    """d x^y / dy = x^y log x, taken as 0 at x = 0 (0 * -inf otherwise), as JAX does."""
    return out * log(where(equal(x, 0.0), 1.0, x))


def _pow_vjp(g, x, y, out):
    # d(x^y) = y x^(y-1) dx + x^y log(x) dy; the dy term only where y needs a gradient
    gy = None if y.op == "const" else unbroadcast(g * _pow_dy(x, out), y.shape)
    return unbroadcast(g * _pow_dx(x, y), x.shape), gy


def _pow_jvp(ts, x, y, out):
    return _sum_tangents(None if ts[0] is None else _t(ts[0] * _pow_dx(x, y), out),
                         None if ts[1] is None else _t(ts[1] * _pow_dy(x, out), out))


def _pow_c(a, dts, dt, attrs):
    float_only(dt, "pow")
    return f"{cmath(dt, 'pow')}({a[0]}, {a[1]})"


register(OpDef("pow", infer=broadcast_infer, forward=lambda xp, x, y: x ** y, vjp=_pow_vjp,
               jvp=_pow_jvp, cost=elementwise_cost, out=ufunc_out("power"), cuda_expr=_pow_c,
               elementwise=True))


@builder("pow")
def pow(x, y) -> Node:  # noqa: A001 - NumPy's name
    return apply("pow", x, y)


def _share(x, y, dtype, first_wins):
    """x's share of d max(x, y) (or of min with ``first_wins=less``): [x > y] + [x == y] / 2.
    Ties split evenly, as the max reduction here, JAX and PyTorch do; a central difference at
    a tie gives the same 1/2."""
    return cast(first_wins(x, y), dtype) + cast(equal(x, y), dtype) * 0.5


def _extremum(name, first_wins, cmp):
    def vjp(g, x, y, out):
        s = _share(x, y, g.dtype, first_wins)    # d max(x,y) = s dx + (1 - s) dy
        return unbroadcast(g * s, x.shape), unbroadcast(g - g * s, y.shape)

    def jvp(ts, x, y, out):
        s = _share(x, y, out.dtype, first_wins)
        return _sum_tangents(None if ts[0] is None else _t(ts[0] * s, out),
                             None if ts[1] is None else _t(ts[1] * (1.0 - s), out))

    def c_expr(a, dts, dt, attrs):
        x, y = a[0], a[1]
        if dt not in FLOATS:
            return f"({x} {cmp} {y} ? {x} : {y})"
        # NumPy's maximum/minimum propagate a NaN from either side
        return f"(({x} != {x} || {x} {cmp} {y}) ? {x} : {y})"

    register(OpDef(name, infer=broadcast_infer,
                   forward=lambda xp, x, y: getattr(xp, name)(x, y),
                   vjp=vjp, jvp=jvp, cost=elementwise_cost, out=ufunc_out(name, "fiu"),
                   cuda_expr=c_expr, elementwise=True))


_extremum("maximum", lambda x, y: greater(x, y), ">")
_extremum("minimum", lambda x, y: less(x, y), "<")


def maximum(x, y) -> Node:
    return apply("maximum", x, y)


def minimum(x, y) -> Node:
    return apply("minimum", x, y)


# ---- unary -------------------------------------------------------------------------------------

def _unary(name, forward, dfdx, doc, out=None, cuda_expr=None):
    """Register an elementwise unary op whose derivative ``dfdx(x, out)`` builds nodes, with
    its ``out=`` kernel and C expression (``OpDef.out``, ``OpDef.cuda_expr``)."""
    register(OpDef(name, infer=float_unary_infer, forward=forward,
                   vjp=lambda g, x, out: (g * dfdx(x, out),),
                   jvp=lambda ts, x, out: None if ts[0] is None else ts[0] * dfdx(x, out),
                   cost=elementwise_cost, out=out, cuda_expr=cuda_expr, elementwise=True))

    def build(x) -> Node:
        return apply(name, x)
    build.__name__, build.__doc__ = name, doc
    return build


def _neg_c(a, dts, dt, attrs):
    if dt == "bool":
        raise Unsupported("neg of bool")
    return f"(-{a[0]})"


neg = builder("neg")(_unary("neg", lambda xp, x: -x, lambda x, out: -1.0, "-x;  d(-x) = -dx",
                            ufunc_out("negative", "fi"), _neg_c))
exp = _unary("exp", lambda xp, x: xp.exp(x), lambda x, out: out, "e^x;  d e^x = e^x dx",
             ufunc_out("exp"), unary_fn_expr("exp"))
log = _unary("log", lambda xp, x: xp.log(x), lambda x, out: 1.0 / x, "ln x;  d ln x = dx / x",
             ufunc_out("log"), unary_fn_expr("log"))
sqrt = _unary("sqrt", lambda xp, x: xp.sqrt(x), lambda x, out: 0.5 / out,
              "sqrt x;  d sqrt x = dx / (2 sqrt x)", ufunc_out("sqrt"), unary_fn_expr("sqrt"))
tanh = _unary("tanh", lambda xp, x: xp.tanh(x), lambda x, out: 1.0 - out * out,
              "tanh x;  d tanh x = (1 - tanh^2 x) dx", ufunc_out("tanh"), unary_fn_expr("tanh"))
sin = _unary("sin", lambda xp, x: xp.sin(x), lambda x, out: cos(x), "sin x;  d sin x = cos x dx",
             ufunc_out("sin"), unary_fn_expr("sin"))
cos = _unary("cos", lambda xp, x: xp.cos(x), lambda x, out: -sin(x),
             "cos x;  d cos x = -sin x dx", ufunc_out("cos"), unary_fn_expr("cos"))


def _sigmoid_fwd(xp, x):
    # 1/(1+e^-x) overflows e^-x for x << 0; tanh form is stable on both sides
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def _sigmoid_out(xp, n):
    # the forward's own sequence, 0.5 * (tanh(0.5 * x) + 1), one pass each, in place
    def run(x, out):
        xp.multiply(x, 0.5, out=out)
        xp.tanh(out, out=out)
        xp.add(out, 1.0, out=out)
        xp.multiply(out, 0.5, out=out)
    return run, ()


def _sigmoid_c(a, dts, dt, attrs):
    float_only(dt, "sigmoid")                # the forward's stable tanh form
    half, one = literal(0.5, dt), literal(1, dt)
    return f"({half} * ({cmath(dt, 'tanh')}({half} * {a[0]}) + {one}))"


sigmoid = _unary("sigmoid", _sigmoid_fwd, lambda x, out: out * (1.0 - out),
                 "1/(1+e^-x);  d s = s (1 - s) dx",
                 OutKernel(_sigmoid_out, True, same_dtype("f")), _sigmoid_c)


def _relu_c(a, dts, dt, attrs):
    x, zero = a[0], literal(0, dt)
    # NumPy's maximum(x, 0): NaN kept, -0.0 becomes 0.0
    return f"(({x} > {zero} || {x} != {x}) ? {x} : {zero})"


# relu is its own primitive (not maximum(x, 0)) so the backward is one mask, not a where+mul
relu = _unary("relu", lambda xp, x: xp.maximum(x, 0), lambda x, out: step(x),
              "max(x, 0);  d relu = [x > 0] dx", ufunc_out("maximum", "fi", 0), _relu_c)

_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_fwd(xp, x):
    # the tanh approximation (PyTorch's approximate="tanh"); gelu_erf below is the exact form
    return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_grad(x, out):
    # d/dx 0.5 x (1 + tanh u), u = c (x + 0.044715 x^3):
    #   0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)
    t = tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 0.134145 * x * x)


def _gelu_c(a, dts, dt, attrs):
    float_only(dt, "gelu")
    x, c = a[0], literal(_GELU_C, dt)
    inner = f"{c} * ({x} + {literal(0.044715, dt)} * {x} * {x} * {x})"
    return f"({literal(0.5, dt)} * {x} * ({literal(1, dt)} + {cmath(dt, 'tanh')}({inner})))"


gelu = _unary("gelu", _gelu_fwd, _gelu_grad, "x Phi(x), tanh approximation", None, _gelu_c)


def _erf_fwd(xp, x):
    # NumPy has no erf: SciPy's (scikit-learn's dependency and ours), CuPy's for GPU arrays,
    # each imported on first use (importing scipy.special takes 0.5 s); float32 on the CPU
    # has its own kernel (_erf_f32). Chosen by the array module, as _erf_out does.
    if xp is np:
        if x.dtype == np.float32:
            out = _erf_f32(x, np.empty(np.shape(x), np.float32))
            return out[()] if isinstance(x, np.generic) else out
        from scipy.special import erf as f
    else:
        from cupyx.scipy.special import erf as f
    out = f(x)
    return out if out.dtype == x.dtype else out.astype(x.dtype)    # float16 runs as float32


def _erf_out(xp, n):
    # the forward's own kernel (SciPy's ufunc, or _erf_f32 for float32, on NumPy; CuPy's on
    # GPU arrays), which takes out=
    if xp is np:
        if n.dtype == "float32":
            return _erf_f32, ()
        from scipy.special import erf as f
    else:
        from cupyx.scipy.special import erf as f
    return f, ()


_ERF_STEPS = 256          # table nodes a unit: x = (k + u) / 256, u in [-1/2, 1/2]
_ERF_MAX = 4.0            # erf(x) rounds to +-1 in float32 from |x| = 3.92 on
_ERF_NODES = int(_ERF_MAX * _ERF_STEPS)


@functools.cache
def _erf_table() -> tuple[np.ndarray, np.ndarray]:
    """The cubic Taylor coefficients of erf at x_k = k h on [-4, 4], h = 1/256, node k at
    index k + 1024, each scaled for u = (x - x_k) / h: c0 = erf(x_k), c1 = h erf'(x_k), c2 =
    h^2 erf''(x_k) / 2, c3 = h^3 erf^(3)(x_k) / 6, where erf' = 2/sqrt(pi) e^(-x^2), erf'' =
    -2x erf', erf^(3) = (4x^2 - 2) erf'; as c3 + i c2 and c1 + i c0, two coefficients an
    entry, so a chunk gathers twice, not four times (12% faster)."""
    from scipy.special import erf as f
    h = 1.0 / _ERF_STEPS
    x = np.arange(-_ERF_NODES, _ERF_NODES + 1) * h
    d1 = 2.0 / math.sqrt(math.pi) * np.exp(-x * x)
    c32, c10 = np.empty((2, len(x)), np.complex128)
    c32.real, c32.imag = (4 * x * x - 2) * d1 * h ** 3 / 6, -x * d1 * h * h
    c10.real, c10.imag = d1 * h, f(x)
    c10.imag[_ERF_NODES] = -0.0       # with u = -0 at x = -0 (see _erf_f32_chunk): erf(-0) = -0
    return c32, c10


def _erf_f32(x, out):
    """float32 erf into ``out``, 2.5x as fast as SciPy's ufunc (which runs cephes' float64
    branches per element, 15 ns each here, so erf was a quarter of the exact-GELU MLP step).
    The cubic at the nearest table node is summed in float64 (its remainder is below 3e-12,
    and relative near 0, where the node is 0 and erf(0) = erf''(0) = 0) and rounded once: the
    result is SciPy's float32 erf unless erf(x) lies within about 3e-12 of a midpoint between
    two float32 values (none of tests/ops/test_erf_f32.py's 2.4M points). NaN stays NaN (its
    index is clipped, its u is NaN); +-inf gives +-1; erf(-0) = -0."""
    table = _erf_table()
    flat = np.reshape(x, -1)
    dst = out.reshape(-1) if out.flags.c_contiguous else np.empty(out.size, np.float32)
    for start in range(0, flat.size, _ERF_CHUNK):
        _erf_f32_chunk(flat[start:start + _ERF_CHUNK], dst[start:start + _ERF_CHUNK], table)
    if not out.flags.c_contiguous:
        np.copyto(out, dst.reshape(out.shape))
    return out


# elements a pass: the chunk's 36 bytes an element of temporaries stay in a 1 MB L2 cache
# (whole 128x512 arrays, 2.3 MB, ran at a third of the speed on this machine)
_ERF_CHUNK = 16384


def _erf_f32_chunk(x, out, table):
    c32, c10 = table
    a = np.clip(x, -_ERF_MAX, _ERF_MAX, dtype=np.float32)
    a *= _ERF_STEPS                                  # exact: a power of two
    k = np.rint(a)
    k += 0.0                                         # -0 -> +0: u = -0 at x = -0
    a -= k                                           # exact: u in [-1/2, 1/2]
    u = a.astype(np.float64)
    k += _ERF_NODES
    with np.errstate(invalid="ignore"):              # NaN's index: clipped by take
        i = k.astype(np.intp)
    c = np.take(c32, i, mode="clip")
    r = c.real * u
    r += c.imag
    np.take(c10, i, mode="clip", out=c)
    r *= u
    r += c.real
    r *= u
    r += c.imag                                      # ((c3 u + c2) u + c1) u + c0
    np.copyto(out, r, casting="same_kind")           # x was read before: out may be x


_ERF_C = 2.0 / math.sqrt(math.pi)
erf = _unary("erf", _erf_fwd, lambda x, out: _ERF_C * exp(-(x * x)),
             "erf x;  d erf x = 2/sqrt(pi) e^(-x^2) dx",
             OutKernel(_erf_out, True,
                       lambda n: n.dtype in FLOATS and n.inputs[0].dtype == n.dtype),
             unary_fn_expr("erf"))
_SQRT_HALF = math.sqrt(0.5)


def gelu_erf(x) -> Node:
    """x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, exact (torch's GELU(approximate="none"), in
    torch's order of operations): a composite, its gradient erf's by the chain rule."""
    return x * 0.5 * (1.0 + erf(x * _SQRT_HALF))


def abs(x) -> Node:  # noqa: A001 - NumPy's name
    return x * sign(x)


# ---- non-differentiable: comparisons, step, sign, cast ------------------------------------------

def _compare_infer(x, y, **_):
    shape, _dtype = broadcast_infer(x, y)
    return shape, "bool"


def _compare_out(name: str) -> OutKernel:
    return OutKernel(lambda xp, n: (getattr(xp, name), ()), True,
                     lambda n: n.inputs[0].dtype == n.inputs[1].dtype)


# op: (Python operator method, C operator)
_COMPARISONS = {"equal": ("__eq__", "=="), "not_equal": ("__ne__", "!="),
                "less": ("__lt__", "<"), "less_equal": ("__le__", "<="),
                "greater": ("__gt__", ">"), "greater_equal": ("__ge__", ">=")}
for _name, (_method, _sym) in _COMPARISONS.items():
    register(OpDef(_name, infer=_compare_infer,
                   forward=(lambda m: lambda xp, x, y: getattr(x, m)(y))(_method),
                   cost=elementwise_cost, nondiff=(0, 1), out=_compare_out(_name),
                   cuda_expr=binary_expr(_sym), elementwise=True))


def equal(x, y): return apply("equal", x, y)
def not_equal(x, y): return apply("not_equal", x, y)
def less(x, y): return apply("less", x, y)
def less_equal(x, y): return apply("less_equal", x, y)
def greater(x, y): return apply("greater", x, y)
def greater_equal(x, y): return apply("greater_equal", x, y)


def _cast_infer(x, dtype, **_):
    return x[0], str(np.dtype(dtype))


def _cast_vjp(g, x, out, dtype):
    return (cast(g, x.dtype),) if np.dtype(x.dtype).kind == "f" else (None,)  # d cast = cast d


def _cast_out(xp, n):
    # copyto takes (dst, src): the kernel convention is fn(src, out=dst)
    def run(x, out):
        xp.copyto(out, x, casting="unsafe")
    return run, ()


def _cast_c(a, dts, dt, attrs):
    if dt == "bool":
        return f"({a[0]} != {literal(0, dts[0])})"
    return f"(({CTYPES[dt]}){a[0]})"


register(OpDef("cast", infer=_cast_infer, forward=lambda xp, x, dtype: x.astype(dtype),
               vjp=_cast_vjp, jvp=lambda ts, x, out, dtype: None if ts[0] is None or np.dtype(
                   dtype).kind != "f" else cast(ts[0], dtype), cost=elementwise_cost,
               out=OutKernel(_cast_out, True, lambda n: True), cuda_expr=_cast_c,
               elementwise=True))


def cast(x, dtype) -> Node:
    return apply("cast", x, dtype=str(np.dtype(dtype)))


def _step_c(a, dts, dt, attrs):
    return f"({a[0]} > {literal(0, dts[0])} ? {literal(1, dt)} : {literal(0, dt)})"


register(OpDef("step", infer=same_infer, forward=lambda xp, x: (x > 0).astype(x.dtype),
               cost=elementwise_cost, nondiff=(0,),
               out=OutKernel(lambda xp, n: (xp.greater, (0,)), True, same_dtype("f")),
               cuda_expr=_step_c, elementwise=True))


def step(x) -> Node:
    """[x > 0] in x's dtype: relu's derivative (no gradient of its own)."""
    return apply("step", x)


def _sign_c(a, dts, dt, attrs):
    x, zero = a[0], literal(0, dt)
    body = f"(({CTYPES[dt]})(({x} > {zero}) - ({x} < {zero})))"
    return f"({x} != {x} ? {x} : {body})" if dt in FLOATS else body


register(OpDef("sign", infer=same_infer, forward=lambda xp, x: xp.sign(x),
               cost=elementwise_cost, nondiff=(0,), out=ufunc_out("sign"), cuda_expr=_sign_c,
               elementwise=True))


def sign(x) -> Node:
    return apply("sign", x)


# ---- floor division and remainder (Python's and torch's: the remainder takes y's sign) ---------

register(OpDef("floor_divide", infer=broadcast_infer,
               forward=lambda xp, x, y: xp.floor_divide(x, y), cost=elementwise_cost,
               nondiff=(0, 1)))


def floor_divide(x, y) -> Node:
    """floor(x / y), piecewise constant: no gradient (torch's ``//``)."""
    return apply("floor_divide", x, y)


def _remainder_vjp(g, x, y, out):
    # x mod y = x - y floor(x/y)  =>  d = dx - floor(x/y) dy (floor is flat between jumps)
    return unbroadcast(g, x.shape), unbroadcast(-(g * floor_divide(x, y)), y.shape)


def _remainder_jvp(ts, x, y, out):
    return _sum_tangents(_t(ts[0], out),
                         None if ts[1] is None else _t(-(ts[1] * floor_divide(x, y)), out))


register(OpDef("remainder", infer=broadcast_infer, forward=lambda xp, x, y: xp.remainder(x, y),
               vjp=_remainder_vjp, jvp=_remainder_jvp, cost=elementwise_cost))


def remainder(x, y) -> Node:
    """x - y floor(x / y), the sign of y's (Python's and torch's ``%``)."""
    return apply("remainder", x, y)


# ---- where ---------------------------------------------------------------------------------------

def _where_infer(c, x, y, **_):
    if c[1] != "bool":
        raise TypeError(f"condition must be bool, got {c[1]}")
    shape, dtype = broadcast_infer(x, y)
    return broadcast_infer((shape, dtype), (c[0], dtype))


def _where_vjp(g, c, x, y, out):
    zero = g * 0.0                                       # d where(c,x,y) = c dx + (1-c) dy
    return None, unbroadcast(where(c, g, zero), x.shape), unbroadcast(where(c, zero, g), y.shape)


def _where_jvp(ts, c, x, y, out):
    return where(c, _t_or_zero(ts[1], out), _t_or_zero(ts[2], out))


def _where_out(xp, n):
    def run(c, x, y, out):
        xp.copyto(out, y)
        xp.copyto(out, x, where=c)
    return run, ()


register(OpDef("where", infer=_where_infer, forward=lambda xp, c, x, y: xp.where(c, x, y),
               vjp=_where_vjp, jvp=_where_jvp, cost=elementwise_cost, nondiff=(0,),
               out=OutKernel(_where_out, False,
                             lambda n: n.inputs[1].dtype == n.inputs[2].dtype == n.dtype),
               cuda_expr=lambda a, dts, dt, attrs: f"({a[0]} ? {a[1]} : {a[2]})",
               elementwise=True))


def where(c, x, y) -> Node:
    # a scalar branch takes the other's dtype; two scalars keep their own (NumPy's where)
    like = x if isinstance(x, Node) else y if isinstance(y, Node) else None
    return apply("where", c, as_node(x, like), as_node(y, like))


__all__ = ["add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "tanh", "sin", "cos",
           "floor_divide", "remainder", "sigmoid",
           "relu", "gelu", "erf", "gelu_erf", "maximum", "minimum", "abs", "where", "cast", "step",
           "sign", "equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
