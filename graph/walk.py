"""The one graph walk every executor shares: a schedule of steps run in order, values freed
after their last use, and a failure re-raised naming the node, op and user line ("while
executing %7 = matmul(%3, %w1) : f32[128,512] (from model.py:12)"), shard and rank.

Pure (no devices, no processes): it lives in graph/ so eager Tensors (graph.tensor) and the
executors of runtime/ (interpreter, compiled, GPU, pipeline profiling) share it across the
one-way import rule. Imports graph.ir and ops.registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from shardgrad.graph.ir import Graph, Node, fmt_type
from shardgrad.ops.registry import kernel_for


class ExecutionError(RuntimeError):
    """A kernel failed. The message says which node, op, source line, shard and rank."""

    def __init__(self, msg: str, node: Node | None = None, rank: int | None = None):
        super().__init__(msg)
        self.node, self.rank = node, rank


def describe(graph: Graph | None, node: Node) -> str:
    """``%7 = matmul(%3, %w1) : f32[128,512]``: the node as its graph prints it (without a
    graph, nodes are named by id)."""
    names = graph.names() if graph is not None else {}
    name = lambda n: names.get(n.id) or (f"%{n.name}" if n.name else f"%{n.id}")
    args = ", ".join(name(x) for x in node.inputs)
    return f"{name(node)} = {node.op}({args}) : {fmt_type(node.shape, node.dtype)}"


def leaf_value(xp, node: Node, feeds: Mapping[Any, Any]):
    """The value of leaf ``node``: a const's, or the one fed under the node or its name,
    checked against the node's type."""
    if node.op == "const":
        return xp.asarray(node.attrs["value"])
    for key in (node, node.name):
        if key in feeds:
            value = feeds[key]
            break
    else:
        raise ExecutionError(f"no value fed for {node.op} {node.name!r} "
                             f"({fmt_type(node.shape, node.dtype)})", node)
    if tuple(value.shape) != node.shape or str(value.dtype) != node.dtype:
        raise ExecutionError(
            f"{node.op} {node.name!r} expects {fmt_type(node.shape, node.dtype)}, got "
            f"{fmt_type(value.shape, str(value.dtype))}", node)
    return value


def last_uses(uses: Sequence[Iterable[int]], keep: Iterable[int] = ()) -> list[list[int]]:
    """For each step (given the value ids it reads), the ids whose last reader it is: the
    values to drop once it has run. ``keep`` (the outputs) are never dropped."""
    last: dict[int, int] = {}
    for i, ids in enumerate(uses):
        for u in ids:
            last[u] = i
    kept = set(keep)
    free: list[list[int]] = [[] for _ in uses]
    for u, i in last.items():
        if u not in kept:
            free[i].append(u)
    return free


# The timeline recorder runtime.trace installs while ``debug.trace`` is on (graph/ may not
# import runtime/, so it is handed in): anything with ``walk(graph, nodes) -> list`` and
# ``clock() -> int``. Read it here (eager evaluation does, to time its ops too); set it with
# set_tracer.
current_tracer: Any = None


def set_tracer(tracer: Any) -> Any:
    """Install ``tracer`` (None: tracing off) for every walk in this process; returns the
    one it replaces."""
    global current_tracer
    saved, current_tracer = current_tracer, tracer
    return saved


class Walk:
    """The executor core: a graph, a schedule of zero-argument steps (``steps``, each the
    work of ``step_nodes[i]``, the node a failure is reported against), and the one loop that
    runs them. A backend builds the steps once (torch.fx's Interpreter has backends override
    ``run_node``; here they build closures, so the loop costs one call per step) and calls
    ``execute()`` each run.

    ``rank`` and ``shard`` name where it runs in error messages; ``on`` says on what (" on
    the GPU"). ``notes[i]`` (optional) adds to step i's message, e.g. a fused group's ops.
    """

    def __init__(self, graph: Graph | None, rank: int | None = None, shard: str | None = None,
                 on: str = ""):
        self.graph, self.rank, self.shard, self.on = graph, rank, shard, on
        self.steps: list[Callable[[], Any]] = []
        self.step_nodes: list[Node] = []
        self.notes: dict[int, str] = {}

    def error(self, node: Node, exc: BaseException, note: str = "") -> BaseException:
        """The exception that reports ``exc``, raised while running ``node``."""
        where = f" on rank {self.rank}" if self.rank is not None else ""
        shard = f" in shard {self.shard}" if self.shard else ""
        return ExecutionError(
            f"while executing {describe(self.graph, node)}{note} (from {node.where}){shard}"
            f"{self.on}{where}: {type(exc).__name__}: {exc}", node, self.rank)

    def execute(self) -> None:
        """Run every step in order (the hot loop: everything was resolved when the steps were
        built). With a tracer installed (``set_tracer``), the clock after each step is
        appended to the list its ``walk(graph, step_nodes)`` returns."""
        i, tracer = 0, current_tracer
        try:
            if tracer is None:
                for i, step in enumerate(self.steps):  # noqa: B007 - i names the failing node
                    step()
            else:
                times, clock = tracer.walk(self.graph, self.step_nodes), tracer.clock
                for i, step in enumerate(self.steps):  # noqa: B007 - as above
                    step()
                    times.append(clock())
        except ExecutionError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the node attached
            err = self.error(self.step_nodes[i], e, self.notes.get(i, ""))
            if err is e:
                raise
            raise err from e


class EnvWalk(Walk):
    """A Walk whose steps keep values by node id in ``env`` and drop each after its last use:
    the node-by-node backends (reference interpreter, GPU program, eager, profiling).

    ``add(node, fn, uses, defines)`` appends a step computing ``fn(*values of uses)``, its
    result stored under ``defines`` (one id, or several for a step that returns a sequence);
    ``add_leaf(node, fn)`` a step storing ``fn(node)``. ``finish(keep)`` then attaches the
    last-use frees. ``run_env(known)`` executes with a fresh ``env`` (holding ``known``),
    returns what is left in it (the kept values), and leaves none behind. One run at a time
    per walk (each rank and thread builds its own, as each holds buffers).
    """

    def __init__(self, graph: Graph, rank: int | None = None, shard: str | None = None,
                 on: str = ""):
        super().__init__(graph, rank, shard, on)
        self.env: dict[int, Any] = {}
        self._uses: list[tuple[int, ...]] = []
        self._body: list[Callable[[dict[int, Any]], None]] = []

    def add(self, node: Node, fn: Callable[..., Any], uses: Sequence[int],
            defines: int | Sequence[int], note: str = "") -> None:
        uses = tuple(uses)
        if isinstance(defines, int):
            d = defines
            if len(uses) == 1:
                (a,) = uses
                body = lambda env: env.__setitem__(d, fn(env[a]))
            elif len(uses) == 2:
                a, b = uses
                body = lambda env: env.__setitem__(d, fn(env[a], env[b]))
            else:
                body = lambda env: env.__setitem__(d, fn(*[env[u] for u in uses]))
        else:
            ds = tuple(defines)

            def body(env):
                env.update(zip(ds, fn(*[env[u] for u in uses]), strict=True))
        if note:
            self.notes[len(self._body)] = note
        self._body.append(body)
        self._uses.append(uses)
        self.step_nodes.append(node)

    def add_leaf(self, node: Node, fn: Callable[[Node], Any]) -> None:
        d = node.id
        self._body.append(lambda env: env.__setitem__(d, fn(node)))
        self._uses.append(())
        self.step_nodes.append(node)

    def add_nodes(self, nodes: Iterable[Node], xp, leaf: Callable[[Node], Any],
                  device: Any = "cpu") -> None:
        """A step per node: leaves from ``leaf(node)``, every other node ``kernel_for(op,
        device)`` on ``xp``."""
        for n in nodes:
            if not n.inputs:
                self.add_leaf(n, leaf)
            else:
                self.add(n, _bind(kernel_for(n, device), xp, n.attrs),
                         [x.id for x in n.inputs], n.id)

    def finish(self, keep: Iterable[int]) -> None:
        env = self.env
        self.steps = []
        for body, free in zip(self._body, last_uses(self._uses, keep), strict=True):
            self.steps.append(_with_frees(body, env, free))

    def run_env(self, known: Mapping[int, Any] | None = None) -> dict[int, Any]:
        """Execute the steps; the values left (the kept ones) by node id."""
        env = self.env
        env.clear()
        if known:
            env.update(known)
        try:
            self.execute()
            return dict(env)
        finally:
            env.clear()


def _with_frees(body, env, free) -> Callable[[], None]:
    if not free:
        return lambda: body(env)
    if len(free) == 1:
        (f,) = free

        def step1():
            body(env)
            del env[f]
        return step1

    def step():
        body(env)
        for f in free:
            env.pop(f, None)
    return step


def _bind(fn, xp, attrs) -> Callable[..., Any]:
    if not attrs:
        return lambda *a: fn(xp, *a)
    return lambda *a: fn(xp, *a, **attrs)


__all__ = ["EnvWalk", "ExecutionError", "Walk", "describe", "last_uses", "leaf_value",
           "set_tracer"]
