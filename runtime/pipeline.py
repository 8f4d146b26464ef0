"""Pipeline execution: each rank runs its stage's rank program (``partition.pipeline``'s
``PipelinePlan.program``: forward, backward and update graphs, a recv or isend graph per
message, the micro-batch sums, the data-parallel allreduce and the loss's mean, all IR) in
its schedule's order, with its communicators bound. A stage's parameters and optimizer
state stay on its ranks between steps; ``gather`` assembles the whole model when read.

Side effects (communication, timing) live here. Imports graph, ops, partition and runtime.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardgrad.graph.device import to_host
from shardgrad.graph.ir import Graph
from shardgrad.graph.walk import EnvWalk
from shardgrad.ops import collective
from shardgrad.ops.registry import kernel_for
from shardgrad.partition.pipeline import (
    PartitionError,
    Parts,
    PipelinePlan,
    pipeline,
    vjp_nodes,
)
from shardgrad.runtime import config as cfg
from shardgrad.runtime import dp as data_parallel
from shardgrad.runtime import trace
from shardgrad.runtime.comm import Communicator, SingleProcess
from shardgrad.runtime.interpreter import ExecutionError, Interpreter, leaf_value

Executor = Callable[..., Any]


@dataclass
class Mesh:
    """This rank's place in a dp x pp mesh: world rank ``d * pp + s`` is stage ``s`` of
    pipeline replica ``d``. ``pp_comm`` joins the stages of one replica (rank = stage),
    ``dp_comm`` the ranks holding the same stage in every replica.

    ``held`` says where the model's current values are: None when every rank holds all of
    them (at the start, after ``gather``), else the stage holding each (by output name,
    ``param/<p>``, ``state/<s>``): the one whose pipelined steps update it (on the others
    it is stale until a gather). The same on every rank."""

    dp: int
    pp: int
    stage: int
    replica: int
    pp_comm: Communicator
    dp_comm: Communicator
    held: dict[str, int] | None = None

    def mine(self) -> list[str]:
        """The output names of the values this rank holds current for the others."""
        return [k for k, s in (self.held or {}).items() if s == self.stage]

    @staticmethod
    def of(comm: Communicator, dp: int, pp: int) -> Mesh:
        if comm.world_size != dp * pp:
            raise ValueError(f"a dp={dp} x pp={pp} mesh needs {dp * pp} ranks, got "
                             f"{comm.world_size}")
        stage, replica = comm.rank % pp, comm.rank // pp
        pp_comm = comm if dp == 1 else comm.split(replica, stage)
        dp_comm = (comm if pp == 1 else comm.split(stage, replica)) if dp > 1 \
            else SingleProcess()
        return Mesh(dp, pp, stage, replica, pp_comm, dp_comm)


@dataclass
class Stats:
    """What one step did on this rank: per compute action (op, mb, start, end) in seconds
    since the step began (at ``t0``, on ``time.perf_counter``'s clock), time blocked in
    communication, and the most micro-batches (and bytes) of activations held for backward
    at once."""

    t0: float = 0.0
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)
    comm_s: float = 0.0
    wall_s: float = 0.0
    peak_live: int = 0
    peak_bytes: int = 0

    @property
    def busy_s(self) -> float:
        return sum(e - s for _, _, s, e in self.spans)


class StageRunner:
    """Runs stage ``stage`` of ``plan``: ``step(state, x, y, **inputs)`` does one training
    step and returns the step's loss (the mean over micro-batches and replicas, on every
    stage: the program's ``loss`` graph) and the updated outputs
    (``param/``, ``state/``, ``grad/`` of this stage; a buffer the forward pass updates, e.g.
    BatchNorm's running statistics, is the mean of its micro-batches' and replicas' updates).

    The stage is its rank program (``plan.program(stage)``) driven by its schedule: each
    action runs one of the program's graphs (forward, backward, a ``recv`` or an ``isend``,
    the micro-batch sums), then ``reduce`` (the data-parallel allreduce) and ``update`` run
    after the flush and ``loss`` after the sends complete, with ``comm`` bound as group "pp"
    and ``dp_comm`` as "dp". The runner
    only carries values from one graph to the next by name. Forward, backward and update
    run on ``executor`` (default the reference interpreter on ``xp``); the small glue graphs
    (communication, sums) on the interpreter.

    Sends are ``isend`` nodes: the stage computes on while a value is in flight. Each sent
    buffer is a fresh array (the reference interpreter allocates its outputs, other
    executors' are copied) that nothing writes and that the binding keeps referenced until
    the sends are waited on, after the update at the end of the step.

    ``state`` holds this stage's params and states by name; ``x``/``y`` are this replica's
    whole batch, cut into ``plan.micro_batches`` consecutive micro-batches; ``inputs`` are
    the step's other inputs (``lr``, ``t``, ``step``), fed whole to every program.
    """

    def __init__(self, plan: PipelinePlan, stage: int, comm: Communicator,
                 dp_comm: Communicator | None = None, executor: Executor | None = None,
                 xp=np, rank: int | None = None):
        if comm.world_size != plan.pp or comm.rank != stage:
            raise ValueError(f"stage {stage} of a {plan.pp}-stage plan needs a pipeline "
                             f"communicator of {plan.pp} ranks with rank {stage}, got rank "
                             f"{comm.rank} of {comm.world_size}")
        self.dp_comm = dp_comm or SingleProcess()
        if self.dp_comm.world_size != plan.dp:
            raise ValueError(f"a plan for dp={plan.dp} replicas needs a data-parallel "
                             f"communicator of {plan.dp} ranks, got {self.dp_comm.world_size}")
        self.plan, self.stage, self.comm, self.xp = plan, stage, comm, xp
        self.program = prog = plan.program(stage)
        st = plan.stages[stage]
        self.rank = rank = comm.rank if rank is None else rank
        make = executor or (lambda g, **kw: Interpreter(g, xp, **kw))
        self.runs = {name: (make if name in ("forward", "backward", "update") else
                            lambda g, **kw: Interpreter(g, xp, **kw))(
                                g, rank=rank, shard=f"pipeline stage {stage} {name}")
                     for name, g in prog.graphs.items()}
        # Other executors may reuse their output buffers on the next run: copy what is kept.
        self.copy = executor is not None
        self.keep = [n.name for n in st.backward.inputs if not n.name.startswith("gact/")]
        self.actions = prog.actions
        self.params = st.params
        self.stats = Stats()
        self._named: trace.Tracer | None = None   # the tracer told the drawing's node names
        # A value sent to several stages leaves the outbox after its last send.
        last: dict[tuple, int] = {}
        for i, a in enumerate(self.actions):
            if a.op == "SEND":
                last[(a.msg.kind, a.msg.name, a.mb)] = i
        self.last_send = set(last.values())

    def _run(self, name: str, feeds: Mapping[str, Any], what: str) -> dict[str, Any]:
        tracer = trace.current()
        try:
            if tracer is None:
                out = self.runs[name].run(feeds)
            else:   # the timeline's nodes say which stage, program and micro-batch ran them
                if tracer is not self._named:
                    self._name_nodes(tracer)
                mb = int(what.rsplit(" ", 1)[1]) if "micro-batch" in what else None
                with tracer.annotate(stage=self.stage, action=name, mb=mb):
                    out = self.runs[name].run(feeds)
        except ExecutionError as e:
            if e.rank is not None:
                raise
            raise ExecutionError(f"pipeline stage {self.stage}, {what}, on rank {self.rank}: {e}",
                                 e.node, self.rank) from e
        if self.copy and name in ("forward", "backward", "update"):
            return {k: self.xp.array(v, copy=True) for k, v in out.items()}
        return out

    def _name_nodes(self, tracer: trace.Tracer) -> None:
        """Name the nodes of every graph this stage runs as ``shardgrad graph`` draws them."""
        self._named = tracer
        ran = executed_programs(self.runs)
        for name, names in self.plan.node_names(self.stage, ran).items():
            tracer.name_nodes(ran.get(name, self.program.graphs[name]), names)

    def _sum(self, name: str, acc: dict[str, Any], out: Mapping[str, Any],
             keys: list[str], what: str) -> None:
        """``acc[k] += out[k]`` for ``keys``, by the program's ``name`` graph (the first
        micro-batch's values start the sums)."""
        if not acc:
            acc.update((k, out[k]) for k in keys)
        elif keys:
            acc.update(self._run(name, {**{f"sum/{k}": acc[k] for k in keys},
                                        **{k: out[k] for k in keys}}, what))

    def step(self, state: Mapping[str, Any], x, y, **inputs: Any) -> tuple[Any, dict[str, Any]]:
        m = self.plan.micro_batches
        if len(x) % m or len(y) != len(x):
            raise ValueError(f"a batch of {len(x)} rows (labels: {len(y)}) cannot be cut into "
                             f"{m} equal micro-batches")
        b = len(x) // m
        xs = [x[i * b:(i + 1) * b] for i in range(m)]
        ys = [y[i * b:(i + 1) * b] for i in range(m)]
        prog = self.program
        inbox: dict[tuple[int, str], Any] = {}
        outbox: dict[tuple[str, str, int], Any] = {}
        kept: dict[int, dict[str, Any]] = {}
        grads: dict[str, Any] = {}
        buffers: dict[str, Any] = {}
        losses = []
        t0 = time.perf_counter()
        stats = Stats(t0)
        now = lambda: time.perf_counter() - t0
        with collective.bind(self.comm, pp=self.comm, dp=self.dp_comm) as binding:
            for i, a in enumerate(self.actions):
                graph = prog.action_graph(a)
                if a.op == "RECV":
                    c0 = now()
                    inbox.update(((a.mb, k), v) for k, v in self._run(
                        graph, {}, f"receive of micro-batch {a.mb}").items())
                    stats.comm_s += now() - c0
                elif a.op == "SEND":
                    c0 = now()
                    name = f"{'act' if a.msg.kind == 'act' else 'gact'}/{a.msg.name}"
                    self._run(graph, {name: outbox[(a.msg.kind, a.msg.name, a.mb)]},
                              f"send of micro-batch {a.mb}")
                    stats.comm_s += now() - c0
                elif a.op == "F":
                    s0 = now()
                    feeds = {**state, **inputs, "x": xs[a.mb], "y": ys[a.mb]}
                    feeds.update((k, v) for (mb, k), v in inbox.items() if mb == a.mb
                                 and k.startswith("act/"))
                    out = self._run(graph, feeds, f"forward of micro-batch {a.mb}")
                    if "loss" in out:
                        losses.append(out["loss"])
                    self._sum("accumulate_buffers", buffers, out, prog.buffers,
                              f"buffer sums of micro-batch {a.mb}")
                    kept[a.mb] = {k: (out[k] if k in out else feeds[k]) for k in self.keep
                                  if k in out or k in feeds}
                    for k, v in out.items():
                        if k.startswith("act/"):
                            outbox[("act", k[4:], a.mb)] = v
                    for k in [k for k in inbox if k[0] == a.mb and k[1].startswith("act/")]:
                        del inbox[k]
                    stats.peak_live = max(stats.peak_live, len(kept))
                    stats.peak_bytes = max(stats.peak_bytes, sum(
                        v.nbytes for d in kept.values() for v in d.values()))
                    stats.spans.append(("F", a.mb, s0, now()))
                elif a.op == "B":
                    s0 = now()
                    feeds = {**state, **inputs, **kept.pop(a.mb)}
                    feeds.update((k, v) for (mb, k), v in inbox.items() if mb == a.mb)
                    out = self._run(graph, feeds, f"backward of micro-batch {a.mb}")
                    self._sum("accumulate", grads, out, prog.grads,
                              f"gradient sums of micro-batch {a.mb}")
                    for k, v in out.items():
                        if k.startswith("gact/"):
                            outbox[("grad", k[5:], a.mb)] = v
                    for k in [k for k in inbox if k[0] == a.mb]:
                        del inbox[k]
                    stats.spans.append(("B", a.mb, s0, now()))
                if i in self.last_send:
                    outbox.pop((a.msg.kind, a.msg.name, a.mb))
            stats.wall_s = now()
            sums = {**grads, **buffers}
            if "reduce" in prog.graphs:
                sums = self._run("reduce", sums, "gradient reduction")
            out = {**self._run("update", {**state, **inputs,
                                          **{k: sums[k] for k in prog.grads}}, "update"),
                   **{k: sums[k] for k in prog.buffers}}
            c0 = now()
            binding.wait_sends()
            stats.comm_s += now() - c0
            loss = self._run("loss", {f"loss/{mb}": v for mb, v in enumerate(losses)},
                             "loss")["loss"]
        self.stats = stats
        return loss, out


def profile_times(graph: Graph, xp=np, repeats: int = 3, seed: int = 0) -> dict[int, float]:
    """Seconds per forward compute node of the step ``graph`` (forward plus its VJP nodes),
    the minimum over ``repeats`` timed runs of the reference interpreter's kernels on
    random data (integer inputs are zeros, valid as labels and indices)."""
    parts = Parts.of(graph)
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in parts.forward:
        if not n.inputs and n.op != "const":
            arr = (rng.standard_normal(n.shape) if np.dtype(n.dtype).kind == "f"
                   else np.zeros(n.shape)).astype(n.dtype)
            feeds[n.name] = xp.asarray(arr)
    env: dict[int, Any] = {}
    fwd = {n.id: float("inf") for n in parts.compute}
    for n in parts.forward:
        if not n.inputs:
            env[n.id] = leaf_value(xp, n, feeds)
    for n in parts.compute:
        kernel = kernel_for(n, xp)
        args = [env[x.id] for x in n.inputs]
        for _ in range(repeats):
            s = time.perf_counter()
            env[n.id] = kernel(xp, *args, **n.attrs)
            fwd[n.id] = min(fwd[n.id], time.perf_counter() - s)
    out = {}
    for n in parts.compute:
        vjp = vjp_nodes(n, parts.needs_grad)
        best = 0.0
        if vjp:
            g = xp.asarray(rng.standard_normal(n.shape).astype(n.dtype))
            walk, known = _vjp_walk(graph, vjp, env, xp, lambda x, g=g: g if x.op == "input"
                                    and x.name == "g" else leaf_value(xp, x, feeds))
            best = float("inf")
            for _ in range(repeats):
                s = time.perf_counter()
                walk.run_env(known)
                best = min(best, time.perf_counter() - s)
        out[n.id] = fwd[n.id] + best
    return out


def _vjp_walk(graph: Graph, vjp: list, env: Mapping[int, Any], xp, leaf
              ) -> tuple[EnvWalk, dict[int, Any]]:
    """The executor core's walk over one node's VJP nodes, and the forward's values it reads
    (from ``env``); any other input (the upstream gradient ``g``, constants) is a leaf read
    by ``leaf``."""
    walk = EnvWalk(graph)
    made = {m.id for m in vjp}
    known = {x.id: env[x.id] for m in vjp for x in m.inputs if x.id in env}
    for x in {x.id: x for m in vjp for x in m.inputs
              if x.id not in made and x.id not in known}.values():
        walk.add_leaf(x, leaf)
    walk.add_nodes(vjp, xp, leaf, xp)
    walk.finish(())
    return walk, known


def sync_outputs(comm: Communicator, out: Mapping[str, Any]) -> dict[str, Any]:
    """Every rank's ``param/`` and ``state/`` values in ``out``, on every rank of ``comm``
    (one allgather)."""
    mine = {k: to_host(v) for k, v in out.items() if k.startswith(("param/", "state/"))}
    merged: dict[str, Any] = {}
    for part in comm.allgather_obj(mine):
        merged.update(part)
    return merged


def plan_pipeline(graph: Graph, mesh: Mesh, micro_batches: int, schedule: str = "1f1b",
                  balance: Any = "cost", xp=np, world: Communicator | None = None
                  ) -> PipelinePlan:
    """``partition.pipeline.pipeline`` for this rank of ``mesh``, agreed by every rank of
    ``world`` (default the pipeline group): with ``balance="profile"`` rank 0 times the
    nodes and broadcasts them; a rank that cut elsewhere (it traced another graph) raises."""
    world = world or mesh.pp_comm
    parts = Parts.of(graph)
    times = None
    if balance == "profile":
        mine = profile_times(graph, xp) if world.rank == 0 else None
        order = world.bcast_obj([mine[n.id] for n in parts.compute] if mine else None)
        times = {n.id: t for n, t in zip(parts.compute, order, strict=True)}
    plan = pipeline(graph, mesh.pp, balance, micro_batches, schedule, mesh.dp, node_times=times)
    starts = [min(i for i, n in enumerate(parts.compute) if plan.stage_of[n.id] == s)
              for s in range(mesh.pp)]
    if world.bcast_obj(starts) != starts:
        raise RuntimeError(f"rank {world.rank} cut the pipeline at {starts}, rank 0 "
                           f"elsewhere: the ranks traced different graphs")
    return plan


class PipelineProgram:
    """A whole training step pipelined across the ranks of ``mesh`` (the executor a
    TrainStep gets): ``run(feeds)`` takes the full model's feeds and this replica's batch and
    returns ``loss`` (on every rank) and this stage's ``param/`` and ``state/`` outputs only:
    the other stages' values in this rank's model go stale (``mesh.held``) until ``gather``.
    The step's only collectives are the loss program's allreduces (over the pipeline, and
    over replicas) and, with dp > 1, the gradient allreduce within the stage's data-parallel
    group."""

    def __init__(self, plan: PipelinePlan, mesh: Mesh, executor: Executor | None = None,
                 xp=np, world: Communicator | None = None):
        world = world or mesh.pp_comm
        graph = plan.graph
        self.plan = plan
        self.mesh = mesh
        self.runner = StageRunner(self.plan, mesh.stage, mesh.pp_comm, mesh.dp_comm, executor,
                                  xp, rank=world.rank)
        st = self.plan.stages[mesh.stage]
        self.owned = set(st.params + st.states)
        self.holders = {f"{kind}/{n}": s.index for s in self.plan.stages
                        for kind, names in (("param", s.params), ("state", s.states))
                        for n in names}
        self.inputs = {n.name for n in graph.inputs} - {"x", "y"}   # lr, t, step

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self.mesh.held not in (None, self.holders):
            # a step retraced with another cut: take the values it needs from their holders
            mine = {k: feeds[k.split("/", 1)[1]] for k in self.mesh.mine()}
            feeds = {**feeds, **{k.split("/", 1)[1]: v
                                 for k, v in sync_outputs(self.mesh.pp_comm, mine).items()}}
        state = {k: v for k, v in feeds.items() if k in self.owned}
        inputs = {k: v for k, v in feeds.items() if k in self.inputs}
        loss, out = self.runner.step(state, feeds["x"], feeds["y"], **inputs)
        if self.mesh.pp > 1:
            self.mesh.held = self.holders
        return {"loss": loss, **{k: v for k, v in out.items()
                                if k.startswith(("param/", "state/"))}}


def gather(step: Any, mesh: Mesh) -> None:
    """Make ``step``'s model (a runtime.step.TrainStep's) whole on every rank of ``mesh``:
    each stage's current parameters, buffers and optimizer state, gathered by one allgather
    over the pipeline from the ranks that hold them. Every rank of the mesh calls it at the
    same point; a no-op when the model is whole already (before the first step, after a
    gather)."""
    if mesh.held is None:
        return
    values = step.feeds(None, None)
    mine = {k: values[k.split("/", 1)[1]] for k in mesh.mine()}
    step.load_outputs(sync_outputs(mesh.pp_comm, mine))
    mesh.held = None


@dataclass(frozen=True)
class PipelineTransform:
    """The step transform that asks TrainStep to trace one micro-batch (``split``) and leaves
    the graph as it is: PipelineProgram cuts it."""

    split: int

    def __call__(self, graph: Graph) -> Graph:
        return graph


def mesh_shape(config: cfg.ConfigLike, world_size: int | None = None) -> tuple[int, int, int]:
    """(dp, pp, micro-batches) of ``config``; ConfigError when ``world_size`` ranks or the
    batch size cannot hold them."""
    config = cfg.from_dict(config)
    par, batch = config.parallel, config.train.batch_size
    dp, pp, m = par.dp, par.pp, par.microbatches
    if world_size is not None and world_size != dp * pp:
        raise cfg.ConfigError(
            f"parallel.dp = {dp} x parallel.pp = {pp} needs {dp * pp} processes but this job "
            f"has {world_size}: start it with `mpirun -n {dp * pp} shardgrad train ...` (as "
            f"root add --allow-run-as-root --oversubscribe)")
    if batch % (dp * m):
        raise cfg.ConfigError(f"train.batch_size = {batch} must be a multiple of parallel.dp x "
                              f"parallel.microbatches = {dp} x {m}")
    return dp, pp, m


def step_options(config: cfg.ConfigLike, comm: Communicator, executor: Executor | None = None,
                 xp=np) -> dict[str, Any]:
    """``runtime.train.step_options`` for ``parallel.pp`` > 1: a dp x pp mesh over ``comm``,
    a TrainStep traced on one micro-batch, and the pipeline as its executor; this rank reads
    the data shard of its replica (``data_rank`` of ``data_world_size`` = dp). ``prepare``
    gives every rank rank 0's state and checks that all traced the same step; ``gather(step)``
    assembles the whole model on every rank (before it is read); ``loss_is_global``: the
    step's loss is the global mean on every rank (no further averaging)."""
    config = cfg.from_dict(config)
    dp, pp, m = mesh_shape(config, comm.world_size)
    par = config.parallel
    mesh = Mesh.of(comm, dp, pp)
    fault = data_parallel.fault_injector(config, comm.rank, comm.world_size)

    def make(graph: Graph) -> Any:
        with as_config_error():
            plan = plan_pipeline(graph, mesh, m, par.schedule, par.balance, xp, comm)
        program = PipelineProgram(plan, mesh, executor, xp, world=comm)
        return program if fault is None else data_parallel.Faulted(program, fault)

    def prepare(model, optimizer, step, x, y) -> None:
        data_parallel.broadcast_state(model, optimizer, comm)
        graph, _ = step.graph_for(np.asarray(x), np.asarray(y))
        data_parallel.check_replicas(comm, graph, model)

    return {"transform": PipelineTransform(m), "executor": make, "prepare": prepare,
            "gather": lambda step: gather(step, mesh), "data_rank": mesh.replica,
            "data_world_size": dp, "loss_is_global": True}


def executed_programs(runs: Mapping[str, Any]) -> dict[str, Graph]:
    """The forward / backward / update graphs ``runs`` (program name -> built executor)
    execute: what the executor made of the plan's programs (e.g. the compiled executor's
    graph after its passes), for ``PipelinePlan.shard`` / ``node_names`` / ``to_dot``."""
    out = {}
    for k in ("forward", "backward", "update"):
        graph = getattr(getattr(runs[k], "inner", runs[k]), "graph", None)
        if isinstance(graph, Graph):
            out[k] = graph
    return out


def drawn_programs(plan: PipelinePlan, executor: Executor | None) -> list[dict[str, Graph]]:
    """``executed_programs`` of every stage of ``plan`` built with ``executor`` as the
    training run builds them (default the reference interpreter: the plan's own graphs)."""
    if executor is None:
        return [{} for _ in range(plan.pp)]
    return [executed_programs({k: executor(plan.program(s).graphs[k], rank=s,
                                           shard=f"pipeline stage {s} {k}")
                               for k in ("forward", "backward", "update")})
            for s in range(plan.pp)]


@contextlib.contextmanager
def as_config_error() -> Iterator[None]:
    """A pipeline the config asks for but cannot have is a config error (the CLI's exit 2)."""
    try:
        yield
    except PartitionError as e:
        raise cfg.ConfigError(f"parallel.pp / parallel.balance: {e}") from None


__all__ = ["Mesh", "PipelineProgram", "PipelineTransform", "StageRunner", "Stats",
           "as_config_error", "drawn_programs", "executed_programs", "gather", "mesh_shape",
           "plan_pipeline", "profile_times", "step_options", "sync_outputs"]
