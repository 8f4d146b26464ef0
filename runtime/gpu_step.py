"""compile_step's path for a model on a GPU: the step owns its state on the device.

Parameters, buffers and optimizer state live in device storage the step owns (the optimizer's
parameters, and each of its state keys, in one flat buffer); the model's Tensors are views of
it, rebound only when user code gives one a new value, so a step builds no Node and copies
nothing back. SGD, Adam and AdamW update the whole flat buffer in one kernel (ops.gpu's flat
updates, scalars as kernel arguments); other optimizers run the update traced in the graph.
The loss comes back as a 0-d device Tensor whose label check is read with it: nothing in a
step waits for the GPU or uploads from the host. Imports graph, ops and runtime.gpu.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardgrad.graph.device import to_device
from shardgrad.graph.ir import Graph
from shardgrad.graph.optim import SGD, Adam, AdamW, Optimizer
from shardgrad.graph.tensor import Tensor, _eager_leaf
from shardgrad.ops import gpu as gpu_ops
from shardgrad.runtime.gpu import GPUExecutor

FLAT_DTYPES = ("float32", "float64")


class StepLoss(Tensor):
    """A step's loss, a 0-d Tensor on the step's device, as torch's. Reading its value
    (``float()``, ``item()``, ``numpy()``, printing) synchronizes with the GPU, and first
    raises any input check the step deferred (a label out of range), as the step would have."""

    __slots__ = ("_checks",)

    def __init__(self, value, checks: gpu_ops.DeferredChecks | None):
        super().__init__(_eager_leaf(value, False))
        self._checks = checks

    @property
    def data(self):
        checks, self._checks = self._checks, None
        if checks is not None:
            checks.raise_if_set()
        return Tensor.data.fget(self)

    @data.setter
    def data(self, value) -> None:
        Tensor.data.fset(self, value)


class _Bound:
    """A Tensor the step owns: its device storage (``view``) and the node it was bound as
    (another node means user code set a new value: copied in at the next step)."""

    __slots__ = ("tensor", "view", "node")

    def __init__(self, tensor: Tensor, view):
        self.tensor, self.view, self.node = tensor, view, None


def flat_kind(optimizer: Optimizer) -> str | None:
    """The flat update kernel for ``optimizer`` (exactly SGD, Adam or AdamW: a subclass may
    change the rule), else None."""
    return {SGD: "sgd", Adam: "adam", AdamW: "adam"}.get(type(optimizer))


class DeviceState:
    """The storage a GPU TrainStep owns for its model's parameters, buffers and optimizer
    state, and the feeds (by leaf name) that read it. ``refresh()`` (every step) copies in
    whatever user code replaced since (``load_state_dict``, ``p.data = ...``, ``to_host``)
    and rebinds that tensor; it builds nothing otherwise."""

    def __init__(self, params: list[tuple[str, Tensor]], buffers: list[tuple[str, Tensor]],
                 optimizer: Optimizer, device, xp):
        self.xp, self.device, self.optimizer = xp, device, optimizer
        name_of = {id(p): n for n, p in params}
        opt_params = optimizer.params
        dtypes = {p.dtype for p in opt_params}
        self.kind = flat_kind(optimizer) if len(dtypes) == 1 and (
            next(iter(dtypes)) in FLAT_DTYPES) else None
        self.flat_names = [name_of[id(p)] for p in opt_params]
        self.bound: list[_Bound] = []
        self.feeds: dict[str, Any] = {}
        self.views: dict[str, Any] = {}            # leaf name -> its storage
        self.flat: dict[str, Any] = {}             # "param", "grad", state key -> flat buffer
        if self.kind is not None:
            dtype = next(iter(dtypes))
            total = sum(p.size for p in opt_params)
            offsets = np.cumsum([0] + [p.size for p in opt_params])
            self.flat["param"] = xp.empty(total, dtype)
            self.flat["grad"] = xp.zeros(total, dtype)
            for k in optimizer.state_keys:
                self.flat[k] = xp.empty(total, dtype)

            def view(key, i, p):
                return self.flat[key][int(offsets[i]):int(offsets[i + 1])].reshape(p.shape)
            for i, p in enumerate(opt_params):
                self._own(self.flat_names[i], p, view("param", i, p))
                self.views[f"grad/{self.flat_names[i]}"] = view("grad", i, p)
                for k, v in optimizer.state[i].items():
                    self._own(f"optim/{self.flat_names[i]}/{k}", v, view(k, i, p))
        else:
            for i, p in enumerate(opt_params):
                self._own(self.flat_names[i], p, xp.empty(p.shape, p.dtype))
                for k, v in optimizer.state[i].items():
                    self._own(f"optim/{self.flat_names[i]}/{k}", v, xp.empty(v.shape, v.dtype))
        for n, t in params + buffers:
            if n not in self.views:
                self._own(n, t, xp.empty(t.shape, t.dtype))
        self.rebinds = 0
        self.refresh()
        self.rebinds = 0

    def _own(self, name: str, tensor: Tensor, view) -> None:
        self.bound.append(_Bound(tensor, view))
        self.views[name] = self.feeds[name] = view

    def refresh(self) -> None:
        for b in self.bound:
            if b.tensor.node is not b.node:
                value = b.tensor.data
                if value is not b.view:
                    self.xp.copyto(b.view, to_device(value, self.device))
                    b.tensor._set_leaf(b.view)
                b.node = b.tensor.node
                self.rebinds += 1


class DeviceProgram:
    """One traced step graph run against a DeviceState. With a flat update the graph is cut
    to the loss, the gradients and the buffers' new values; the gradients are written into
    the flat gradient buffer and one kernel updates every parameter and its state. Otherwise
    the graph's own update runs and its results are copied into the state's storage."""

    def __init__(self, graph: Graph, state: DeviceState):
        self.state = state
        updated = [n for n in graph.meta["params"] if f"param/{n}" in graph.outputs]
        self.flat = state.kind is not None and sorted(updated) == sorted(state.flat_names)
        if self.flat:
            keep = {"loss", *(f"grad/{n}" for n in state.flat_names)}
            keep |= {k for k in graph.outputs if k.startswith("state/")
                     and not k.startswith("state/optim/")}
            graph = Graph({k: v for k, v in graph.outputs.items() if k in keep},
                          meta=graph.meta)
            self.copies = [(k, state.views[k[len("state/"):] if k.startswith("state/") else k])
                           for k in graph.outputs if k != "loss"]
        else:
            self.copies = [(k, state.views[k.split("/", 1)[1]]) for k in graph.outputs
                           if k.startswith(("param/", "state/"))]
        self.graph = graph
        self.reads_step = any(n.op == "input" and n.name == "step" for n in graph.nodes)
        self.exe = GPUExecutor(graph, state.device, xp=state.xp)
        self.path = f"flat-{state.kind}" if self.flat else "graph-update"

    def run(self, feeds: Mapping[str, Any], checks: gpu_ops.DeferredChecks):
        xp, opt = self.state.xp, self.state.optimizer
        with checks:
            out = self.exe.run(feeds)
        for name, view in self.copies:
            xp.copyto(view, out[name])
        if self.flat:
            flat = self.state.flat
            if self.state.kind == "sgd":
                gpu_ops.sgd_update_(flat["param"], flat["grad"], flat.get("momentum_buffer"),
                                    lr=opt.lr, momentum=opt.momentum,
                                    weight_decay=opt.weight_decay, nesterov=opt.nesterov)
            else:
                gpu_ops.adam_update_(flat["param"], flat["grad"], flat["exp_avg"],
                                     flat["exp_avg_sq"], lr=opt.lr, step=opt.t + 1,
                                     betas=opt.betas, eps=opt.eps,
                                     weight_decay=opt.weight_decay, decoupled=opt.decoupled)
        return out["loss"]


__all__ = ["DeviceProgram", "DeviceState", "StepLoss", "flat_kind"]
