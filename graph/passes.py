"""Graph passes: pure Graph -> Graph rewrites (dead code, common subexpressions, constant
folding, a memory-friendly order) and the elementwise fusion analysis that executors and the
CUDA backend share.

No pass mutates its input. Imports graph.ir and ops.registry (to evaluate constants).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from shardgrad.graph.ir import Graph, Node, fmt_type
from shardgrad.ops.registry import is_effectful, is_elementwise, kernel_for

# Constant folding evaluates a node only when its result has at most this many elements, so a
# folded graph never carries large arrays. broadcast_to is never folded: a broadcast view of a
# small constant is cheaper to read than its materialization. Effectful ops (OpDef.effectful:
# communication, randomness) are never merged by cse nor folded.
FOLD_LIMIT = 4096


def _rebuild(n: Node, ins: tuple[Node, ...]) -> Node:
    if all(a is b for a, b in zip(ins, n.inputs, strict=True)):
        return n
    return Node(n.op, ins, n.attrs, n.shape, n.dtype, n.where)


def _sweep(graph: Graph, visit: Callable[[Node, tuple[Node, ...]], Node]) -> Graph:
    """Rebuild ``graph`` front to back: ``visit(node, new_inputs)`` returns the node that
    stands for ``node`` (itself, a rebuilt copy, an earlier node, a new leaf or new nodes
    built on the new inputs). Unlike
    ``rewrite.replace``, the original order is kept, so liveness is not reshuffled."""
    new: dict[int, Node] = {}
    order: list[Node] = []
    placed: set[int] = set()

    def put(m: Node) -> None:       # a new node may come with new inputs of its own
        if m.id not in placed:
            for x in m.inputs:
                put(x)
            placed.add(m.id)
            order.append(m)

    for n in graph.nodes:
        new[n.id] = visit(n, tuple(new[x.id] for x in n.inputs))
        put(new[n.id])
    outputs = {k: new[v.id] for k, v in graph.outputs.items()}
    return dce(Graph(outputs, order, dict(graph.meta)))


def dce(graph: Graph) -> Graph:
    """Drop every node no output needs (unused leaves included); order is kept."""
    live: set[int] = {n.id for n in graph.outputs.values()}
    for n in reversed(graph.nodes):
        if n.id in live:
            live.update(x.id for x in n.inputs)
    return Graph(graph.outputs, [n for n in graph.nodes if n.id in live], dict(graph.meta))


def _key(value: Any) -> Any:
    """A hashable, value-based key for an attribute (arrays by dtype, shape and bytes)."""
    if isinstance(value, np.ndarray | np.generic):
        arr = np.ascontiguousarray(value)
        return ("ndarray", str(arr.dtype), arr.shape, arr.tobytes())
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float) and value != value:
        return ("nan",)
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))  # unknown unhashable attribute: equal only to itself
    return (type(value).__name__, value)


def cse(graph: Graph) -> Graph:
    """Merge nodes that compute the same thing: same op, same (merged) inputs, equal attrs
    (constants compared by dtype, shape and bytes), same type. Leaves ``input``/``param``/
    ``state`` merge when their name and type agree. Effectful ops are never merged."""
    seen: dict[Any, Node] = {}

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        m = _rebuild(n, ins)
        if is_effectful(n.op):
            return m
        key = (n.op, tuple(x.id for x in ins), _key(n.attrs), n.shape, n.dtype)
        return seen.setdefault(key, m)

    return _sweep(graph, visit)


def fold_constants(graph: Graph, limit: int = FOLD_LIMIT) -> Graph:
    """Replace each node whose inputs are all constants and whose result has at most ``limit``
    elements by a ``const`` holding its value, computed with the op's NumPy forward (the same
    kernel the reference interpreter runs, so results are bitwise unchanged). A node whose
    kernel fails, or disagrees with its inferred type, is left for the executor to run."""

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        m = _rebuild(n, ins)
        if (not ins or n.op == "broadcast_to" or is_effectful(n.op) or n.size > limit
                or any(x.op != "const" for x in ins)):
            return m
        try:
            out = np.asarray(kernel_for(n, "cpu")(np, *[x.attrs["value"] for x in ins],
                                               **n.attrs))
        except Exception:  # noqa: BLE001 - left for the executor to report with its node
            return m
        if out.shape != n.shape or str(out.dtype) != n.dtype:
            return m
        return Node("const", (), {"value": np.array(out)}, n.shape, n.dtype, n.where)

    return _sweep(graph, visit)


def _transpose(x: Node, axes: tuple[int, ...], where: str) -> Node:
    """``x`` permuted by ``axes``, cancelling against a transpose it is made of."""
    if x.op == "transpose":
        axes = tuple(x.attrs["axes"][a] for a in axes)
        x = x.inputs[0]
    if axes == tuple(range(x.ndim)):
        return x
    return Node("transpose", (x,), {"axes": axes}, tuple(x.shape[a] for a in axes), x.dtype,
                where)


def fold_transposes(graph: Graph) -> Graph:
    """Transposes folded away: a transpose of a transpose composes (or cancels), and the
    transpose of a 2-d matmul used nowhere else becomes the matmul of the transposed operands,
    (A B)^T = B^T A^T, so the product is written in the layout its users read (BLAS takes
    transposed operands for free). The same dot products in another operand order: equal on
    the BLAS measured here, within rounding (1e-6 relative) in general."""
    users = graph.users()
    outputs = {o.id for o in graph.outputs.values()}

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        m = _rebuild(n, ins)
        if m.op != "transpose":
            return m
        x, axes, src = m.inputs[0], tuple(m.attrs["axes"]), n.inputs[0].id
        if (x.op == "matmul" and axes == (1, 0) and len(users[src]) == 1
                and src not in outputs and all(v.ndim == 2 for v in x.inputs)):
            a, b = x.inputs
            bt, at = _transpose(b, (1, 0), m.where), _transpose(a, (1, 0), m.where)
            return Node("matmul", (bt, at), {}, m.shape, m.dtype, x.where)
        return _transpose(x, axes, m.where) if x.op == "transpose" else m

    return _sweep(graph, visit)


def gemm_batch_sums(graph: Graph) -> Graph:
    """A batched matmul summed over its batch axis, sum_n A_n B_n, becomes one GEMM over the
    batch laid end to end, [A_0 .. A_N-1] (M, N*P) @ [B_0; ..; B_N-1] (N*P, K): a conv weight
    gradient, (N, O, P) @ (N, P, Cin*KH*KW) summed over N, no longer materializes the
    (N, O, Cin*KH*KW) products. Each operand is copied once into that layout: on the CPU
    BLAS measured here those copies cost more than the batched products they replace
    (bench_step's conv shapes: 0.15 vs 0.73 ms and 1.3 vs 1.7 ms), so the GPU step runs
    this pass and the CPU programs do not. The same dot products summed in another order."""
    users = graph.users()
    outputs = {o.id for o in graph.outputs.values()}

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        m = _rebuild(n, ins)
        if m.op != "sum" or m.attrs.get("keepdims") or m.attrs.get("axis") not in ((0,), 0):
            return m
        x, src = m.inputs[0], n.inputs[0].id
        if (x.op != "matmul" or len(users[src]) != 1 or src in outputs or x.dtype != m.dtype
                or any(v.ndim != 3 for v in x.inputs)
                or x.inputs[0].shape[0] != x.inputs[1].shape[0]):
            return m
        a, b = x.inputs
        (nb, rows, p), k = a.shape, b.shape[2]
        at = _transpose(a, (1, 0, 2), m.where)
        a2 = Node("reshape", (at,), {"shape": (rows, nb * p)}, (rows, nb * p), a.dtype, m.where)
        b2 = Node("reshape", (b,), {"shape": (nb * p, k)}, (nb * p, k), b.dtype, m.where)
        return Node("matmul", (a2, b2), {}, m.shape, m.dtype, x.where)

    return _sweep(graph, visit)


def gemm_epilogues(graph: Graph) -> Graph:
    """A linear layer's forward as one op a GPU library runs as one GEMM with its epilogue:
    ``add(matmul(x, w), b)`` (2-d x and w, b the (N,) bias, the product used nowhere else)
    becomes ``matmul_bias_act(x, w, b, act="none")``, and with the ``relu`` that is its only
    other reader, ``act="relu"``: relu's backward reads ``step(z)``, which is
    ``step(relu(z))`` (relu(z) > 0 exactly where z > 0), so it reads the fused output and z
    is never stored. Other activations keep z for their backward: BIAS alone."""
    users = graph.users()
    outputs = {o.id for o in graph.outputs.values()}

    def linear(n: Node) -> bool:
        if n.op != "add" or n.id in outputs or len(n.inputs) != 2:
            return False
        m, b = n.inputs
        return (m.op == "matmul" and m.id not in outputs and len(users[m.id]) == 1
                and all(v.ndim == 2 for v in m.inputs) and b.shape == (n.shape[-1],)
                and m.shape == n.shape and len({m.dtype, b.dtype, *(v.dtype for v in m.inputs)})
                == 1 and n.dtype in ("float32", "float64"))

    fused_relu: dict[int, int] = {}      # z (the add) -> the relu that takes it in
    for n in graph.nodes:
        if linear(n):
            readers = users[n.id]
            relus = [u for u in readers if u.op == "relu"]
            if len(relus) == 1 and all(u.op == "step" for u in readers if u is not relus[0]):
                fused_relu[n.id] = relus[0].id
    relu_of = {r: z for z, r in fused_relu.items()}
    new_relu: dict[int, Node] = {}

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        if n.id in fused_relu:
            return _rebuild(n, ins)             # dead once its relu and steps read the fusion
        if n.id in relu_of:
            z = n.inputs[0]
            (m, b) = z.inputs
            mi = tuple(visit_map[x.id] for x in m.inputs) + (visit_map[b.id],)
            fused = Node("matmul_bias_act", mi, {"act": "relu"}, n.shape, n.dtype, m.where)
            new_relu[z.id] = fused
            return fused
        if n.op == "step" and n.inputs[0].id in fused_relu:
            z = n.inputs[0]
            if z.id in new_relu:
                return Node("step", (new_relu[z.id],), n.attrs, n.shape, n.dtype, n.where)
        m = _rebuild(n, ins)
        if linear(n) and n.id not in fused_relu:
            (mm, b), (_, nb) = n.inputs, ins
            mi = tuple(visit_map[x.id] for x in mm.inputs) + (nb,)
            return Node("matmul_bias_act", mi, {"act": "none"}, n.shape, n.dtype, mm.where)
        return m

    visit_map: dict[int, Node] = {}

    def record(n: Node, ins: tuple[Node, ...]) -> Node:
        visit_map[n.id] = out = visit(n, ins)
        return out

    return _sweep(graph, record)


def conv_library(graph: Graph) -> Graph:
    """conv2d's traced pieces as the three calls a convolution library makes: the forward
    ``reshape(matmul(reshape(w), reshape(im2col(x))))`` becomes ``conv_fprop(x, w)``, the input
    gradient ``col2im(reshape(matmul(transpose(reshape(w)), g)))`` ``conv_dgrad(g, w)``, and
    the weight gradient ``reshape(sum(matmul(g, transpose(reshape(im2col(x)))), 0))``
    ``conv_wgrad(x, g)`` (run it before gemm_batch_sums), each where its intermediate values
    feed nothing else; im2col is left to the pieces that still read it. Groups of 1 only."""
    users = graph.users()
    outputs = {o.id for o in graph.outputs.values()}
    new: dict[int, Node] = {}

    def only(n: Node) -> bool:
        return len(users[n.id]) == 1 and n.id not in outputs

    def cols_of(r: Node):           # reshape(im2col(x), (N, C*KH*KW, P)) -> the im2col
        if r.op == "reshape" and r.inputs[0].op == "im2col" and r.ndim == 3:
            return r.inputs[0]
        return None

    def weight_of(r: Node):         # reshape(w, (O, C*KH*KW)) of a 4-d w -> w
        if r.op == "reshape" and r.inputs[0].ndim == 4 and r.ndim == 2:
            return r.inputs[0]
        return None

    def grad4(g3: Node, shape: tuple[int, ...]) -> Node:    # g (N, O, P) -> (N, O, OH, OW)
        if g3.op == "reshape" and g3.inputs[0].shape == shape:
            return new[g3.inputs[0].id]
        return Node("reshape", (new[g3.id],), {"shape": shape}, shape, g3.dtype, g3.where)

    def window(c: Node) -> dict[str, Any]:
        return {"stride": tuple(c.attrs["stride"]), "padding": tuple(c.attrs["padding"])}

    def visit(n: Node) -> Node | None:
        if n.op == "reshape" and n.ndim == 4 and n.inputs[0].op == "matmul":
            m = n.inputs[0]
            a, b = m.inputs
            c, w = cols_of(b), weight_of(a)
            if c is not None and w is not None and only(m) and w.shape[2:] == tuple(
                    c.attrs["kernel"]) and n.shape[1] == w.shape[0]:
                x = c.inputs[0]
                return Node("conv_fprop", (new[x.id], new[w.id]), window(c), n.shape, n.dtype,
                            n.where)
        if n.op == "col2im" and n.inputs[0].op == "reshape":
            r = n.inputs[0]
            m = r.inputs[0]
            if (m.op == "matmul" and only(r) and only(m) and m.inputs[0].op == "transpose"
                    and m.inputs[0].attrs["axes"] == (1, 0) and m.inputs[1].ndim == 3):
                w = weight_of(m.inputs[0].inputs[0])
                if w is not None and w.shape[2:] == tuple(n.attrs["kernel"]):
                    g3 = m.inputs[1]
                    shape = (g3.shape[0], g3.shape[1], *r.shape[-2:])
                    return Node("conv_dgrad", (grad4(g3, shape), new[w.id]),
                                {**window(n), "shape": tuple(n.attrs["shape"])}, n.shape,
                                n.dtype, n.where)
        if n.op == "reshape" and n.ndim == 4 and n.inputs[0].op == "sum":
            s_ = n.inputs[0]
            m = s_.inputs[0]
            if (s_.attrs.get("axis") in ((0,), 0) and not s_.attrs.get("keepdims") and only(s_)
                    and m.op == "matmul" and only(m) and m.inputs[1].op == "transpose"
                    and m.inputs[1].attrs["axes"] == (0, 2, 1)):
                c = cols_of(m.inputs[1].inputs[0])
                g3 = m.inputs[0]
                if c is not None and tuple(c.attrs["kernel"]) == n.shape[2:]:
                    x = c.inputs[0]
                    shape = (g3.shape[0], g3.shape[1], *c.shape[-2:])
                    return Node("conv_wgrad", (new[x.id], grad4(g3, shape)),
                                {**window(c), "kernel": tuple(c.attrs["kernel"])}, n.shape,
                                n.dtype, n.where)
        return None

    def record(n: Node, ins: tuple[Node, ...]) -> Node:
        new[n.id] = visit(n) or _rebuild(n, ins)
        return new[n.id]

    return _sweep(graph, record)


def simplify(graph: Graph) -> Graph:
    """``cse(fold_constants(dce(graph)))``: what every executor runs before planning."""
    return cse(fold_constants(dce(graph)))


def schedule(graph: Graph) -> Graph:
    """The same graph in a memory-friendlier order: a node that feeds exactly one output (an
    optimizer update and the gradient matmul that feeds it, the loss tail) runs as soon as
    its inputs exist, so a gradient dies right after it is made instead of living until the
    update block at the end; every other node keeps its relative order."""
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    reach: dict[int, frozenset[str]] = {}
    outs_of: dict[int, set[str]] = {}
    for k, o in graph.outputs.items():
        outs_of.setdefault(o.id, set()).add(k)
    for n in reversed(graph.nodes):
        r = set(outs_of.get(n.id, ()))
        for u in users[n.id]:
            r |= reach[u.id]
        reach[n.id] = frozenset(r)
    waiting = {n.id: len({x.id for x in n.inputs}) for n in graph.nodes}
    ready: list[tuple[int, int, Node]] = []
    order: list[Node] = []

    def place(n: Node) -> None:
        order.append(n)
        for u in {u.id: u for u in users[n.id]}.values():
            waiting[u.id] -= 1
            if waiting[u.id] == 0:
                heapq.heappush(ready, (0 if len(reach[u.id]) == 1 else 1, pos[u.id], u))

    for n in graph.nodes:
        if not n.inputs:                 # leaves cost nothing: all of them first
            place(n)
    while ready:
        place(heapq.heappop(ready)[2])
    return Graph(graph.outputs, order, dict(graph.meta))


# ---- elementwise fusion ----------------------------------------------------------------------

class Step(NamedTuple):
    """One line of a fused kernel: ``op(*args, **attrs)``. An arg ``j`` below
    ``len(group.inputs)`` names ``group.inputs[j]``; otherwise it names the member
    ``group.nodes[j - len(group.inputs)]``."""

    op: str
    args: tuple[int, ...]
    attrs: dict[str, Any]


@dataclass(frozen=True, eq=False)
class FusionGroup:
    """A region of elementwise nodes that can run as one kernel over one index space.

    nodes    the members, in topological order; all have the same ``shape``.
    inputs   the values the group reads from outside it, each broadcastable to ``shape``
             (constants included: a backend may inline 0-d ones).
    outputs  the members whose value is needed outside the group (by another node or as a
             graph output); every other member is an intermediate a kernel keeps in registers.
    shape    the common output shape: one thread (or one loop iteration) per element.
    expr     the expression DAG, one Step per member: ``expr[k]`` computes ``nodes[k]``.

    The region is convex: no path leaves it and comes back, so running it as one kernel at
    the position of its last member respects every dependency.
    """

    nodes: tuple[Node, ...]
    inputs: tuple[Node, ...]
    outputs: tuple[Node, ...]
    shape: tuple[int, ...]
    expr: tuple[Step, ...]

    def __str__(self) -> str:
        k = len(self.inputs)
        names = [f"in{j}" for j in range(k)] + [f"t{j}" for j in range(len(self.nodes))]
        body = "; ".join(
            f"t{j} = {s.op}({', '.join(names[a] for a in s.args)}"
            + "".join(f", {a}={v!r}" for a, v in sorted(s.attrs.items())) + ")"
            for j, s in enumerate(self.expr))
        outs = ", ".join(names[k + self.nodes.index(o)] for o in self.outputs)
        ins = ", ".join(f"in{j}: {fmt_type(x.shape, x.dtype)}" for j, x in enumerate(self.inputs))
        return f"fused[{','.join(map(str, self.shape))}]({ins}) {{ {body} }} -> ({outs})"


def _convex(members: set[int], pos: dict[int, int], users: dict[int, list[Node]]) -> bool:
    """True if no path leaves ``members`` and re-enters them."""
    last = max(pos[i] for i in members)
    stack = [u for i in members for u in users[i] if u.id not in members]
    seen: set[int] = set()
    while stack:
        u = stack.pop()
        if u.id in seen or pos[u.id] > last:
            continue
        seen.add(u.id)
        for v in users[u.id]:
            if v.id in members:
                return False
            stack.append(v)
    return True


def _break_group_cycles(graph: Graph, members: dict[int, set[int]], group_of: dict[int, int],
                        pos: dict[int, int]) -> None:
    """Groups that are each convex can still depend on each other both ways (group A reads
    what B computes and B reads what A computes: no order runs them as one kernel each).
    While the graph of groups has a cycle, the earliest group left in it is split back into
    single nodes (which the acyclic graph itself orders). Kahn's algorithm over the groups."""
    while True:
        unit = {n.id: group_of.get(n.id, -1 - n.id) for n in graph.nodes}
        deps: dict[int, set[int]] = {u: set() for u in unit.values()}
        for n in graph.nodes:
            deps[unit[n.id]].update(unit[x.id] for x in n.inputs if unit[x.id] != unit[n.id])
        users: dict[int, list[int]] = {u: [] for u in deps}
        for u, ds in deps.items():
            for d in ds:
                users[d].append(u)
        waiting = {u: len(ds) for u, ds in deps.items()}
        ready = [u for u, k in waiting.items() if k == 0]
        while ready:
            u = ready.pop()
            for v in users[u]:
                waiting[v] -= 1
                if waiting[v] == 0:
                    ready.append(v)
        stuck = [g for g, k in waiting.items() if k and g in members and len(members[g]) > 1]
        if not stuck:
            return
        g = min(stuck, key=lambda g: min(pos[i] for i in members[g]))
        for i in members.pop(g):
            group_of[i] = i
            members[i] = {i}


def fusion_groups(graph: Graph) -> list[FusionGroup]:
    """Partition the elementwise nodes of ``graph`` into convex same-shape FusionGroups
    (singletons included), ordered by the position of each group's last member.

    Greedy, producer into consumer, walking the graph backwards (as XLA's instruction fusion):
    a node joins the group of its earliest same-shape elementwise user when the result stays
    convex; a node with users elsewhere becomes one of that group's outputs. Groups that
    would depend on each other both ways are split (``_break_group_cycles``).
    """
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    out_ids = {n.id for n in graph.outputs.values()}
    group_of: dict[int, int] = {}
    members: dict[int, set[int]] = {}
    for n in reversed(graph.nodes):
        if not is_elementwise(n.op):
            continue
        cands: list[int] = []
        for u in sorted(users[n.id], key=lambda u: pos[u.id]):
            g = group_of.get(u.id)
            if g is not None and g not in cands and u.shape == n.shape:
                cands.append(g)
        for g in cands:
            trial = members[g] | {n.id}
            if _convex(trial, pos, users):
                members[g] = trial
                group_of[n.id] = g
                break
        else:
            group_of[n.id] = n.id
            members[n.id] = {n.id}
    _break_group_cycles(graph, members, group_of, pos)
    groups = []
    for ids in members.values():
        nodes = tuple(sorted((graph.nodes[pos[i]] for i in ids), key=lambda m: pos[m.id]))
        inputs: list[Node] = []
        for m in nodes:
            for x in m.inputs:
                if x.id not in ids and x not in inputs:
                    inputs.append(x)
        index = {x.id: j for j, x in enumerate(inputs)}
        index.update({m.id: len(inputs) + j for j, m in enumerate(nodes)})
        expr = tuple(Step(m.op, tuple(index[x.id] for x in m.inputs), dict(m.attrs))
                     for m in nodes)
        outputs = tuple(m for m in nodes if m.id in out_ids
                        or any(u.id not in ids for u in users[m.id]))
        groups.append(FusionGroup(nodes, tuple(inputs), outputs, nodes[-1].shape, expr))
    groups.sort(key=lambda g: pos[g.nodes[-1].id])
    return groups


# ---- mixed precision ---------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def low_dtype(precision: str) -> str | None:
    """The storage dtype of ``precision`` ("fp32" | "bf16" | "fp16"): None for fp32. bfloat16
    is NumPy's through ml_dtypes (which CuPy uses too); a missing package or an unknown name
    is a ValueError of one line."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        try:
            import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy
        except ImportError:
            raise ValueError("precision = 'bf16' needs ml_dtypes: pip install ml_dtypes") from None
    return PRECISIONS[precision]


def autocast(graph: Graph, precision: str, emulate: bool = False) -> Graph:
    """Mixed precision as a rewrite: every float32 matmul (the linear layers, and conv2d's
    im2col product, forward and backward) reads its operands rounded to ``precision``'s
    dtype and gives its product in it, then cast back to float32; everything else (master
    weights, optimizer, reductions, softmax, the loss) stays float32, as torch.autocast.
    ``emulate`` (the CPU): the product is computed in float32 from the rounded operands and
    rounded itself (cast there and back), which is what a low-precision GEMM accumulating in
    float32 gives, without NumPy's slow float16/bfloat16 loops; else the matmul runs in the
    low dtype (cuBLAS accumulates in float32). ``fp32`` returns ``graph`` unchanged."""
    low = low_dtype(precision)
    if low is None:
        return graph
    from shardgrad.ops.elementwise import cast
    from shardgrad.ops.linalg import matmul

    def visit(n: Node, ins: tuple[Node, ...]) -> Node:
        if n.op != "matmul" or n.dtype != "float32":
            return _rebuild(n, ins)
        a, b = (cast(x, low) for x in ins)
        if emulate:
            a, b = cast(a, n.dtype), cast(b, n.dtype)
            return cast(cast(matmul(a, b), low), n.dtype)
        return cast(matmul(a, b), n.dtype)

    out = _sweep(graph, visit)
    out.meta["precision"] = precision
    return out
