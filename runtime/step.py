"""compile_step: trace the whole training step once, then run it every step.

On the CPU (or with a custom executor or transform) each call feeds the model's tensors
(parameters, buffers, optimizer state) to the executor and takes the updated ones back, so
``model.state_dict()`` and eager use keep working between steps. A model on a GPU
(``model.to("cuda")``) takes runtime.gpu_step's path: the step owns that state on the
device, the tensors are views of it, and the loss comes back as a 0-d device Tensor.
``bound_executor`` binds a step's collectives to its communicator. Imports graph, ops and
runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shardgrad.graph import passes
from shardgrad.graph.ir import Graph
from shardgrad.graph.nn import Module
from shardgrad.graph.optim import Optimizer
from shardgrad.graph.tensor import Tensor, tensor, zeros
from shardgrad.graph.trace import trace_forward, trace_step
from shardgrad.ops import collective, gpu_libs
from shardgrad.runtime import device as dev
from shardgrad.runtime.device import is_device_array, to_host
from shardgrad.runtime.executors import Executor, choose_executor
from shardgrad.runtime.interpreter import Interpreter

INIT_SCALE = 2.0 ** 16      # torch.amp.GradScaler's init_scale


def default_executor(graph: Graph):
    """The compiled Program (graph passes, planned buffers): the fast path. Pass
    ``executor=Interpreter`` for the reference."""
    return choose_executor("compiled")(graph)


def device_of(model: Module) -> dev.Device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), dev.CPU)


def executor_for(model: Module) -> Executor:
    """The default executor for where ``model``'s parameters live: the compiled Program on
    the CPU, runtime.gpu's GPUExecutor on their GPU."""
    where = device_of(model)
    return choose_executor("compiled", where) if where.is_cuda else default_executor


def _current(where: dev.Device):
    """A context making GPU ``where`` current while a step runs (nothing for the CPU)."""
    if not where.is_cuda:
        return contextlib.nullcontext()
    return dev.xp_for(where).cuda.Device(where.index or 0)


def as_batch(v):
    """A batch as the executor takes it: a Tensor's value, a GPU array as it is, anything
    else as a NumPy array."""
    v = v.data if isinstance(v, Tensor) else v
    return v if is_device_array(v) else np.asarray(v)


class TrainStep:
    """``loss = step(x, y)`` runs forward, backward and the optimizer update.

    One Graph per distinct (x, y) batch type is traced, transformed (``transform``, e.g. the
    data-parallel rewrite) and handed to ``executor`` once, then reused. A transform with an
    attribute ``split`` > 1 gets the step traced on batches that many times smaller and
    returns a graph that takes the whole batch (deterministic data parallelism does that);
    one with ``trace_context()`` has the step traced inside it (SyncBatchNorm does that).
    """

    def __init__(self, model: Module, loss_fn: Callable, optimizer: Optimizer,
                 executor: Executor | None = None,
                 transform: Callable[[Graph], Graph] | None = None, precision: str = "fp32",
                 cuda_graph: bool = True, comm: Any = None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.cuda_graph = cuda_graph
        passes.low_dtype(precision)                 # a bad name or missing package: now
        if precision == "fp16" and transform is not None:
            raise ValueError("precision = 'fp16' (dynamic loss scaling) with a step transform "
                             "(data parallelism, pipelines) is not supported yet: use 'bf16'")
        self.precision = precision
        self.executor = executor or executor_for(model)
        self.device = device_of(model)
        # a GPU model on the default executor: the step owns its state there (runtime.gpu_step),
        # data parallelism (a DataParallel transform and its communicator ``comm``) included
        self._parallel = (transform, comm) if comm is not None and resident_parallel(
            transform) else None
        self._resident = executor is None and self.device.is_cuda and (
            transform is None or self._parallel is not None)
        if self._resident:
            self.executor = self._device_program
        elif comm is not None:          # the transform's collectives run on comm
            self.executor = bound_executor(self.executor, comm)
        self._state = None
        self._last: tuple = ()
        self._steps = 0
        self.transform = transform
        self._compiled: dict[tuple, tuple[Graph, Any]] = {}
        self._params = list(model.named_parameters())   # the names trace_step gives them
        if not self._params:
            raise ValueError(f"{type(model).__name__} has no parameters to train")
        self._buffers = list(model.named_buffers())
        name_of = {id(p): n for n, p in self._params}
        foreign = [i for i, p in enumerate(optimizer.params) if id(p) not in name_of]
        if foreign:
            raise ValueError(f"the optimizer's parameters {foreign} (by position) are not "
                             f"parameters of the {type(model).__name__} being trained")
        self._n_opt_params = len(optimizer.params)      # (add_param_group later: refused)
        self._opt_states = [(f"optim/{name_of[id(p)]}/{k}", v)
                            for p, st in zip(optimizer.params, optimizer.state, strict=True)
                            for k, v in st.items()]
        if precision == "fp16":     # the dynamic loss scale, as torch's GradScaler starts it
            self.loss_scale = tensor(np.asarray(INIT_SCALE, self._params[0][1].dtype),
                                     device=self.device)
            self._opt_states += [("amp/scale", self.loss_scale),
                                 ("amp/growth", zeros((), dtype=self._params[0][1].dtype,
                                                      device=self.device))]
        self.dtype = self._params[0][1].dtype

    def graph_for(self, x, y) -> tuple[Graph, Any]:
        # which parameters are frozen is part of the traced graph (they get no update), and so
        # are the optimizer's hyper-parameters other than lr (param_groups may change them)
        # and each module's train/eval mode (model.eval() steps use the running statistics)
        frozen = tuple(n for n, p in self._params if not p.requires_grad)
        key = (tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype), frozen,
               self.optimizer.hyperparameters(), self._modes())
        if key not in self._compiled:
            if len(self.optimizer.params) != self._n_opt_params:
                raise ValueError("the optimizer gained parameters (add_param_group) after this "
                                 "step was made, which feeds its state as it was then: make "
                                 "the step again (compile_step) after add_param_group")
            split = getattr(self.transform, "split", 1)
            if split > 1 and (key[0][:1] != key[2][:1] or key[0][0] % split):
                raise ValueError(f"batch of {key[0][0]} rows (labels: {key[2][:1]}) cannot be "
                                 f"split into {split} equal parts for this step's transform")
            if split > 1:
                key_traced = (((key[0][0] // split,) + key[0][1:], key[1]),
                              ((key[2][0] // split,) + key[2][1:], key[3]))
            else:
                key_traced = (key[:2], key[2:4])
            context = getattr(self.transform, "trace_context", contextlib.nullcontext)
            with context():
                graph = trace_step(self.model, self.loss_fn, self.optimizer, *key_traced,
                                   loss_scaling=self.precision == "fp16")
            if self.transform is not None and not self._resident:
                graph = self.transform(graph)      # (a resident step applies it itself)
            # the CPU emulates low precision (rounding around float32 GEMMs): docs/gpu.md
            graph = passes.autocast(graph, self.precision, emulate=not self.device.is_cuda)
            self._compiled[key] = (graph, self.executor(graph))
        return self._compiled[key]

    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.model.modules())

    @property
    def graph(self) -> Graph:
        """The most recently built step graph."""
        if not self._compiled:
            raise RuntimeError("no step has been traced yet: call the step once or graph_for")
        return next(reversed(self._compiled.values()))[0]

    def feeds(self, x, y) -> dict[str, Any]:
        opt = self.optimizer
        feeds: dict[str, Any] = {"x": x, "y": y, "lr": np.asarray(opt.lr, self.dtype),
                                 "t": np.asarray(opt.t + 1, self.dtype),
                                 "step": np.asarray(opt.t + 1, np.int64)}
        feeds.update((n, p.data) for n, p in self._params)
        feeds.update((n, b.data) for n, b in self._buffers)
        feeds.update((n, v.data) for n, v in self._opt_states)
        return feeds

    def __call__(self, x, y) -> float | Tensor:
        """Run one step on batch ``(x, y)``. Returns the loss: a float on the CPU, a 0-d
        device Tensor for a model on a GPU (``float(loss)`` waits for the GPU; see
        runtime.gpu_step.StepLoss)."""
        x, y = as_batch(x), as_batch(y)
        if self._resident:
            return self._device_step(x, y)
        _, program = self.graph_for(x, y)
        with _current(self.device):
            out = program.run(self.feeds(x, y))
        self.write_back(out)
        self._steps += 1
        return float(out["loss"])

    def _device_program(self, graph: Graph):
        from shardgrad.runtime import gpu_step

        self._own_state()
        return gpu_step.DeviceProgram(graph, self._state, self._parallel)

    def _own_state(self) -> None:
        from shardgrad.runtime import gpu_step

        if self._state is None:
            with _current(self.device):
                self._state = gpu_step.DeviceState(
                    self._params, self._buffers + [
                        s for s in self._opt_states if s[0].startswith("amp/")],
                    self.optimizer, self.device, dev.xp_for(self.device))
                self._checks = gpu_step.gpu_ops.DeferredChecks()

    def _device_step(self, x, y) -> Tensor:
        from shardgrad.runtime import gpu_step

        opt = self.optimizer
        # the cache key: the batch types, the frozen set and the rule's constants (compared,
        # not rebuilt into a tuple of tuples, on the hot path)
        hyper = opt.hyperparameters()
        modes = self._modes()
        last = self._last
        if not (last and last[0] == x.shape and last[1] == x.dtype and last[2] == y.shape
                and last[3] == y.dtype and last[4] == hyper and last[5] == modes and all(
                    p.requires_grad for _, p in self._params)):
            with _current(self.device):
                self._own_state()
                _, self._program = self.graph_for(x, y)
                key = (x.shape, x.dtype, y.shape, y.dtype, hyper, modes)
                self._feeds = dict(self._state.feeds)
                self._last = key if all(p.requires_grad for _, p in self._params) else ()
        state, feeds = self._state, self._feeds
        state.refresh()
        feeds["x"], feeds["y"] = x, y
        if not self._program.flat:     # scalars the traced update reads (uploaded on change)
            feeds["lr"] = np.asarray(opt.lr, self.dtype)
            feeds["t"] = np.asarray(opt.t + 1, self.dtype)
        if self._program.reads_step:   # random ops' salt
            feeds["step"] = np.asarray(opt.t + 1, np.int64)
        with _current(self.device):
            loss = self._program.run(feeds, self._checks, self.cuda_graph)
        opt.t += 1
        self._steps += 1
        return gpu_step.StepLoss(loss, self._checks)

    def stats(self) -> dict[str, Any]:
        """Which path the last step took and its facts: ``path`` is ``host-feeds`` (each step
        feeds the parameters and takes the new ones back; the CPU, or a custom executor or
        transform), ``flat-sgd`` / ``flat-adam`` (state owned on the GPU, one update kernel)
        or ``graph-update`` (state owned on the GPU, the traced update); ``cuda_graph`` says
        whether steps replay a captured CUDA Graph and ``graph`` why not (``captured``, or
        the reason plain launches run); ``rebinds`` counts tensors copied in because user
        code replaced their values; ``memory`` is the GPU step's static memory plan
        (runtime.gpu.MemoryPlan.stats: arena, naive and peak bytes, ops left unplanned);
        ``gemm`` which GEMM a capture uses (runtime.capture_gemm: cuBLAS called directly
        with a preset workspace, or why CuPy's matmul stays)."""
        out: dict[str, Any] = {"device": str(self.device), "steps": self._steps,
                               "cuda_graph": False, "path": "host-feeds"}
        if self._resident and getattr(self, "_program", None) is not None:
            out.update(path=self._program.path, rebinds=self._state.rebinds,
                       cuda_graph=self._program.cuda_graph, graph=self._program.graph_note,
                       fused_groups=self._program.exe.n_fused,
                       launch_actions=len(self._program.exe.actions),
                       memory=self._program.exe.plan.stats(),
                       gemm=self._program.gemm_note, libraries=gpu_libs.report())
        return out

    def write_back(self, out: dict[str, Any]) -> None:
        self.optimizer.t += 1
        self.load_outputs(out)

    def load_outputs(self, out: Mapping[str, Any]) -> None:
        """Set the parameters (``param/<name>``), buffers and optimizer state
        (``state/<name>``) found in ``out``, a step's outputs, leaving the rest as they are."""
        for n, p in self._params:
            if f"param/{n}" in out:            # frozen or not the optimizer's: unchanged
                p._set_leaf(out[f"param/{n}"])
        for n, t in self._buffers + self._opt_states:
            if f"state/{n}" in out:
                t._set_leaf(out[f"state/{n}"])

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this process holds (per-parameter state, e.g. momentum or
        Adam's moments, and the fp16 loss scale)."""
        return sum(int(t.data.nbytes) for _, t in self._opt_states)

    def to_host(self) -> None:
        """Copy the parameters, buffers and optimizer state that steps on a GPU left on the
        device back into NumPy arrays (before evaluating, checkpointing or summarizing); the
        next step uploads them again."""
        for _, t in self._params + self._buffers + self._opt_states:
            if is_device_array(t.data):
                t._set_leaf(to_host(t.data))


class Bound:
    """Runs ``inner`` (anything with ``run(feeds)``) inside ``collective.bind(comm, **groups)``,
    so the graph's collective ops reach ``comm``. ``fault`` is called before each run with
    the 1-based run count (fault injection)."""

    def __init__(self, inner: Any, comm: Any, groups: Mapping[str, Any],
                 fault: Callable[[int], None] | None = None):
        self.inner, self.comm, self.groups, self.fault = inner, comm, dict(groups), fault
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        if self.fault is not None:
            self.fault(self.runs)
        with collective.bind(self.comm, **self.groups):
            return self.inner.run(feeds)


def bound_executor(executor: Callable[[Graph], Any] | None, comm: Any,
                   fault: Callable[[int], None] | None = None, **groups: Any
                   ) -> Callable[[Graph], Bound]:
    """``executor`` (default: the reference Interpreter) whose runs see ``comm``: the one
    binding of a step's collectives to its communicator (runtime.dp's ParallelStep and
    ``compile_step(..., comm=)`` alike)."""
    make = executor or Interpreter
    return lambda graph: Bound(make(graph), comm, groups, fault)


def resident_parallel(transform) -> bool:
    """Whether a GPU step can own its state under ``transform``: data parallelism by
    allreduce (the deterministic mode's chunked graph runs through the host-feeds path)."""
    from shardgrad.partition.data_parallel import DataParallel

    # type, not isinstance: ZeRO-1 (partition.zero.Zero1, a subclass) shards the update
    return type(transform) is DataParallel and not transform.deterministic and (
        transform.split == 1)


def compile_step(model: Module, loss_fn: Callable, optimizer: Optimizer,
                 executor: Executor | None = None,
                 transform: Callable[[Graph], Graph] | None = None,
                 precision: str = "fp32", cuda_graph: bool = True,
                 accumulate: int = 1, comm: Any = None) -> TrainStep:
    """Trace ``loss_fn(model(x), y)``, its gradients and ``optimizer``'s update into one
    Graph (built on the first call), and return the callable step. ``precision`` "bf16" or
    "fp16" runs matmuls and convolutions in that dtype (graph.passes.autocast), the rest in
    float32; fp16 adds dynamic loss scaling (``step.loss_scale``), as torch's GradScaler.
    On a GPU, ``cuda_graph`` (default) captures the step after a warm-up and replays it
    where it can (``stats()`` says whether it does and why not).

    ``accumulate`` k > 1: gradient accumulation. Call the step with k batches at once (x of
    k * B rows); it is traced on B rows, runs k times and updates once with the mean of the
    k gradients (``train.accumulate`` does the same).

    ``comm``: the communicator a data-parallel ``transform`` (partition.DataParallel) runs
    over; with it a GPU model keeps its state on the device, its flat gradient buffer
    allreduced a bucket at a time (sg.distributed and ``shardgrad train`` pass it)."""
    if accumulate > 1:
        if transform is not None:
            raise ValueError("compile_step: accumulate with a transform: give the transform "
                             "the chunks (DataParallel(..., deterministic=True, chunks=k * "
                             "world_size))")
        from shardgrad.partition.data_parallel import DataParallel

        transform = DataParallel(1, deterministic=True, chunks=accumulate)
    return TrainStep(model, loss_fn, optimizer, executor, transform, precision, cuda_graph,
                     comm)


class Predictor:
    """Batched inference with the eval-mode forward graph, built once per batch shape."""

    def __init__(self, model: Module, executor: Executor | None = None):
        self.model, self.executor = model, executor or executor_for(model)
        self.device = device_of(model)
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, x) -> np.ndarray:
        """The logits for batch ``x``, as a NumPy array (copied from the GPU if need be)."""
        x = as_batch(x)
        key = (x.shape, str(x.dtype))
        if key not in self._compiled:
            self._compiled[key] = self.executor(trace_forward(self.model, key))
        feeds = {"x": x, **{n: p.data for n, p in self.model.named_parameters()},
                 **{n: b.data for n, b in self.model.named_buffers()}}
        with _current(self.device):
            # a copy: the executor may hand back a buffer its next run reuses (a transformer's
            # logits were overwritten by the following batch's)
            return np.array(to_host(self._compiled[key].run(feeds)["logits"]))


def accuracy(model: Module, x, y, batch_size: int = 512, executor: Executor | None = None
             ) -> float:
    """The fraction of rows of ``x`` whose largest logit is at the integer label in ``y``."""
    y = to_host(as_batch(y))         # labels may be on the GPU (np.asarray refuses CuPy's)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"accuracy needs one integer label per row of x: got labels of shape "
                         f"{y.shape} for {len(x)} rows")
    predict = Predictor(model, executor)
    x = as_batch(x)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((predict(x[i:i + batch_size]).argmax(axis=1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)
