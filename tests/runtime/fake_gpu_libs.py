"""A stand-in for nvmath-python's ``nvmath.linalg.advanced`` holding just what ops.gpu_libs
calls (``Matmul(a, b, stream=)``, ``.plan(epilog=, epilog_inputs={"bias": ...})``,
``.execute(stream=)``, ``MatmulEpilog``), computed with NumPy as cuBLASLt defines it:
``epilog(a @ b + bias[:, None])``, the bias broadcast along the result's columns, GELU in
its tanh form. ``mode`` makes it fail ("raise") or give wrong values ("wrong"), so the
fallbacks can be tested without a GPU.
"""

from __future__ import annotations

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
