"""Property tests of the op library: hypothesis-drawn shapes (broadcasting, indices, windows)
through the shared harness, worked examples of both autodiff modes (colah's e = (a+b)(b+1)),
Hessian-vector products against closed forms, dropout's determinism, and one test per bug
fixed in the first version of the ops.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from op_harness import F, OpCase, check_forward, check_grad, check_jvp

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, const, leaf
from shardgrad.ops import elementwise as E
from shardgrad.ops import loss, nn
from shardgrad.ops import reduce as R
from shardgrad.ops import shape as S
from shardgrad.ops.registry import get
from shardgrad.runtime.interpreter import run

SMALL = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**16)


def check_all(case, seed):
    check_forward(case, "float64", seed=seed)
    check_grad(case, seed)
    check_jvp(case, seed)


# ---- hypothesis: shapes and broadcasting ---------------------------------------------------------

BINARY = {"add": (E.add, np.add, {}), "sub": (E.sub, np.subtract, {}),
          "mul": (E.mul, np.multiply, {}), "div": (E.div, np.divide, {"lo": 0.5, "hi": 2.0}),
          "pow": (E.pow, np.power, {"lo": 0.5, "hi": 2.0}),
          "maximum": (E.maximum, np.maximum, {}), "minimum": (E.minimum, np.minimum, {})}


@pytest.mark.parametrize("name", BINARY)
@SMALL
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
       seed=seeds)
def test_binary_broadcasting(name, shapes, seed):
    fn, ref, positive = BINARY[name]
    x, y = shapes.input_shapes
    check_all(OpCase(name, fn, (F(*x, **positive), F(*y, **(positive if name == "div" else {}))),
                     ref), seed)


@SMALL
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3),
       seed=seeds)
def test_where_broadcasting(shapes, seed):
    c, x, y = shapes.input_shapes
    case = OpCase("where", lambda c, x, y: E.where(E.greater(c, 0.0), x, y),
                  (F(*c), F(*x), F(*y)), lambda c, x, y: np.where(c > 0, x, y))
    check_forward(case, seed=seed)
    check_grad(case, seed)


UNARY = {"exp": (E.exp, np.exp, {}), "log": (E.log, np.log, {"lo": 0.5, "hi": 2.0}),
         "tanh": (E.tanh, np.tanh, {}), "sigmoid": (E.sigmoid, lambda x: 1 / (1 + np.exp(-x)), {}),
         "softmax": (loss.softmax, lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True), {})}


@pytest.mark.parametrize("name", UNARY)
@SMALL
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3), seed=seeds)
def test_unary_shapes(name, shape, seed):
    fn, ref, bounds = UNARY[name]
    check_all(OpCase(name, fn, (F(*shape, **bounds),), ref), seed)


@SMALL
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3), data=st.data(), seed=seeds,
       keepdims=st.booleans(), op=st.sampled_from(["sum", "max", "mean"]))
def test_reductions(shape, data, seed, keepdims, op):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1))
    axis = tuple(axes)
    check_all(OpCase(op, lambda x: getattr(R, op)(x, axis, keepdims), (F(*shape),),
                     lambda x: getattr(np, op)(x, axis=axis, keepdims=keepdims)), seed)


@SMALL
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4), data=st.data(),
       seed=seeds)
def test_getitem_basic_indices(shape, data, seed):
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    check_all(OpCase("getitem", lambda x: S.getitem(x, index), (F(*shape),),
                     lambda x: x[index]), seed)


@SMALL
@given(base=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3), data=st.data(), seed=seeds)
def test_concat_shapes(base, data, seed):
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    shapes = [tuple(s if i != axis % len(base) else k for i, s in enumerate(base))
              for k in sizes]
    check_all(OpCase("concat", lambda *xs: S.concat(xs, axis), tuple(F(*s) for s in shapes),
                     lambda *xs: np.concatenate(xs, axis)), seed)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 2), o=st.integers(1, 2), hw=st.integers(3, 6),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), seed=seeds)
def test_conv2d_windows(n, c, o, hw, k, stride, padding, seed):
    def ref(x, w):
        xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        oh = (hw + 2 * padding - k) // stride + 1
        out = np.zeros((n, o, oh, oh))
        for i in range(oh):
            for j in range(oh):
                patch = xp_[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
                out[:, :, i, j] = np.einsum("ncab,ocab->no", patch, w)
        return out
    check_all(OpCase("conv2d", lambda x, w: nn.conv2d(x, w, stride=stride, padding=padding),
                     (F(n, c, hw, hw), F(o, c, k, k)), ref), seed)


@settings(max_examples=15, deadline=None)
@given(hw=st.integers(2, 6), k=st.integers(1, 3), stride=st.integers(1, 3),
       padding=st.integers(0, 1), op=st.sampled_from(["max_pool2d", "avg_pool2d"]), seed=seeds)
def test_pool_windows(hw, k, stride, padding, op, seed):
    if 2 * padding > k or hw + 2 * padding < k:
        return
    reduce = np.max if op == "max_pool2d" else np.mean

    def ref(x):
        fill = -np.inf if op == "max_pool2d" else 0.0
        xp_ = np.pad(x, ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2), constant_values=fill)
        oh = (hw + 2 * padding - k) // stride + 1
        return np.stack([np.stack([reduce(xp_[:, :, i * stride:i * stride + k,
                                             j * stride:j * stride + k], axis=(2, 3))
                                   for j in range(oh)], -1) for i in range(oh)], -2)
    check_all(OpCase(op, lambda x: getattr(nn, op)(x, k, stride, padding), (F(1, 2, hw, hw),),
                     ref), seed)


# ---- worked examples: both modes, second order ---------------------------------------------

def test_colah_example_both_modes():
    """colah's "Calculus on Computational Graphs": e = (a+b)(b+1) at a=2, b=1 has
    de/da = 2 and de/db = 5, by reverse mode and by forward mode."""
    a = leaf("input", (), "float64", name="a")
    b = leaf("input", (), "float64", name="b")
    e = (a + b) * (b + 1.0)
    feeds = {"a": np.float64(2.0), "b": np.float64(1.0)}
    rev = run(autodiff.grad(Graph({"e": e}), ["a", "b"]), feeds)
    assert (rev["e"], rev["grad/a"], rev["grad/b"]) == (6.0, 2.0, 5.0)
    fwd = autodiff.jvp(Graph({"e": e}), ["a", "b"])
    assert run(fwd, {**feeds, "tangent/a": np.float64(1), "tangent/b": np.float64(0)})[
        "jvp/e"] == 2.0
    assert run(fwd, {**feeds, "tangent/a": np.float64(0), "tangent/b": np.float64(1)})[
        "jvp/e"] == 5.0


def _hvp(y, x, v):
    """H v for scalar y(x): the gradient of <grad y, v> (grad of grad)."""
    (g,) = autodiff.backprop([y], [const(1.0)], [x])
    return autodiff.backprop([R.sum(g * const(v))], [const(1.0)], [x])[0]


def test_hessian_vector_product_closed_forms():
    rng = np.random.default_rng(0)
    x = leaf("input", (5,), "float64", name="x")
    xv, v = rng.standard_normal(5), rng.standard_normal(5)
    got = run(Graph({"hv": _hvp(R.sum(x ** 3.0), x, v)}), {"x": xv})["hv"]
    np.testing.assert_allclose(got, 6 * xv * v)               # H = diag(6x)

    logits = leaf("input", (3, 4), "float64", name="z")
    labels = const(np.array([0, 3, 1]))
    zv, v2 = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    got = run(Graph({"hv": _hvp(loss.cross_entropy(logits, labels), logits, v2)}),
              {"z": zv})["hv"]
    p = np.exp(zv) / np.exp(zv).sum(1, keepdims=True)          # H_i = (diag p_i - p_i p_i^T)/N
    want = (p * v2 - p * (p * v2).sum(1, keepdims=True)) / 3
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ---- dropout ----------------------------------------------------------------------------------

def _mask(p, seed, salt=None, shape=(100, 100)):
    x = leaf("input", shape, "float32", name="x")
    ins = {"x": np.ones(shape, np.float32)}
    s = None
    if salt is not None:
        s = leaf("input", (), "int64", name="s")
        ins["s"] = np.asarray(salt)
    return run(Graph({"y": nn.dropout(x, p, seed, salt=s)}), ins)["y"]


def test_dropout_is_seeded_scaled_and_off_in_eval():
    a, b = _mask(0.25, 1), _mask(0.25, 1)
    assert np.array_equal(a, b)                                # same seed, same mask
    assert not np.array_equal(a, _mask(0.25, 2))
    assert not np.array_equal(_mask(0.25, 1, salt=1), _mask(0.25, 1, salt=2))
    assert set(np.unique(a)) == {0.0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.02                  # 10^4 draws: sd 0.004
    x = leaf("input", (3,), "float32", name="x")
    assert nn.dropout(x, 0.5, training=False) is x
    assert (_mask(1.0, 0) == 0).all()


# ---- batch_norm ----------------------------------------------------------------------------------

def test_batch_norm_eval_returns_running_stats_unchanged():
    x = leaf("input", (4, 3), "float64", name="x")
    rm = leaf("state", (3,), "float64", name="rm")
    rv = leaf("state", (3,), "float64", name="rv")
    out, rm2, rv2 = nn.batch_norm(x, None, None, rm, rv, training=False)
    assert rm2 is rm and rv2 is rv
    out, rm3, rv3 = nn.batch_norm(x, None, None, rm, rv, training=True)
    assert rm3 is not rm and rm3.shape == (3,)


# ---- bugs fixed in the first version, one test each ---------------------------------------------

def _grads(y, names, feeds):
    return run(autodiff.grad(Graph({"y": R.sum(y)}), names), feeds)


def test_maximum_minimum_split_ties_evenly():
    x = leaf("input", (2,), "float64", name="x")
    y = leaf("input", (2,), "float64", name="y")
    feeds = {"x": np.array([1.0, 2.0]), "y": np.array([1.0, 3.0])}
    for op in (E.maximum, E.minimum):
        g = _grads(op(x, y), ["x", "y"], feeds)
        assert g["grad/x"][0] == g["grad/y"][0] == 0.5        # a tie: the central difference


def test_minimum_of_integers():
    x = leaf("input", (3,), "int64", name="x")
    assert run(Graph({"m": E.minimum(x, 1)}), {"x": np.array([0, 1, 2])})["m"].tolist() == [
        0, 1, 1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # x^-1 at 0 is computed, then masked
def test_pow_gradients_at_zero_are_finite():
    x = leaf("input", (2,), "float64", name="x")
    y = leaf("input", (2,), "float64", name="y")
    g = _grads(x ** y, ["x", "y"], {"x": np.array([0.0, 0.0]), "y": np.array([0.0, 2.0])})
    assert g["grad/x"].tolist() == [0.0, 0.0]                 # d x^0 = 0; d x^2 = 2x
    assert g["grad/y"].tolist() == [0.0, 0.0]                 # x^y log x -> 0 at x = 0


def test_matmul_vector_matrix_shape():
    assert (leaf("input", (3,), "float32") @ leaf("input", (3, 2), "float32")).shape == (2,)


def test_cast_to_int_has_no_tangent():
    x = leaf("input", (3,), "float64", name="x")
    g = autodiff.jvp(Graph({"i": E.cast(x, "int64")}), ["x"])
    out = run(g, {"x": np.ones(3), "tangent/x": np.ones(3)})
    assert out["jvp/i"].tolist() == [0, 0, 0]


def _first_argmax_routes(g, x, k, s, p):
    """Loop reference: each window's g to its first maximum in row-major order (a NaN is the
    maximum, as numpy.argmax), the windows' reads of y back from the same positions."""
    n, c, h, w = x.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (p[0],) * 2, (p[1],) * 2), constant_values=-np.inf)
    oh, ow = g.shape[2:]
    gx = np.zeros(xp_.shape)
    pos = np.zeros(g.shape + (2,), int)
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    win = xp_[a, b, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
                    di, dj = divmod(int(np.argmax(win)), k[1])
                    pos[a, b, i, j] = i * s[0] + di, j * s[1] + dj
                    gx[a, b, i * s[0] + di, j * s[1] + dj] += g[a, b, i, j]
    return gx[:, :, p[0]:p[0] + h, p[1]:p[1] + w], pos


@pytest.mark.parametrize("win", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                 ((2, 3), (3, 3), (1, 1))])
def test_max_pool_routes_ties_and_nan_to_the_first_maximum(win):
    """ReLU outputs tie at 0 in most windows: the gradient goes to the first maximum only
    (PyTorch's and the CUDA kernel's rule), on the disjoint-window fast path (2x2/2, with an
    odd size left over) and the overlapping one; a NaN counts as the maximum."""
    k, s, p = win
    rng = np.random.default_rng(0)
    x = np.maximum(rng.integers(-2, 3, (2, 3, 7, 7)), 0).astype(np.float64)
    x[0, 0, 1, 1] = x[1, 2, 4, 5] = np.nan
    out_hw = [(7 + 2 * p[d] - k[d]) // s[d] + 1 for d in (0, 1)]
    g = rng.standard_normal((2, 3, *out_hw))
    want, pos = _first_argmax_routes(g, x, k, s, p)
    attrs = dict(kernel=k, stride=s, padding=p)
    # overlapping windows add in another order than the loop: to rounding
    np.testing.assert_allclose(get("max_pool2d_grad").forward(np, g, x, **attrs), want,
                               rtol=1e-12, atol=1e-15)
    y = rng.standard_normal(x.shape)
    ypad = np.pad(y, ((0, 0), (0, 0), (p[0],) * 2, (p[1],) * 2))
    a, b, i, j = np.indices(g.shape)
    np.testing.assert_array_equal(get("max_pool2d_gather").forward(np, y, x, **attrs),
                                  ypad[a, b, pos[..., 0], pos[..., 1]])
    g[0, 1, 0, 0] = np.inf                  # an inf stays in its own window: no NaN elsewhere
    got = get("max_pool2d_grad").forward(np, g, x, **attrs)
    assert np.isnan(got).sum() == 0 and np.isinf(got).sum() == 1


@pytest.mark.parametrize("win", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))])
def test_max_pool_backward_reads_the_forward_maxima(win, monkeypatch):
    """max_pool2d's VJP hands its own output (the window maxima) to max_pool2d_grad, so the
    backward finds each argmax without running the pooling again; the gradient equals the
    first-argmax loop's (float64, 1e-10) and the one that recomputes the maxima."""
    k, s, p = win
    rng = np.random.default_rng(1)
    xv = np.maximum(rng.standard_normal((2, 3, 9, 9)), 0)     # ReLU-like: ties at 0
    x = leaf("input", xv.shape, "float64", name="x")
    y = nn.max_pool2d(x, k, s, p)
    gv = rng.standard_normal(y.shape)
    (gx,) = autodiff.backprop([y], [const(gv)], [x])
    assert gx.op == "max_pool2d_grad" and len(gx.inputs) == 3 and gx.inputs[2] is y
    want, _pos = _first_argmax_routes(gv, xv, k, s, p)
    attrs = dict(kernel=k, stride=s, padding=p)
    top = get("max_pool2d").forward(np, xv, **attrs)
    calls = []
    real = nn._max_pool_fwd
    monkeypatch.setattr(nn, "_max_pool_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = get("max_pool2d_grad").forward(np, gv, xv, top, **attrs)
    assert calls == []                                        # no recompute of the maxima
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(got, get("max_pool2d_grad").forward(np, gv, xv, **attrs))
    assert len(calls) == 1                                    # without them: recomputed
    monkeypatch.undo()
    np.testing.assert_allclose(run(Graph({"gx": gx}), {"x": xv})["gx"], want, rtol=1e-10,
                               atol=1e-10)
    with pytest.raises(ValueError, match="window maxima"):
        get("max_pool2d_grad").infer((gv.shape, "float64"), (xv.shape, "float64"),
                                     (xv.shape, "float64"), **attrs)


@SMALL
@given(st.integers(2, 40), st.integers(2, 40), seeds)
def test_a_float_sum_does_not_depend_on_memory_layout(m, n, seed):
    # exp(x.T) is F-ordered in NumPy (a ufunc keeps its input's order) but C-ordered in the
    # compiled executor's buffer: the same values must sum to the same bits (hypothesis found
    # a 1-ulp difference between the interpreter and a compiled program this way)
    x = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    f_order = np.exp(x.T)
    c_order = np.ascontiguousarray(f_order)
    s = get("sum")
    for axis in (None, (0,), (1,)):
        a = s.forward(np, f_order, axis=axis, keepdims=False)
        b = s.forward(np, c_order, axis=axis, keepdims=False)
        np.testing.assert_array_equal(a, b)
        kernel, _ = s.out.make(np, _sum_node(f_order, axis))
        np.testing.assert_array_equal(kernel(f_order, out=np.empty_like(b)), b)


def _sum_node(x, axis):
    return R.sum(leaf("input", x.shape, "float32", name="x"), axis)
