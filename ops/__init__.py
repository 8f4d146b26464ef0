"""The op library: one registry (ops.registry) and one module per op family.

Importing this package registers every op and attaches the hand-written CUDA kernels of
ops.gpu (OpDef.cuda). Imports only graph.ir.
"""

from shardgrad.ops import (  # noqa: F401 (registers)
    collective,
    elementwise,
    fused,
    gpu,
    linalg,
    loss,
    nn,
    reduce,
    shape,
)
from shardgrad.ops.registry import REGISTRY, OpDef, apply, get, register

gpu.attach()

__all__ = ["REGISTRY", "OpDef", "apply", "get", "register"]
