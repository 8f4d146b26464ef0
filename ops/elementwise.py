"""Elementwise ops: arithmetic, transcendental functions, activations, comparisons, where.

Each op is one stanza: forward kernel against ``xp``, VJP with its math, JVP where it is one
line, then ``register``, then the public builder. Imports only ops.registry and graph.ir.
"""

from __future__ import annotations

import math

import numpy as np

from shardgrad.graph.ir import Node, const
from shardgrad.ops.registry import (
    FLOAT_DTYPES,
    OpDef,
    apply,
    as_node,
    broadcast_infer,
    builder,
    elementwise_cost,
    float_unary_infer,
    register,
    same_infer,
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
               cost=elementwise_cost))


@builder("add")
def add(x, y) -> Node:
    return apply("add", x, y)


def _sub_vjp(g, x, y, out):
    return unbroadcast(g, x.shape), unbroadcast(-g, y.shape)         # d(x-y) = dx - dy


def _sub_jvp(ts, x, y, out):
    return _sum_tangents(_t(ts[0], out), None if ts[1] is None else -_t(ts[1], out))


register(OpDef("sub", infer=broadcast_infer, forward=lambda xp, x, y: x - y, vjp=_sub_vjp,
               jvp=_sub_jvp, cost=elementwise_cost))


@builder("sub")
def sub(x, y) -> Node:
    return apply("sub", x, y)


def _mul_vjp(g, x, y, out):
    return unbroadcast(g * y, x.shape), unbroadcast(g * x, y.shape)  # d(xy) = y dx + x dy


def _mul_jvp(ts, x, y, out):
    return _sum_tangents(None if ts[0] is None else _t(ts[0] * y, out),
                         None if ts[1] is None else _t(x * ts[1], out))


register(OpDef("mul", infer=broadcast_infer, forward=lambda xp, x, y: x * y, vjp=_mul_vjp,
               jvp=_mul_jvp, cost=elementwise_cost))


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


register(OpDef("div", infer=_div_infer, forward=lambda xp, x, y: x / y, vjp=_div_vjp,
               jvp=_div_jvp, cost=elementwise_cost))


@builder("div")
def div(x, y) -> Node:
    return apply("div", x, y)


def _pow_dx(x, y):
    """d x^y / dx = y x^(y-1), taken as 0 where y == 0 (x^-1 would give 0 * inf at x = 0)."""
    if y.op == "const" and np.all(y.attrs["value"] != 0):
        return y * x ** const(y.attrs["value"] - 1, dtype=y.dtype)      # fold y - 1 now
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


register(OpDef("pow", infer=broadcast_infer, forward=lambda xp, x, y: x ** y, vjp=_pow_vjp,
               jvp=_pow_jvp, cost=elementwise_cost))


@builder("pow")
def pow(x, y) -> Node:  # noqa: A001 - NumPy's name
    return apply("pow", x, y)


def _share(x, y, dtype, first_wins):
    """x's share of d max(x, y) (or of min with ``first_wins=less``): [x > y] + [x == y] / 2.
    Ties split evenly, as the max reduction here, JAX and PyTorch do; a central difference at
    a tie gives the same 1/2."""
    return cast(first_wins(x, y), dtype) + cast(equal(x, y), dtype) * 0.5


def _extremum(name, first_wins):
    def vjp(g, x, y, out):
        s = _share(x, y, g.dtype, first_wins)    # d max(x,y) = s dx + (1 - s) dy
        return unbroadcast(g * s, x.shape), unbroadcast(g - g * s, y.shape)

    def jvp(ts, x, y, out):
        s = _share(x, y, out.dtype, first_wins)
        return _sum_tangents(None if ts[0] is None else _t(ts[0] * s, out),
                             None if ts[1] is None else _t(ts[1] * (1.0 - s), out))

    register(OpDef(name, infer=broadcast_infer,
                   forward=lambda xp, x, y: getattr(xp, name)(x, y),
                   vjp=vjp, jvp=jvp, cost=elementwise_cost))


_extremum("maximum", lambda x, y: greater(x, y))
_extremum("minimum", lambda x, y: less(x, y))


def maximum(x, y) -> Node:
    return apply("maximum", x, y)


def minimum(x, y) -> Node:
    return apply("minimum", x, y)


# ---- unary -------------------------------------------------------------------------------------

def _unary(name, forward, dfdx, doc):
    """Register an elementwise unary op whose derivative ``dfdx(x, out)`` builds nodes."""
    register(OpDef(name, infer=float_unary_infer, forward=forward,
                   vjp=lambda g, x, out: (g * dfdx(x, out),),
                   jvp=lambda ts, x, out: None if ts[0] is None else ts[0] * dfdx(x, out),
                   cost=elementwise_cost))

    def build(x) -> Node:
        return apply(name, x)
    build.__name__, build.__doc__ = name, doc
    return build


neg = builder("neg")(_unary("neg", lambda xp, x: -x, lambda x, out: -1.0, "-x;  d(-x) = -dx"))
exp = _unary("exp", lambda xp, x: xp.exp(x), lambda x, out: out, "e^x;  d e^x = e^x dx")
log = _unary("log", lambda xp, x: xp.log(x), lambda x, out: 1.0 / x, "ln x;  d ln x = dx / x")
sqrt = _unary("sqrt", lambda xp, x: xp.sqrt(x), lambda x, out: 0.5 / out,
              "sqrt x;  d sqrt x = dx / (2 sqrt x)")
tanh = _unary("tanh", lambda xp, x: xp.tanh(x), lambda x, out: 1.0 - out * out,
              "tanh x;  d tanh x = (1 - tanh^2 x) dx")
sin = _unary("sin", lambda xp, x: xp.sin(x), lambda x, out: cos(x), "sin x;  d sin x = cos x dx")
cos = _unary("cos", lambda xp, x: xp.cos(x), lambda x, out: -sin(x),
             "cos x;  d cos x = -sin x dx")


def _sigmoid_fwd(xp, x):
    # 1/(1+e^-x) overflows e^-x for x << 0; tanh form is stable on both sides
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


sigmoid = _unary("sigmoid", _sigmoid_fwd, lambda x, out: out * (1.0 - out),
                 "1/(1+e^-x);  d s = s (1 - s) dx")
# relu is its own primitive (not maximum(x, 0)) so the backward is one mask, not a where+mul
relu = _unary("relu", lambda xp, x: xp.maximum(x, 0), lambda x, out: step(x),
              "max(x, 0);  d relu = [x > 0] dx")

_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_fwd(xp, x):
    # the tanh approximation (PyTorch's approximate="tanh"); gelu_erf below is the exact form
    return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_grad(x, out):
    # d/dx 0.5 x (1 + tanh u), u = c (x + 0.044715 x^3):
    #   0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)
    t = tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 0.134145 * x * x)


gelu = _unary("gelu", _gelu_fwd, _gelu_grad, "x Phi(x), tanh approximation")


def _erf_fwd(xp, x):
    # NumPy has no erf: SciPy's (scikit-learn's dependency and ours), CuPy's for GPU arrays,
    # each imported on first use (importing scipy.special takes 0.5 s)
    if isinstance(x, np.ndarray | np.generic):
        from scipy.special import erf as f
    else:
        from cupyx.scipy.special import erf as f
    out = f(x)
    return out if out.dtype == x.dtype else out.astype(x.dtype)    # float16 runs as float32


_ERF_C = 2.0 / math.sqrt(math.pi)
erf = _unary("erf", _erf_fwd, lambda x, out: _ERF_C * exp(-(x * x)),
             "erf x;  d erf x = 2/sqrt(pi) e^(-x^2) dx")
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


_COMPARISONS = {"equal": "__eq__", "not_equal": "__ne__", "less": "__lt__",
                "less_equal": "__le__", "greater": "__gt__", "greater_equal": "__ge__"}
for _name, _method in _COMPARISONS.items():
    register(OpDef(_name, infer=_compare_infer,
                   forward=(lambda m: lambda xp, x, y: getattr(x, m)(y))(_method),
                   cost=elementwise_cost, nondiff=(0, 1)))


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


register(OpDef("cast", infer=_cast_infer, forward=lambda xp, x, dtype: x.astype(dtype),
               vjp=_cast_vjp, jvp=lambda ts, x, out, dtype: None if ts[0] is None or np.dtype(
                   dtype).kind != "f" else cast(ts[0], dtype), cost=elementwise_cost))


def cast(x, dtype) -> Node:
    return apply("cast", x, dtype=str(np.dtype(dtype)))


register(OpDef("step", infer=same_infer, forward=lambda xp, x: (x > 0).astype(x.dtype),
               cost=elementwise_cost, nondiff=(0,)))


def step(x) -> Node:
    """[x > 0] in x's dtype: relu's derivative (no gradient of its own)."""
    return apply("step", x)


register(OpDef("sign", infer=same_infer, forward=lambda xp, x: xp.sign(x),
               cost=elementwise_cost, nondiff=(0,)))


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


register(OpDef("where", infer=_where_infer, forward=lambda xp, c, x, y: xp.where(c, x, y),
               vjp=_where_vjp, jvp=_where_jvp, cost=elementwise_cost, nondiff=(0,)))


def where(c, x, y) -> Node:
    # a scalar branch takes the other's dtype; two scalars keep their own (NumPy's where)
    like = x if isinstance(x, Node) else y if isinstance(y, Node) else None
    return apply("where", c, as_node(x, like), as_node(y, like))


__all__ = ["add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "tanh", "sin", "cos",
           "floor_divide", "remainder", "sigmoid",
           "relu", "gelu", "erf", "gelu_erf", "maximum", "minimum", "abs", "where", "cast", "step",
           "sign", "equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
