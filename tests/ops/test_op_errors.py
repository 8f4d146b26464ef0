"""Bad programs fail early and say why: a shape or dtype mismatch is a ShapeError at build time
naming the op, the types and the caller's own line; unknown ops and gradients of integers are
refused; a label out of range stops the run with the label and the class count.
"""

import inspect
import os

import numpy as np
import pytest

from shardgrad.graph import autodiff
from shardgrad.graph.ir import Graph, Node, ShapeError, leaf, verify
from shardgrad.ops import REGISTRY, get, loss, nn
from shardgrad.ops import elementwise as E
from shardgrad.ops import shape as S
from shardgrad.ops.linalg import matmul
from shardgrad.ops.reduce import sum as rsum
from shardgrad.runtime.interpreter import ExecutionError, run

HERE = os.path.basename(__file__)


def x_(*shape, dtype="float32", name=None):
    return leaf("input", shape, dtype, name=name)


def raises_here(fn, *words):
    """fn() raises a ShapeError whose message holds ``words`` and the line that called fn."""
    line = inspect.currentframe().f_back.f_lineno
    with pytest.raises(ShapeError) as e:
        fn()
    msg = str(e.value)
    assert f"{HERE}:{line}" in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_shape_mismatch_names_op_shapes_and_caller_line():
    a, b = x_(2, 3), x_(4)
    raises_here(lambda: a + b, "add(f32[2,3], f32[4])", "cannot be broadcast")
    raises_here(lambda: matmul(x_(2, 3), x_(4, 5)), "matmul(f32[2,3], f32[4,5])", "inner")
    raises_here(lambda: S.concat([x_(2, 3), x_(3, 3)], axis=1), "concat", "differ outside")
    raises_here(lambda: S.reshape(x_(2, 3), (4, 2)), "reshape", "cannot reshape")
    raises_here(lambda: S.getitem(x_(2, 3), (0, 0, 0)), "getitem(f32[2,3])", "too many")
    raises_here(lambda: S.getitem(x_(2, 3), 5), "getitem", "out of bounds")
    raises_here(lambda: S.getitem(x_(2, 3), [0, 1]), "getitem", "not list")
    raises_here(lambda: nn.max_pool2d(x_(1, 1, 4, 4), 2, padding=2), "max_pool2d", "padding")


def test_wrong_dtype():
    raises_here(lambda: x_(3) * x_(3, dtype="float64"), "mul(f32[3], f64[3])", "differ")
    raises_here(lambda: E.log(x_(3, dtype="int64")), "log(i64[3])", "floating-point")
    raises_here(lambda: S.gather(x_(3, 4), x_(3, 1)), "gather", "integers")
    raises_here(lambda: E.where(x_(3), x_(3), x_(3)), "where", "bool")


def test_unknown_op_is_refused():
    with pytest.raises(ShapeError, match="unknown op 'frobnicate'; known ops: .*matmul"):
        get("frobnicate")
    a = x_(3)
    bad = Node("frobnicate", (a,), {}, (3,), "float32")
    with pytest.raises(ShapeError, match="unknown op 'frobnicate'"):
        verify(Graph({"y": bad}), known_ops=lambda op: op in REGISTRY)
    verify(Graph({"y": E.exp(a)}), known_ops=lambda op: op in REGISTRY)


def test_gradient_of_integer_input_is_refused():
    i = x_(3, dtype="int64", name="i")
    y = rsum(E.cast(i, "float32") * x_(3, name="w"))
    with pytest.raises(ShapeError, match="int64 is not floating point"):
        autodiff.grad(Graph({"y": y}), ["i"])
    assert "grad/w" in autodiff.grad(Graph({"y": y}), ["w"]).outputs


def test_cross_entropy_checks_labels():
    logits = x_(4, 10)
    raises_here(lambda: loss.cross_entropy(logits, x_(4)), "cross_entropy(f32[4,10], f32[4])",
                "integers")
    raises_here(lambda: loss.cross_entropy(logits, x_(4, 1, dtype="int64")),
                "cross_entropy(f32[4,10], i64[4,1])", "labels (N,)")
    raises_here(lambda: loss.cross_entropy(logits, x_(4, dtype="int64"), "avg"), "reduction")
    y = loss.cross_entropy(x_(4, 10, name="z"), x_(4, dtype="int64", name="y"))
    feeds = {"z": np.zeros((4, 10), np.float32), "y": np.array([1, 12, 3, -1])}
    with pytest.raises(ExecutionError, match="label 12 out of range for 10 classes"):
        run(Graph({"loss": y}), feeds)


def test_conv2d_channel_mismatch():
    raises_here(lambda: nn.conv2d(x_(2, 3, 8, 8), x_(4, 2, 3, 3)),
                "conv2d(f32[2,3,8,8], f32[4,2,3,3])", "3 channels", "expects 2")
    raises_here(lambda: nn.conv2d(x_(2, 3, 8, 8), x_(4, 3, 3, 3), x_(5)), "conv2d", "bias")
    raises_here(lambda: nn.conv2d(x_(2, 3, 2, 2), x_(4, 3, 3, 3)), "conv2d", "do not fit")


def test_python_scalar_the_dtype_cannot_hold_is_refused_not_truncated():
    i, b = x_(3, dtype="int64"), x_(3, dtype="bool")
    raises_here(lambda: i * 1.5, "mul(i64[3], f64[])", "differ")           # was i * 1
    raises_here(lambda: 0.5 + i, "add(f64[], i64[3])", "differ")
    raises_here(lambda: E.less(i, 1.5), "less(i64[3], f64[])", "differ")  # was i < 1
    raises_here(lambda: b * 2, "mul(b1[3], i64[])", "differ")              # was b * True
    raises_here(lambda: x_(3, dtype="int8") + 1000, "add(int8[3], i64[])", "differ")
    assert (i * 2).dtype == "int64" and (x_(3) * 2).dtype == "float32"
    assert (x_(3) + True).dtype == "float32" and (b * True).dtype == "bool"


def test_integer_division_sum_and_mean_give_numpy_dtypes_or_refuse():
    i, b = x_(3, dtype="int64", name="i"), x_(3, dtype="bool", name="b")
    feeds = {"i": np.array([1, 2, 3]), "b": np.array([True, False, True])}
    graph = Graph({"half": i / 2, "rdiv": 2 / i, "count": rsum(b),
                   "total": rsum(x_(3, dtype="uint8", name="u"))})
    out = run(graph, {**feeds, "u": np.array([200, 100, 50], np.uint8)})
    for k, n in graph.outputs.items():            # the node's dtype is the value's dtype
        assert str(out[k].dtype) == n.dtype, (k, out[k].dtype, n.dtype)
    np.testing.assert_array_equal(out["half"], [0.5, 1.0, 1.5])
    assert out["count"] == 2 and out["total"] == 350
    from shardgrad.ops.reduce import mean
    raises_here(lambda: mean(i), "mean(i64[3])", "floating-point")         # was sum * 0 == 0
    raises_here(lambda: mean(b, axis=0), "mean(b1[3])", "floating-point")


def test_window_stride_must_be_positive():
    raises_here(lambda: nn.conv2d(x_(1, 3, 5, 5), x_(2, 3, 3, 3), stride=0), "conv2d",
                "must be positive")
    raises_here(lambda: nn.max_pool2d(x_(1, 3, 5, 5), 2, stride=(1, 0)), "max_pool2d",
                "must be positive")


def test_bad_axis_or_index_names_the_op_and_line():
    a = x_(3, 4)
    raises_here(lambda: rsum(a, axis=2), "sum(f32[3,4])", "axis 2 is out of range")
    raises_here(lambda: loss.softmax(a, axis=-3), "softmax(f32[3,4])", "axis -3")
    raises_here(lambda: S.concat([a, a], axis=2), "concat(f32[3,4], f32[3,4])", "out of range")
    raises_here(lambda: S.squeeze(a, axis=(0, 0)), "squeeze", "repeated axis")
    raises_here(lambda: S.getitem(a, slice(None, None, 0)), "getitem", "step cannot be zero")


def test_batch_norm_counts_the_values_of_all_ranks_when_synchronised():
    x = leaf("input", (1, 4), "float32")           # one row on this rank
    with pytest.raises(ShapeError, match="more than one value per channel"):
        nn.batch_norm(x)
    with nn.sync_batch_stats("world", 2):         # two rows over two ranks: fine
        out, _, _ = nn.batch_norm(x)
    assert out.shape == (1, 4)
    with nn.sync_batch_stats("world", 1), pytest.raises(ShapeError, match="over all ranks"):
        nn.batch_norm(x)
