"""The op library: one registry (ops.registry) and one module per op family.

Importing this package registers every op. Imports only graph.ir.
"""

from shardgrad.ops import (  # noqa: F401 (registers)
    collective,
    elementwise,
    linalg,
    loss,
    nn,
    reduce,
    shape,
)
from shardgrad.ops.registry import REGISTRY, OpDef, apply, get, register

__all__ = ["REGISTRY", "OpDef", "apply", "get", "register"]
