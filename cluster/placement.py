"""Where the Ray launcher asks for each rank's slot: a pure policy from the job's shape
(``dp`` x ``pp`` ranks, CPUs and GPUs per rank) and the cluster's nodes to one node per rank,
and its printable form (``shardgrad plan --launcher ray``). No Ray, no processes; imports
nothing of ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """A Ray node as the policy sees it: its id (Ray's ``NodeID``), a name to print (its
    address) and its CPUs and GPUs."""

    id: str
    name: str
    cpus: float
    gpus: float = 0.0

    def slots(self, cpus: float, gpus: float) -> int:
        """How many ranks of ``cpus`` CPUs and ``gpus`` GPUs fit on this node."""
        fits = [self.cpus / cpus] + ([self.gpus / gpus] if gpus > 0 else [])
        return max(0, math.floor(min(fits) + 1e-9))


def _resources(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus > 0 else "")


def place(dp: int, pp: int, nodes: Sequence[Node], cpus: float, gpus: float = 0.0,
          first: str | None = None) -> list[int]:
    """The node (an index into ``nodes``) of each world rank ``d * pp + s`` (stage ``s`` of
    pipeline replica ``d``).

    The stages of one replica go, in order, onto the node that holds the most of the ones
    still to place (activations cross between neighbouring stages every micro-batch), so a
    replica spans as few nodes as it can; among nodes that fit as many, a replica starts on
    the one holding the fewest of this job's ranks, so the replicas of one stage spread across
    nodes; then on node ``first`` (the launcher's, where rank 0 writes the run directory),
    then on the emptiest. Raises ValueError, saying what was asked and what the nodes have,
    when they cannot hold every rank.
    """
    free = [node.slots(cpus, gpus) for node in nodes]
    n = dp * pp
    if sum(free) < n:
        have = ", ".join(f"{node.name} {_resources(node.cpus, node.gpus)}" for node in nodes)
        raise ValueError(f"{n} ranks of {_resources(cpus, gpus)} do not fit on the cluster's "
                         f"nodes ({have or 'none'}): {sum(free)} fit")
    used = [0] * len(nodes)
    where: list[int] = []
    for _ in range(dp):
        left = pp
        while left:
            i = max((i for i in range(len(nodes)) if free[i]),
                    key=lambda i: (min(free[i], left), -used[i], nodes[i].id == first,
                                   free[i], -i))
            take = min(free[i], left)
            where += [i] * take
            free[i] -= take
            used[i] += take
            left -= take
    return where


def describe(where: Sequence[int], nodes: Sequence[Node], pp: int, cpus: float,
             gpus: float = 0.0) -> str:
    """The placement ``where`` (from ``place``) as lines, one per node that holds ranks:
    ``node 10.0.0.1 (id 1a2b3c4d): ranks 0 1 = replica 0 stages 0-1``."""
    lines = [f"Ray placement: {len(where)} slots of {_resources(cpus, gpus)}, "
             f"one per rank (rank = replica * {pp} + stage)"]
    for i in dict.fromkeys(where):   # the nodes in the order of their first rank
        node, ranks = nodes[i], [r for r, at in enumerate(where) if at == i]
        if ranks:
            parts = ", ".join(f"replica {r // pp} stage {r % pp}" for r in ranks)
            lines.append(f"  node {node.name} (id {node.id[:8]}): ranks "
                         f"{' '.join(map(str, ranks))} = {parts}")
    return "\n".join(lines)


__all__ = ["Node", "describe", "place"]
