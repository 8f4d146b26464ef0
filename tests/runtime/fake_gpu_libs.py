"""Stand-ins for the optional GPU libraries, holding just the calls ops.gpu_libs makes.
nvmath-python's ``nvmath.linalg.advanced`` (``module``): what ops.gpu_libs
calls (``Matmul(a, b, stream=)``, ``.plan(epilog=, epilog_inputs={"bias": ...})``,
``.execute(stream=)``, ``MatmulEpilog``), computed with NumPy as cuBLASLt defines it:
``epilog(a @ b + bias[:, None])``, the bias broadcast along the result's columns, GELU in
its tanh form. ``mode`` makes it fail ("raise") or give wrong values ("wrong"), so the
fallbacks can be tested without a GPU.
"""

from __future__ import annotations

import ctypes
import math
import types

import numpy as np


def _plain(a):
    return a.view(np.ndarray)


def _gelu(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))


ACTS = {"BIAS": lambda z: z, "RELU_BIAS": lambda z: np.maximum(z, 0), "GELU_BIAS": _gelu}


def module(mode: str = "ok") -> types.ModuleType:
    """A fresh fake ``nvmath.linalg.advanced``; ``module.executes`` counts its GEMMs,
    ``module.plans`` the plans made."""
    adv = types.ModuleType("nvmath.linalg.advanced")
    adv.executes, adv.plans = 0, 0
    adv.MatmulEpilog = types.SimpleNamespace(**{k: k for k in ACTS})

    class Matmul:
        def __init__(self, a, b, c=None, *, stream=None):
            assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0], (a.shape, b.shape)
            self.a, self.b, self.epilog, self.bias = a, b, None, None
            adv.plans += 1

        def plan(self, *, epilog=None, epilog_inputs=None):
            self.epilog, self.bias = epilog, epilog_inputs["bias"]
            assert self.bias.shape == (self.a.shape[0],), "the bias runs along the rows"

        def execute(self, *, stream=None):
            if mode == "raise":
                raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
            adv.executes += 1
            z = _plain(self.a) @ _plain(self.b) + _plain(self.bias)[:, None]
            r = np.asfortranarray(ACTS[self.epilog](z))      # cuBLASLt's column-major result
            if mode == "wrong":
                r = r + 1.0
            return r.view(type(self.a))

    adv.Matmul = Matmul
    return adv


# ---- cuDNN's frontend (``import cudnn``) ------------------------------------------------------

def _view(address: int, t) -> np.ndarray:
    """The host array at ``address`` as tensor ``t`` declares it (dims, strides in elements):
    what cuDNN reads from a device address, here on the stand-in's host memory."""
    itemsize = np.dtype(t.data_type).itemsize
    span = 1 + sum((d - 1) * s for d, s in zip(t.dim, t.stride, strict=True))
    flat = np.frombuffer((ctypes.c_char * (span * itemsize)).from_address(address),
                         t.data_type)
    return np.lib.stride_tricks.as_strided(flat, t.dim, [s * itemsize for s in t.stride])


def cudnn_module(mode: str = "ok") -> types.ModuleType:
    """A fresh fake ``cudnn`` holding the graph calls ops.gpu_libs.cudnn_conv makes; it
    computes with torch's conv2d and its two gradients (``torch.nn.grad``), reading and
    writing the operands through the addresses and strides it is given. ``executes`` and
    ``graphs`` count its calls."""
    import torch

    mod = types.ModuleType("cudnn")
    mod.__version__, mod.executes, mod.graphs = "fake", 0, 0
    mod.data_type = types.SimpleNamespace(FLOAT="float32", DOUBLE="float64")
    mod.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
    mod.create_handle = lambda: object()
    mod.set_stream = lambda handle, stream: None

    class Tensor:
        def __init__(self, dim=None, stride=None, data_type=None):
            self.dim, self.stride, self.data_type, self.output = dim, stride, data_type, False

        def set_output(self, flag):
            self.output = flag
            return self

        def set_dim(self, dim):
            self.dim = list(dim)
            return self

        def set_stride(self, stride):
            self.stride = list(stride)
            return self

        def set_data_type(self, data_type):
            self.data_type = data_type
            return self

    class pygraph:  # noqa: N801 - cudnn's own name
        def __init__(self, handle=None, io_data_type=None, intermediate_data_type=None,
                     compute_data_type=None):
            mod.graphs += 1
            self.op = None

        def tensor(self, name, dim, stride, data_type):
            return Tensor(list(dim), list(stride), data_type)

        def _conv(self, kind, a, b, padding, stride, dilation):
            assert dilation == [1, 1] and self.op is None
            self.op, self.y = (kind, a, b, tuple(padding), tuple(stride)), Tensor()
            return self.y

        def conv_fprop(self, image, weight, padding, stride, dilation):
            return self._conv("fprop", image, weight, padding, stride, dilation)

        def conv_dgrad(self, loss, filter, padding, stride, dilation):  # noqa: A002
            return self._conv("dgrad", loss, filter, padding, stride, dilation)

        def conv_wgrad(self, image, loss, padding, stride, dilation):
            return self._conv("wgrad", image, loss, padding, stride, dilation)

        def validate(self):
            assert self.y.output and self.y.dim and self.y.stride, "output not declared"

        def build_operation_graph(self):
            pass

        def create_execution_plans(self, modes):
            pass

        def check_support(self):
            pass

        def build_plans(self):
            pass

        def get_workspace_size(self):
            return 64

        def execute(self, pack, workspace, handle=None):
            if mode == "raise":
                raise RuntimeError("cudnnGraphNotSupportedError: no engine")
            mod.executes += 1
            kind, ta, tb, padding, stride = self.op
            a, b, y = (torch.from_numpy(_view(pack[t], t).copy()) for t in (ta, tb, self.y))
            if kind == "fprop":
                r = torch.nn.functional.conv2d(a, b, stride=stride, padding=padding)
            elif kind == "dgrad":
                r = torch.nn.grad.conv2d_input(list(y.shape), b, a, stride=stride,
                                               padding=padding)
            else:
                r = torch.nn.grad.conv2d_weight(a, list(y.shape), b, stride=stride,
                                                padding=padding)
            _view(pack[self.y], self.y)[...] = r.numpy() + (1.0 if mode == "wrong" else 0.0)

    mod.pygraph = pygraph
    return mod
