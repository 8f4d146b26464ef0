"""One op definition: every piece of an op hangs off its OpDef and executors find kernels
through ops.registry.kernel_for(op, device, form); nothing lists ops elsewhere."""

import numpy as np
import pytest

from shardgrad.graph.device import Device
from shardgrad.ops import REGISTRY
from shardgrad.ops import gpu as gpu_kernels
from shardgrad.ops.registry import OutKernel, device_kind, kernel_for


def test_kernel_for_answers_each_form_on_each_device():
    sm = REGISTRY["softmax"]
    assert kernel_for("softmax", "cuda") is sm.cuda is gpu_kernels.softmax
    assert kernel_for(sm, Device.parse("cuda:1")) is sm.cuda
    assert kernel_for("softmax", "cpu") is kernel_for("softmax", np) is sm.forward
    assert kernel_for("matmul", "cuda") is REGISTRY["matmul"].forward     # cuBLAS via cupy
    assert isinstance(kernel_for("add", "cpu", "out"), OutKernel)
    assert kernel_for("add", "cuda", "out") is kernel_for("add", "cpu", "out")
    assert kernel_for("relu", "cuda", "expr")(["x"], ["float32"], "float32", {}) == (
        "((x > 0.0f || x != x) ? x : 0.0f)")           # NumPy's maximum(x, 0): -0.0 -> 0.0
    assert kernel_for("relu", "cpu", "expr") is None
    assert kernel_for("softmax", "cpu", "out") is None
    with pytest.raises(ValueError, match="unknown kernel form 'jit'"):
        kernel_for("add", "cpu", "jit")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device_kind("tpu")


def test_traits_are_consistent():
    for name, d in REGISTRY.items():
        if d.cuda_expr is not None:
            assert d.elementwise, f"{name}: a C expression belongs to an elementwise op"
        assert not (d.effectful and d.elementwise), name
    assert {n for n, d in REGISTRY.items() if d.effectful} >= {
        "send", "recv", "allreduce", "allreduce_start", "allreduce_wait", "allgather",
        "reduce_scatter"}
    assert {"add", "mul", "exp", "where", "cast", "relu", "less"} <= {
        n for n, d in REGISTRY.items() if d.elementwise and d.cuda_expr is not None}


def test_view_ops_declare_it():
    assert {n: d.view for n, d in REGISTRY.items() if d.view} == {
        "reshape": "contiguous", "transpose": "any", "broadcast_to": "any", "unpack": "part"}
    x = np.arange(6.0).reshape(2, 3)
    for name, attrs in (("reshape", {"shape": (3, 2)}), ("transpose", {"axes": (1, 0)}),
                        ("broadcast_to", {"shape": (4, 2, 3)})):
        assert np.shares_memory(kernel_for(name, "cpu")(np, x, **attrs), x), name
    flat = np.arange(10.0)
    part = kernel_for("unpack", "cpu")(np, flat, offset=4, shape=(2, 3))
    assert np.shares_memory(part, flat) and part[0, 0] == 4.0


def test_vjp_rules_read_constants_only_through_const_value():
    """A VJP rule that folds a const's value into the gradient reads it with
    registry.const_value, which eager backward plans (graph.tensor) record and re-check before
    a replay: a direct read of ``attrs["value"]`` (or of an eager value) in an op module
    would let a plan replay a gradient made for other values."""
    import pathlib
    import re

    import shardgrad.ops as ops_pkg
    folder = pathlib.Path(ops_pkg.__file__).parent
    direct = re.compile(r"""attrs\s*(\[\s*["']value["']\s*\]|\.get\(\s*["']value["'])"""
                        r"|eager_value")
    found = [f"{p.name}:{i}" for p in sorted(folder.glob("*.py"))
             if p.name not in ("registry.py", "codegen.py")      # the reader; kernel text
             for i, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert not found, f"ops read a const's value directly (use registry.const_value): {found}"
