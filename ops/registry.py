"""The op registry: one OpDef per op, and the helpers every op family shares.

Imports only graph.ir (and NumPy). Each op family module (elementwise, reduce, linalg, shape,
nn, loss, collective) registers its stanzas here at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from shardgrad.graph.ir import BUILDERS, Node, ShapeError, const, emit, fmt_type, user_frame

Type = tuple[tuple[int, ...], str]


class OutKernel(NamedTuple):
    """An op's kernel that writes into a given buffer (the compiled program's ``out=`` form).

    ``make(xp, node) -> (fn, tail)``: the node runs as ``fn(*inputs, *tail, out=buf)`` and
    must give bitwise what the op's ``forward`` gives. ``inplace``: ``buf`` may be the buffer
    of a same-shape input that dies there (true of elementwise ufuncs). ``accepts(node)``:
    whether the kernel is exact for this node's dtypes (else the op's forward runs)."""

    make: Callable[[Any, Node], tuple[Callable[..., Any], tuple[Any, ...]]]
    inplace: bool
    accepts: Callable[[Node], bool]


class CpuKernel(NamedTuple):
    """An op's C kernel on the CPU, which the compiled program runs over its intra-op pool
    (runtime.native) in place of ``out`` for float32 and float64: ``name`` is ``"gemm"`` (a
    matmul as blocks of single-threaded BLAS GEMMs) or a kernel of ops/cpu/window.c, whose
    geometry is that of the (N, C, H, W) image ``image`` (an input's index, or -1 for the
    output) under the node's ``kernel``, ``stride`` and ``padding``. It must give the values
    ``forward`` gives."""

    name: str
    image: int = 0


# ``expr(args, arg_dtypes, dtype, attrs) -> str``: the op as one C expression over the C
# expressions ``args`` (of dtypes ``arg_dtypes``), of result ``dtype``; raises
# ops.codegen.Unsupported for a dtype it has no exact C form for.
CudaExpr = Callable[[list[str], list[str], str, dict[str, Any]], str]


@dataclass(frozen=True)
class OpDef:
    """Everything the system knows about one op: an op is one stanza in ops/<family>.py, and
    every executor finds each piece of it here, through ``kernel_for(op, device, form)``.

    name     the op's name in the IR.
    infer    ``infer(*input_types, **attrs) -> (shape, dtype)``; each input type is a
             ``(shape, dtype)`` pair. Raise ValueError/TypeError with a short reason on bad
             input: ``graph.ir.emit`` adds the op, the types and the user's source line.
    forward  ``forward(xp, *arrays, **attrs) -> array``, written once against the array
             module ``xp`` (numpy or cupy). Must not modify its inputs. The reference
             interpreter runs exactly this; it is the op's semantics.
    vjp      ``vjp(g, *inputs, out, **attrs) -> tuple[Node | None, ...]``: builds the nodes of
             the gradient for each input from the upstream gradient ``g`` (a Node). ``None``
             means no gradient flows to that input. ``None`` as the whole rule means the op is
             not differentiable (comparisons, argmax, ...).
    jvp      ``jvp(tangents, *inputs, out, **attrs) -> Node | None`` for forward mode, where
             ``tangents[i]`` is a Node or None (zero). Optional: without it forward mode
             transposes the VJP (autodiff.jvp does that).
    cost     ``cost(node) -> (flops, bytes)`` estimate for the partitioner.
    nondiff  indices of inputs that never get a gradient (labels, conditions, indices).
    out      optional OutKernel: the forward writing into a planned buffer (``out=``), used
             by the compiled program (runtime.compiled) on any device. Without it the op runs
             its ``forward`` there and the result is a fresh array.
    cpu      optional CpuKernel: the op's C kernel on the CPU (ops/cpu/, run by runtime.native
             over the intra-op pool), used by the compiled program where it builds.
    cuda     optional hand-written CUDA implementation, ``cuda(xp, *arrays, **attrs)`` with
             ``forward``'s signature and results (ops.gpu holds them, sources in ops/cuda/);
             run on a CUDA device in place of ``forward``.
    cuda_expr  optional C expression (see CudaExpr) of an elementwise op, so the op can be a
             member of a generated fused kernel (ops.codegen); an elementwise op without one
             runs alone.
    elementwise  computed independently per element, inputs broadcast to the output's shape:
             the only ops graph.passes.fusion_groups puts in fusion groups.
    effectful  the result is not a pure function of inputs and attrs (communication,
             randomness): never merged by cse, never evaluated by constant folding.
    view     ``forward`` returns a view of its input, never a copy: "any" (whatever the
             input's layout: transpose, broadcast_to), "contiguous" (only of a C-contiguous
             input: reshape) or "part" (of a slice of a C-contiguous input: unpack). The
             compiled CPU program then plans no buffer for it; the GPU program plans a view
             as its input's whole buffer, so it runs a "part" op as a copy.
    batched  row i of the output (along axis 0) is computed from row i of every input alone,
             by ``out`` for any number of rows (the window ops, over the images of a batch):
             the compiled program may split such a node over its threads.

    A new op declares its pieces in its stanza, in this order: the forward (and ``out`` /
    ``cuda`` / ``cuda_expr`` forms beside it when it has them), the VJP with its math, then
    ``register(OpDef(...))`` naming them all, then its public builder. Nothing else is
    edited: no table elsewhere lists ops. docs/internals.md walks through an example.
    """

    name: str
    infer: Callable[..., Type]
    forward: Callable[..., Any]
    vjp: Callable[..., tuple[Node | None, ...]] | None = None
    jvp: Callable[..., Node | None] | None = None
    cost: Callable[[Node], tuple[float, float]] | None = None
    nondiff: tuple[int, ...] = ()
    out: OutKernel | None = None
    cpu: CpuKernel | None = None
    cuda: Callable[..., Any] | None = None
    cuda_expr: CudaExpr | None = None
    elementwise: bool = False
    effectful: bool = False
    view: str | None = None
    batched: bool = False


REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in REGISTRY:
        raise ValueError(f"op {opdef.name!r} registered twice")
    REGISTRY[opdef.name] = opdef
    return opdef


def get(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ShapeError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


# Eager ops' C kernels: runtime.native installs ``runner(node, args) -> value | None``, which
# runs an op's CpuKernel on the intra-op pool as a compiled step does (None: the op's
# ``forward`` runs), so that the C runtime stays in runtime/ and eager code asks only here.
_cpu_runner: list[Callable[[Node, list[Any]], Any]] = []
_cpu_runner_elementwise: dict[str, Callable[[Node, list[Any]], Any]] = {}


def set_cpu_runner(runner: Callable[[Node, list[Any]], Any] | None,
                   elementwise: Callable[[Node, list[Any]], Any] | None = None,
                   names: Iterable[str] = ()) -> None:
    """Install (None: remove) the runner of eager ops' CpuKernels, and ``elementwise``, the
    runner of the elementwise ops ``names`` (from their C expressions)."""
    _cpu_runner[:] = [] if runner is None else [runner]
    _cpu_runner_elementwise.clear()
    if runner is not None and elementwise is not None:
        _cpu_runner_elementwise.update(dict.fromkeys(names, elementwise))


def cpu_runner(opdef: OpDef) -> Callable[[Node, list[Any]], Any] | None:
    """The runner of ``opdef``'s C kernel for an eager op, or None (no kernel, no runner)."""
    if not _cpu_runner:
        return None
    if opdef.cpu is None:
        return _cpu_runner_elementwise.get(opdef.name)
    return _cpu_runner[0]


# the CPU runtime's fused multi-tensor optimizer updates (runtime.native installs them): an
# object with ops.gpu's ``sgd_multi_`` and ``adam_multi_`` signatures and ``ready()`` (False
# where the C runtime is off or cannot be built); graph.optim asks here, as eager ops ask
# for the runner
_cpu_updates: list[Any] = []


def set_cpu_updates(updates: Any) -> None:
    """Install (None: remove) the CPU runtime's fused optimizer updates."""
    _cpu_updates[:] = [] if updates is None else [updates]


def cpu_updates() -> Any:
    """The CPU runtime's fused optimizer updates, or None (none installed)."""
    return _cpu_updates[0] if _cpu_updates else None


DEVICE_KINDS = ("cpu", "cuda")
FORMS = ("call", "out", "expr", "c")


def device_kind(device: Any) -> str:
    """``"cpu"`` or ``"cuda"`` for a device name (``"cuda:1"``), a Device, or an array module
    (CuPy, or a stand-in named ``cupy``, is ``"cuda"``; anything else ``"cpu"``)."""
    if isinstance(device, str):
        kind = device.split(":")[0].strip().lower()
    elif hasattr(device, "type") and isinstance(device.type, str):
        kind = device.type
    else:
        kind = "cuda" if getattr(device, "__name__", "") == "cupy" else "cpu"
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICE_KINDS}")
    return kind


def kernel_for(op: str | OpDef | Node, device: Any, form: str = "call") -> Any:
    """The one place executors find an op's kernel on a device (the device owns its kernels).

    ``form="call"``: ``fn(xp, *arrays, **attrs) -> array``, the hand-written CUDA kernel on a
    CUDA device where the op has one, else its ``forward``. ``form="out"``: the op's
    OutKernel (written against ``xp``, so the same on every device), or None. ``form="expr"``:
    on a CUDA device the op's C expression for fused kernels, or None (and None on the CPU).
    ``form="c"``: on the CPU the op's CpuKernel, or None (and None on a CUDA device).
    ``device`` is anything ``device_kind`` reads; ``op`` an op name, OpDef or Node."""
    opdef = op if isinstance(op, OpDef) else get(op.op if isinstance(op, Node) else op)
    kind = device_kind(device)
    if form == "call":
        return opdef.cuda if kind == "cuda" and opdef.cuda is not None else opdef.forward
    if form == "out":
        return opdef.out
    if form == "expr":
        return opdef.cuda_expr if kind == "cuda" else None
    if form == "c":
        return opdef.cpu if kind == "cpu" else None
    raise ValueError(f"unknown kernel form {form!r}: expected one of {FORMS}")


def is_elementwise(op: str) -> bool:
    """Whether ``op`` is a registered elementwise op (OpDef.elementwise)."""
    opdef = REGISTRY.get(op)
    return opdef is not None and opdef.elementwise


def is_effectful(op: str) -> bool:
    """Whether ``op`` is a registered effectful op (OpDef.effectful)."""
    opdef = REGISTRY.get(op)
    return opdef is not None and opdef.effectful


def builder(name: str) -> Callable[[Callable[..., Node]], Callable[..., Node]]:
    """Decorator: expose a public builder under ``name`` for Node operators."""
    def wrap(fn: Callable[..., Node]) -> Callable[..., Node]:
        BUILDERS[name] = fn
        return fn
    return wrap


def as_node(x: Any, like: Node | None = None) -> Node:
    """A Node for ``x``: Nodes pass through; Python scalars take ``like``'s dtype (weak typing,
    as NumPy and PyTorch do for ``x * 2``); arrays keep theirs."""
    if isinstance(x, Node):
        return x
    if hasattr(x, "node") and isinstance(x.node, Node):  # a front-end Tensor
        return x.node
    if isinstance(x, bool | int | float) and like is not None and _holds(like.dtype, x):
        return const(x, dtype=like.dtype)
    # a scalar that like's dtype cannot hold (1.5 with an int tensor, 2 with a bool one) keeps
    # its own dtype, so the op's dtype rule reports the mismatch instead of truncating it
    return const(np.asarray(x))


def _holds(dtype: str, x: bool | int | float) -> bool:
    """Whether a tensor of ``dtype`` holds the Python scalar ``x`` exactly enough to take it
    weakly: floats take any number; integers take ints in range; bools take bools."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return True
    if kind in "iu":
        info = np.iinfo(dtype)
        return isinstance(x, int) and info.min <= x <= info.max
    return isinstance(x, bool)


def apply(name: str, *inputs: Any, **attrs: Any) -> Node:
    """Emit ``name(*inputs, **attrs)``, promoting Python scalars to consts."""
    opdef = REGISTRY.get(name) or get(name)
    like, plain = None, False
    for x in inputs:
        if isinstance(x, Node):
            if like is None:
                like = x
        else:
            plain = True
    if plain:
        inputs = tuple([x if isinstance(x, Node) else as_node(x, like) for x in inputs])
    return emit(opdef, inputs, attrs)


# ---- shared shape rules, costs and VJP helpers -------------------------------------------------

# The consts whose values VJP rules read (through const_value) while graph.tensor records an
# eager backward's plan, per thread and task: the plan replays only where those values are
# still the same.
_CONST_READS: ContextVar[list[Node] | None] = ContextVar("const_reads", default=None)


def const_value(node: Node) -> Any:
    """The value of the const ``node``, as a VJP rule reads it to fold it into the gradient's
    nodes (a rule must not read ``attrs["value"]`` directly: graph.tensor's backward plans
    record the reads made here and re-check those values before a replay)."""
    reads = _CONST_READS.get()
    if reads is not None:
        reads.append(node)
    return node.attrs["value"]


@contextmanager
def const_reads() -> Iterator[list[Node]]:
    """``with const_reads() as reads:``: the const nodes const_value was asked for inside
    (in this thread)."""
    reads: list[Node] = []
    token = _CONST_READS.set(reads)
    try:
        yield reads
    finally:
        _CONST_READS.reset(token)


FLOAT_DTYPES = ("float16", "float32", "float64")


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    # the common cases (equal shapes, or those and scalars) without NumPy's general rule,
    # which took 3 us of a small eager op's 15
    ranked = [s for s in shapes if s != ()]
    if not ranked:
        return ()
    first = ranked[0]
    if type(first) is tuple and all(s == first for s in ranked):
        return first
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise ValueError("shapes " + " and ".join(str(tuple(s)) for s in shapes)
                         + " cannot be broadcast together") from None


def result_dtype(*dtypes: str) -> str:
    kinds = set(dtypes)
    if len(kinds) > 1:
        raise TypeError("dtypes " + ", ".join(dtypes) + " differ; cast one explicitly")
    return dtypes[0]


def broadcast_infer(*types: Type, **_: Any) -> Type:
    return broadcast_shapes(*[t[0] for t in types]), result_dtype(*[t[1] for t in types])


def float_unary_infer(x: Type, **_: Any) -> Type:
    if x[1] not in FLOAT_DTYPES:
        raise TypeError(f"needs a floating-point input, got {x[1]}")
    return x


def same_infer(x: Type, **_: Any) -> Type:
    return x


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def elementwise_cost(node: Node) -> tuple[float, float]:
    nbytes = sum(x.size * itemsize(x.dtype) for x in node.inputs) + node.size * itemsize(
        node.dtype)
    return float(node.size), float(nbytes)


def same_dtype(kinds: str) -> Callable[[Node], bool]:
    """OutKernel.accepts: the node's dtype is of a NumPy kind in ``kinds`` and every input's
    dtype is the node's."""
    return lambda n: (np.dtype(n.dtype).kind in kinds
                      and all(x.dtype == n.dtype for x in n.inputs))


def ufunc_out(name: str, kinds: str = "f", *tail: Any) -> OutKernel:
    """The OutKernel of an op that is the ufunc ``xp.<name>`` (called with extra trailing
    arguments ``tail``), exact for same-dtype inputs of the kinds ``kinds``, in place."""
    return OutKernel(lambda xp, n: (getattr(xp, name), tail), True, same_dtype(kinds))


def forward_out(accepts: Callable[[Node], bool]) -> OutKernel:
    """The OutKernel of an op whose own ``forward`` takes ``out=`` (the window ops)."""
    return OutKernel(lambda xp, n: (partial(get(n.op).forward, xp, **n.attrs), ()), False,
                     accepts)


def unbroadcast(g: Node, shape: tuple[int, ...]) -> Node:
    """Sum ``g`` down to ``shape``: the adjoint of broadcasting."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and g.shape[i + lead] != 1)
    out = apply("sum", g, axis=axes, keepdims=False) if axes else g
    lead_kept = tuple(s for i, s in enumerate(g.shape) if i not in axes)
    return out if lead_kept == shape else apply("reshape", out, shape=shape)


def zeros(shape: tuple[int, ...], dtype: str) -> Node:
    """A zero Node of ``shape`` (a broadcast scalar: no memory until used)."""
    return apply("broadcast_to", const(0, dtype=dtype), shape=tuple(shape))


def is_int(dtype: str) -> bool:
    return np.dtype(dtype).kind in "iu"


def shape_error(op: str, inputs: Sequence[Node], reason: str, **attrs: Any) -> ShapeError:
    """The error ``emit`` raises, for checks a builder makes before any node exists (composite
    ops, index normalisation): names the op, the input types and the user's source line."""
    types = ", ".join(fmt_type(x.shape, x.dtype) for x in inputs)
    extra = f" with {attrs}" if attrs else ""
    return ShapeError(f"{op}({types}){extra} at {user_frame()}: {reason}")
