"""Pipeline parallelism: cut a training-step Graph into ``pp`` stages that run on different
ranks, with micro-batches flowing through them. A policy assigns every forward node a stage
(``stage_of(node) -> int``); one mechanism (``cut``) builds each stage's forward, backward
and update programs and the transfers between stages. Pure: imports graph (IR, autodiff,
rewrite, DOT), ops and partition.schedule, and runs no kernel (measured node times come in
from runtime.pipeline.profile_times).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardgrad.graph.autodiff import backprop, zeros_like
from shardgrad.graph.dot import to_dot
from shardgrad.graph.ir import Graph, Node, const, fmt_type, leaf, toposort, verify
from shardgrad.graph.optim import global_norm
from shardgrad.graph.rewrite import replace
from shardgrad.graph.tensor import Tensor
from shardgrad.ops import collective
from shardgrad.ops.registry import elementwise_cost, get, itemsize
from shardgrad.partition import schedule as sched
from shardgrad.partition.schedule import Schedule, Transfer

# Cost model of one node: flops / FLOP_RATE + bytes / MEM_RATE seconds, and a value crossing
# stages costs bytes / BANDWIDTH. Measured on the 2-core development machine: NumPy float32
# matmul 512^3 ran at 47 GFLOP/s, np.add over 64 MB arrays at 6.1 GB/s; DESIGN.md gives
# mpi4py Allreduce of 16 MB on 2 ranks in 3 ms (5.3 GB/s). Only their ratios matter.
FLOP_RATE = 5e10
MEM_RATE = 6e9
BANDWIDTH = 5e9

BALANCES = ("cost", "profile")
STAGE_COLOURS = ("#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#fb9a99", "#ffff99", "#8dd3c7",
                 "#d9d9d9")


class PartitionError(ValueError):
    """A pipeline request that cannot be met: too many stages, a split point that is not a
    forward node, a policy that sends a value backwards. The message says what to change."""


def _node_time(n: Node) -> float:
    opdef = get(n.op)
    flops, nbytes = (opdef.cost or elementwise_cost)(n)
    return flops / FLOP_RATE + nbytes / MEM_RATE


def _floating(n: Node) -> bool:
    return np.dtype(n.dtype).kind == "f"


# ---- what the step graph is made of ---------------------------------------------------------


@dataclass
class Parts:
    """The step graph taken apart: forward nodes (ancestors of the loss and of the buffer
    updates, e.g. BatchNorm's running statistics) in order, the computing ones among them,
    which values need a gradient, and the update outputs."""

    graph: Graph
    loss: Node
    forward: list[Node]
    compute: list[Node]
    needs_grad: set[int]
    update_outputs: dict[str, list[str]]   # param name -> output names (param/, state/optim/)
    buffers: dict[str, Node]               # forward-pass buffer updates: state/<name> -> node

    @staticmethod
    def of(graph: Graph) -> Parts:
        if "loss" not in graph.outputs or graph.outputs["loss"].shape != ():
            raise PartitionError("pipeline needs a training-step graph with a scalar 'loss' "
                                 "output (graph.trace.trace_step builds one)")
        loss = graph.outputs["loss"]
        params = {n.name for n in graph.params}
        update: dict[str, list[str]] = {p: [] for p in params}
        buffers: dict[str, Node] = {}
        for k in graph.outputs:
            if k in ("loss", "grad_norm") or k.startswith("grad/"):
                continue
            owner = k[len("param/"):] if k.startswith("param/") else None
            if k.startswith("state/optim/"):
                owner = next((p for p in params if k.startswith(f"state/optim/{p}/")), None)
            elif k.startswith("state/"):
                buffers[k] = graph.outputs[k]
                continue
            if owner not in update:
                raise PartitionError(f"pipeline cannot place output {k!r}: expected loss, "
                                     f"grad/<param>, param/<param>, state/optim/<param>/... or "
                                     f"state/<buffer>")
            update[owner].append(k)
        differentiated = {n.id for n in toposort([loss])}
        forward = toposort([loss, *buffers.values()])
        needs: set[int] = set()
        for n in forward:
            if n.id in differentiated and (
                    n.op == "param" or any(x.id in needs for x in n.inputs)):
                needs.add(n.id)
        compute = [n for n in forward if n.inputs]
        return Parts(graph, loss, forward, compute, needs, update, buffers)


def vjp_nodes(n: Node, needs_grad: set[int]) -> list[Node]:
    """The nodes n's VJP rule emits for the inputs that need a gradient (what backprop will
    build for n), found by walking back from them to nodes older than the call."""
    opdef = get(n.op)
    if opdef.vjp is None or not _floating(n) or n.id not in needs_grad:
        return []
    g = leaf("input", n.shape, n.dtype, name="g")
    gxs = opdef.vjp(g, *n.inputs, n, **n.attrs)
    roots = [gx for i, (x, gx) in enumerate(zip(n.inputs, gxs, strict=True))
             if gx is not None and x.id in needs_grad and i not in opdef.nondiff]
    return [m for m in toposort(roots) if m.id > g.id and m.inputs]


def estimated_times_of(nodes: Sequence[Node], needs_grad: set[int]) -> dict[int, float]:
    return {n.id: _node_time(n) + sum(_node_time(m) for m in vjp_nodes(n, needs_grad))
            for n in nodes}


def estimated_times(parts: Parts) -> dict[int, float]:
    """Seconds per forward compute node, forward plus its backward, from the ops' costs."""
    return estimated_times_of(parts.compute, parts.needs_grad)


# ---- policies: who computes what ------------------------------------------------------------


def _values(parts: Parts) -> list[tuple[Node, int, list[int]]]:
    """Each value that may cross a cut: (node, index of the compute node that makes it or,
    for a param/state leaf, of its first user, sorted indices of its compute users)."""
    index = {n.id: i for i, n in enumerate(parts.compute)}
    users: dict[int, list[int]] = {}
    for i, n in enumerate(parts.compute):
        for x in n.inputs:
            if x.op not in ("const", "input"):
                users.setdefault(x.id, []).append(i)
    out = []
    for n in parts.forward:
        us = sorted(set(users.get(n.id, [])))
        if us:
            out.append((n, index[n.id] if n.inputs else us[0], us))
    return out


def stage_costs(parts: Parts, times: Mapping[int, float]) -> Callable[[int, int], float]:
    """``cost(i, j)``: seconds one micro-batch spends on a stage made of compute nodes i..j
    (inclusive): their times plus, at BANDWIDTH, the bytes it receives and sends (each value
    once per direction; twice when its gradient travels back too)."""
    n = len(parts.compute)
    prefix = np.concatenate([[0.0], np.cumsum([times[c.id] for c in parts.compute])])
    vals = [(p, us, v.size * itemsize(v.dtype) * (2 if v.id in parts.needs_grad
                                                    and _floating(v) else 1))
            for v, p, us in _values(parts)]
    send = np.zeros((n, n))
    recv = np.zeros((n, n))
    made_at: list[list[tuple[int, list[int], int]]] = [[] for _ in range(n)]
    for p, us, b in vals:
        made_at[p].append((p, us, b))
    for j in range(n):
        acc = 0.0
        for i in range(j, -1, -1):
            acc += sum(b for _, us, b in made_at[i] if us[-1] > j)
            send[i, j] = acc
    for i in range(n):
        first = np.zeros(n + 1)
        for p, us, b in vals:
            if p < i:
                later = [u for u in us if u >= i]
                if later:
                    first[later[0]] += b
        recv[i, :] = np.cumsum(first[:n])
    table = (prefix[None, 1:] - prefix[:-1, None]) + (send + recv) / BANDWIDTH
    return lambda i, j: float(table[i, j])


def balanced_starts(n: int, pp: int, cost: Callable[[int, int], float]) -> list[int]:
    """The first index of each of ``pp`` contiguous non-empty stages over items 0..n-1 that
    minimises the largest ``cost(first, last)``: dynamic programming, O(pp n^2)."""
    if pp > n:
        raise PartitionError(f"cannot cut {n} forward nodes into {pp} non-empty stages")
    inf = float("inf")
    best = [[inf] * n for _ in range(pp + 1)]   # best[k][j]: items 0..j in k stages
    back = [[0] * n for _ in range(pp + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for k in range(2, pp + 1):
        for j in range(k - 1, n):
            for i in range(k - 1, j + 1):       # stage k covers i..j
                c = max(best[k - 1][i - 1], cost(i, j))
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    starts, j = [], n - 1
    for k in range(pp, 1, -1):
        i = back[k][j]
        starts.append(i)
        j = i - 1
    return [0] + starts[::-1]


def cost_policy(parts: Parts, pp: int, times: Mapping[int, float]) -> dict[int, int]:
    """Contiguous stages over the compute nodes in order, balanced by ``times`` and the
    transfer cost at each cut (see ``stage_costs``)."""
    starts = balanced_starts(len(parts.compute), pp, stage_costs(parts, times))
    return _from_starts(parts, starts)


def _from_starts(parts: Parts, starts: Sequence[int]) -> dict[int, int]:
    bounds = list(starts[1:]) + [len(parts.compute)]
    out, s = {}, 0
    for i, n in enumerate(parts.compute):
        while i >= bounds[s]:
            s += 1
        out[n.id] = s
    return out


def split_policy(parts: Parts, pp: int, points: Sequence[Any]) -> dict[int, int]:
    """Stages that start at the given forward nodes: each point is a Node, a printed local
    name such as ``"%12"`` (from ``print(graph)``), or a parameter name (the stage then
    starts at that parameter's first user)."""
    if len(points) != pp - 1:
        raise PartitionError(f"{pp} stages need {pp - 1} split points, got {len(points)}: "
                             f"{list(points)!r}")
    index = {n.id: i for i, n in enumerate(parts.compute)}
    names = parts.graph.names()
    by_name = {names[n.id]: n for n in parts.graph.nodes}
    first_user: dict[str, int] = {}
    for i, n in enumerate(parts.compute):
        for x in n.inputs:
            if x.op == "param":
                first_user.setdefault(x.name, i)
    starts = [0]
    for p in points:
        node = p if isinstance(p, Node) else by_name.get(p) if isinstance(p, str) else None
        if isinstance(p, str) and p in first_user:
            i = first_user[p]
        elif node is not None and node.id in index:
            i = index[node.id]
        else:
            shown = p if isinstance(p, Node) else repr(p)
            what = ("not a forward node of the step" if node is not None else
                    "not a node of the graph")
            raise PartitionError(
                f"split point {shown} is {what}: use a forward node's name such as "
                f"{names[parts.compute[len(parts.compute) // 2].id]!r} (see `shardgrad plan`) "
                f"or a parameter name such as {next(iter(first_user), '0.weight')!r}")
        if i <= starts[-1]:
            raise PartitionError(f"split point {p!r} (forward node {i}) does not come after the "
                                 f"previous one (node {starts[-1]}): split points must be in "
                                 f"order and leave every stage non-empty")
        starts.append(i)
    return _from_starts(parts, starts)


# ---- the mechanism: cut the graph at stage boundaries ---------------------------------------


@dataclass
class Stage:
    """One stage's programs, each a standalone Graph an executor runs (no communication in
    them: the runtime moves arrays as the schedule says).

    forward   leaves: the stage's params and states (by name), ``x``/``y`` if it reads the
              data, ``act/<value>`` received from earlier stages; outputs: ``loss`` (on the
              last stage), ``act/<value>`` to send on, ``stash/<value>`` kept for backward,
              ``state/<buffer>`` (buffers updated in the forward pass: the runtime averages
              them over micro-batches and replicas, as data parallelism does over ranks).
    backward  leaves: ``stash/...``, the forward leaves it needs (same names),
              ``gact/<value>/<stage>`` gradients from later stages; outputs:
              ``gact/<value>`` sent back to the value's stage, ``grad/<param>`` to accumulate.
    update    leaves: ``grad/<param>`` (the sum over micro-batches and data-parallel ranks),
              params, optimizer state, ``lr``, ``t``; outputs: ``param/``, ``state/optim/``,
              and ``grad/<param>`` scaled to the full-batch gradient; with gradient
              clipping also ``grad_norm``, the norm over all stages (an ``allreduce`` over
              group "pp" of each stage's sum of squares).
    """

    index: int
    nodes: list[Node]
    forward: Graph
    backward: Graph
    update: Graph
    params: list[str]
    states: list[str]
    forward_time: float
    backward_time: float
    activation_bytes: int
    param_bytes: int

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


@dataclass
class RankProgram:
    """Everything one pipeline rank runs, as IR: ``graphs`` by name and ``actions``, its
    stage's schedule, each naming the graph it runs (``action_graph``). The runtime walks
    the actions, runs each graph with the rank's communicators bound (groups "pp" and "dp")
    and carries values between graphs by name; it computes and moves nothing itself.

    forward, backward, update   the Stage's programs (see ``Stage``)
    recv/<tag>                  RECV: ``recv`` of one message; output ``act/<value>`` or
                                ``gact/<value>/<stage>``, the leaf its consumer reads
    send/<tag>                  SEND: ``isend`` of ``act/<value>`` or ``gact/<value>``; the
                                sends complete after the update (``Binding.wait_sends``)
    accumulate                  after each B but the first: ``sum/<k> + <k>`` for the
                                ``grad/`` outputs (the sum over micro-batches)
    accumulate_buffers          after each F but the first: the same for ``state/`` buffers
    reduce                      after the flush: gradients and buffers allreduced over the
                                data-parallel group "dp" (one flat buffer per dtype), buffers
                                divided by micro-batches x replicas; absent when it would
                                change nothing
    loss                        last, on every stage: the step's loss, the global mean. The
                                loss stage sums its ``loss/<mb>`` leaves (micro-batch order)
                                and divides by the micro-batches, the others start from 0;
                                an ``allreduce`` over "pp" (adding zeros: the loss stage's
                                value exactly) and one over "dp" divided by the replicas
    """

    stage: int
    graphs: dict[str, Graph]
    actions: list[Any]
    grads: list[str]
    buffers: list[str]

    @staticmethod
    def action_graph(a: Any) -> str:
        if a.op in ("SEND", "RECV"):
            return f"{a.op.lower()}/{a.msg.tag}"
        return {"F": "forward", "B": "backward"}[a.op]

    def describe(self) -> str:
        """One line: the graphs and their communication nodes per step."""
        count = collections.Counter(n.op for g in self.graphs.values() for n in g.nodes
                                    if n.op in ("isend", "recv", "allreduce"))
        big = [f"{k} {len(self.graphs[k])} nodes" for k in ("forward", "backward", "reduce",
                                                             "update", "loss")
               if k in self.graphs]
        comm = ", ".join(f"{k} {op}" for op, k in sorted(count.items())) or "no communication"
        return f"{', '.join(big)}; {comm} per step"


def _reduce_program(names: list[str], leaves: Mapping[str, Node], dp: int,
                    buffers: list[str], replicas: int) -> Graph | None:
    """Sum ``names`` over the "dp" group (one packed allreduce per dtype, in ``names``
    order), then divide ``buffers`` by ``replicas``: the values the update reads."""
    if dp == 1 and not buffers:
        return None
    ins = {k: leaf("input", leaves[k].shape, leaves[k].dtype, name=k) for k in names}
    out = dict(ins)
    if dp > 1:
        by_dtype: dict[str, list[str]] = {}
        for k in names:
            by_dtype.setdefault(ins[k].dtype, []).append(k)
        for keys in by_dtype.values():
            flat = collective.allreduce(collective.pack([ins[k] for k in keys]), group="dp",
                                        inplace=True)
            start = 0
            for k in keys:
                out[k] = collective.unpack(flat, start, ins[k].shape)
                start += ins[k].size
    for k in buffers:
        out[k] = out[k] / const(replicas, dtype=out[k].dtype)
    return Graph(out)


def _loss_program(dtype: str, micro_batches: int, mean: bool, pp: int, dp: int,
                  here: bool) -> Graph:
    """The step's loss on every rank (see ``RankProgram``): on the loss stage (``here``)
    the sum of the ``loss/<mb>`` leaves in micro-batch order, divided by ``micro_batches``
    when the loss is a ``mean``; elsewhere 0. Then summed over "pp" (one stage adds its
    value to zeros: exact, a broadcast) and averaged over "dp"."""
    if here:
        total = leaf("input", (), dtype, name="loss/0")
        for mb in range(1, micro_batches):
            total = total + leaf("input", (), dtype, name=f"loss/{mb}")
        if mean and micro_batches > 1:
            total = total / const(micro_batches, dtype=dtype)
    else:
        total = const(0, dtype=dtype)
    if pp > 1:
        total = collective.allreduce(total, group="pp")
    if dp > 1:
        total = collective.allreduce(total, group="dp") / const(dp, dtype=dtype)
    return Graph({"loss": total})


def _sum_program(names: list[str], leaves: Mapping[str, Node]) -> Graph:
    outs = {}
    for k in names:
        acc = leaf("input", leaves[k].shape, leaves[k].dtype, name=f"sum/{k}")
        outs[k] = acc + leaf("input", leaves[k].shape, leaves[k].dtype, name=k)
    return Graph(outs)


@dataclass
class PipelinePlan:
    """A step graph cut into stages: ``stages[s]`` runs on pipeline rank ``s``; ``transfers``
    are the values that cross stages (every micro-batch); ``schedule`` orders the work.

    ``micro_batches`` micro-batches of the traced batch make one step; the update runs once
    after the flush on the gradients summed over micro-batches (and ``dp`` data-parallel
    replicas), scaled so they equal the full-batch gradient of the mean loss.
    """

    graph: Graph
    stages: list[Stage]
    transfers: list[Transfer]
    schedule: Schedule
    micro_batches: int
    dp: int
    stage_of: dict[int, int] = field(repr=False)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def loss_stage(self) -> int:
        return self.stage_of[self.graph.outputs["loss"].id]

    def owner(self) -> dict[str, int]:
        """Param and state name -> the stage that holds and updates it."""
        return {n: s.index for s in self.stages for n in s.params + s.states}

    def program(self, stage: int) -> RankProgram:
        """Stage ``stage``'s rank program: its three programs, a ``recv`` or ``isend`` graph
        for every message of its schedule, the micro-batch sums and the data-parallel
        reduction, all IR (see ``RankProgram``). Pure; built on first use."""
        cache = self.__dict__.setdefault("_programs", {})
        if stage not in cache:
            cache[stage] = self._program(stage)
        return cache[stage]

    def _program(self, stage: int) -> RankProgram:
        st = self.stages[stage]
        leaves = {n.name: n for g in (st.forward, st.backward, st.update) for n in g.inputs}
        graphs: dict[str, Graph] = {"forward": st.forward, "backward": st.backward,
                                    "update": st.update}
        actions = self.schedule.actions[stage]
        for a in actions:
            m = a.msg
            if a.op == "RECV":
                name = f"act/{m.name}" if m.kind == "act" else f"gact/{m.name}/{m.src}"
                v = leaves[name]
                graphs[f"recv/{m.tag}"] = Graph({name: collective.recv(
                    collective.token(v.dtype), v.shape, v.dtype, m.src, m.tag, "pp")})
            elif a.op == "SEND":
                name = f"act/{m.name}" if m.kind == "act" else f"gact/{m.name}"
                v = (st.forward if m.kind == "act" else st.backward).outputs[name]
                x = leaf("input", v.shape, v.dtype, name=name)
                graphs[f"send/{m.tag}"] = Graph({f"sent/{name}>{m.dst}": collective.isend(
                    x, m.dst, m.tag, "pp")})
        grads = [k for k in st.backward.outputs if k.startswith("grad/")]
        buffers = [k for k in st.forward.outputs if k.startswith("state/")]
        values = {**{k: st.backward.outputs[k] for k in grads},
                  **{k: st.forward.outputs[k] for k in buffers}}
        graphs["accumulate"] = _sum_program(grads, values)
        graphs["accumulate_buffers"] = _sum_program(buffers, values)
        reduce = _reduce_program(grads + buffers, values, self.dp, buffers,
                                 self.micro_batches * self.dp)
        if reduce is not None:
            graphs["reduce"] = reduce
        graphs["loss"] = _loss_program(
            self.graph.outputs["loss"].dtype, self.micro_batches,
            self.graph.meta.get("loss_scale", "mean") == "mean", self.pp, self.dp,
            "loss" in st.forward.outputs)
        return RankProgram(stage, graphs, actions, grads, buffers)

    def shard(self, stage: int, programs: Mapping[str, Graph] | None = None) -> Graph:
        """Stage ``stage``'s rank program (``program``) on micro-batch 0 joined into one
        Graph: the ``recv`` nodes feed the forward and backward programs, the ``isend``
        nodes take their outputs, the micro-batch sums (with more than one micro-batch: the
        running sum a ``sum/`` leaf) and the data-parallel ``reduce`` (if any) feed the
        update; the ``loss`` program gives the output ``loss`` (later micro-batches' losses
        are ``loss/<mb>`` leaves). ``programs`` replaces the forward / backward / update
        graphs by the ones an executor runs (e.g. after its passes). The nodes are the ones
        that run; only the joining is for reading and drawing."""
        return self._join(stage, programs)[0]

    def node_names(self, stage: int, programs: Mapping[str, Graph] | None = None
                   ) -> dict[str, dict[int, str]]:
        """The name ``to_dot`` draws (``s<stage>:%k``; leaves by name) of each node of each
        graph of stage ``stage``'s rank program, by graph name and node id; ``programs`` as
        in ``shard``. A later micro-batch's ``recv``/``isend`` graph is named as micro-batch
        0's (the drawing shows micro-batch 0), so a timeline's node is found on the drawing."""
        joined, at = self._join(stage, programs)
        names = {k: _staged(stage, v) for k, v in joined.names().items()}
        prog = self.program(stage)
        graphs = {**prog.graphs, **(programs or {})}
        first = {(a.op, a.msg.kind, a.msg.name, a.msg.src, a.msg.dst): prog.action_graph(a)
                 for a in prog.actions if a.mb == 0 and a.op in ("SEND", "RECV")}
        out = {}
        for name, g in graphs.items():
            shown = g
            if name.startswith(("send/", "recv/")):
                (a,) = [a for a in prog.actions if prog.action_graph(a) == name]
                shown = graphs[first[(a.op, a.msg.kind, a.msg.name, a.msg.src, a.msg.dst)]]
            out[name] = {n.id: names[at.get(m.id, m).id] for n, m in
                         zip(g.nodes, shown.nodes, strict=True) if at.get(m.id, m).id in names}
        return out

    def _join(self, stage: int, programs: Mapping[str, Graph] | None
              ) -> tuple[Graph, dict[int, Node]]:
        """``shard``'s graph, and the node there of each program node the joining rebuilt
        (by the program node's id)."""
        prog, programs = self.program(stage), programs or {}
        fwd0, bwd0, upd0 = (programs.get(k, prog.graphs[k])
                            for k in ("forward", "backward", "update"))
        at: dict[int, Node] = {}

        def join(g: Graph, mapping: Mapping[int, Node]) -> Graph:
            def rebuild(n: Node, ins: tuple[Node, ...]) -> Node:
                at[n.id] = Node(n.op, ins, n.attrs, n.shape, n.dtype, n.where)
                return at[n.id]
            return replace(g, mapping, rebuild)

        recvs: dict[str, Node] = {}
        sends: list[Graph] = []
        for a in prog.actions:
            if a.mb == 0 and a.op == "RECV":
                recvs.update(prog.graphs[prog.action_graph(a)].outputs)
            elif a.mb == 0 and a.op == "SEND":
                sends.append(prog.graphs[prog.action_graph(a)])
        fwd = join(fwd0, {n.id: recvs[n.name] for n in fwd0.inputs if n.name in recvs})
        bwd = join(bwd0, {n.id: recvs[n.name] if n.name in recvs else fwd.outputs[n.name]
                          for n in bwd0.inputs if n.name in recvs or n.name in fwd.outputs})
        sums = {**{k: bwd.outputs[k] for k in prog.grads},
                **{k: fwd.outputs[k] for k in prog.buffers}}
        if self.micro_batches > 1:
            for acc in ("accumulate", "accumulate_buffers"):
                g = prog.graphs[acc]
                sums.update(join(g, {n.id: sums[n.name] for n in g.inputs
                                     if n.name in sums}).outputs)
        if "reduce" in prog.graphs:
            red = prog.graphs["reduce"]
            sums = dict(join(red, {n.id: sums[n.name] for n in red.inputs}).outputs)
        update = join(upd0, {n.id: sums[n.name] for n in upd0.inputs if n.name in sums})
        lg = prog.graphs["loss"]
        outputs = dict(join(lg, {n.id: fwd.outputs["loss"] for n in lg.inputs
                                 if n.name == "loss/0"}).outputs)
        for g in sends:
            (x,) = g.inputs
            value = (fwd if x.name.startswith("act/") else bwd).outputs[x.name]
            outputs.update(join(g, {x.id: value}).outputs)
        outputs.update(update.outputs)
        outputs.update((k, sums[k]) for k in prog.buffers)
        return Graph(outputs, meta={"stage": stage}), at

    def to_dot(self, programs: Sequence[Mapping[str, Graph]] | None = None):
        """A ``graphviz.Digraph`` of every stage's shard (``shard``, with ``programs[s]`` for
        stage s) drawn by ``graph.dot.to_dot``, each node named as ``node_names`` says and
        in its stage's colour, and a dashed red edge from each send to the receive it pairs
        with."""
        programs = programs or [None] * self.pp
        shards = [self.shard(s, programs[s]) for s in range(self.pp)]
        roles = {n.id: f"stage {s}" for s in reversed(range(self.pp)) for n in shards[s].nodes}
        names = {k: _staged(s, v) for s in reversed(range(self.pp))
                 for k, v in shards[s].names().items()}
        outputs = {f"stage {s}: {k}": v for s, g in enumerate(shards) for k, v in g.outputs.items()}
        palette = {f"stage {s}": STAGE_COLOURS[s % len(STAGE_COLOURS)] for s in range(self.pp)}
        joined = Graph(outputs)
        label = lambda n, _: (f"{names[n.id]} = {n.op}\n{fmt_type(n.shape, n.dtype)}"
                              if n.inputs else
                              f"{names[n.id]} ({n.op})\n{fmt_type(n.shape, n.dtype)}")
        dot = to_dot(joined, roles, palette, name="pipeline", label=label)
        sends, recvs = {}, {}
        for s, g in enumerate(shards):
            for n in g.nodes:
                if n.op == "isend":
                    sends[(s, n.attrs["dest"], n.attrs["tag"])] = n
                elif n.op == "recv":
                    recvs[(n.attrs["source"], s, n.attrs["tag"])] = n
        for key, n in sends.items():
            dot.edge(f"n{n.id}", f"n{recvs[key].id}", color="red", style="dashed",
                     constraint="false", label=f"tag {key[2]}", fontcolor="red", fontsize="8")
        return dot

    def summary(self) -> str:
        """Per stage: forward nodes, estimated time, parameters, activation bytes; then the
        transfers and the schedule grid."""
        names = self.graph.names()
        lines = [f"pipeline: {self.pp} stages x {self.micro_batches} micro-batches, "
                 f"{self.schedule.kind}, dp={self.dp}"]
        for s in self.stages:
            first = names[s.nodes[0].id] if s.nodes else "-"
            last = names[s.nodes[-1].id] if s.nodes else "-"
            lines.append(
                f"stage {s.index}: {len(s.nodes)} forward nodes {first}..{last}, est "
                f"{_us(s.forward_time)} fwd + {_us(s.backward_time)} bwd per micro-batch, "
                f"activations {_human(s.activation_bytes)}/micro-batch, "
                f"params {_human(s.param_bytes)} [{', '.join(s.params)}]")
            ops: dict[str, int] = {}
            for n in s.nodes:
                ops[n.op] = ops.get(n.op, 0) + 1
            lines.append("  ops: " + ", ".join(f"{k}x {op}" if k > 1 else op
                                                for op, k in ops.items()))
            lines.append("  rank program: " + self.program(s.index).describe())
        lines.append("transfers per micro-batch:")
        for t in self.transfers:
            lines.append(f"  {t.name}: stage {t.src} -> {t.dst}, {_human(t.nbytes)}"
                         f"{' (+ gradient back)' if t.grad else ''}")
        lines.append(str(self.schedule))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _staged(stage: int, name: str) -> str:
    """A node's name on the pipeline's drawing: ``%k`` within its stage's shard becomes
    ``s<stage>:%k`` (the stages' shards are numbered apart); a leaf keeps its name."""
    return f"s{stage}:{name}" if name.startswith("%") else name


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _check_stage_of(parts: Parts, pp: int, stage_of: Mapping[int, int]) -> None:
    for n in parts.compute:
        s = stage_of.get(n.id)
        if not isinstance(s, int | np.integer) or not 0 <= s < pp:
            raise PartitionError(f"stage_of gave {s!r} for forward node {n!r} ({n.op} at "
                                 f"{n.where}): expected a stage in 0..{pp - 1}")
        for x in n.inputs:
            if x.inputs and stage_of[x.id] > s:
                raise PartitionError(
                    f"stage_of puts {n.op} at {n.where} on stage {s} but its input {x.op} on "
                    f"stage {stage_of[x.id]}: a value may only flow to the same or a later "
                    f"stage")
    used = {stage_of[n.id] for n in parts.compute}
    if len(used) != pp:
        empty = sorted(set(range(pp)) - used)
        raise PartitionError(f"stages {empty} get no forward node: use fewer stages or "
                             f"another split")


def cut(graph: Graph, pp: int, stage_of: Mapping[int, int] | Callable[[Node], int],
        micro_batches: int = 1, schedule: str = "1f1b", dp: int = 1,
        times: Mapping[int, float] | None = None) -> PipelinePlan:
    """The mechanism: given a stage for every forward compute node (a mapping by node id or
    a function of the node), build each stage's forward, backward and update programs.

    A value used by a later stage is sent straight to it (also past stages in between: a
    skip connection is one transfer); its gradient travels back the same way and is summed
    where the value lives. A param or state lives with its first user's stage, which also
    holds its optimizer state and update. Each stage's backward is the reverse-mode
    derivative (``graph.autodiff.backprop``) of its own forward program, so every backward
    node is on the stage of the forward node it differentiates by construction.
    """
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise PartitionError(f"pp must be an integer >= 1, got {pp!r}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise PartitionError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if not isinstance(dp, int) or dp < 1:
        raise PartitionError(f"dp must be an integer >= 1, got {dp!r}")
    parts = Parts.of(graph)
    if pp > len(parts.compute):
        raise PartitionError(f"cannot cut {len(parts.compute)} forward nodes into {pp} stages: "
                             f"use pp <= {len(parts.compute)}")
    if callable(stage_of):
        stage_of = {n.id: stage_of(n) for n in parts.compute}
    _check_stage_of(parts, pp, stage_of)
    stage_of = {n.id: int(stage_of[n.id]) for n in parts.compute}
    names = graph.names()
    times = times or estimated_times(parts)

    # Where every forward value lives and which later stages use it.
    home: dict[int, int] = dict(stage_of)
    users: dict[int, set[int]] = {}
    for n in parts.compute:
        for x in n.inputs:
            users.setdefault(x.id, set()).add(stage_of[n.id])
    for n in parts.forward:
        if not n.inputs and n.op in ("param", "state"):
            home[n.id] = min(users.get(n.id, {0}))
    owner = {n.name: home.get(n.id, 0) for n in graph.nodes
             if not n.inputs and n.op in ("param", "state")}
    for p, outs in parts.update_outputs.items():
        for k in outs:
            if k.startswith("state/"):
                owner[k[len("state/"):]] = owner[p]

    transfers: list[Transfer] = []
    for n in parts.forward:
        if n.op in ("const", "input") or n.id not in home:
            continue
        for s in sorted(users.get(n.id, set())):
            if s != home[n.id]:
                name = n.name if not n.inputs else names[n.id]
                grad = n.id in parts.needs_grad and _floating(n)
                transfers.append(Transfer(name, home[n.id], s, grad,
                                          n.size * itemsize(n.dtype)))
    tname = {(t.name, t.dst): t for t in transfers}

    stages = []
    for s in range(pp):
        stages.append(_build_stage(parts, s, stage_of, home, transfers, tname, names, owner,
                                   micro_batches * dp, times))
    f_time = [max(st.forward_time, 1e-12) for st in stages]
    b_time = [max(st.backward_time, 1e-12) for st in stages]
    plan_schedule = sched.build(schedule, pp, micro_batches, transfers, f_time, b_time)
    return PipelinePlan(graph, stages, transfers, plan_schedule, micro_batches, dp, stage_of)


def _build_stage(parts: Parts, s: int, stage_of: Mapping[int, int], home: Mapping[int, int],
                 transfers: list[Transfer], tname: Mapping[tuple[str, int], Transfer],
                 names: Mapping[int, str], owner: Mapping[str, int], replicas: int,
                 times: Mapping[int, float]) -> Stage:
    graph = parts.graph
    new: dict[int, Node] = {}
    recv_leaves: list[tuple[Node, Transfer]] = []

    def local(x: Node) -> Node:
        if x.id in new:
            return new[x.id]
        if x.op in ("const", "input") or (not x.inputs and home.get(x.id) == s):
            new[x.id] = x
        else:
            name = x.name if not x.inputs else names[x.id]
            t = tname[(name, s)]
            new[x.id] = leaf("input", x.shape, x.dtype, name=f"act/{t.name}")
            recv_leaves.append((new[x.id], t))
        return new[x.id]

    nodes = [n for n in parts.compute if stage_of[n.id] == s]
    for n in nodes:
        new[n.id] = Node(n.op, tuple(local(x) for x in n.inputs), n.attrs, n.shape, n.dtype,
                         n.where)
    outputs: dict[str, Node] = {}
    if stage_of[parts.loss.id] == s:
        outputs["loss"] = new[parts.loss.id]
    for k, node in parts.buffers.items():
        if node.inputs and stage_of[node.id] == s:
            outputs[k] = new[node.id]
    sends = [t for t in transfers if t.src == s]
    for t in sends:
        orig = next(n for n in parts.forward if (n.name if not n.inputs else names[n.id])
                    == t.name)
        outputs[f"act/{t.name}"] = local(orig)

    # Backward: reverse mode over this stage's forward, seeded by the loss (if here) and the
    # gradients of the values sent on.
    seeds, cots = [], []
    if "loss" in outputs:
        seeds.append(outputs["loss"])
        cots.append(const(1, dtype=outputs["loss"].dtype))
    for t in sends:
        if t.grad:
            v = outputs[f"act/{t.name}"]
            seeds.append(v)
            cots.append(leaf("input", v.shape, v.dtype, name=f"gact/{t.name}/{t.dst}"))
    params = [n for n in graph.params if owner[n.name] == s]
    diff_recvs = [(lf, t) for lf, t in recv_leaves if t.grad]
    wrt = [new[p.id] if p.id in new else p for p in params] + [lf for lf, _ in diff_recvs]
    grads = backprop(seeds, cots, wrt) if seeds else [zeros_like(w) for w in wrt]
    bout: dict[str, Node] = {}
    for p, g in zip(params, grads[:len(params)], strict=True):
        bout[f"grad/{p.name}"] = g
    for (_, t), g in zip(diff_recvs, grads[len(params):], strict=True):
        bout[f"gact/{t.name}"] = g

    fwd_ids = {n.id for n in new.values() if n.inputs}
    stash: dict[int, Node] = {}
    orig_of = {v.id: k for k, v in new.items()}
    for n in toposort(bout.values()):
        if n.id in fwd_ids:
            continue
        for x in n.inputs:
            if x.id in fwd_ids:
                stash[x.id] = x
    for v in bout.values():
        if v.id in fwd_ids:
            stash[v.id] = v
    mapping = {}
    for i, x in stash.items():
        key = f"stash/{names[orig_of[i]]}"
        outputs[key] = x
        mapping[i] = leaf("input", x.shape, x.dtype, name=key)
    backward = replace(Graph(bout), mapping)
    forward = Graph(outputs, meta={"stage": s})

    update = _update_program(parts, [p.name for p in params], replicas)
    states = [n for n, o in owner.items() if o == s and n not in {p.name for p in params}]
    for g in (forward, backward, update):
        verify(g)
    kept = [n for n in backward.inputs if not n.name.startswith("gact/")]
    # The stage's own programs priced by the ops' costs, rescaled to the times the policy
    # used (measured ones with balance="profile") so both describe the same stage.
    fwd_time = sum(_node_time(n) for n in forward.nodes if n.inputs)
    bwd_time = sum(_node_time(n) for n in backward.nodes if n.inputs)
    est = sum(estimated_times_of(nodes, parts.needs_grad).values())
    if est > 0:
        ratio = sum(times[n.id] for n in nodes) / est
        fwd_time, bwd_time = fwd_time * ratio, bwd_time * ratio
    return Stage(s, nodes, forward, backward, update, [p.name for p in params], states,
                 fwd_time, bwd_time, sum(n.size * itemsize(n.dtype) for n in kept),
                 sum(p.size * itemsize(p.dtype) for p in params))


def _update_program(parts: Parts, params: list[str], replicas: int) -> Graph:
    graph = parts.graph
    scale = 1.0 / replicas if graph.meta.get("loss_scale", "mean") == "mean" else 1.0
    outs = {k: graph.outputs[k] for p in params for k in parts.update_outputs[p]}
    mapping: dict[int, Node] = {}
    grads: dict[str, Node] = {}
    for p in params:
        g = graph.outputs.get(f"grad/{p}")
        if g is None:
            raise PartitionError(f"the step graph has no output grad/{p}")
        total = leaf("input", g.shape, g.dtype, name=f"grad/{p}")
        scaled = total * const(scale, dtype=g.dtype) if scale != 1.0 else total
        if g.id in mapping:
            raise PartitionError(f"grad/{p} is the same node as another parameter's gradient")
        mapping[g.id] = scaled
        grads[f"grad/{p}"] = scaled
    norm = graph.outputs.get("grad_norm")
    if norm is not None:
        # gradient clipping: the global norm sums the squares of every stage's gradients;
        # each stage adds its own (after the micro-batch and data-parallel sums) and one
        # allreduce over the pipeline's stages totals them. Every stage runs it, even one
        # without parameters (a zero sum), or the others would wait for it.
        def over_stages(total: Tensor) -> Tensor:
            return Tensor(collective.allreduce(total.node, "sum", group="pp"))

        local = [Tensor(grads[f"grad/{p}"]) for p in params] or [
            Tensor(const(0.0, dtype=norm.dtype))]
        mapping[norm.id] = global_norm(local, over_stages).node
        outs["grad_norm"] = norm
    update = replace(Graph(outs), mapping)
    inner = {n.id for n in parts.forward if n.inputs}
    for n in update.nodes:
        if n.id in inner:
            raise PartitionError(f"the optimizer update uses forward value {n!r} ({n.op} at "
                                 f"{n.where}); pipeline updates may only read params, state, "
                                 f"gradients, lr and t")
    return Graph({**update.outputs, **grads}, meta={"params": params})


def pipeline(graph: Graph, pp: int, balance: str | Sequence[Any] = "cost",
             micro_batches: int = 1, schedule: str = "1f1b", dp: int = 1,
             node_times: Mapping[int, float] | None = None) -> PipelinePlan:
    """Cut the training-step ``graph`` of ONE micro-batch (traced at the micro-batch size)
    into ``pp`` stages run on ``micro_batches`` micro-batches per step.

    balance  "cost": contiguous stages balanced by the ops' cost estimates (forward plus
             backward of each node) and the transfer cost at each cut, by dynamic
             programming that minimises the slowest stage; "profile": the same, with
             ``node_times`` measured by a short run (``runtime.pipeline.profile_times``);
             a list of ``pp - 1`` split points (see ``split_policy``).
    schedule "gpipe" | "1f1b".
    dp       data-parallel replicas of the whole pipeline (their gradients are summed
             before the update).
    """
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise PartitionError(f"pp must be an integer >= 1, got {pp!r}")
    if schedule not in sched.SCHEDULES:
        raise PartitionError(f"unknown schedule {schedule!r}; choose one of "
                             f"{', '.join(sched.SCHEDULES)}")
    parts = Parts.of(graph)
    if pp > len(parts.compute):
        raise PartitionError(f"cannot cut {len(parts.compute)} forward nodes into {pp} stages: "
                             f"use pp <= {len(parts.compute)}")
    if isinstance(balance, str):
        if balance == "cost":
            times = estimated_times(parts)
        elif balance == "profile":
            if node_times is None:
                raise PartitionError("balance='profile' needs measured node_times: get them "
                                     "with runtime.pipeline.profile_times(graph)")
            missing = [n for n in parts.compute if n.id not in node_times]
            if missing:
                raise PartitionError(f"node_times lacks {len(missing)} forward nodes, e.g. "
                                     f"{missing[0]!r}")
            times = {n.id: float(node_times[n.id]) for n in parts.compute}
        else:
            raise PartitionError(f"unknown balance {balance!r}: use 'cost', 'profile' or a "
                                 f"list of {pp - 1} split points")
        stage_of = cost_policy(parts, pp, times)
    else:
        times = dict(node_times) if node_times is not None else estimated_times(parts)
        stage_of = split_policy(parts, pp, list(balance))
    return cut(graph, pp, stage_of, micro_batches, schedule, dp, times)


__all__ = ["BALANCES", "BANDWIDTH", "FLOP_RATE", "MEM_RATE", "PartitionError", "Parts",
           "PipelinePlan", "RankProgram", "Stage", "balanced_starts", "cost_policy", "cut",
           "estimated_times", "pipeline", "split_policy", "stage_costs", "vjp_nodes"]
