"""Tracing a whole training step into one Graph: forward, loss, backward, optimizer update.

The model's parameters and buffers and the optimizer's state are swapped for symbolic leaves
while the user's code runs, so the same Python builds the graph; the eager tensors are put
back afterwards. Imports graph (ir, autodiff, tensor, nn, optim) and ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from shardgrad.graph.autodiff import backprop
from shardgrad.graph.ir import Graph, ShapeError, const, toposort
from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer, clip_grad_norm, global_norm
from shardgrad.graph.tensor import Tensor, placeholder, tracing_salt
from shardgrad.ops import elementwise as E
from shardgrad.ops.nn import batch_stats_sync


@contextlib.contextmanager
def _swapped(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    saved = [(t, t.node) for t, _ in pairs]
    try:
        for t, sym in pairs:
            t.node = sym.node
        yield
    finally:
        for t, node in saved:
            t.node = node


@contextlib.contextmanager
def _mode(model: Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` inside; every sub-module's own mode restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in saved:
            object.__setattr__(m, "training", mode)          # as Module.train sets it


GROWTH_INTERVAL = 2000      # torch.amp.GradScaler's defaults: x2 after this many finite steps,
BACKOFF = 0.5               # x0.5 after a step with an inf or NaN gradient (skipped)


def _loss_scaled_update(outputs: dict, scale: Tensor, growth: Tensor, grads: list[Tensor],
                        olds: dict[str, Tensor]) -> None:
    """Dynamic loss scaling in the graph, as torch's GradScaler: the gradients came out
    multiplied by ``scale``; if any is inf or NaN the step's updates are skipped (each
    ``param/`` and ``state/optim/`` output takes its old value) and the scale halves, else
    after GROWTH_INTERVAL finite steps in a row it doubles."""
    total = grads[0].sum()
    for g in grads[1:]:
        total = total + g.sum()
    bad = ((total * 0.0) != 0.0).node    # inf * 0 and NaN * 0 are NaN, and NaN != 0
    for k, old in olds.items():
        outputs[k] = E.where(bad, old.node, outputs[k])
    count = Tensor(E.where(bad, (growth * 0.0).node, (growth + 1.0).node))
    grow = (count >= float(GROWTH_INTERVAL)).node
    outputs["state/amp/scale"] = E.where(bad, (scale * BACKOFF).node,
                                         E.where(grow, (scale * 2.0).node, scale.node))
    outputs["state/amp/growth"] = E.where(grow, (count * 0.0).node, count.node)


def trace_step(model: Module, loss_fn: Callable, optimizer: Optimizer | None,
               x_spec: tuple[tuple[int, ...], str], y_spec: tuple[tuple[int, ...], str],
               loss_scaling: bool = False) -> Graph:
    """The training-step Graph for a batch of the given (shape, dtype) specs.

    Leaves: inputs ``x``, ``y``, ``lr``, ``t`` (1-based step, float), ``step`` (int64, only
    if random ops use it); params by ``named_parameters()`` names (those with
    ``requires_grad``); states for buffers and frozen parameters (their names) and optimizer
    state (``optim/<param>/<key>``). Each module runs in the mode it is in (``model.eval()``
    before a step: running statistics, no dropout, as an eager step would).
    Outputs: ``loss``, ``grad/<param>``, ``param/<param>`` (updated), ``state/<name>``
    (updated), and with ``optimizer.max_grad_norm`` set ``grad_norm`` (the gradients' global
    L2 norm before clipping, as torch's clip_grad_norm_ returns it). ``meta``: ``params``,
    ``states`` (names in order), ``loss_scale`` = ``"mean"`` (the loss averages over the
    batch).

    ``loss_scaling`` (fp16): backward starts from the state ``amp/scale`` instead of 1, the
    gradients are unscaled before the update, and a step whose gradients hold an inf or NaN
    keeps the old parameters and optimizer state; states ``amp/scale`` and ``amp/growth``
    are updated as torch's GradScaler updates its scale (see ``_loss_scaled_update``).
    """
    every = list(model.named_parameters())
    named = [(n, p) for n, p in every if p.requires_grad]
    if not named:
        raise ShapeError(f"{type(model).__name__} has no parameters to train")
    frozen = [(n, p) for n, p in every if not p.requires_grad]
    dtype = named[0][1].dtype
    name_of = {id(p): n for n, p in every}
    swaps = [(p, placeholder(p.shape, p.dtype, "param", name=n)) for n, p in named]
    # a frozen parameter (requires_grad=False) is read, not differentiated or updated
    swaps += [(p, placeholder(p.shape, p.dtype, "state", name=n)) for n, p in frozen]
    buffers = list(model.named_buffers())
    swaps += [(b, placeholder(b.shape, b.dtype, "state", name=n)) for n, b in buffers]
    opt_states = []
    if optimizer is not None:
        for p, st in zip(optimizer.params, optimizer.state, strict=True):
            if id(p) not in name_of:
                raise ShapeError("the optimizer holds a parameter that is not the model's")
            for k, v in st.items():
                name = f"optim/{name_of[id(p)]}/{k}"
                opt_states.append((name, v))
                swaps.append((v, placeholder(v.shape, v.dtype, "state", name=name)))
    leaves = {id(t): sym.node for t, sym in swaps}

    x = placeholder(*x_spec, name="x")
    y = placeholder(*y_spec, name="y")
    with _swapped(swaps), tracing_salt(placeholder((), "int64", name="step")):
        loss = loss_fn(model(x), y)
        if not isinstance(loss, Tensor) or loss.size != 1:
            raise ShapeError(f"loss_fn must return a scalar Tensor, got {loss!r}")
        loss = loss.reshape(())              # one element of any shape, as torch's backward
        new_buffers = {n: b.node for n, b in buffers}
        params = [leaves[id(p)] for _, p in named]
        seed = const(1, dtype=loss.dtype)
        if loss_scaling:      # fp16: the backward pass starts from the scale, not from 1
            scale = placeholder((), dtype, "state", name="amp/scale")
            growth = placeholder((), dtype, "state", name="amp/growth")
            seed = scale.node
        grads = backprop([loss.node], [seed], params)
        if loss_scaling:
            scaled = [Tensor(g) for g in grads]
            grads = [(g * (1.0 / scale)).node for g in scaled]
        outputs = {"loss": loss.node}
        outputs.update({f"grad/{n}": g for (n, _), g in zip(named, grads, strict=True)})
        if optimizer is not None:
            lr = placeholder((), dtype, name="lr")
            t = placeholder((), dtype, name="t")
            # a parameter the loss does not use gets no update, as in torch (its grad is None)
            used = {n.id for n in toposort([loss.node])}
            olds: dict[str, Tensor] = {}
            grad_of = {id(p): Tensor(g) for (_, p), g in zip(named, grads, strict=True)
                       if leaves[id(p)].id in used}
            if optimizer.max_grad_norm and grad_of:
                # an output, so a pipeline stage can swap in the norm over all its stages
                norm = global_norm(grad_of.values())
                outputs["grad_norm"] = norm.node
                grad_of = clip_grad_norm(grad_of, optimizer.max_grad_norm, norm)
            for i, (p, st) in enumerate(zip(optimizer.params, optimizer.state, strict=True)):
                if id(p) not in grad_of:
                    continue                       # frozen or unused: no update
                pname = name_of[id(p)]
                new_p, new_st = optimizer.group_rule(i, Tensor(leaves[id(p)]), grad_of[id(p)],
                                                      st, lr, t)
                outputs[f"param/{pname}"] = new_p.node
                outputs.update({f"state/optim/{pname}/{k}": v.node for k, v in new_st.items()})
                olds[f"param/{pname}"] = Tensor(leaves[id(p)])
                olds.update({f"state/optim/{pname}/{k}": st[k] for k in new_st})
            if loss_scaling:
                _loss_scaled_update(outputs, scale, growth,
                                    [s for s, (_, p) in zip(scaled, named, strict=True)
                                     if id(p) in grad_of], olds)
        for n, node in new_buffers.items():
            outputs[f"state/{n}"] = node
    for n, b in buffers:
        if f"state/{n}" in outputs and outputs[f"state/{n}"] is leaves[id(b)]:
            del outputs[f"state/{n}"]
    meta = {"params": [n for n, _ in named],
            "states": [n for n, _ in buffers + frozen] + [n for n, _ in opt_states]
            + (["amp/scale", "amp/growth"] if loss_scaling and optimizer is not None else []),
            "loss_scale": "mean", "dtype": dtype,
            "loss_scaling": bool(loss_scaling and optimizer is not None),
            "batch_stats_synced": batch_stats_sync() is not None}
    return Graph(outputs, meta=meta)


def trace_forward(model: Module, x_spec: tuple[tuple[int, ...], str]) -> Graph:
    """The inference graph ``logits = model(x)`` in eval mode (for evaluation and export)."""
    named = list(model.named_parameters())
    swaps = [(p, placeholder(p.shape, p.dtype, "param", name=n)) for n, p in named]
    swaps += [(b, placeholder(b.shape, b.dtype, "state", name=n))
              for n, b in model.named_buffers()]
    x = placeholder(*x_spec, name="x")
    with _swapped(swaps), _mode(model, False):
        out = model(x)
    if not isinstance(out, Tensor):
        raise ShapeError(f"{type(model).__name__}(x) must return one Tensor of logits for "
                         f"inference (Predictor, accuracy), got {type(out).__name__}")
    return Graph({"logits": out.node}, meta={"params": [n for n, _ in named]})


