"""Data parallelism as a pure graph rewrite: every rank runs the training step on its share of
the global batch; the step's gradients (and its loss and batch statistics) are averaged over
the ranks before the optimizer update, through collective op nodes. Imports graph and ops.

Default mode packs the values to average into static buckets in the order they become
ready, one flat buffer and one allreduce per bucket. Deterministic mode computes a fixed
number of chunk gradients and sums them along one fixed tree (locally where a rank holds
both halves of a sum, after an allgather where it does not), so the result does not depend
on how many ranks share the work.
"""

from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass, field

from shardgrad.graph.ir import Graph, Node, ShapeError, ancestors, const, descendants, leaf
from shardgrad.graph.rewrite import replace
from shardgrad.ops.collective import (
    allgather,
    allreduce,
    batch_chunk,
    pack,
    unpack,
)
from shardgrad.ops.nn import sync_batch_stats
from shardgrad.ops.registry import apply, itemsize
from shardgrad.partition.plan import Bucket, Plan

# PyTorch DDP's bucket_cap_mb default. On 2 ranks here one 2.7 MB buffer reduces in 0.5 ms
# and 64 KB buckets cost 1.9x a single buffer, so fewer, larger buckets win.
DEFAULT_BUCKET_BYTES = 25 * 2**20
DATA_INPUTS = ("x", "y")


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel rewrite as a step transform (``compile_step(transform=...)``).

    ``split`` tells the step how much smaller than the local batch the traced batch must
    be: deterministic mode traces one chunk and repeats it ``chunks // world_size`` times.
    """

    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    deterministic: bool = False
    chunks: int = 4
    overlap: bool = False
    group: str = "world"
    sync_batchnorm: bool = True
    plans: list[Plan] = field(default_factory=list, compare=False, repr=False)

    def trace_context(self) -> contextlib.AbstractContextManager:
        """The context the step is traced in: batch_norm statistics over the global batch
        (SyncBatchNorm), unless switched off or in deterministic mode, whose result must not
        depend on how chunks map to ranks (there each chunk keeps its own statistics)."""
        if self.sync_batchnorm and not self.deterministic and self.world_size > 1:
            return sync_batch_stats(self.group, self.world_size)
        return contextlib.nullcontext()

    @property
    def split(self) -> int:
        return self.chunks // self.world_size if self.deterministic else 1

    def plan(self, graph: Graph) -> Plan:
        return data_parallel(graph, self.world_size, self.bucket_bytes, self.deterministic,
                             self.chunks, self.overlap, self.group)

    def __call__(self, graph: Graph) -> Graph:
        plan = self.plan(graph)
        self.plans.append(plan)
        return plan.graph


def data_parallel(graph: Graph, world_size: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  deterministic: bool = False, chunks: int = 4, overlap: bool = False,
                  group: str = "world") -> Plan:
    """The plan that runs the training-step ``graph`` (from ``trace_step``) on ``world_size``
    data-parallel ranks, each feeding its local batch (global batch / world_size).

    Outputs keep their names and meanings for the global batch: ``loss`` and ``grad/<p>``
    become averages over the ranks, ``param/<p>`` and ``state/...`` the updates made with
    them; batch statistics (``state/<buffer>`` that depend on the data) are averaged too,
    unless the graph was traced with them synchronised (meta ``batch_stats_synced``).

    Default mode: those values are packed, in the order they become ready, into buckets of
    at most ``bucket_bytes`` (one dtype each; a bigger single value gets its own), each
    scaled by 1/world_size as it is packed and allreduced in place, then unpacked as views.
    A bucket is issued right after its last value is computed; ``overlap`` issues a
    non-blocking allreduce there and waits for it only before the first update that reads it.

    Deterministic mode: ``graph`` must be traced on one chunk, 1/``chunks`` of the global
    batch. Each rank runs it on ``chunks // world_size`` chunks of its local batch (chunk k
    of the global batch is its rows k, k + chunks, ...; with runtime.data's strided sampler
    that chunk is on rank k % world_size). The chunk results are summed along one tree
    (while the count L of partial sums is even, partial j += partial j + L/2; then left to
    right), each rank folding what it holds and gathering the rest: the same additions in
    the same order, so the same bits, whatever ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    check_step(graph)
    options = {"mode": "deterministic" if deterministic else "allreduce", "group": group}
    if deterministic:
        if chunks < 1 or chunks % world_size:
            raise ValueError(f"deterministic data parallelism needs chunks ({chunks}) to be a "
                             f"positive multiple of world_size ({world_size})")
        options["chunks"] = chunks
        return Plan("data_parallel", world_size,
                    _deterministic(graph, world_size, chunks, group), [], options)
    options.update(bucket_bytes=bucket_bytes, overlap=overlap)
    if world_size == 1:
        return Plan("data_parallel", 1, graph, [], options)
    new, buckets = bucketed(graph, world_size, bucket_bytes, overlap, group)
    return Plan("data_parallel", world_size, new, buckets, options)


def check_step(graph: Graph) -> None:
    """Raise ShapeError unless ``graph`` is a training step whose gradients can be averaged
    over ranks: it outputs ``loss`` and ``grad/<p>`` for each of ``meta["params"]``, and its
    loss is a mean over the batch."""
    missing = [k for k in ["loss"] + [f"grad/{p}" for p in graph.meta.get("params", [])]
               if k not in graph.outputs]
    if "params" not in graph.meta or missing:
        raise ShapeError(f"data_parallel needs a training-step graph (trace_step): outputs "
                         f"loss and grad/<param> for each of meta['params']; missing {missing}")
    if graph.meta.get("loss_scale", "mean") != "mean":
        raise ShapeError("data_parallel averages gradients, so the loss must be a mean over "
                         f"the batch; this graph's loss_scale is {graph.meta['loss_scale']!r}")


def _averaged(graph: Graph) -> list[tuple[Node, list[str]]]:
    """The nodes to average over ranks, each with the output names it stands for: the loss,
    the gradients and the data-dependent floating-point state updates (batch statistics)."""
    data = descendants(graph.nodes, [n for n in graph.inputs if n.name in DATA_INPUTS])
    names = ["loss"] + [f"grad/{p}" for p in graph.meta["params"]]
    synced = graph.meta.get("batch_stats_synced", False)   # already global: nothing to average
    names += [k for k in graph.outputs if k.startswith("state/") and not synced
              and not k.startswith("state/optim/") and graph.outputs[k].id in data
              and graph.outputs[k].dtype.startswith("float")]
    items: dict[int, tuple[Node, list[str]]] = {}
    for k in names:
        node = graph.outputs[k]
        items.setdefault(node.id, (node, []))[1].append(k)
    grads = {graph.outputs[f"grad/{p}"].id for p in graph.meta["params"]}
    inside = ancestors([n for n, _ in items.values()])
    for n in graph.nodes:
        if n.id in inside and n.id not in grads and any(x.id in grads for x in n.inputs):
            raise ShapeError(f"a gradient feeds another averaged value (node {n.op} at "
                             f"{n.where}): data_parallel cannot average it only once")
    return list(items.values())


def averaged_outputs(graph: Graph) -> list[str]:
    """The output names data parallelism averages over the ranks: the loss, every gradient
    and the data-dependent batch statistics (unless traced synchronised). A GPU step that
    reduces its flat gradient buffer itself (runtime.gpu_step) averages these."""
    check_step(graph)
    return [k for _, names in _averaged(graph) for k in names]


def contiguous_source(node: Node, users: dict[int, list[Node]]
                      ) -> tuple[Node, tuple[int, ...] | None]:
    """What to pack for ``node`` so that packing is a plain copy, and the transpose to apply
    after unpacking (None: none). nn.Linear's weight gradient is the transpose of a 2-d matmul
    used nowhere else: it becomes the product of the transposed operands, (A B)^T = B^T A^T,
    written in the layout it is read in (passes.fold_transposes' rule; BLAS takes transposed
    operands for free). Any other transpose is packed untransposed and transposed back after
    the reduction, which commutes with it. A transposing copy costs 3-4x a plain one here."""
    if node.op != "transpose":
        return node, None
    x, axes = node.inputs[0], tuple(node.attrs["axes"])
    if x.op == "matmul" and axes == (1, 0) and len(users[x.id]) == 1 and all(
            v.ndim == 2 for v in x.inputs):
        a, b = x.inputs
        return apply("matmul", apply("transpose", b, axes=(1, 0)),
                     apply("transpose", a, axes=(1, 0))), None
    return x, axes


def _unpacked(flat: Node, offset: int, src: Node, axes: tuple[int, ...] | None) -> Node:
    view = unpack(flat, offset, src.shape)
    return view if axes is None else apply("transpose", view, axes=axes)


def _schedule(outputs: dict[str, Node], priority: dict[int, float]) -> list[Node]:
    """Every node the outputs need, inputs first, otherwise in ascending ``priority``
    (unlisted nodes: by id, after the listed ones)."""
    nodes = {n.id: n for n in _walk(outputs.values())}
    users: dict[int, list[Node]] = {i: [] for i in nodes}
    waiting = {}
    for n in nodes.values():
        ins = {x.id for x in n.inputs}
        waiting[n.id] = len(ins)
        for i in ins:
            users[i].append(n)
    key = lambda n: (priority.get(n.id, float("inf")), n.id)
    ready = [(key(n), n.id) for n in nodes.values() if waiting[n.id] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(nodes[nid])
        for u in users[nid]:
            waiting[u.id] -= 1
            if waiting[u.id] == 0:
                heapq.heappush(ready, (key(u), u.id))
    return order


def _walk(outputs) -> list[Node]:
    seen: dict[int, Node] = {}
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n.id not in seen:
            seen[n.id] = n
            stack.extend(n.inputs)
    return list(seen.values())


def bucketed(graph: Graph, world_size: int, bucket_bytes: int, overlap: bool, group: str,
             grads: bool = True) -> tuple[Graph, list[Bucket]]:
    """``graph`` with the values it averages over ``group`` (the loss, batch statistics and,
    with ``grads``, the gradients) packed in order of readiness into buckets of at most
    ``bucket_bytes`` per dtype, each scaled by 1/``world_size`` and allreduced (``overlap``:
    started when ready, waited for before the first update that reads it); returns the new
    graph and its buckets. ``grads=False`` leaves the gradients to the caller (ZeRO
    reduce-scatters them)."""
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    names = graph.names()
    grad_ids = {graph.outputs[f"grad/{p}"].id for p in graph.meta["params"]}
    items = sorted([item for item in _averaged(graph) if grads or item[0].id not in grad_ids],
                   key=lambda item: pos[item[0].id])
    groups: list[list[tuple[Node, list[str]]]] = []
    open_by_dtype: dict[str, list] = {}
    for node, outs in items:
        cur = open_by_dtype.get(node.dtype)
        nbytes = node.size * itemsize(node.dtype)
        if cur is None or sum(n.size for n, _ in cur) * itemsize(node.dtype) + nbytes > \
                bucket_bytes:
            cur = open_by_dtype[node.dtype] = []
            groups.append(cur)
        cur.append((node, outs))

    users = graph.users()
    averaged_ids = {n.id for n, _ in items}
    feeding = ancestors([n for n, _ in items])
    priority: dict[int, float] = {n.id: float(i) for i, n in enumerate(graph.nodes)}
    reduced: dict[int, Node] = {}
    buckets = []
    for b, members in enumerate(groups):
        ready = max(pos[n.id] for n, _ in members)
        sources = [contiguous_source(n, users) for n, _ in members]
        for (n, _), (src, _) in zip(members, sources, strict=True):
            for m in _walk([src]):  # nodes made for the source run where the value did
                if m.id not in pos:
                    priority[m.id] = pos[n.id] - 0.5
        flat = pack([src for src, _ in sources], scale=1.0 / world_size)
        if overlap:
            started = apply("allreduce_start", flat, op="sum", group=group, tag=b, inplace=True)
            out = apply("allreduce_wait", started, tag=b)
            first_use = min([pos[u.id] for n, _ in members for u in users[n.id]
                             if u.id not in feeding and u.id not in averaged_ids],
                            default=len(graph.nodes))
            priority.update({flat.id: ready + 0.5, started.id: ready + 0.5})
            late = first_use - 0.5
        else:
            out = allreduce(flat, "sum", group, inplace=True)
            priority.update({flat.id: ready + 0.5})
            late = ready + 0.5
        priority[out.id] = late
        offset = 0
        for (n, _), (src, axes) in zip(members, sources, strict=True):
            reduced[n.id] = _unpacked(out, offset, src, axes)
            priority.update({reduced[n.id].id: late, reduced[n.id].inputs[0].id: late})
            offset += n.size
        buckets.append(Bucket(b, members[0][0].dtype,
                              tuple(k for _, outs in members for k in outs),
                              tuple(n.size for n, _ in members),
                              f"{names[graph.nodes[ready].id]} = {graph.nodes[ready].op}"))

    grads = {graph.outputs[f"grad/{p}"].id for p in graph.meta["params"]}

    def rebuild(old: Node, ins: tuple[Node, ...]) -> Node:
        new = Node(old.op, ins, old.attrs, old.shape, old.dtype, old.where)
        priority[new.id] = priority[old.id]
        return new

    new = replace(graph, {i: v for i, v in reduced.items() if i in grads}, rebuild)
    outputs = dict(new.outputs)
    for node, outs in items:
        for k in outs:
            outputs[k] = reduced[node.id]
    meta = dict(graph.meta, data_parallel={"world_size": world_size, "mode": "allreduce",
                                           "buckets": len(buckets), "overlap": overlap})
    return Graph(outputs, _schedule(outputs, priority), meta), buckets


def _fold(parts: list[list[Node]], half: int) -> list[list[Node]]:
    """Partial j becomes partial j + partial j + half, value by value."""
    return [[a + b for a, b in zip(parts[j], parts[j + half], strict=True)]
            for j in range(half)]


def _deterministic(graph: Graph, world_size: int, chunks: int, group: str) -> Graph:
    # The sum over chunks follows one tree, whatever world_size: while the count L of partial
    # sums is even, partial j += partial j + L/2; then the rest left to right. Chunk j lives
    # on rank j % world_size, so every fold whose stride L/2 is a multiple of world_size pairs
    # two partials of the same rank: those run locally, before anything is gathered.
    n_ranks, m = world_size, chunks // world_size
    data = {n.name: n for n in graph.inputs if n.name in DATA_INPUTS}
    if set(data) != set(DATA_INPUTS):
        raise ShapeError(f"deterministic data parallelism needs inputs {DATA_INPUTS}; the graph "
                         f"has {sorted(n.name for n in graph.inputs)}")
    full = {k: leaf("input", (x.shape[0] * m,) + x.shape[1:], x.dtype, name=k)
            for k, x in data.items()}
    items = _averaged(graph)
    users = graph.users()
    sources = [contiguous_source(n, users) for n, _ in items]
    one = Graph({str(j): src for j, (src, _) in enumerate(sources)})
    parts = []  # parts[i]: this rank's partial i, i.e. chunk (rank + i * world_size)
    for i in range(m):
        sub = replace(one, {x.id: batch_chunk(full[k], i, m) for k, x in data.items()})
        parts.append([sub.outputs[str(j)] for j in range(len(items))])
    count = chunks
    while count % 2 == 0 and (count // 2) % n_ranks == 0:
        parts = _fold(parts, count // (2 * n_ranks))
        count //= 2
    if n_ranks > 1:
        per_rank = count // n_ranks
        gathered = allgather(pack([v for part in parts for v in part]), n_ranks, group)
        size = sum(src.size for src, _ in sources)
        parts = []
        for j in range(count):  # partial j came from rank j % n_ranks, its (j // n_ranks)-th
            offset = ((j % n_ranks) * per_rank + j // n_ranks) * size
            row = []
            for src, _ in sources:
                row.append(unpack(gathered, offset, src.shape))
                offset += src.size
            parts.append(row)
    while count % 2 == 0:
        parts = _fold(parts, count // 2)
        count //= 2
    total = parts[0]
    for part in parts[1:]:
        total = [a + b for a, b in zip(total, part, strict=True)]
    reduced = {}
    for (node, _), (_, axes), value in zip(items, sources, total, strict=True):
        mean = value * const(1.0 / chunks, dtype=value.dtype)
        reduced[node.id] = mean if axes is None else apply("transpose", mean, axes=axes)
    grads = {graph.outputs[f"grad/{p}"].id for p in graph.meta["params"]}
    new = replace(graph, {i: v for i, v in reduced.items() if i in grads})
    outputs = dict(new.outputs)
    for node, outs in items:
        for k in outs:
            outputs[k] = reduced[node.id]
    result = Graph(outputs, meta=dict(graph.meta, data_parallel={
        "world_size": world_size, "mode": "deterministic", "chunks": chunks}))
    stale = [n for n in result.inputs if n.name in DATA_INPUTS and n is not full[n.name]]
    if stale:
        raise ShapeError("the optimizer update reads the batch other than through the "
                         "gradients; deterministic data parallelism cannot chunk it")
    return result
