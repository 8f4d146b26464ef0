"""The user-facing Tensor: a handle on a Node, eager by default, symbolic while tracing.

An eager tensor's value is computed as soon as the op is applied (the node and its value are
kept so ``backward()`` can run the gradient graph); a symbolic tensor (a traced leaf, or any
result of one) only builds nodes. The same user code therefore runs eagerly and traces into
the training-step Graph. An eager value lives on a device (a NumPy array on the CPU, a CuPy
array on a GPU, where ops run their hand-written CUDA kernels); the ops of one call must share
it, as in PyTorch. Imports graph.ir, graph.device, graph.autodiff and ops.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from shardgrad import ops
from shardgrad.graph import walk as walk_module
from shardgrad.graph.autodiff import backprop
from shardgrad.graph.device import (
    CPU,
    Device,
    DeviceError,
    array_module,
    device_of,
    is_device_array,
    to_device,
    to_host,
)
from shardgrad.graph.ir import (
    Node,
    ShapeError,
    const,
    dtype_name,
    leaf,
    set_eager_value,
    toposort,
)
from shardgrad.graph.walk import ExecutionError, Walk, describe, last_uses
from shardgrad.ops import elementwise as E
from shardgrad.ops import linalg as L
from shardgrad.ops import reduce as R
from shardgrad.ops import shape as S
from shardgrad.ops.registry import const_reads, cpu_runner, kernel_for
from shardgrad.ops.registry import get as get_opdef

# Eager values live in their nodes (Node.eager_value) and die with them (a node lives as long
# as a tensor or a later node refers to it, as PyTorch's autograd graph keeps saved tensors).
_LEAVES: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_RETAINED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_grad_enabled = [True]
_rng_salt: list[Tensor | None] = [None]   # the traced step counter, while a step is traced
_default_dtype = ["float32"]


def set_default_dtype(dtype) -> None:
    _default_dtype[0] = str(np.dtype(dtype))


def get_default_dtype() -> str:
    return _default_dtype[0]


@contextlib.contextmanager
def no_grad():
    """Inside, results record no history and need no gradient (as torch.no_grad)."""
    saved = _grad_enabled[0]
    _grad_enabled[0] = False
    try:
        yield
    finally:
        _grad_enabled[0] = saved


def is_grad_enabled() -> bool:
    return _grad_enabled[0]


class set_grad_enabled:  # noqa: N801 - torch's name
    """Gradient recording on or off inside (``with sg.set_grad_enabled(train):``), or from now
    on when called on its own, as torch.set_grad_enabled."""

    def __init__(self, mode: bool):
        self._saved = _grad_enabled[0]
        _grad_enabled[0] = bool(mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _grad_enabled[0] = self._saved


def rng_salt() -> Tensor | None:
    """While a training step is traced, the int64 step-counter input that random ops (dropout)
    mix into their seed so each step draws anew; None when running eagerly."""
    return _rng_salt[0]


@contextlib.contextmanager
def tracing_salt(salt: Tensor):
    saved = _rng_salt[0]
    _rng_salt[0] = salt
    try:
        yield
    finally:
        _rng_salt[0] = saved


def _evaluate(outs: list[Node]) -> None:
    """Compute eager values for ``outs`` and whatever they need that has none yet."""
    if len(outs) == 1 and walk_module.current_tracer is None:
        # the common eager case, one op whose inputs all have values: run it directly
        # rather than through a one-step walk (a fifth of a small eager op's time here)
        n = outs[0]
        if n.eager_value is not None:
            return
        args = []
        for x in n.inputs:
            v = x.eager_value
            if v is None and x.op == "const":      # a Python scalar's new constant
                v = x.attrs["value"]
                set_eager_value(x, v)
            if v is None:
                break
            args.append(v)
        if n.inputs and len(args) == len(n.inputs):
            try:
                set_eager_value(n, _run(n, args))
            except Exception as e:
                _note(n, e)
                raise
            return
    todo: dict[int, Node] = {}
    stack = [n for n in outs if n.eager_value is None]
    while stack:
        n = stack.pop()
        if n.id in todo:
            continue
        todo[n.id] = n
        stack.extend([x for x in n.inputs if x.eager_value is None])
    order = [todo[i] for i in sorted(todo)]
    for n in order:
        if n.op != "const" and not n.inputs:
            raise ShapeError(f"{n!r} has no value: it is a traced placeholder")
    if walk_module.current_tracer is not None:      # the executor core's loop times each node
        walk = _EagerWalk()
        for n in order:
            if n.op == "const":
                set_eager_value(n, n.attrs["value"])
            else:
                walk.steps.append(lambda n=n: set_eager_value(
                    n, _run(n, [x.eager_value for x in n.inputs])))
                walk.step_nodes.append(n)
        walk.execute()
        return
    # a gradient graph's nodes run directly (a closure and a walk step a node were a quarter
    # of a small eager backward's dispatch)
    try:
        for n in order:
            set_eager_value(n, n.attrs["value"] if n.op == "const" else
                            _run(n, [x.eager_value for x in n.inputs]))
    except Exception as e:
        _note(n, e)
        raise


class _EagerWalk(Walk):
    """Eager evaluation as a backend of the executor core (graph.walk): a step per node still
    without a value, each kept in its node (Node.eager_value: as long as the node lives). A
    kernel's error keeps its type (user code may catch a ValueError, as with PyTorch), with
    the node, op and user line added as a note."""

    def __init__(self):
        super().__init__(None)

    def error(self, node: Node, exc: BaseException, note: str = "") -> BaseException:
        exc.add_note(f"while executing {describe(None, node)} (from {node.where})")
        return exc


def _note(n: Node, e: Exception) -> None:
    # as Walk.execute: a kernel's error keeps its type, node n's note added (an
    # ExecutionError already names its node)
    if not isinstance(e, ExecutionError):
        _EagerWalk().error(n, e)


# ---- eager backward plans ----------------------------------------------------------------------
# An eager training step builds the same forward graph every step, and so the same gradient
# graph: building it (each op's VJP rule emitting nodes) was a third of a small model's
# backward. The second time a forward graph of one structure is differentiated, the gradient
# graph's kernels are kept as a plan, keyed by that structure; later backward calls run the plan
# on the new values. The kernels are the ones the gradient's nodes run (_run), on the same
# inputs, in the same order: the values are the same bits.


class _BackwardPlan:
    """The gradient graph of one forward structure as kernels over slots: slots 0..n-1 hold
    the forward nodes' values (toposort order), slot n the seed, then the gradient's nodes.
    ``consts``: (slot, value) of the constants the VJP rules made; ``steps``: (node, input
    slots, output slot, slots last read here) with a node of the gradient's op, attrs, shape
    and dtype whose inputs are placeholders of the right type (it holds no values);
    ``outs``: the slots of the gradients, with whether a value may share memory with a kept
    constant (then it is copied: the caller may change a gradient in place); ``reads``:
    (slot, value) of the forward consts a VJP rule folded in (registry.const_value)."""

    __slots__ = ("consts", "outs", "reads", "size", "steps")

    def __init__(self, consts, steps, outs, reads, size):
        self.consts, self.steps, self.outs, self.reads, self.size = \
            consts, steps, outs, reads, size

    def run(self, values: list) -> list:
        for slot, value in self.reads:            # the same bits (NaN is NaN here)
            now = np.asarray(values[slot])
            if now.dtype != value.dtype or now.shape != value.shape or \
                    now.tobytes() != value.tobytes():
                return None
        values.extend([None] * (self.size - len(values)))
        for slot, value in self.consts:
            values[slot] = value
        for node, ins, out, dead in self.steps:
            try:
                values[out] = _run(node, [values[i] for i in ins])
            except Exception as e:
                _note(node, e)
                raise
            for i in dead:
                values[i] = None
        return [values[i].copy() if copy else values[i] for i, copy in self.outs]


# forward structure -> plan (None: seen once, not planned yet); bounded, cleared when full
_PLANS: dict[tuple, _BackwardPlan | None] = {}
_PLANS_MAX = 64


def _structure(history: list[Node], wrt: list[Node]) -> tuple | None:
    """What a backward plan of ``history`` (toposort order) depends on: each node's op,
    attrs, type and inputs (by position), and which ones the gradient is taken for. None
    where no plan applies: a value on a device or missing (attrs that do not hash make the
    key fail to hash)."""
    pos: dict[int, int] = {}
    parts = []
    for i, n in enumerate(history):
        value = n.eager_value
        if type(value) is not np.ndarray and (value is None or is_device_array(value)):
            return None
        pos[n.id] = i
        a = n.attrs
        # a const's value is data (the next batch); the rules that fold one in are re-checked
        attrs = () if not a or n.op == "const" else tuple([(k, type(v), v) for k, v in a.items()])
        parts.append((n.op, n.shape, n.dtype, attrs, tuple([pos[x.id] for x in n.inputs])))
    return tuple(parts), tuple([pos[w.id] for w in wrt])


def _placeholder(n: Node) -> Node:
    return Node("input", (), {}, n.shape, n.dtype, n._where, id=-1)


def _make_plan(history: list[Node], seed: Node, gs: list[Node],
               reads: list[Node]) -> _BackwardPlan | None:
    """The plan of a gradient graph just evaluated (None where it cannot be replayed)."""
    slot = {n.id: i for i, n in enumerate(history)}
    slot[seed.id] = len(history)
    forward = len(history) + 1
    held = {n.id: _placeholder(n) for n in history}
    held[seed.id] = _placeholder(seed)
    consts, steps = [], []
    for n in toposort(gs):
        if n.id in slot:
            continue
        if n.inputs:
            ins = [slot[x.id] for x in n.inputs]
            node = Node(n.op, tuple([held[x.id] for x in n.inputs]), n.attrs, n.shape, n.dtype,
                        n._where, id=-1)
            slot[n.id] = forward + len(consts) + len(steps)
            steps.append((node, ins, slot[n.id]))
        elif n.op == "const":
            slot[n.id] = forward + len(consts) + len(steps)
            consts.append((slot[n.id], n.attrs["value"]))
        else:
            return None                 # a leaf outside the forward graph
        held[n.id] = _placeholder(n)
    # the forward's values and the gradients stay; the rest is dropped after its last reader
    dead = last_uses([ins for _, ins, _ in steps], [*range(forward), *(slot[g.id] for g in gs)])
    kept = [v for _, v in consts]
    plan_outs = [(slot[g.id], any(np.may_share_memory(g.eager_value, v) for v in kept))
                 for g in gs]
    # this call's gradients may be views of its constants, which the caller may change
    consts = [(i, np.array(v, copy=True)) for i, v in consts]
    plan_reads = []
    for r in reads:
        if r.id in slot and slot[r.id] < len(history):
            plan_reads.append((slot[r.id], np.array(r.attrs["value"], copy=True)))
    return _BackwardPlan(consts, [(*st, tuple(d)) for st, d in zip(steps, dead, strict=True)],
                         plan_outs, plan_reads, forward + len(consts) + len(steps))


def _gradients(history: list[Node], seed: Node, wrt: list[Node]) -> list:
    """The values of d(history[-1])/d(wrt) for the cotangent ``seed``: by the plan of this
    forward structure where there is one, else by building and evaluating the gradient graph
    (and planning it, the second time this structure comes)."""
    key, out = None, history[-1]
    start = seed.attrs["value"] if seed.op == "const" else seed.eager_value
    if walk_module.current_tracer is None and not seed.inputs and start is not None and \
            not _on_device(start) and seed.shape == out.shape and seed.dtype == out.dtype:
        key = _structure(history, wrt)
        try:
            plan = _PLANS.get(key) if key is not None else None
        except TypeError:                   # attrs that do not hash
            key = plan = None
        if plan is not None:
            values = [n.eager_value for n in history]
            values.append(start)
            got = plan.run(values)
            if got is not None:
                return got
    with const_reads() as reads:
        gs = backprop([out], [seed], wrt, history)     # checks the seed's type
    _evaluate(gs)
    if key is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = _make_plan(history, seed, gs, reads) if key in _PLANS else None
    return [g.eager_value for g in gs]


def _on_device(a) -> bool:
    """is_device_array, a NumPy array answered without the attribute probe."""
    return type(a) is not np.ndarray and is_device_array(a)


def _run(n: Node, args: list[Any]):
    """Node ``n``'s value from its inputs' values: with NumPy, or on the GPU that holds its
    device inputs (host inputs, constants such as a Python scalar, are copied there)."""
    on = None
    for a in args:
        if type(a) is not np.ndarray and is_device_array(a):
            on = a
            break
    if on is None:
        opdef = get_opdef(n.op)
        hit = _CPU_KERNELS.get(n.op)
        if hit is None or hit[0] is not opdef:
            hit = _CPU_KERNELS[n.op] = (opdef, kernel_for(opdef, "cpu"), cpu_runner(opdef))
        if hit[2] is not None:          # the op's C kernel (a GEMM, a window op), when it takes it
            got = hit[2](n, args)
            if got is not None:
                return got
        return hit[1](np, *args, **n.attrs)
    xp = array_module(on)
    with on.device:
        args = [a if is_device_array(a) else _to_device_once(xp, a, on.device.id)
                for a in args]
        return _kernel(n.op, "cuda")(xp, *args, **n.attrs)


# device kind -> op name -> (OpDef, kernel_for's callable, the CPU runner of its C kernel or
# None), looked up once (the registry lookup and device naming were a tenth of a small eager
# op's dispatch); a re-registered op (another OpDef) is looked up anew
_KERNELS: dict[str, dict[str, tuple[Any, Any, Any]]] = {"cpu": {}, "cuda": {}}
_CPU_KERNELS = _KERNELS["cpu"]      # _run's inline lookup of _kernel(op, "cpu")


def _kernel(op: str, kind: str):
    opdef = get_opdef(op)
    table = _KERNELS[kind]
    hit = table.get(op)
    if hit is None or hit[0] is not opdef:
        hit = table[op] = (opdef, kernel_for(opdef, kind),
                           cpu_runner(opdef) if kind == "cpu" else None)
    return hit[1]


# Python scalars of eager ops on a GPU (0.9 * buf, p - lr * g), by (device, dtype, value): each
# is uploaded once, not once an op (a host-to-device copy each); bounded, cleared when full.
_DEVICE_SCALARS: dict[tuple, Any] = {}


def _to_device_once(xp, a, device_id: int):
    if np.ndim(a) != 0:
        return xp.asarray(a)
    a = np.asarray(a)
    key = (device_id, a.dtype.str, a.item())
    hit = _DEVICE_SCALARS.get(key)
    if hit is None:
        if len(_DEVICE_SCALARS) >= 4096:
            _DEVICE_SCALARS.clear()
        hit = _DEVICE_SCALARS[key] = xp.asarray(a)
    return hit


def eager_leaf(value: np.ndarray, requires_grad: bool, where: Any = None) -> Node:
    """A node holding the eager value ``value`` (an array on its device): an input leaf when
    ``requires_grad`` (so backward reaches it), else a constant. What a Tensor made from a
    value wraps. ``where``: its source site (default: the caller's line)."""
    dtype = dtype_name(value.dtype)
    if where is not None:               # a new value of an existing tensor: no stack walk
        node = Node("input", (), {"name": None}, value.shape, dtype, where) if requires_grad \
            else Node("const", (), {"value": value}, value.shape, dtype, where)
    else:
        node = leaf("input", value.shape, dtype, name=None) if requires_grad else Node(
            "const", (), {"value": value}, value.shape, dtype)
    set_eager_value(node, value)
    return node


def value_of(x):
    """A Tensor's value (its array); anything else as it is."""
    return x.data if isinstance(x, Tensor) else x


def is_dtype(x) -> bool:
    """Whether ``x`` names a dtype (``np.float32``, ``"float64"``), not a device."""
    if isinstance(x, np.dtype) or isinstance(x, type) and issubclass(x, np.generic):
        return True
    return isinstance(x, str) and x in _DTYPE_NAMES


_DTYPE_NAMES = frozenset(("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                          "uint8", "bool"))


def _as_bool(y):
    return y.astype("bool") if isinstance(y, Tensor) else tensor(np.asarray(y, dtype=bool))


def _logical(op: str, x, y) -> Tensor:
    """``&``, ``|``, ``^`` of bool tensors (or Python bools), from where / not_equal."""
    x = x if isinstance(x, Tensor) else tensor(np.asarray(x))
    y = y if isinstance(y, Tensor) else tensor(np.asarray(y))
    if x.dtype != "bool" or y.dtype != "bool":
        raise TypeError(f"{op} of {x.dtype} and {y.dtype} tensors: only bool tensors are "
                        f"supported (compare first, e.g. (x > 0) {op} (x < 1))")
    if op == "&":
        return apply(E.where, x, y, False)
    if op == "|":
        return apply(E.where, x, True, y)
    return apply(E.not_equal, x, y)


def full_like_value(t: Tensor, value) -> Tensor:
    """A tensor of t's shape and dtype holding ``value`` (a number or a 0-d tensor)."""
    if isinstance(value, Tensor):
        return _broadcast_like(value, t)
    return full(t.shape, value, t.dtype, None if t.is_symbolic else t.device)


def _broadcast_like(v, t: Tensor) -> Tensor:
    """``v`` broadcast to t's shape in t's dtype (what an assignment into t writes)."""
    v = v if isinstance(v, Tensor) else tensor(np.asarray(v, dtype=t.dtype))
    if v.dtype != t.dtype:
        v = v.astype(t.dtype)
    return v if v.shape == t.shape else v.expand(t.shape)


def _is_array_index(it) -> bool:
    return isinstance(it, Tensor | np.ndarray | list)


def _index_items(t: Tensor, index) -> list:
    """The items of ``index`` with bool masks turned into integer index arrays (their number
    of elements is data, so an eager mask only), index arrays as int64 Tensors and the
    ellipsis spelled out."""
    items = []
    for it in (index if isinstance(index, tuple) else (index,)):
        if not _is_array_index(it):
            items.append(it)
            continue
        a = it if isinstance(it, Tensor) else tensor(np.asarray(it))
        if a.dtype == "bool":
            if a.is_symbolic:
                raise ShapeError(f"indexing with a traced bool mask ({a.node!r}): the result's "
                                 f"size depends on the data, so it cannot be traced; use "
                                 f"sg.where / masked_fill, or a mask of the tensor's shape in "
                                 f"an assignment (x[mask] = v)")
            items.extend(tensor(ix) for ix in np.nonzero(to_host(a.data)))
        elif np.dtype(a.dtype).kind in "iu":
            items.append(a)
        else:
            raise IndexError(f"tensors used as indices must be integer or bool, got {a.dtype}")
    if any(it is None for it in items):
        raise IndexError("None (a new axis) together with index arrays is not supported: "
                         "unsqueeze before or after indexing")
    used = sum(1 for it in items if it is not Ellipsis)
    if used > t.ndim:
        raise IndexError(f"too many indices: {used} for {t.ndim} dimensions")
    if any(it is Ellipsis for it in items):
        at = next(i for i, it in enumerate(items) if it is Ellipsis)
        items[at:at + 1] = [slice(None)] * (t.ndim - used)
    return items + [slice(None)] * (t.ndim - len(items))


def _getitem(t: Tensor, index) -> Tensor:
    """``t[index]``: basic indices are one getitem node (a view); index arrays (integer
    tensors, lists, bool masks) pick elements as NumPy and torch do, through the
    ``embedding`` row gather of t's indexed dims flattened into one (its gradient is the
    row scatter-add)."""
    if not any(_is_array_index(it) for it in (index if isinstance(index, tuple) else (index,))):
        return apply(S.getitem, t, index)
    items = _index_items(t, index)
    arrays = [it for it in items if isinstance(it, Tensor)]
    y = apply(S.getitem, t, tuple(slice(None) if isinstance(it, Tensor) else it
                                  for it in items))
    kept = [it for it in items if not isinstance(it, int | np.integer)]
    pos = [d for d, it in enumerate(kept) if isinstance(it, Tensor)]
    rest = [d for d in range(y.ndim) if d not in pos]
    flat, stride = None, 1
    for a, d in zip(reversed(arrays), reversed(pos), strict=True):
        n = y.shape[d]
        a = a.astype("int64") if a.dtype != "int64" else a
        a = a + (a < 0).astype("int64") * n              # negative indices count from the end
        flat = a * stride if flat is None else flat + a * stride
        stride *= n
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    flat = flat if flat.shape == shape else flat.expand(shape)
    rest_shape = tuple(y.shape[d] for d in rest)
    if pos + rest != list(range(y.ndim)):
        y = apply(S.transpose, y, tuple(pos + rest))
    rows = y.reshape(stride, int(np.prod(rest_shape, dtype=np.int64)))
    out = apply(ops.nn.embedding, flat, rows).reshape(shape + rest_shape)
    k = len(shape)
    if pos == list(range(pos[0], pos[0] + len(pos))) and pos[0] > 0 and k:
        # adjacent index arrays keep their place (NumPy's rule); apart, their dims lead
        lead = list(range(k, k + pos[0]))
        out = apply(S.transpose, out, tuple(lead + list(range(k)) + list(
            range(k + pos[0], out.ndim))))
    return out


def _setitem(t: Tensor, index, value) -> Tensor:
    """The tensor ``t`` with ``value`` written at ``index`` (see Tensor.__setitem__)."""
    mask = index if isinstance(index, Tensor) and index.dtype == "bool" else None
    if mask is not None and mask.shape == t.shape[:mask.ndim]:
        # a mask over t's leading dims, traceable: where(mask, value, t)
        m = mask.reshape(mask.shape + (1,) * (t.ndim - mask.ndim))
        if isinstance(value, Tensor) and value.size != 1 and value.ndim and (
                value.shape != t.shape):
            raise ShapeError(f"x[mask] = v with v of shape {value.shape}: v must be a number "
                             f"or have x's shape {t.shape} (writing v's elements in the "
                             f"mask's order is not supported)")
        return apply(E.where, m, _broadcast_like(value, t), t)
    if any(_is_array_index(it) for it in (index if isinstance(index, tuple) else (index,))):
        items = _index_items(t, index)
        if any(isinstance(it, Tensor) and it.is_symbolic for it in items):
            raise ShapeError("x[index] = v with a traced index array is not supported: use "
                             "sg.where with a mask")
        where_ = np.zeros(t.shape, bool)
        where_[tuple(to_host(it.data) if isinstance(it, Tensor) else it for it in items)] = True
        if isinstance(value, Tensor) and value.size != 1:
            raise ShapeError(f"x[index array] = v with v of shape {value.shape}: only a number "
                             f"(or a one-element tensor) can be written through index arrays")
        v = value.reshape(()) if isinstance(value, Tensor) else value
        return apply(E.where, tensor(where_), _broadcast_like(v, t), t)
    try:
        norm = S.normalize_index(index, t.shape)
    except (TypeError, IndexError, ValueError) as e:
        raise IndexError(f"x[{index!r}] = ...: {e}") from None
    where_ = np.zeros(t.shape, bool)
    where_[tuple(slice(*it[1:]) if it[0] == "s" else it[1] for it in norm if it[0] != "n")] = True
    region = apply(S.getitem, t, index)
    placed = apply(S.getitem_grad, _broadcast_like(value, region), norm, t.shape)
    return apply(E.where, tensor(where_), placed, t)


class Tensor:
    """An n-d array that records the ops applied to it. PyTorch's names: ``requires_grad``,
    ``grad``, ``backward()``, ``detach()``, ``numpy()``, ``item()``; NumPy's for array ops."""

    __slots__ = ("node", "_requires_grad", "grad", "__weakref__")
    __array_priority__ = 100  # so ndarray <op> Tensor defers to Tensor's reflected op

    def __init__(self, node: Node, requires_grad: bool = False):
        self.node = node
        self._requires_grad = requires_grad
        self.grad: Tensor | None = None

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, requires_grad: bool) -> None:
        """As torch: turning it on makes a tensor that records no history (made without grad,
        or frozen and then given new data) a leaf, however the flag is set: requires_grad_(),
        ``p.requires_grad = True``, Module.requires_grad_()."""
        requires_grad = bool(requires_grad)
        if requires_grad and np.dtype(self.dtype).kind != "f":
            raise ShapeError(f"only floating-point tensors can require gradients, got "
                             f"{self.dtype}")
        was, self._requires_grad = self._requires_grad, requires_grad
        if requires_grad and not was and not self.is_symbolic and self.node.id not in _LEAVES:
            self._set_leaf(self.data)

    # -- values -----------------------------------------------------------------------------
    @property
    def is_symbolic(self) -> bool:
        return self.node.eager_value is None and self.node.op != "const"

    @property
    def data(self) -> np.ndarray:
        if self.is_symbolic:
            raise ShapeError(f"{self.node!r} is symbolic (being traced): it has no value yet")
        if self.node.eager_value is None:
            _evaluate([self.node])
        return self.node.eager_value

    @data.setter
    def data(self, value) -> None:
        """Replace the value in place (no history), keeping dtype, shape and device (a value
        from another device is copied to this tensor's)."""
        value = to_device(value.data if isinstance(value, Tensor) else value, self.device)
        if value.shape != self.shape:
            raise ShapeError(f"cannot set data of shape {value.shape} on a tensor of shape "
                             f"{self.shape}")
        self._set_leaf(value.astype(self.dtype, copy=False))

    def _set_leaf(self, value) -> None:
        if _LEAVES.get(self.node.id) is self:      # the old value's node leaves the table
            del _LEAVES[self.node.id]
        # the tensor's site stays where it was made (a parameter's: its module's line)
        self.node = eager_leaf(value, self.requires_grad, self.node._where)
        if self.requires_grad:
            _LEAVES[self.node.id] = self

    @property
    def is_leaf(self) -> bool:
        """As torch: a tensor that does not require grad, or one the user made with
        requires_grad (not the result of an op)."""
        return not self._requires_grad or self.node.id in _LEAVES

    def retain_grad(self) -> None:
        """Keep this non-leaf tensor's gradient in ``.grad`` on the next backward()."""
        if not self._requires_grad:
            raise RuntimeError("retain_grad() of a tensor that does not require grad")
        if self.node.id not in _LEAVES:
            _RETAINED[self.node.id] = self

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Start (or stop) recording this leaf's gradient, in place, as in torch (a tensor
        made without grad, e.g. ``sg.randn(3) * 0.01``, becomes a leaf: see requires_grad)."""
        if requires_grad and not self.requires_grad and self.is_symbolic:
            raise ShapeError("requires_grad_() of a traced tensor")
        self.requires_grad = requires_grad
        return self

    def zero_(self) -> Tensor:
        """Set every element to zero in place (no history), as in torch."""
        value = self.data
        self._set_leaf(array_module(value).zeros(self.shape, self.dtype))
        return self

    def assign_(self, other: Tensor) -> Tensor:
        """Take ``other``'s value without its history (a buffer update). While tracing this
        rebinds the tensor to the traced node, which becomes the state's new value."""
        if other.is_symbolic:
            self.node = other.node
        else:
            value = other.data
            self._set_leaf(value if is_device_array(value) else np.asarray(value))
        return self

    def numpy(self) -> np.ndarray:
        """The value as a NumPy array (copied from the GPU if it lives there)."""
        return to_host(self.data)

    @property
    def device(self) -> Device:
        """Where the value lives: ``cpu`` or ``cuda:N``. A traced tensor has no value; it
        reports the CPU (the executor that runs the graph decides where it computes)."""
        return CPU if self.is_symbolic else device_of(self.data)

    @property
    def is_cuda(self) -> bool:
        return self.device.is_cuda

    def to(self, device) -> Tensor:
        """This tensor on ``device`` (itself if already there), as torch.Tensor.to. The copy
        is a new leaf: moving a tensor that has autograd history is refused, so move the
        parameters (Module.to) and inputs before computing with them."""
        if is_dtype(device):                  # torch's x.to(torch.float64): a cast
            return self.astype(str(np.dtype(device)))
        value = self.data
        moved = to_device(value, device)
        if moved is value:
            return self
        if self.requires_grad and self.node.id not in _LEAVES:
            raise DeviceError(f"Tensor.to({str(Device.parse(device))!r}) of a tensor with "
                              f"autograd history ({self.node!r}): the move is not "
                              f"differentiable here; move the leaves (Module.to(device), the "
                              f"inputs) before computing, or detach() first")
        return tensor(moved, requires_grad=self.requires_grad)

    def cpu(self) -> Tensor:
        return self.to(CPU)

    def cuda(self, index: int | None = None) -> Tensor:
        return self.to(Device("cuda", index))

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        return Tensor(eager_leaf(self.data, False))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.node.shape

    @property
    def dtype(self) -> str:
        return self.node.dtype

    @property
    def ndim(self) -> int:
        return self.node.ndim

    @property
    def size(self) -> _Size:
        """The number of elements (NumPy's ``a.size``); called, torch's ``size()`` / ``size(dim)``
        (the shape, or one dimension of it)."""
        return _Size(self.node.size, self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if not self.shape:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.shape[0]))

    def _scalar(self, what: str):
        if self.is_symbolic:
            raise ShapeError(f"{what} of a traced tensor ({self.node!r}): its value is not known "
                             f"while the step is traced, so Python control flow cannot depend "
                             f"on it (use sg.where, or compute it outside the step)")
        if self.size != 1:
            raise ValueError(f"{what} of a tensor with {self.size} elements (shape "
                             f"{self.shape}) is ambiguous: only one-element tensors convert")
        return self.data.item()

    def __bool__(self) -> bool:
        return bool(self._scalar("bool()"))

    def __float__(self) -> float:
        return float(self._scalar("float()"))

    def __int__(self) -> int:
        return int(self._scalar("int()"))

    def __index__(self) -> int:
        if np.dtype(self.dtype).kind not in "iub":
            raise TypeError(f"only integer tensors can be used as an index, got {self.dtype}")
        return int(self._scalar("index"))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.numpy()
        return value if dtype is None else value.astype(dtype, copy=False)

    def __repr__(self) -> str:
        if self.is_symbolic:
            return f"Tensor(<traced {self.node!r}>)"
        grad = ", requires_grad=True" if self.requires_grad else ""
        where = f", device='{self.device}'" if self.is_cuda else ""
        return (f"Tensor({np.array2string(self.numpy(), precision=4)}, dtype={self.dtype}"
                f"{where}{grad})")

    # -- autograd ---------------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph: bool | None = None,
                 create_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.
        The history is kept (``retain_graph`` is accepted for torch's sake), so a second call
        accumulates again; ``create_graph`` (gradients with history) is not supported here:
        use graph.autodiff.grad on a traced graph for higher derivatives."""
        if create_graph:
            raise NotImplementedError("backward(create_graph=True): eager gradients carry no "
                                      "history; differentiate a traced graph twice with "
                                      "shardgrad.graph.autodiff.grad instead")
        if self.is_symbolic:
            raise ShapeError("backward() of a traced tensor: use compile_step / autodiff.grad")
        if not self.requires_grad:
            raise ShapeError("backward() of a tensor that does not require grad (no leaf "
                             "with requires_grad=True was used to compute it)")
        if gradient is None:
            if self.size != 1:        # one element of any shape, as torch's implicit grad
                raise ShapeError(f"backward() without a gradient needs a scalar, got shape "
                                 f"{self.shape}; pass gradient= of that shape")
            seed = const(1, dtype=self.dtype) if self.shape == () else const(
                np.ones(self.shape, self.dtype))
            if self.is_cuda:     # the gradient is computed where the value lives
                value = self.data
                with value.device:
                    seed = _const(_to_device_once(array_module(value), seed.attrs["value"],
                                                  value.device.id))
        else:
            if self.is_cuda and not isinstance(gradient, Tensor):
                gradient = to_device(gradient, self.device)
            seed = _node_of(gradient, self.node)
        history = toposort([self.node])
        leaves = [n for n in history
                  if not n.inputs and n.id in _LEAVES and _LEAVES[n.id].requires_grad]
        kept = [n for n in history if n.id in _RETAINED and _RETAINED[n.id].node is n] \
            if _RETAINED else []
        holders = [_LEAVES[n.id] for n in leaves] + [_RETAINED[n.id] for n in kept]
        gs = _gradients(history, seed, leaves + kept)
        for t, g in zip(holders, gs, strict=True):
            # a gradient made of constants alone (x.sum()'s) is computed on the host
            value = to_device(g, t.device)
            t.grad = Tensor(eager_leaf(value if t.grad is None else t.grad.data + value, False))

    # -- operators --------------------------------------------------------------------------
    def __add__(self, y): return apply(E.add, self, y)
    def __radd__(self, y): return apply(E.add, y, self)
    def __sub__(self, y): return apply(E.sub, self, y)
    def __rsub__(self, y): return apply(E.sub, y, self)
    def __mul__(self, y): return apply(E.mul, self, y)
    def __rmul__(self, y): return apply(E.mul, y, self)
    def __truediv__(self, y): return apply(E.div, self, y)
    def __rtruediv__(self, y): return apply(E.div, y, self)
    def __pow__(self, y): return apply(E.pow, self, y)
    def __rpow__(self, y): return apply(E.pow, y, self)
    def __matmul__(self, y): return apply(L.matmul, self, y)
    def __rmatmul__(self, y): return apply(L.matmul, y, self)
    def __neg__(self):
        return apply(E.neg, self) if _is_float(self.dtype) else 0 - self    # integers too
    def __abs__(self): return self.abs()
    def __floordiv__(self, y): return apply(E.floor_divide, self, y)
    def __rfloordiv__(self, y): return apply(E.floor_divide, y, self)
    def __mod__(self, y): return apply(E.remainder, self, y)
    def __rmod__(self, y): return apply(E.remainder, y, self)
    def __lt__(self, y): return apply(E.less, self, y)
    def __le__(self, y): return apply(E.less_equal, self, y)
    def __gt__(self, y): return apply(E.greater, self, y)
    def __ge__(self, y): return apply(E.greater_equal, self, y)
    def __eq__(self, y): return apply(E.equal, self, y)      # elementwise, as in torch
    def __ne__(self, y): return apply(E.not_equal, self, y)
    __hash__ = object.__hash__
    def __getitem__(self, index): return _getitem(self, index)

    def __setitem__(self, index, value) -> None:
        """``x[index] = value`` as torch: basic indices, integer index arrays and bool masks;
        the value is broadcast and cast to x's dtype. Done out of place under the hood (x takes
        the result's node), so views taken earlier do not see it."""
        self._inplace(lambda t: _setitem(t, index, value), "__setitem__")

    def __and__(self, y): return _logical("&", self, y)
    def __rand__(self, y): return _logical("&", y, self)
    def __or__(self, y): return _logical("|", self, y)
    def __ror__(self, y): return _logical("|", y, self)
    def __xor__(self, y): return _logical("^", self, y)
    def __rxor__(self, y): return _logical("^", y, self)

    def __invert__(self):
        if self.dtype != "bool":
            raise TypeError(f"~ of a {self.dtype} tensor: only bool tensors are supported")
        return apply(E.equal, self, False)

    def logical_not(self): return ~self.astype("bool")
    def logical_and(self, y): return self.astype("bool") & _as_bool(y)
    def logical_or(self, y): return self.astype("bool") | _as_bool(y)

    def all(self, dim=None, keepdim: bool = False):
        """Whether every element (along ``dim``) is non-zero: a bool tensor, as torch."""
        return self._nonzero().min(axis=dim, keepdims=keepdim) == 1

    def any(self, dim=None, keepdim: bool = False):
        return self._nonzero().sum(axis=dim, keepdims=keepdim) > 0

    def _nonzero(self):
        return (self if self.dtype == "bool" else self != 0).astype("int64")

    # -- in place (torch's trailing underscore and augmented assignment) ----------------------
    def _inplace(self, fn, name: str) -> Tensor:
        """Make self ``fn(self)``, as torch's in-place ops: refused on a leaf that requires
        grad while grad is on (its gradient would be lost); under no_grad a leaf keeps being
        the same leaf (``with no_grad(): w -= lr * w.grad``); otherwise self takes the
        result's history."""
        leaf = self._requires_grad and (self.node.id in _LEAVES or self.is_symbolic and (
            not self.node.inputs))                     # a traced parameter
        if leaf and _grad_enabled[0]:
            raise RuntimeError(f"{name}: a leaf tensor that requires grad ({self.node!r}) is "
                               f"used in an in-place operation; do it under sg.no_grad(), or "
                               f"on a copy")
        out = fn(self)
        if out.shape != self.shape:
            raise ShapeError(f"{name}: the result's shape {out.shape} differs from the "
                             f"tensor's {self.shape} (in-place ops cannot broadcast it)")
        if out.dtype != self.dtype:
            out = out.astype(self.dtype)
        if not out.is_symbolic and not out._requires_grad:
            self._set_leaf(out.data)          # a value without history: self stays a leaf
        else:
            self.node, self._requires_grad = out.node, out._requires_grad
        return self

    def add_(self, y, alpha=1):
        return self._inplace(lambda t: t + (y if alpha == 1 else y * alpha), "add_")

    def sub_(self, y, alpha=1):
        return self._inplace(lambda t: t - (y if alpha == 1 else y * alpha), "sub_")

    def mul_(self, y): return self._inplace(lambda t: t * y, "mul_")
    def div_(self, y): return self._inplace(lambda t: t / y, "div_")
    def pow_(self, y): return self._inplace(lambda t: t ** y, "pow_")
    def neg_(self): return self._inplace(lambda t: -t, "neg_")
    def clamp_(self, min=None, max=None): return self._inplace(  # noqa: A002
        lambda t: t.clamp(min, max), "clamp_")
    def fill_(self, value): return self._inplace(lambda t: full_like_value(t, value), "fill_")
    def copy_(self, src): return self._inplace(lambda t: _broadcast_like(src, t), "copy_")

    def normal_(self, mean: float = 0.0, std: float = 1.0):
        """Fill with N(mean, std^2) samples (the manual_seed generator), as torch's init."""
        return self._inplace(lambda t: randn(*t.shape, dtype=t.dtype, device=t.device) * std
                             + mean, "normal_")

    def uniform_(self, a: float = 0.0, b: float = 1.0):
        return self._inplace(lambda t: rand(*t.shape, dtype=t.dtype, device=t.device) * (b - a)
                             + a, "uniform_")

    def __iadd__(self, y): return self.add_(y)
    def __isub__(self, y): return self.sub_(y)
    def __imul__(self, y): return self.mul_(y)
    def __itruediv__(self, y): return self.div_(y)

    # Reductions take NumPy's axis= / keepdims= or torch's dim= / keepdim=. max and min follow
    # torch when called its way, positionally or with dim= (``_, pred = out.max(1)``): a dim
    # gives (values, indices), a tensor the elementwise extremum; axis= gives NumPy's values.
    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return apply(R.sum, self, *_axis("sum", axis, keepdims, dim, keepdim))

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return apply(R.mean, self, *_axis("mean", axis, keepdims, dim, keepdim))

    def max(self, *args, axis=None, keepdims=False, dim=None, keepdim=None):
        if args and isinstance(args[0], Tensor):
            return apply(E.maximum, self, *args)
        dim, keepdim = _torch_dim("max", args, axis, dim, keepdim)
        if dim is None:
            return apply(R.max, self, *_axis("max", axis, keepdims, dim, keepdim))
        # the values picked at the indices, so the gradient goes to that one element of a
        # tie, as torch's (max over all elements, or amax, shares it evenly)
        indices = self.argmax(dim=dim, keepdim=True)
        values = self.gather(dim, indices)
        if not keepdim:
            values, indices = values.squeeze(dim), indices.squeeze(dim)
        return MinMax(values, indices)

    def min(self, *args, axis=None, keepdims=False, dim=None, keepdim=None):
        if args and isinstance(args[0], Tensor):
            return apply(E.minimum, self, *args)
        dim, keepdim = _torch_dim("min", args, axis, dim, keepdim)
        out = self._negated().max(axis=axis, keepdims=keepdims, dim=dim, keepdim=keepdim)
        if np.dtype(self.dtype).kind == "f":
            return -out if dim is None else MinMax(-out.values, out.indices)
        back = (0 - (out if dim is None else out.values)).astype(self.dtype)
        return back if dim is None else MinMax(back, out.indices)

    def argmax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """The index of the largest element along ``axis`` / ``dim``, or of the flattened
        tensor without one (NumPy and torch alike)."""
        axis, keepdims = _axis("argmax", axis, keepdims, dim, keepdim)
        if axis is None:
            out = apply(R.argmax, self.reshape(-1), 0)
            return out.reshape((1,) * self.ndim) if keepdims else out
        out = apply(R.argmax, self, axis)
        return out.unsqueeze(axis) if keepdims else out

    def argmin(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return self._negated().argmax(axis, keepdims, dim=dim, keepdim=keepdim)

    def _negated(self):
        """-self for min/argmin: neg takes floats only, so integers and bools are negated
        in int64 (an unsigned value negated in its own dtype would wrap)."""
        return -self if np.dtype(self.dtype).kind == "f" else 0 - self.astype("int64")

    def var(self, axis=None, keepdims=False, ddof=None, *, dim=None, keepdim=None,
            unbiased=None, correction=None):
        """The variance, NumPy's way (``var(axis, keepdims, ddof=0)``) or torch's (``dim=``,
        ``keepdim=``, ``unbiased=`` / ``correction=``, unbiased by default: ddof 1)."""
        torch_way = dim is not None or keepdim is not None or unbiased is not None or (
            correction is not None)
        axis, keepdims = _axis("var", axis, keepdims, dim, keepdim)
        if ddof is None:
            ddof = (correction if correction is not None else int(unbiased)
                    if unbiased is not None else 1) if torch_way else 0
        d = self - self.mean(axis, keepdims=True)
        total = (d * d).sum(axis, keepdims=keepdims)
        n = self.size // max(total.size, 1) - ddof
        return total * (1.0 / n if n > 0 else float("nan"))     # NumPy: nan for n <= ddof

    def std(self, axis=None, keepdims=False, ddof=None, *, dim=None, keepdim=None,
            unbiased=None, correction=None):
        return self.var(axis, keepdims, ddof, dim=dim, keepdim=keepdim, unbiased=unbiased,
                        correction=correction).sqrt()

    def softmax(self, axis=-1, *, dim=None):
        return apply(ops.loss.softmax, self, axis=_axis("softmax", axis, False, dim, None)[0])

    def log_softmax(self, axis=-1, *, dim=None):
        return apply(ops.loss.log_softmax, self,
                     axis=_axis("log_softmax", axis, False, dim, None)[0])

    def clamp(self, min=None, max=None):  # noqa: A002 - torch's names
        """Limit to [min, max]. The gradient passes where min <= x <= max, boundaries included,
        as torch (maximum/minimum split it in half at a tie)."""
        out = self
        if min is not None:
            out = apply(E.where, apply(E.less, out, min), min, out)
        if max is not None:
            out = apply(E.where, apply(E.greater, out, max), max, out)
        return out

    def clip(self, min=None, max=None):  # noqa: A002 - torch's and NumPy's names
        return self.clamp(min, max)

    def where(self, condition, y):
        """``condition ? self : y`` elementwise (torch.Tensor.where)."""
        return apply(E.where, condition, self, y)

    def masked_fill(self, mask, value):
        """``value`` where the bool ``mask`` is true, else self (torch.Tensor.masked_fill)."""
        return apply(E.where, mask, value, self)

    def gather(self, dim: int, index):
        """``out[i][j] = self[i][index[i][j]]`` along ``dim`` (torch.gather; NumPy's
        take_along_axis): index has self's number of dims."""
        return apply(S.gather, self, index, dim)

    def cumsum(self, dim: int):
        return apply(R.cumsum, self, dim)

    def sort(self, dim: int = -1, descending: bool = False):
        """(values, indices) sorted along ``dim`` (stable); the values' gradient flows back to
        where each came from, as torch.sort."""
        indices = apply(R.argsort, self, dim, descending)
        return MinMax(self.gather(dim, indices), indices)

    def topk(self, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002
        """(values, indices) of the ``k`` largest (or smallest) along ``dim``, as torch.topk
        (always sorted; ties keep their order)."""
        d = dim % max(self.ndim, 1)
        if not 0 <= k <= (self.shape[d] if self.ndim else 1):
            raise ShapeError(f"topk: k={k} out of range for dimension {dim} of size "
                             f"{self.shape[d] if self.ndim else 1}")
        order = apply(R.argsort, self, dim, largest)
        indices = order[(slice(None),) * d + (slice(0, k),)]
        return MinMax(self.gather(dim, indices), indices)

    def norm(self, p=2, dim=None, keepdim: bool = False):
        """The vector p-norm over ``dim`` (all elements by default): p = 2, 1, inf or any
        positive number, as torch.norm / torch.linalg.vector_norm."""
        a = self.abs()
        if p == float("inf"):
            return a.max(axis=dim, keepdims=keepdim)
        if p == 1:
            return a.sum(dim, keepdim)
        if p == 2:
            # d||x|| = x / ||x||, taken as 0 at x = 0 (torch's), not 0 / 0
            sq = (self * self).sum(dim, keepdim)
            zero = sq == 0
            return apply(E.where, zero, 0.0, apply(E.where, zero, 1.0, sq).sqrt())
        if not p > 0:
            raise ValueError(f"norm: p must be positive or inf, got {p}")
        return (a ** float(p)).sum(dim, keepdim) ** (1.0 / p)

    def expand(self, *sizes):
        """A broadcast view at ``sizes`` (-1 keeps a dimension; new ones lead), as torch."""
        sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else sizes
        lead = len(sizes) - self.ndim
        if lead < 0:
            raise ShapeError(f"expand{tuple(sizes)}: fewer sizes than the {self.ndim} dims of "
                             f"{self.shape}")
        shape = tuple(self.shape[i - lead] if s == -1 and i >= lead else s
                      for i, s in enumerate(sizes))
        try:
            return apply(S.broadcast_to, self, shape)
        except (ShapeError, ValueError) as e:
            raise ShapeError(f"expand: {self.shape} cannot expand to {tuple(sizes)}: {e}") from None

    def expand_as(self, other):
        return self.expand(other.shape)

    def repeat(self, *sizes):
        """Tile ``sizes[i]`` copies along each dim (torch.Tensor.repeat, NumPy's tile): a
        reshape to (1, s) pairs, a broadcast to (r, s), a reshape to r*s."""
        sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else sizes
        if len(sizes) < self.ndim:
            raise ShapeError(f"repeat{tuple(sizes)}: needs at least {self.ndim} sizes for "
                             f"{self.shape}")
        shape = (1,) * (len(sizes) - self.ndim) + self.shape
        pairs = self.reshape(tuple(d for s in shape for d in (1, s)))
        tiled = pairs.expand(tuple(d for r, s in zip(sizes, shape, strict=True) for d in (r, s)))
        return tiled.reshape(tuple(r * s for r, s in zip(sizes, shape, strict=True)))

    def flip(self, *dims):
        """Reverse the order along ``dims`` (torch.flip; a slice with step -1)."""
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims
        n = max(self.ndim, 1)
        index = [slice(None)] * self.ndim
        for d in dims:
            index[d % n] = slice(None, None, -1)
        return self[tuple(index)]

    def split(self, split_size_or_sections, dim: int = 0):
        """Pieces along ``dim``: of ``split_size`` each (the last may be smaller) or of the
        listed sizes, as torch.split."""
        d = dim % max(self.ndim, 1)
        n = self.shape[d]
        if isinstance(split_size_or_sections, int | np.integer):
            step = int(split_size_or_sections)
            if step < 1:
                raise ValueError(f"split: split_size must be positive, got {step}")
            sizes = [min(step, n - i) for i in range(0, n, step)] or [0]
        else:
            sizes = [int(v) for v in split_size_or_sections]
            if sum(sizes) != n or min(sizes, default=0) < 0:
                raise ShapeError(f"split: sections {sizes} must sum to {n}, the size of "
                                 f"dimension {dim}")
        ends = np.cumsum(sizes).tolist()
        return tuple(self[(slice(None),) * d + (slice(e - k, e),)]
                     for k, e in zip(sizes, ends, strict=True))

    def chunk(self, chunks: int, dim: int = 0):
        """``chunks`` pieces (or fewer) of ceil(size / chunks) along ``dim``, as torch.chunk."""
        if chunks < 1:
            raise ValueError(f"chunk: chunks must be positive, got {chunks}")
        n = self.shape[dim % max(self.ndim, 1)]
        return self.split(max(-(-n // chunks), 1), dim)

    def tolist(self):
        """The value as nested Python lists of numbers (torch.Tensor.tolist)."""
        return self.numpy().tolist()

    def float(self): return self.astype("float32")
    def double(self): return self.astype("float64")
    def long(self): return self.astype("int64")
    def int(self): return self.astype("int32")
    def numel(self) -> int: return self.size
    def dim(self) -> int: return self.ndim
    def exp(self): return apply(E.exp, self)
    def log(self): return apply(E.log, self)
    def sqrt(self): return apply(E.sqrt, self)
    def tanh(self): return apply(E.tanh, self)
    def sin(self): return apply(E.sin, self)
    def cos(self): return apply(E.cos, self)
    def sigmoid(self): return apply(E.sigmoid, self)
    def relu(self): return apply(E.relu, self)
    def abs(self): return apply(E.abs, self)
    def astype(self, dtype): return apply(E.cast, self, dtype)
    def type_as(self, other): return self.astype(other.dtype)
    def erf(self): return apply(E.erf, self)
    def reciprocal(self): return 1.0 / self
    def log2(self): return self.log() * (1.0 / np.log(2.0))
    def log10(self): return self.log() * (1.0 / np.log(10.0))
    def maximum(self, y): return apply(E.maximum, self, y)
    def minimum(self, y): return apply(E.minimum, self, y)
    def nelement(self) -> int: return self.size
    def view_as(self, other): return self.reshape(other.shape)
    def reshape_as(self, other): return self.reshape(other.shape)
    def isnan(self): return self != self
    def isfinite(self): return (self - self) == 0           # inf - inf and nan are nan

    def clone(self):
        """A copy with the same history (its gradient flows back to self), as torch.clone."""
        return self * 1 if self.dtype != "bool" else self.astype("bool")

    def amax(self, dim=None, keepdim: bool = False):
        return apply(R.max, self, dim, bool(keepdim))

    def amin(self, dim=None, keepdim: bool = False):
        return self.min(axis=dim, keepdims=keepdim)

    def logsumexp(self, dim, keepdim: bool = False):
        """log(sum(exp(x))) over ``dim``, shifted by the maximum (no overflow), as torch."""
        m = self.amax(dim, keepdim=True).detach()
        out = (self - m).exp().sum(axis=dim, keepdims=True).log() + m
        return out if keepdim else out.squeeze(dim)

    def unbind(self, dim: int = 0):
        d = dim % max(self.ndim, 1)
        return tuple(self[(slice(None),) * d + (i,)] for i in range(self.shape[d]))

    def index_select(self, dim: int, index):
        d = dim % max(self.ndim, 1)
        return self[(slice(None),) * d + (index,)]

    def narrow(self, dim: int, start: int, length: int):
        d = dim % max(self.ndim, 1)
        return self[(slice(None),) * d + (slice(start, start + length),)]

    def masked_select(self, mask):
        return self[mask if mask.shape == self.shape else mask.expand(self.shape)]

    def nonzero(self, as_tuple: bool = False):
        """Indices of the non-zero elements (eager: their number is data), as torch."""
        found = np.nonzero(to_host(self.data))
        if as_tuple:
            return tuple(tensor(i) for i in found)
        return tensor(np.stack(found, axis=-1) if found else np.zeros((0, 0), np.int64))

    def tril(self, diagonal: int = 0):
        keep = np.tril(np.ones(self.shape[-2:], bool), diagonal)
        return apply(E.where, tensor(keep), self, 0)

    def triu(self, diagonal: int = 0):
        keep = np.triu(np.ones(self.shape[-2:], bool), diagonal)
        return apply(E.where, tensor(keep), self, 0)

    def new_zeros(self, *size, dtype=None):
        return zeros(*size, dtype=dtype or self.dtype, device=None if self.is_symbolic
                     else self.device)

    def new_ones(self, *size, dtype=None):
        return ones(*size, dtype=dtype or self.dtype, device=None if self.is_symbolic
                    else self.device)

    def new_full(self, size, fill_value, dtype=None):
        return full(size, fill_value, dtype or self.dtype)

    def new_tensor(self, data, dtype=None):
        return tensor(data, dtype=dtype or self.dtype)
    def contiguous(self): return self          # values are always contiguous here
    def square(self): return self * self
    def rsqrt(self): return 1.0 / self.sqrt()
    def log1p(self): return (1.0 + self).log()
    def sign(self): return apply(E.sign, self)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return apply(S.reshape, self, tuple(shape))

    def transpose(self, *axes):
        """NumPy's ``transpose(axes)`` (a permutation, or reversed without one); two dims, as
        torch's ``transpose(dim0, dim1)``, swap those two (so ``x.transpose(0, 1)`` of a
        matrix is its transpose, not the identity permutation)."""
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], tuple | list) else axes
        if len(axes) == 2:      # a matrix's two permutations are its two swaps
            n = max(self.ndim, 1)
            if not all(isinstance(a, int | np.integer) and -n <= a < n for a in axes):
                raise ShapeError(f"transpose{tuple(axes)}: dims out of range for a "
                                 f"{self.ndim}-d tensor")
            perm = list(range(self.ndim))
            a, b = axes[0] % n, axes[1] % n
            perm[a], perm[b] = perm[b], perm[a]
            axes = perm
        return apply(S.transpose, self, tuple(axes) if axes else None)

    def t(self):
        """The transpose of a matrix (a 0-d or 1-d tensor as it is), as torch.Tensor.t."""
        if self.ndim > 2:
            raise ShapeError(f"t() expects a tensor with <= 2 dimensions, got {self.shape}")
        return self.transpose() if self.ndim == 2 else self

    @property
    def mT(self) -> Tensor:  # noqa: N802 - torch's name
        """The last two dimensions swapped (torch's Tensor.mT, NumPy's matrix_transpose)."""
        if self.ndim < 2:
            raise ShapeError(f"mT needs at least 2 dimensions, got {self.shape}")
        return self.transpose(-2, -1)

    def flatten(self, start_dim=0, end_dim=-1):
        n = max(self.ndim, 1)                       # a 0-d tensor flattens to one element
        if not (-n <= start_dim < n and -n <= end_dim < n) or start_dim % n > end_dim % n:
            raise ShapeError(f"flatten({start_dim}, {end_dim}) of a {self.ndim}-d tensor: the "
                             f"dims must lie in [{-n}, {n - 1}], start_dim not after end_dim")
        start, end = start_dim % n, end_dim % n
        return self.reshape(self.shape[:start] + (-1,) + self.shape[end + 1:])

    def view(self, *shape):
        return self.reshape(*shape)

    def unsqueeze(self, dim: int):
        return apply(S.expand_dims, self, dim)

    def squeeze(self, dim=None):
        """Drop size-1 dims (all, or those of ``dim``); a listed dim of another size stays,
        as torch (``out.squeeze(-1)`` of a batch that is already (N,) is a no-op)."""
        if dim is not None:
            dims = dim if isinstance(dim, tuple | list) else (dim,)
            n = max(self.ndim, 1)
            dim = tuple(d for d in dims if self.ndim and self.shape[d % n] == 1)
            if not dim:
                return self
            dim = dim if isinstance(dims, tuple | list) or len(dim) > 1 else dim[0]
        return apply(S.squeeze, self, dim)

    def permute(self, *dims):
        return self.transpose(*dims)

    @property
    def T(self) -> Tensor:
        return self.transpose()


def _const(value) -> Node:
    """A constant node holding ``value`` where it lives (a GPU array stays on its GPU)."""
    if not is_device_array(value):
        return const(value)
    node = Node("const", (), {"value": value}, value.shape, dtype_name(value.dtype))
    set_eager_value(node, value)
    return node


MinMax = collections.namedtuple("MinMax", "values indices")


def _axis(op: str, axis, keepdims, dim, keepdim) -> tuple:
    """(axis, keepdims) from NumPy's names or torch's (not both)."""
    if dim is not None and axis not in (None, -1):
        raise TypeError(f"{op}: give axis= (NumPy) or dim= (torch), not both")
    return (axis if dim is None else dim), bool(keepdims if keepdim is None else keepdim)


def _torch_dim(op: str, args: tuple, axis, dim, keepdim) -> tuple:
    """(dim, keepdim) of ``max(dim, keepdim)`` / ``min`` called positionally, as torch."""
    if len(args) > 2 or args and (dim is not None or axis is not None):
        raise TypeError(f"{op}: takes (dim, keepdim) positionally, or axis= / dim= by name")
    if args:
        dim = args[0]
        keepdim = args[1] if len(args) > 1 else keepdim
    return dim, keepdim


class _Size(int):
    """A tensor's ``size``: its element count as an int (NumPy's ``a.size``, what shardgrad's
    own code reads) that, called as torch's ``size()`` / ``size(dim)``, gives the shape or one
    of its dimensions (``x.view(x.size(0), -1)``)."""

    def __new__(cls, count: int, shape: tuple[int, ...]):
        out = super().__new__(cls, count)
        out.shape = shape
        return out

    def __call__(self, dim: int | None = None):
        if dim is None:
            return self.shape
        if not -len(self.shape) <= dim < len(self.shape):
            raise IndexError(f"size({dim}): dimension out of range for a "
                             f"{len(self.shape)}-d tensor of shape {self.shape}")
        return self.shape[dim]


def _node_of(x, like: Node | None) -> Node:
    """The node standing for ``x`` in an op (eager tensors cut their history when grad is off
    or when the op is being traced: a traced graph never holds an eager past)."""
    if isinstance(x, Tensor):
        return x.node
    if is_device_array(x):
        return _const(x)
    if isinstance(x, np.ndarray | np.generic):
        return const(np.asarray(x))
    if isinstance(x, bool | int | float) and like is not None:
        return const(x, dtype=like.dtype)
    return const(np.asarray(x))


def apply(fn: Callable[..., Any], *args, **kwargs):
    """Apply a node builder ``fn`` (from ops) to tensors and plain values, eagerly or
    symbolically; returns a Tensor, or a tuple of them for multi-result builders."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(tensors) < len(args):
        for a in args:
            if isinstance(a, list | tuple):
                tensors += [t for t in a if isinstance(t, Tensor)]
    if kwargs:
        tensors += [v for v in kwargs.values() if isinstance(v, Tensor)]
    # one pass over the tensors (the lookups and device checks were a third of a small eager
    # op's dispatch)
    symbolic = on_device = track = False
    for t in tensors:
        n = t.node
        v = n.eager_value
        if v is None:
            if n.op != "const":
                symbolic = True
        elif _on_device(v):
            on_device = True
        if t._requires_grad:
            track = True
    if on_device and not symbolic:
        _same_device(fn, tensors)
    track = track and _grad_enabled[0]
    if track and not symbolic and not kwargs:     # an eager op with history: each its node
        out = fn(*[a.node if isinstance(a, Tensor) else _arg_node(a, True, False)
                   for a in args])
    else:
        out = fn(*[_arg_node(a, track, symbolic) for a in args],
                 **{k: _arg_node(v, track, symbolic) for k, v in kwargs.items()})
    if not isinstance(out, tuple):
        if not symbolic:
            _evaluate([out])
        return Tensor(out, requires_grad=track and _is_float(out.dtype))
    if not symbolic:
        _evaluate(list(out))
    return tuple(Tensor(n, requires_grad=track and _is_float(n.dtype)) for n in out)


def _arg_node(a, track: bool, symbolic: bool):
    """What an op's builder gets for argument ``a``: a tensor's node, or, where the op records
    no history for it (grad off, or a traced op), a constant cut from its past (a traced
    graph never holds an eager past, and holds host constants); lists and tuples element by
    element; anything else as is."""
    if isinstance(a, Tensor):
        n = a.node
        if (track and not symbolic) or (n.eager_value is None and n.op != "const"):
            return n
        if symbolic and a.is_cuda:
            return const(to_host(a.data))
        return n if n.op == "const" else _const(a.data)
    if isinstance(a, list | tuple):
        return type(a)(_arg_node(t, track, symbolic) for t in a)
    return a


_FLOAT_NAMES = frozenset(("float16", "float32", "float64"))


def _is_float(dtype: str) -> bool:
    return dtype in _FLOAT_NAMES or np.dtype(dtype).kind == "f"


def _same_device(fn, tensors: list[Tensor]) -> None:
    """As PyTorch: the tensors of one op live on one device (a 0-d CPU tensor, like a Python
    number, may join a GPU op)."""
    devices = {t.device for t in tensors if t.ndim or t.is_cuda}
    if len(devices) > 1:
        name = getattr(fn, "__name__", str(fn))
        raise DeviceError(f"{name}: expected all tensors on one device, found "
                          f"{' and '.join(sorted(map(str, devices)))}; move them with "
                          f".to(device) (or Module.to(device)) first")


def tensor(data, requires_grad: bool = False, dtype=None, device=None) -> Tensor:
    """A new leaf tensor holding a copy of ``data`` on ``device`` (default: where ``data``
    is, the CPU for Python and NumPy data). As in torch.tensor, arrays keep their dtype and
    Python floats take the default dtype (float32 unless set_default_dtype)."""
    src = data.data if isinstance(data, Tensor) else data
    keeps_dtype = isinstance(data, np.ndarray | np.generic | Tensor) or is_device_array(src)
    arr = array_module(src).array(src, dtype=dtype, copy=True)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"tensor() takes numbers (bool, int, float), got {arr.dtype} from "
                        f"{type(data).__name__} {str(data)[:60]!r}")
    if dtype is None and arr.dtype.kind == "f" and not keeps_dtype:
        arr = arr.astype(_default_dtype[0])
    if requires_grad and arr.dtype.kind != "f":
        raise ShapeError(f"only floating-point tensors can require gradients, got {arr.dtype}")
    if device is not None:
        arr = to_device(arr, device)
    t = Tensor(eager_leaf(arr, False), requires_grad=requires_grad)
    t._set_leaf(arr)
    return t


def placeholder(shape, dtype, op: str = "input", name: str | None = None) -> Tensor:
    """A symbolic leaf for tracing: ``input`` (fed each call), ``param`` or ``state``."""
    return Tensor(leaf(op, shape, dtype, name=name), requires_grad=op == "param")


def _shape(shape) -> tuple[int, ...]:
    """``f(2, 3)`` and ``f((2, 3))`` alike, as torch's factory functions."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
    if not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
        raise ShapeError(f"a shape is non-negative integers, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def zeros(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return full(_shape(shape), 0, dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return full(_shape(shape), 1, dtype, device, requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of ``shape`` holding ``fill_value`` (the default float dtype unless given)."""
    shape = _shape((shape,) if isinstance(shape, int | np.integer) else (tuple(shape),))
    arr = np.full(shape, fill_value, dtype or _default_dtype[0])
    return tensor(arr, requires_grad, device=device)


def zeros_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return full(t.shape, 0, dtype or t.dtype, device or t.device, requires_grad)


def ones_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return full(t.shape, 1, dtype or t.dtype, device or t.device, requires_grad)


# The generator of parameter initialisation and sg.randn / rand / randint (torch's global one).
_rng = [np.random.default_rng(0)]


def default_generator() -> np.random.Generator:
    """The generator parameter initialisation and sg.randn / rand / randint draw from (a new
    one after each manual_seed), as torch's default generator."""
    return _rng[0]


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation and sg.randn / rand / randint (data order, dropout and
    the data split have their own seeds)."""
    _rng[0] = np.random.default_rng(seed)


def randn(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Standard normal samples (from the generator manual_seed seeds)."""
    arr = _rng[0].standard_normal(_shape(shape)).astype(dtype or _default_dtype[0])
    return tensor(arr, requires_grad, device=device)


def rand(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Uniform samples in [0, 1)."""
    arr = _rng[0].random(_shape(shape)).astype(dtype or _default_dtype[0])
    return tensor(arr, requires_grad, device=device)


def randint(low: int, high: int | None = None, size=(), dtype="int64", device=None) -> Tensor:
    """Integers in [low, high) (``randint(high, size)`` starts at 0), as torch.randint."""
    if isinstance(high, tuple | list):             # torch.randint(high, size)
        high, size = None, high
    low, high = (0, low) if high is None else (low, high)
    if high <= low:
        raise ValueError(f"randint: high ({high}) must be greater than low ({low})")
    shape = _shape((size,) if isinstance(size, int | np.integer) else (tuple(size),))
    return tensor(_rng[0].integers(low, high, shape).astype(dtype), device=device)


def arange(start, end=None, step=1, dtype=None, device=None) -> Tensor:
    """``start, start + step, ...`` below ``end`` (``arange(n)`` is 0 .. n-1): int64 for
    integer arguments, else the default float dtype, as torch.arange."""
    start, end = (0, start) if end is None else (start, end)
    if step == 0:
        raise ValueError("arange: step must be non-zero")
    integral = all(isinstance(v, int | np.integer) for v in (start, end, step))
    arr = np.arange(start, end, step, dtype=dtype or ("int64" if integral else
                                                      _default_dtype[0]))
    return tensor(arr, device=device)


def join_axis(op: str, axis: int, dim: int | None) -> int:
    """The axis of a join (stack, concat): NumPy's ``axis=`` (default 0) or torch's ``dim=``."""
    if dim is not None and axis != 0:
        raise TypeError(f"{op}: give axis= (NumPy) or dim= (torch), not both")
    return axis if dim is None else dim


def stack(tensors, axis: int = 0, *, dim: int | None = None) -> Tensor:
    """Join same-shaped tensors along a new ``axis`` (torch.stack, NumPy's stack)."""
    axis = join_axis("stack", axis, dim)
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("stack of no tensors")
    ndim = (tensors[0].ndim if isinstance(tensors[0], Tensor) else np.ndim(tensors[0])) + 1
    if not -ndim <= axis < ndim:
        raise ShapeError(f"stack: axis {axis} out of range for {ndim - 1}-d tensors")
    axis %= ndim
    parts = [apply(S.expand_dims, t if isinstance(t, Tensor) else tensor(t), axis)
             for t in tensors]
    return apply(S.concat, parts, axis=axis)
