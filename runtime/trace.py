"""Timelines (``debug.trace = true``): each rank records what it did as Chrome-trace / Perfetto
JSON, RUN_DIR/trace/rank<R>.json: every executed graph node (its name as ``shardgrad graph``
draws it, op, stage, micro-batch), every communication (kind, bytes, peer), data loading,
host-device copies, evaluation and checkpoints; on a GPU each step's device time by CUDA
events. ``summarize`` turns the files into compute / communication / idle per rank.
Imports graph (ir, walk): the executor core (graph.walk) records each step into the
installed Tracer.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from shardgrad.graph import walk
from shardgrad.graph.ir import Graph, Node
from shardgrad.runtime.config import ConfigError

# Graph ops that move data between ranks: their nodes are communication, not compute.
COMM_OPS = frozenset({"allreduce", "allreduce_start", "allreduce_wait", "allgather",
                      "reduce_scatter", "send", "recv"})
# Chrome trace thread ids (one track each in the viewer).
TRACKS = {"step": 0, "op": 1, "comm": 2, "host": 3, "gpu": 4}

_current: Tracer | None = None


def current() -> Tracer | None:
    """The tracer of this process, or None when tracing is off (the executors' fast path)."""
    return _current


class Tracer:
    """Events of rank ``rank`` on one clock (``time.perf_counter_ns``). Kept as tuples and
    formatted once, at ``write``: recording a node costs a clock read and an append."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.t0 = time.perf_counter_ns()
        self.walks: list[tuple[Graph, Sequence[Node], tuple, list[int]]] = []
        self.spans: list[dict[str, Any]] = []
        self.context: tuple = ()           # (("stage", 0), ("mb", 1)) while a pipeline runs
        self._names: dict[int, tuple[Graph, dict[int, str]]] = {}
        self._gpu: list[tuple[Any, Any, int]] = []

    clock = staticmethod(time.perf_counter_ns)

    def walk(self, graph: Graph, nodes: Sequence[Node]) -> list[int]:
        """A list holding the clock now, to which an executor appends the clock after each
        of ``nodes`` (of ``graph``) runs, in order: one clock read and one append a node
        (the compiled program's hot loop)."""
        times = [time.perf_counter_ns()]
        self.walks.append((graph, nodes, self.context, times))
        return times

    def span(self, name: str, cat: str, start: int, end: int | None = None,
             **args: Any) -> None:
        self.spans.append({"name": name, "cat": cat, "start": start,
                           "end": time.perf_counter_ns() if end is None else end,
                           "args": args})

    @contextlib.contextmanager
    def timed(self, name: str, cat: str, **args: Any) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.span(name, cat, start, **args)

    @contextlib.contextmanager
    def annotate(self, **context: Any) -> Iterator[None]:
        """Nodes run inside carry ``context`` (e.g. ``stage=``, ``mb=``) in their args."""
        saved = self.context
        self.context = saved + tuple(context.items())
        try:
            yield
        finally:
            self.context = saved

    def gpu_step(self, step: int, start_event: Any, end_event: Any) -> None:
        """CUDA events recorded around step ``step`` on the current stream; read at write
        time, so recording them never waits for the GPU."""
        self._gpu.append((start_event, end_event, step, time.perf_counter_ns()))

    def name_nodes(self, graph: Graph, names: Mapping[int, str]) -> None:
        """Record ``graph``'s nodes under ``names`` (node id -> name) instead of the graph's
        own ``%k``: a pipeline stage's programs are drawn joined (PipelinePlan.node_names)."""
        self._names[id(graph)] = (graph, dict(names))

    def _name(self, graph: Graph | None, node: Node) -> str:
        if graph is None:   # an eager op's walk
            return f"%{node.id}"
        entry = self._names.get(id(graph))
        if entry is None or entry[0] is not graph:
            entry = self._names[id(graph)] = (graph, graph.names())
        return entry[1].get(node.id, "?")

    def events(self) -> list[dict[str, Any]]:
        """The Chrome trace events (``ph`` "X", times in microseconds since the tracer
        started), with the process and track names as metadata events."""
        us = lambda ns: (ns - self.t0) / 1e3
        pid = self.rank
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"rank {pid}"}},
            {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}}]
        out += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                 "args": {"name": name}} for name, tid in TRACKS.items()]
        walked = [(start, end, graph, n, ctx) for graph, nodes, ctx, times in self.walks
                  for n, start, end in zip(nodes, times, times[1:], strict=False)]
        for start, end, graph, n, ctx in walked:
            if not n.inputs:   # a leaf's step only fetches its value
                continue
            comm = n.op in COMM_OPS
            args = {"node": self._name(graph, n), "op": n.op, **dict(ctx),
                    "shape": list(n.shape), "where": n.where}
            if comm:
                args.update(_comm_args(n))
            out.append({"ph": "X", "name": f"{args['node']} {n.op}",
                        "cat": "comm" if comm else "op", "pid": pid, "tid": TRACKS["op"],
                        "ts": us(start), "dur": (end - start) / 1e3, "args": args})
        for s in self.spans:
            track = s["cat"] if s["cat"] in TRACKS else "host"
            out.append({"ph": "X", "name": s["name"], "cat": s["cat"], "pid": pid,
                        "tid": TRACKS[track], "ts": us(s["start"]),
                        "dur": (s["end"] - s["start"]) / 1e3, "args": s["args"]})
        for start_event, end_event, step, recorded in self._gpu:
            end_event.synchronize()
            ms = _elapsed_ms(start_event, end_event)
            out.append({"ph": "X", "name": "gpu step", "cat": "gpu", "pid": pid,
                        "tid": TRACKS["gpu"], "ts": us(recorded) - ms * 1e3, "dur": ms * 1e3,
                        "args": {"step": step, "device_ms": ms}})
        return out

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events(), "displayTimeUnit": "ms",
                       "otherData": {"rank": self.rank}}, f)


def _elapsed_ms(start_event: Any, end_event: Any) -> float:
    from shardgrad.graph.device import xp_for  # only GPU runs record CUDA events

    return float(xp_for("cuda").cuda.get_elapsed_time(start_event, end_event))


def _comm_args(n: Node) -> dict[str, Any]:
    itemsize = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2,
                "bfloat16": 2, "bool": 1, "uint8": 1, "int8": 1}.get(n.dtype, 4)
    src = n.inputs[0] if n.op == "send" else n
    size = 1
    for d in src.shape:
        size *= d
    args = {"kind": n.op, "bytes": size * itemsize}
    for key in ("dest", "source", "src", "dst", "peer", "group"):
        if key in n.attrs:
            args["peer" if key != "group" else "group"] = n.attrs[key]
    return args


@contextlib.contextmanager
def tracing(rank: int = 0, path: str | None = None) -> Iterator[Tracer]:
    """Install a Tracer for this process while the block runs; write it to ``path`` (when
    given) at the end, also after a failure (the timeline of a failed run is the useful
    one)."""
    global _current
    saved, tracer = _current, Tracer(rank)
    _current = tracer
    saved_walk = walk.set_tracer(tracer)
    try:
        yield tracer
    finally:
        _current = saved
        walk.set_tracer(saved_walk)
        if path is not None:
            tracer.write(path)


def traced_iter(iterable: Iterable, name: str = "data", cat: str = "data") -> Iterator:
    """``iterable``'s items, each ``next`` recorded as a span when tracing is on."""
    it = iter(iterable)
    while True:
        tracer, start = _current, time.perf_counter_ns()
        try:
            item = next(it)
        except StopIteration:
            return
        if tracer is not None:
            tracer.span(name, cat, start)
        yield item


@contextlib.contextmanager
def span(name: str, cat: str = "host", **args: Any) -> Iterator[None]:
    """A span of this process's tracer, or nothing when tracing is off."""
    tracer = _current
    if tracer is None:
        yield
        return
    with tracer.timed(name, cat, **args):
        yield


class TracedComm:
    """A Communicator that records each call as a ``comm`` span (kind, bytes, peer) and
    forwards it to ``inner``; every other attribute is ``inner``'s."""

    TIMED = {"allreduce_": "allreduce", "bcast_": "bcast", "send": "send", "recv_": "recv",
             "isend": "isend", "allgather_": "allgather", "iallreduce_": "iallreduce",
             "barrier": "barrier", "bcast_obj": "bcast_obj", "allgather_obj": "allgather_obj"}

    def __init__(self, inner: Any):
        self.__dict__["inner"] = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name == "split":   # the pipeline's and replicas' groups are traced too
            return lambda *a, **k: TracedComm(attr(*a, **k))
        kind = self.TIMED.get(name)
        if kind is None or not callable(attr):
            return attr

        def call(*args, **kwargs):
            tracer, start = _current, time.perf_counter_ns()
            out = attr(*args, **kwargs)
            if tracer is not None:
                buf = args[0] if args else None
                extra = {"kind": kind, "bytes": int(getattr(buf, "nbytes", 0) or 0)}
                peer = args[1] if kind in ("send", "recv", "isend") and len(args) > 1 else None
                if peer is not None:
                    extra["peer"] = int(peer)
                tracer.span(kind, "comm", start, **extra)
            return out
        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


def rank_files(run_dir: str) -> list[tuple[int, str]]:
    """(rank, path) of each RUN_DIR/trace/rank<R>.json, by rank."""
    where = os.path.join(run_dir, "trace")
    found = []
    if os.path.isdir(where):
        for name in os.listdir(where):
            if name.startswith("rank") and name.endswith(".json") and name[4:-5].isdigit():
                found.append((int(name[4:-5]), os.path.join(where, name)))
    return sorted(found)


def merge(paths: Sequence[str], out: str) -> list[dict[str, Any]]:
    """One trace of the ranks' files (each rank a process), written to ``out``. The ranks'
    clocks start apart: each rank's events are shifted so its first step starts at the
    same time as rank 0's, as the steps start together after MPI's start-up."""
    per_rank = []
    for path in paths:
        try:
            with open(path) as f:
                per_rank.append(json.load(f)["traceEvents"])
        except (ValueError, KeyError, TypeError) as e:   # e.g. cut short by a killed rank
            raise ConfigError(f"{path}: not a readable trace ({type(e).__name__}: {e})") \
                from None
    firsts = [min((e["ts"] for e in evs if e.get("cat") == "step"), default=0.0)
              for evs in per_rank]
    merged = []
    for evs, first in zip(per_rank, firsts, strict=True):
        shift = firsts[0] - first
        merged += [{**e, "ts": e["ts"] + shift} if "ts" in e else e for e in evs]
    with open(out, "w") as f:
        json.dump({"traceEvents": merged, "displayTimeUnit": "ms"}, f)
    return merged


def _total_inside(spans: Sequence[tuple[float, float]], windows: Sequence[tuple[float, float]]
                  ) -> float:
    """Total length of ``spans`` that start inside one of the sorted ``windows``."""
    starts = [w[0] for w in windows]
    total = 0.0
    for s, d in spans:
        i = bisect.bisect_right(starts, s) - 1
        if i >= 0 and s < windows[i][1]:
            total += d
    return total


def summarize(events: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Per rank, over its training steps but the first (which traces and compiles the
    graph): ``steps``, ``step_ms`` (median), ``compute_ms``,
    ``comm_ms`` and ``idle_ms`` (totals; idle = step time neither computing nor
    communicating: waiting, Python between nodes), and outside the steps ``data_ms``
    (data loading) and ``other_ms`` (evaluation, copies, checkpoints). ``busy`` is
    compute / step time."""
    out: dict[int, dict[str, float]] = {}
    for rank in sorted({e["pid"] for e in events if e.get("ph") == "X"}):
        mine = [e for e in events if e.get("ph") == "X" and e["pid"] == rank]
        steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in mine if e["cat"] == "step")
        steps = steps[1:] if len(steps) > 1 else steps   # the first traces and compiles
        total = sum(b - a for a, b in steps)
        ops = [(e["ts"], e["dur"]) for e in mine if e["cat"] == "op"]
        comm_ops = [(e["ts"], e["dur"]) for e in mine if e["cat"] == "comm" and e["tid"] ==
                    TRACKS["op"]]
        calls = [(e["ts"], e["dur"]) for e in mine if e["cat"] == "comm" and e["tid"] ==
                 TRACKS["comm"]]
        compute = _total_inside(ops, steps)
        fb = _total_inside([(e["ts"], e["dur"]) for e in mine if e["cat"] == "op" and
                            e["args"].get("action") in ("forward", "backward")], steps)
        # A collective node's time is its communication; calls made outside any node (a
        # pipeline's sends and receives) add theirs.
        inside_nodes = _total_inside(calls, sorted((s, s + d) for s, d in comm_ops))
        comm = _total_inside(comm_ops, steps) + _total_inside(calls, steps) - inside_nodes
        out[rank] = {
            "steps": len(steps),
            "step_ms": statistics.median([b - a for a, b in steps]) / 1e3 if steps else 0.0,
            "compute_ms": compute / 1e3, "comm_ms": comm / 1e3,
            "idle_ms": max(total - compute - comm, 0.0) / 1e3,
            "data_ms": sum(e["dur"] for e in mine if e["cat"] == "data") / 1e3,
            "other_ms": sum(e["dur"] for e in mine if e["cat"] in ("host", "io", "copy")) / 1e3,
            "busy": compute / total if total else 0.0,
            # a pipeline stage: the share of its steps spent outside its forward and backward
            # actions, the schedule's bubble as measured (communication counts as idle)
            "bubble": 1.0 - fb / total if total and fb else None,
        }
    return out


COLOURS = {"op": "#4c78a8", "comm": "#e45756", "data": "#72b7b2", "host": "#b279a2",
           "copy": "#b279a2", "io": "#9d755d", "gpu": "#54a24b", "step": "#dddddd"}


def plot(events: Sequence[Mapping[str, Any]], path: str, step: int | None = None) -> int:
    """Draw training step ``step`` (default: the middle one) of every rank as a timeline PNG
    (matplotlib): a row per rank and track, each span coloured by category. Returns the
    step drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = [e for e in events if e.get("ph") == "X"]
    ranks = sorted({e["pid"] for e in spans})
    steps = sorted({e["args"]["step"] for e in spans if e["cat"] == "step"})
    step = steps[len(steps) // 2] if step is None else step
    windows = {e["pid"]: (e["ts"], e["ts"] + e["dur"]) for e in spans
               if e["cat"] == "step" and e["args"]["step"] == step}
    start = min(w[0] for w in windows.values())
    end = max(w[1] for w in windows.values())
    tracks = [t for t in ("step", "op", "comm", "gpu") if any(e["tid"] == TRACKS[t]
                                                           for e in spans)]
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * len(ranks) * len(tracks)))
    labels = []
    for i, (rank, track) in enumerate((r, t) for r in ranks for t in tracks):
        labels.append(f"rank {rank} {track}")
        bars = [(e["ts"] - start, e["dur"], COLOURS.get(e["cat"], "#999999")) for e in spans
                if e["pid"] == rank and e["tid"] == TRACKS[track]
                and e["ts"] < end and e["ts"] + e["dur"] > start]
        if bars:
            ax.broken_barh([(x / 1e3, d / 1e3) for x, d, _ in bars], (i - 0.4, 0.8),
                           facecolors=[c for _, _, c in bars], linewidth=0)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, (end - start) / 1e3)
    ax.set_xlabel(f"ms since step {step} began")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[c]) for c in ("op", "comm", "step")]
    ax.legend(handles, ["compute node", "communication", "step"], loc="upper right",
              fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return step


def table(stats: Mapping[int, Mapping[str, float]]) -> str:
    """``summarize``'s figures, one line a rank."""
    lines = [f"{'rank':>4} {'steps':>5} {'step ms':>8} {'compute ms':>11} {'comm ms':>8} "
             f"{'idle ms':>8} {'busy':>5} {'data ms':>8} {'other ms':>9}"]
    for rank, s in stats.items():
        lines.append(f"{rank:>4} {s['steps']:>5} {s['step_ms']:>8.3f} {s['compute_ms']:>11.1f} "
                     f"{s['comm_ms']:>8.1f} {s['idle_ms']:>8.1f} {s['busy']:>5.0%} "
                     f"{s['data_ms']:>8.1f} {s['other_ms']:>9.1f}")
    return "\n".join(lines)


__all__ = ["COMM_OPS", "TRACKS", "TracedComm", "Tracer", "current", "merge", "rank_files",
           "plot", "span", "summarize", "table", "traced_iter", "tracing"]
