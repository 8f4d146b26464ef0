"""Drawing a Graph: Graph -> graphviz.Digraph (DOT), pure, no files written.

Nodes are coloured by a role (``step_roles`` gives forward / backward / update for a
training step); partition/ passes its own roles (e.g. the stage of each node) and palette.
Imports graph.ir and the graphviz package (which only builds DOT text here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import graphviz

from shardgrad.graph.ir import Graph, Node, ancestors, fmt_type

STEP_PALETTE = {"forward": "#cfe2ff", "backward": "#ffd8a8", "update": "#c3f0c8",
                "leaf": "#eeeeee", "const": "#ffffff"}



def step_roles(graph: Graph) -> dict[int, str]:
    """The role of each node of a training-step graph (outputs named as trace_step names
    them): ``forward`` = needed by ``loss``; ``update`` = needed only by the ``param/`` and
    ``state/`` outputs, not by the loss or any ``grad/`` output; ``backward`` = the rest;
    leaves are ``leaf`` (inputs, params, states) or ``const``."""
    outs = graph.outputs
    forward = ancestors([outs["loss"]]) if "loss" in outs else set()
    grads = ancestors(v for k, v in outs.items() if k.startswith("grad/"))
    updates = ancestors(v for k, v in outs.items() if k.startswith(("param/", "state/")))
    roles = {}
    for n in graph.nodes:
        if not n.inputs:
            roles[n.id] = "const" if n.op == "const" else "leaf"
        elif n.id in forward:
            roles[n.id] = "forward"
        elif n.id in updates and n.id not in grads:
            roles[n.id] = "update"
        else:
            roles[n.id] = "backward"
    return roles


def to_dot(graph: Graph, roles: Mapping[int, str] | None = None,
           palette: Mapping[str, str] | None = None, name: str = "step",
           label: Callable[[Node, str], str] | None = None) -> graphviz.Digraph:
    """A Digraph of ``graph``: one box per node (``%k = op : type``), an edge per input, an
    oval per output. ``roles`` (node id -> role, default ``step_roles``) picks each node's
    fill colour from ``palette`` and is shown in a legend."""
    roles = step_roles(graph) if roles is None else roles
    palette = STEP_PALETTE if palette is None else palette
    names = graph.names()
    dot = graphviz.Digraph(name, graph_attr={"rankdir": "TB", "fontsize": "10"},
                           node_attr={"shape": "box", "style": "filled,rounded",
                                      "fontname": "Helvetica", "fontsize": "9"})
    for n in graph.nodes:
        role = roles.get(n.id, "")
        text = label(n, names[n.id]) if label else (
            f"{names[n.id]} = {n.op}\n{fmt_type(n.shape, n.dtype)}" if n.inputs
            else f"{names[n.id]} ({n.op})\n{fmt_type(n.shape, n.dtype)}")
        attrs = {"fillcolor": palette.get(role, "#ffffff"), "tooltip": f"{role} {n.where}"}
        if not n.inputs:
            attrs["shape"] = "note" if n.op == "const" else "box"
        dot.node(f"n{n.id}", text, **attrs)
        for x in n.inputs:
            dot.edge(f"n{x.id}", f"n{n.id}")
    for i, (k, v) in enumerate(graph.outputs.items()):
        dot.node(f"out{i}", k, shape="oval", style="solid")
        dot.edge(f"n{v.id}", f"out{i}", style="dashed")
    used = sorted({roles.get(n.id, "") for n in graph.nodes} - {""}, key=str)
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", fontsize="9")
        for i, role in enumerate(used):
            legend.node(f"legend{i}", str(role), fillcolor=palette.get(role, "#ffffff"))
    return dot


__all__ = ["STEP_PALETTE", "step_roles", "to_dot"]
