"""The reference executor: walks a Graph node by node on an array module (numpy or cupy),
running each op's generic ``forward``, freeing each value after its last use, and re-raising
failures with the node, op, source line and rank attached. It defines the semantics every
other executor is tested against; the walk itself is graph.walk's, shared by all of them.

Imports graph and ops; the only side effects are the kernels it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph.ir import Graph
from shardgrad.graph.walk import EnvWalk, ExecutionError, describe, leaf_value


class Interpreter(EnvWalk):
    """Runs ``graph`` on ``xp``. Build once; call ``run`` every step.

    ``run(feeds)`` takes leaf values keyed by leaf name (or Node) and returns the outputs by
    name. Values not needed later are dropped as soon as their last user has run.
    """

    def __init__(self, graph: Graph, xp=np, rank: int | None = None, shard: str | None = None):
        super().__init__(graph, rank, shard)
        self.xp = xp
        self._feeds: Mapping[Any, Any] = {}
        # the reference runs each op's generic forward (its CPU kernel) whatever xp is
        self.add_nodes(graph.nodes, xp, lambda n: leaf_value(xp, n, self._feeds), "cpu")
        self.finish(n.id for n in graph.outputs.values())

    def run(self, feeds: Mapping[Any, Any]) -> dict[str, Any]:
        self._feeds = feeds
        try:
            env = self.run_env()
        finally:
            self._feeds = {}
        return {k: env[v.id] for k, v in self.graph.outputs.items()}


def run(graph: Graph, feeds: Mapping[Any, Any] | None = None, xp=np) -> dict[str, Any]:
    """Run ``graph`` once with the reference interpreter."""
    return Interpreter(graph, xp).run(feeds or {})


__all__ = ["ExecutionError", "Interpreter", "describe", "leaf_value", "run"]
