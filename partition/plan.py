"""Plans: what a partitioner decided, as data that prints. A Plan holds the Graph each rank runs
and the facts behind it (for data parallelism, the gradient buckets), plus ``graph_hash``,
the structural fingerprint ranks compare at start-up. Pure: imports graph only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardgrad.graph.ir import DTYPE_SHORT, Graph


def graph_hash(graph: Graph) -> str:
    """SHA-256 of the graph's structure: its printed program (ops, attrs, types, wiring,
    outputs) and the bytes of every constant. Equal on two ranks exactly when they would run
    the same program; source lines and node ids do not enter it."""
    h = hashlib.sha256(str(graph).encode())
    for n in graph.nodes:
        if n.op == "const":
            v = np.ascontiguousarray(n.attrs["value"])
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(v.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Bucket:
    """Values reduced together: one flat buffer, one collective. ``names`` are the step
    outputs it carries (``loss``, ``grad/<p>``, ``state/<s>``), ``sizes`` their elements,
    ``after`` the node whose completion makes the bucket ready."""

    index: int
    dtype: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    after: str

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * np.dtype(self.dtype).itemsize


@dataclass
class Plan:
    """A partitioned training step.

    kind        the partitioner ("data_parallel", ...)
    world_size  ranks in the group the plan is for
    graph       the Graph every rank runs (data parallelism: the same on every rank)
    buckets     the collectives it issues, in issue order
    options     the settings that shaped it (bucket size, mode, chunks, ...)
    """

    kind: str
    world_size: int
    graph: Graph
    buckets: list[Bucket] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"{self.kind} plan: world_size={self.world_size}, {opts}",
                 f"  graph: {len(self.graph)} nodes, hash {graph_hash(self.graph)[:12]}"]
        for b in self.buckets:
            shown = ", ".join(b.names[:4]) + (f", ... ({len(b.names)} in all)"
                                               if len(b.names) > 4 else "")
            lines.append(f"  bucket {b.index}: {DTYPE_SHORT.get(b.dtype, b.dtype)} "
                         f"{b.nbytes:,} B, ready after {b.after}: {shown}")
        return "\n".join(lines)
