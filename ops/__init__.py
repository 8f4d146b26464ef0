"""The op library: one registry (ops.registry) and one module per op family.

Importing this package registers every op; each op's stanza names all its pieces (kernels for
each device included), found through ``kernel_for``. Imports only graph.ir.
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
from shardgrad.ops.registry import REGISTRY, OpDef, apply, get, kernel_for, register

__all__ = ["REGISTRY", "OpDef", "apply", "get", "kernel_for", "register"]
