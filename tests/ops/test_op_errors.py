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
