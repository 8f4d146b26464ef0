"""The IR: a frozen Node (op, inputs, attrs, shape, dtype) and an ordered SSA Graph.

This is the bottom layer: it imports only NumPy and the standard library. Ops are passed in
as OpDef-like objects (anything with ``name`` and ``infer``), so the op library can depend on
this module and never the other way round.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

_ids = itertools.count()
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CORE_DIRS = (os.path.join(_PKG_DIR, "graph", ""), os.path.join(_PKG_DIR, "ops", ""))

DTYPE_SHORT = {"float16": "f16", "float32": "f32", "float64": "f64", "int32": "i32",
               "int64": "i64", "bool": "b1", "uint8": "u8", "uint64": "u64"}

# Operator overloads on Node dispatch through this table, filled by ops.registry; the IR
# itself knows no op.
BUILDERS: dict[str, Callable[..., Node]] = {}


class ShapeError(ValueError):
    """A program that cannot be built: bad shapes, dtypes, unknown ops or gradients asked of
    something that has none. The message names the op, the node, the shapes and the user's
    source line."""


# A source site is kept raw, as (file, line), and formatted only when read (Node.where,
# user_frame): formatting every eager op's site was a tenth of its dispatch, and most sites
# are never read.
Site = str | tuple[str, int]
_where_stack: list[Site] = []


class located:
    """Nodes emitted inside take ``where`` (a 'file:line' string, or a node's raw site) as
    their source line: autodiff uses it so a gradient node points at the user line of the
    forward node it differentiates. A class, not a generator: it wraps every VJP."""

    __slots__ = ("where",)

    def __init__(self, where: Site):
        self.where = where

    def __enter__(self) -> None:
        _where_stack.append(self.where)

    def __exit__(self, *exc: Any) -> None:
        _where_stack.pop()


def _format_site(site: Site) -> str:
    if isinstance(site, str):
        return site
    fn, line = site
    return f"{os.path.relpath(fn) if not os.path.isabs(fn) else fn}:{line}"


def _frame_at(f) -> tuple[str, int]:
    return (f.f_code.co_filename, f.f_lineno)


_USER_DIRS = tuple(os.path.join(_PKG_DIR, d) for d in ("tests", "examples", "bench"))
# file name -> "core" (graph/, ops/), "pkg" (the rest of shardgrad), "skip" (the console
# script's stub, importlib) or "user": every eager op walks the stack, and classifying each
# frame's file anew (os.path.join per frame) was 18% of an eager MLP step's time
_FILE_KIND: dict[str, str] = {}


def _file_kind(fn: str) -> str:
    kind = _FILE_KIND.get(fn)
    if kind is None:
        if fn.startswith(_PKG_DIR) and not fn.startswith(_USER_DIRS):
            kind = "core" if fn.startswith(_CORE_DIRS) else "pkg"
        elif os.path.basename(fn) == "shardgrad" or "importlib" in fn or fn.startswith(
                "<frozen"):
            kind = "skip"
        else:
            kind = "user"
        _FILE_KIND[fn] = kind
    return kind


def user_frame() -> str:
    """The first stack frame outside shardgrad and the standard library, as 'file:line'.
    Without one (a model the ``shardgrad`` command built from a config), the innermost frame
    of shardgrad above the op library: the model code that applied the op."""
    return _format_site(_site())


def _site() -> Site:
    """user_frame's site, unformatted."""
    if _where_stack:
        return _where_stack[-1]
    f, fallback = sys._getframe(2), None
    kinds = _FILE_KIND
    while f is not None:
        fn = f.f_code.co_filename
        kind = kinds.get(fn) or _file_kind(fn)
        if kind == "user":
            return (fn, f.f_lineno)
        if kind == "pkg" and fallback is None:
            fallback = f
        f = f.f_back
    return "<unknown>" if fallback is None else _frame_at(fallback)


def fmt_type(shape: Sequence[int], dtype: str) -> str:
    return f"{DTYPE_SHORT.get(dtype, dtype)}[{','.join(map(str, shape))}]"


class Node:
    """One SSA value: the result of applying ``op`` to ``inputs`` with ``attrs``.

    Nodes are immutable and compared by identity; ``id`` grows with creation order, so sorting
    nodes by id is a topological order. Leaves are ops with no inputs: ``input`` (fed each
    call), ``param`` and ``state`` (named, persistent), ``const`` (value in attrs). ``where``
    is the user's source line that made the node.

    A slots class rather than a frozen dataclass: an eager op makes several nodes, and the
    dataclass's per-field ``object.__setattr__`` made a node cost 2 us instead of 0.9. The one
    slot written after creation, ``eager_value``, holds the node's value when graph.tensor
    computed it eagerly (``set_eager_value``; None for a traced node): the value lives as
    long as the node, as PyTorch's autograd graph keeps its saved tensors.
    """

    __slots__ = ("op", "inputs", "attrs", "shape", "dtype", "_where", "id", "eager_value",
                 "__weakref__")

    def __init__(self, op: str, inputs: tuple[Node, ...], attrs: dict[str, Any],
                 shape: tuple[int, ...], dtype: str, where: Site = "<unknown>",
                 id: int | None = None):  # noqa: A002 - the field's name
        _set_op(self, op)
        _set_inputs(self, inputs)
        _set_attrs(self, attrs)
        _set_shape(self, shape)
        _set_dtype(self, dtype)
        _set_where(self, where)
        _set_id(self, next(_ids) if id is None else id)
        _set_value(self, None)

    def __reduce__(self):
        # pickle and copy rebuild through __init__ (a slot assignment would be refused); the
        # eager value stays behind, as it did outside the node
        return (Node, (self.op, self.inputs, self.attrs, self.shape, self.dtype, self._where,
                       self.id))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Node is immutable: cannot assign {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Node is immutable: cannot delete {name!r}")

    @property
    def site(self) -> Site:
        """``where`` as kept: maybe still unformatted (what ``located`` takes)."""
        return self._where

    @property
    def where(self) -> str:
        site = self._where
        if isinstance(site, str):
            return site
        text = _format_site(site)
        _set_where(self, text)
        return text

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def name(self) -> str | None:
        return self.attrs.get("name")

    def __repr__(self) -> str:
        label = self.name or f"{self.op}#{self.id}"
        return f"<Node {label} : {fmt_type(self.shape, self.dtype)}>"

    # Operators build nodes through the registered op builders (see module docstring).
    def __add__(self, y): return BUILDERS["add"](self, y)
    def __radd__(self, y): return BUILDERS["add"](y, self)
    def __sub__(self, y): return BUILDERS["sub"](self, y)
    def __rsub__(self, y): return BUILDERS["sub"](y, self)
    def __mul__(self, y): return BUILDERS["mul"](self, y)
    def __rmul__(self, y): return BUILDERS["mul"](y, self)
    def __truediv__(self, y): return BUILDERS["div"](self, y)
    def __rtruediv__(self, y): return BUILDERS["div"](y, self)
    def __pow__(self, y): return BUILDERS["pow"](self, y)
    def __neg__(self): return BUILDERS["neg"](self)
    def __matmul__(self, y): return BUILDERS["matmul"](self, y)

    @property
    def T(self) -> Node:
        return BUILDERS["transpose"](self)


(_set_op, _set_inputs, _set_attrs, _set_shape, _set_dtype, _set_where, _set_id,
 _set_value) = (getattr(Node, k).__set__ for k in Node.__slots__[:-1])


# set_eager_value(node, value): keep ``value`` as ``node.eager_value`` (graph.tensor's eager
# evaluation); the slot's own setter, called for every eager value
set_eager_value = _set_value


def leaf(op: str, shape: Sequence[int], dtype: str, **attrs: Any) -> Node:
    """A node with no inputs: ``input``, ``param``, ``state`` or ``const``."""
    return Node(op, (), attrs, tuple(int(s) for s in shape), dtype_name(dtype), where=_site())


def const(value: Any, dtype: str | None = None) -> Node:
    arr = np.asarray(value, dtype=dtype)
    return Node("const", (), {"value": arr}, arr.shape, dtype_name(arr.dtype), where=_site())


# (op, input types, attrs) -> (shape, dtype) of rules that succeeded: an eager step emits the
# same nodes every step, and the shape rules were a tenth of a small eager op's dispatch. A
# failing rule is not remembered (it raises again, with this call's source line); attrs that
# do not hash (arrays) are not cached. Bounded, cleared when full.
_INFERRED: dict[tuple, tuple[tuple[int, ...], str]] = {}


def emit(opdef: Any, inputs: Sequence[Node], attrs: dict[str, Any] | None = None) -> Node:
    """Create the node ``opdef(inputs, attrs)``, inferring its shape and dtype now.

    Any failure of the op's shape rule is re-raised as a ShapeError naming the op, the input
    types and the user's source line.
    """
    attrs = dict(attrs) if attrs else {}
    where = _site()
    types = tuple([(x.shape, x.dtype) for x in inputs])
    # keyed by the rule itself (ops share rules); the attrs' types are part of the key: True
    # == 1 and 1 == 1.0, but a rule may tell them apart
    key = (opdef.infer, types, tuple([(k, type(v), v) for k, v in attrs.items()])) if attrs \
        else (opdef.infer, types)
    try:
        hit = _INFERRED.get(key)
    except TypeError:                       # an unhashable attribute
        key, hit = None, None
    if hit is not None:
        return Node(opdef.name, tuple(inputs), attrs, hit[0], hit[1], where)
    try:
        shape, dtype = opdef.infer(*types, **attrs)
    except ShapeError:
        raise
    except Exception as e:  # noqa: BLE001 - every shape-rule failure becomes one error type
        names = ", ".join(fmt_type(x.shape, x.dtype) for x in inputs)
        shown = {k: v for k, v in attrs.items() if not isinstance(v, np.ndarray)}
        extra = f" with {shown}" if shown else ""
        raise ShapeError(f"{opdef.name}({names}){extra} at {_format_site(where)}: {e}") from None
    shape, dtype = tuple(map(int, shape)), dtype_name(dtype)
    if key is not None:
        if len(_INFERRED) >= 4096:
            _INFERRED.clear()
        _INFERRED[key] = (shape, dtype)
    return Node(opdef.name, tuple(inputs), attrs, shape, dtype, where)


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype) -> str:
    """str(np.dtype(dtype)), remembered: numpy's dtype naming took 6% of an eager step."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = _DTYPE_NAMES[dtype] = str(np.dtype(dtype))
        return name
    except TypeError:                       # an unhashable dtype-like
        return str(np.dtype(dtype))


def _reachable(outputs: Iterable[Node]) -> dict[int, Node]:
    seen: dict[int, Node] = {}
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n.id in seen:
            continue
        seen[n.id] = n
        stack.extend(n.inputs)
    return seen


def ancestors(outputs: Iterable[Node]) -> set[int]:
    """The ids of ``outputs`` and every node they depend on."""
    return set(_reachable(outputs))


def descendants(nodes: Iterable[Node], roots: Iterable[Node]) -> set[int]:
    """The ids of ``roots`` and of every node in ``nodes`` (topologically ordered) that
    depends on one of them."""
    live = {r.id for r in roots}
    for n in nodes:
        if any(x.id in live for x in n.inputs):
            live.add(n.id)
    return live


def toposort(outputs: Iterable[Node]) -> list[Node]:
    """Every node reachable from ``outputs``, inputs before users (by creation order)."""
    seen = _reachable(outputs)
    return [seen[i] for i in sorted(seen)]


class Graph:
    """An ordered SSA program: ``nodes`` (topological), named ``outputs`` and ``meta``.

    The leaves are the nodes whose op is ``input``, ``param``, ``state`` or ``const``;
    ``inputs``/``params``/``states`` list them in order. ``meta`` carries facts that passes
    preserve, e.g. which outputs are gradients or updated parameters. A Graph is never
    mutated by a pass: passes return new graphs.
    """

    def __init__(self, outputs: dict[str, Node] | Sequence[Node],
                 nodes: Sequence[Node] | None = None, meta: dict[str, Any] | None = None):
        if not isinstance(outputs, dict):
            outputs = {f"out{i}": n for i, n in enumerate(outputs)}
        self.outputs: dict[str, Node] = dict(outputs)
        self.nodes: list[Node] = list(nodes) if nodes is not None else toposort(
            self.outputs.values())
        self.meta: dict[str, Any] = dict(meta or {})

    def leaves(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    @property
    def inputs(self) -> list[Node]:
        return self.leaves("input")

    @property
    def params(self) -> list[Node]:
        return self.leaves("param")

    @property
    def states(self) -> list[Node]:
        return self.leaves("state")

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for x in n.inputs:
                out[x.id].append(n)
        return out

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> dict[int, str]:
        """Printable local names: leaves by their name, others %0, %1, ... in order."""
        out, k = {}, 0
        for n in self.nodes:
            if n.name is not None and not n.inputs:
                out[n.id] = n.name
            else:
                out[n.id] = f"%{k}"
                k += 1
        return out

    def __str__(self) -> str:
        names = self.names()
        lines = []
        for n in self.nodes:
            args = [names[x.id] for x in n.inputs]
            shown = {k: v for k, v in n.attrs.items() if k not in ("name", "value")}
            if n.op == "const":
                v = n.attrs["value"]
                args.append(repr(v.item()) if v.size == 1 else f"<{v.size} values>")
            args += [f"{k}={v!r}" for k, v in sorted(shown.items())]
            lines.append(f"{names[n.id]} = {n.op}({', '.join(args)}) : "
                         f"{fmt_type(n.shape, n.dtype)}")
        outs = ", ".join(f"{k}={names[v.id]}" for k, v in self.outputs.items())
        lines.append(f"return ({outs})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Graph {len(self.nodes)} nodes, outputs {list(self.outputs)}>"

    # Nodes reference nodes, so pickle would recurse once per node of depth; a graph travels
    # as a flat table instead (what crosses a process boundary is data).
    def __getstate__(self) -> dict[str, Any]:
        index = {n.id: i for i, n in enumerate(self.nodes)}
        table = [(n.op, tuple(index[x.id] for x in n.inputs), n.attrs, n.shape, n.dtype,
                  n.where) for n in self.nodes]
        return {"table": table, "outputs": {k: index[v.id] for k, v in self.outputs.items()},
                "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nodes: list[Node] = []
        for op, ins, attrs, shape, dtype, where in state["table"]:
            nodes.append(Node(op, tuple(nodes[i] for i in ins), attrs, shape, dtype, where))
        self.nodes = nodes
        self.outputs = {k: nodes[i] for k, i in state["outputs"].items()}
        self.meta = state["meta"]


LEAF_OPS = ("input", "param", "state", "const")


def verify(graph: Graph, known_ops: Callable[[str], bool] | None = None) -> None:
    """Check SSA, order, that every input exists, and (given ``known_ops``) that every op is
    registered. Raises ShapeError naming the first bad node."""
    seen: set[int] = set()
    names = graph.names()
    for n in graph.nodes:
        if n.id in seen:
            raise ShapeError(f"node {names[n.id]} ({n.op}) appears twice: not SSA")
        for x in n.inputs:
            if x.id not in seen:
                raise ShapeError(
                    f"node {names[n.id]} = {n.op}(...) at {n.where} uses a value that is not "
                    f"defined before it ({x!r})")
        if n.op in LEAF_OPS and n.inputs:
            raise ShapeError(f"leaf {names[n.id]} ({n.op}) has inputs")
        if n.op not in LEAF_OPS and known_ops is not None and not known_ops(n.op):
            raise ShapeError(f"node {names[n.id]} at {n.where}: unknown op {n.op!r}")
        seen.add(n.id)
    for k, v in graph.outputs.items():
        if v.id not in seen:
            raise ShapeError(f"output {k!r} is not a node of the graph")

