"""One training step of an MLP (784-512-512-10, float32, MSE loss, SGD) and of a CNN
(conv(1->16,3x3)+ReLU+maxpool2+conv(16->32,3x3)+ReLU+maxpool2+linear(800->10) on 28x28, batch
64, cross-entropy, SGD), timed for shardgrad's compiled Program, the reference interpreter, a
hand-written NumPy step and PyTorch eager (when torch is installed), plus the per-node overhead
on a tiny MLP (compiled, interpreted and eager) and the planner's memory figures. Two more:
``gelu``, the MLP with exact GELU (torch's nn.GELU()) traced by sg.compile_step, and ``eager``
and ``eager_cnn``, the MLP and the CNN step run eagerly (model(x), loss.backward(),
opt.step()) against the same in torch.

    python bench/bench_step.py                       # MLP batches 128 and 1024, CNN, per node
    python bench/bench_step.py --batches 128 --rounds 3 --out bench/step.json
    python bench/bench_step.py --graph frontend      # the MLP step traced by sg.compile_step
    python bench/bench_step.py --benches cnn         # only the CNN (traced by sg.compile_step)
    python bench/bench_step.py --benches cnn gelu eager --threads 1 2   # issue 12's targets

``--threads N [M ...]``: every bench at each count, set in each worker as ``device.threads``
sets it (threadpoolctl's BLAS limit, plus the OpenMP/BLAS variables) and torch.set_num_threads.

Each measurement runs in a fresh process; implementations alternate round by round, and the
ratios are paired (taken within a round, then the median over rounds), so slow drift of the
machine cancels. A graph builder is one function in GRAPHS: swap in another to time it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

SIZES = (784, 512, 512, 10)
LR = 0.01


# ---- graph builders: (batch, sizes, lr) -> (Graph, feeds by leaf name) ----------------------

def graph_from_ops(batch: int, sizes=SIZES, lr: float = LR):
    """The step built directly from ops (tests/graph/graph_cases.mlp_step: x@w+b, relu, MSE,
    autodiff.grad, p - lr*g)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "graph"))
    from graph_cases import mlp_step

    graph = mlp_step(batch, sizes, lr)
    leaf = {p.name: p for p in graph.params}
    params = [leaf[f"{k}{i}"] for i in range(len(sizes) - 1) for k in "wb"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((batch, sizes[0])).astype(np.float32),
             "y": rng.standard_normal((batch, sizes[-1])).astype(np.float32)}
    for p in params:
        feeds[p.name] = (rng.standard_normal(p.shape) / np.sqrt(p.shape[0])).astype(np.float32)
    return graph, feeds


def graph_from_frontend(batch: int, sizes=SIZES, lr: float = LR):
    """The step traced by the front end (sg.nn, F.mse_loss-like loss, sg.optim.SGD)."""
    import shardgrad as sg
    from shardgrad.runtime.step import compile_step

    sg.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(sg.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(sg.nn.ReLU())
    model = sg.nn.Sequential(*layers)

    def mse(out, y):
        d = out - y
        return (d * d).mean()

    step = compile_step(model, mse, sg.optim.SGD(model.parameters(), lr=lr))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.standard_normal((batch, sizes[-1])).astype(np.float32)
    graph, _ = step.graph_for(x, y)
    return graph, step.feeds(x, y)


GRAPHS = {"ops": graph_from_ops, "frontend": graph_from_frontend}


# ---- implementations: each returns a zero-argument step function -----------------------------

def _feed_back(out, feeds):
    for k, v in out.items():
        if k.startswith(("param/", "state/")):
            feeds[k.split("/", 1)[1]] = v


def make_shardgrad(kind: str, graph_name: str, batch: int):
    graph, feeds = GRAPHS[graph_name](batch)
    if kind == "interpreter":
        from shardgrad.runtime.interpreter import Interpreter
        program = Interpreter(graph)
    else:
        from shardgrad.runtime.compiled import compile
        program = compile(graph)
    if kind == "compiled_inplace":
        # parameters live in one flat buffer; the update writes into it (outputs_into)
        names = [k.split("/", 1)[1] for k in graph.outputs if k.startswith("param/")]
        flat = np.empty(sum(feeds[n].size for n in names), np.float32)
        into, k = {}, 0
        for n in names:
            view = flat[k:k + feeds[n].size].reshape(feeds[n].shape)
            view[...] = feeds[n]
            feeds[n] = into[f"param/{n}"] = view
            k += view.size
        return lambda: program.run(feeds, outputs_into=into), program

    def step():
        _feed_back(program.run(feeds), feeds)
    return step, program


def make_numpy(batch: int):
    """A hand-written NumPy step with the same math (the natural way: a few in-place ops)."""
    _, feeds = graph_from_ops(batch)
    x, y = feeds["x"], feeds["y"]
    w0, b0, w1, b1, w2, b2 = (feeds[k] for k in ("w0", "b0", "w1", "b1", "w2", "b2"))
    lr = np.float32(LR)

    def step():
        h0 = x @ w0
        h0 += b0
        a0 = np.maximum(h0, 0)
        h1 = a0 @ w1
        h1 += b1
        a1 = np.maximum(h1, 0)
        out = a1 @ w2
        out += b2
        d = out - y
        loss = np.mean(d * d)
        g = d * np.float32(2.0 / d.size)
        gw2, gb2 = a1.T @ g, g.sum(axis=0)
        ga1 = g @ w2.T
        ga1 *= h1 > 0
        gw1, gb1 = a0.T @ ga1, ga1.sum(axis=0)
        ga0 = ga1 @ w1.T
        ga0 *= h0 > 0
        gw0, gb0 = x.T @ ga0, ga0.sum(axis=0)
        for p, gp in ((w0, gw0), (b0, gb0), (w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2)):
            p -= lr * gp
        return loss
    return step


def make_torch(batch: int, sizes=SIZES):
    """PyTorch eager as people write it: nn.Linear, mse_loss, optim.SGD."""
    import torch

    _, feeds = graph_from_ops(batch, sizes)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(feeds[f"w{i}"].T.copy()))
            lin.bias.copy_(torch.from_numpy(feeds[f"b{i}"]))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["y"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return step


# ---- (b) the CNN step -------------------------------------------------------------------------

CNN_BATCH = 64
CNN_IMPLS = ("compiled", "interpreter", "numpy", "torch")


def cnn_model():
    """The sg model, seeded: its initial parameters are every implementation's."""
    import shardgrad as sg

    sg.manual_seed(0)
    nn = sg.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 5 * 5, 10))


def cnn_batch(batch: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, 1, 28, 28)).astype(np.float32),
            rng.integers(0, 10, batch))


def make_cnn_shardgrad(kind: str, batch: int):
    """The step as users write it: sg.nn model, F.cross_entropy, sg.optim.SGD, traced once by
    sg.compile_step; each call feeds the batch and takes the new parameters back."""
    import shardgrad as sg
    from shardgrad.runtime.compiled import compile
    from shardgrad.runtime.interpreter import Interpreter

    model = cnn_model()
    step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                           sg.optim.SGD(model.parameters(), lr=LR),
                           executor=compile if kind == "compiled" else Interpreter)
    x, y = cnn_batch(batch)
    _, program = step.graph_for(x, y)
    return lambda: step(x, y), program


def make_cnn_numpy(batch: int):
    """A straightforward NumPy step: im2col rows (N*OH*OW, C*9) copied from a strided view, one
    matmul per conv, pooling by reshape (the gradient goes to every tied maximum), col2im by
    adding the 9 shifted slices."""
    w0, b0, w1, b1, w2, b2 = (np.array(v) for v in cnn_model().state_dict().values())
    x, y = cnn_batch(batch)
    lr = np.float32(LR)
    rows = np.arange(batch)

    def im2col(a):
        n, c, h, w = a.shape
        s = a.strides
        win = np.lib.stride_tricks.as_strided(a, (n, h - 2, w - 2, c, 3, 3),
                                              (s[0], s[2], s[3], s[1], s[2], s[3]))
        return win.reshape(n * (h - 2) * (w - 2), c * 9)

    def col2im(cols, shape):
        n, c, h, w = shape
        cols = cols.reshape(n, h - 2, w - 2, c, 3, 3)
        out = np.zeros(shape, cols.dtype)
        for i in range(3):
            for j in range(3):
                out[:, :, i:i + h - 2, j:j + w - 2] += cols[..., i, j].transpose(0, 3, 1, 2)
        return out

    def conv(a, w, b):
        n, _, h, wd = a.shape
        cols = im2col(a)
        out = cols @ w.reshape(len(w), -1).T + b
        return out.reshape(n, h - 2, wd - 2, len(w)).transpose(0, 3, 1, 2), cols

    def pool(a):
        n, c, h, w = a.shape
        a6 = a[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
        return a6.max(axis=(3, 5)), a6

    def pool_back(g, a6, out, shape):
        mask = a6 == out[:, :, :, None, :, None]
        gx = np.zeros(shape, g.dtype)
        n, c, oh, _, ow, _ = a6.shape
        gx[:, :, :2 * oh, :2 * ow] = (mask * g[:, :, :, None, :, None]).reshape(
            n, c, 2 * oh, 2 * ow)
        return gx

    def conv_back(g, cols, w):
        gr = g.transpose(0, 2, 3, 1).reshape(-1, len(w))
        return (gr.T @ cols).reshape(w.shape), g.sum(axis=(0, 2, 3)), gr @ w.reshape(len(w), -1)

    def step():
        h0, c0 = conv(x, w0, b0)
        a0 = np.maximum(h0, 0)
        p0, a06 = pool(a0)
        h1, c1 = conv(p0, w1, b1)
        a1 = np.maximum(h1, 0)
        p1, a16 = pool(a1)
        f = p1.reshape(batch, -1)
        z = f @ w2.T + b2
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(total[:, 0]) - z[rows, y])
        g = e / total
        g[rows, y] -= 1
        g /= batch
        gw2, gb2, gf = g.T @ f, g.sum(axis=0), g @ w2
        ga1 = pool_back(gf.reshape(p1.shape), a16, p1, a1.shape)
        gw1, gb1, gc1 = conv_back(ga1 * (h1 > 0), c1, w1)
        ga0 = pool_back(col2im(gc1, p0.shape), a06, p0, a0.shape)
        gw0, gb0, _ = conv_back(ga0 * (h0 > 0), c0, w0)
        for p, gp in ((w0, gw0), (b0, gb0), (w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2)):
            p -= lr * gp
        return loss
    return step


def make_cnn_torch(batch: int):
    """PyTorch eager as people write it: nn.Conv2d, nn.MaxPool2d, cross_entropy, optim.SGD."""
    import torch

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 5 * 5, 10))
    state = cnn_model().state_dict()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = (torch.from_numpy(v) for v in cnn_batch(batch))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


# ---- (c) the exact-GELU MLP, traced; (d) the MLP step run eagerly ----------------------------

GELU_BATCH = 128
GELU_IMPLS = ("compiled", "interpreter", "torch")
EAGER_BATCH = 128
EAGER_IMPLS = ("sg_eager", "torch")


def _mlp_module(nn, act, sizes=SIZES):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _mlp_batch(batch: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, SIZES[0])).astype(np.float32),
            rng.standard_normal((batch, SIZES[-1])).astype(np.float32))


def _mse(out, y):
    d = out - y
    return (d * d).mean()


def make_gelu_shardgrad(kind: str, batch: int):
    import shardgrad as sg
    from shardgrad.runtime.compiled import compile
    from shardgrad.runtime.interpreter import Interpreter

    sg.manual_seed(0)
    model = _mlp_module(sg.nn, sg.nn.GELU)
    step = sg.compile_step(model, _mse, sg.optim.SGD(model.parameters(), lr=LR),
                           executor=compile if kind == "compiled" else Interpreter)
    x, y = _mlp_batch(batch)
    _, program = step.graph_for(x, y)
    return lambda: step(x, y), program


def _torch_copy(model, sg_model):
    import torch
    model.load_state_dict({k: torch.from_numpy(np.array(v))
                           for k, v in sg_model.state_dict().items()})


def _torch_mlp_step(batch: int, activation: str):
    """torch's step of the MLP with ``activation`` ("GELU", "ReLU") from sg's initial
    parameters: the baseline of the gelu and eager benches."""
    import torch

    import shardgrad as sg

    sg.manual_seed(0)
    model = _mlp_module(torch.nn, getattr(torch.nn, activation))
    _torch_copy(model, _mlp_module(sg.nn, getattr(sg.nn, activation)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = (torch.from_numpy(v) for v in _mlp_batch(batch))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return step


def make_gelu_torch(batch: int):
    return _torch_mlp_step(batch, "GELU")


def make_eager_shardgrad(batch: int):
    """sg's eager step as a torch user writes it: each op computed as it is applied."""
    return _eager_mlp(batch, SIZES)


def _eager_mlp(batch: int, sizes):
    import shardgrad as sg

    sg.manual_seed(0)
    model = _mlp_module(sg.nn, sg.nn.ReLU, sizes)
    opt = sg.optim.SGD(model.parameters(), lr=LR)
    rng = np.random.default_rng(0)
    x, y = (sg.tensor(v) for v in _mlp_batch(batch)) if sizes == SIZES else (
        sg.tensor(rng.standard_normal((batch, n)).astype(np.float32))
        for n in (sizes[0], sizes[-1]))

    def step():
        opt.zero_grad()
        _mse(model(x), y).backward()
        opt.step()
    return step


def make_eager_torch(batch: int):
    return _torch_mlp_step(batch, "ReLU")


def make_eager_cnn_shardgrad(batch: int):
    """The CNN step run eagerly, as make_cnn_torch's: each op computed as it is applied."""
    import shardgrad as sg

    model = cnn_model()
    opt = sg.optim.SGD(model.parameters(), lr=LR)
    x, y = (sg.tensor(v) for v in cnn_batch(batch))

    def step():
        opt.zero_grad()
        sg.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


IMPLS = ("compiled", "compiled_inplace", "interpreter", "numpy", "torch")


def make(impl: str, graph_name: str, batch: int, sizes=SIZES):
    if graph_name == "gelu":
        return (make_gelu_torch(batch), None) if impl == "torch" else make_gelu_shardgrad(
            impl, batch)
    if graph_name == "eager":
        return (make_eager_torch if impl == "torch" else make_eager_shardgrad)(batch), None
    if graph_name == "eager_cnn":
        return (make_cnn_torch if impl == "torch" else make_eager_cnn_shardgrad)(batch), None
    if graph_name == "cnn":
        if impl == "numpy":
            return make_cnn_numpy(batch), None
        if impl == "torch":
            return make_cnn_torch(batch), None
        return make_cnn_shardgrad(impl, batch)
    if impl == "numpy":
        return make_numpy(batch), None
    if impl == "torch":
        return make_torch(batch, sizes), None
    return make_shardgrad(impl, graph_name, batch)


def _time(step, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds per step. With one BLAS thread the CPU time of the process
    is what the step costs even on a machine busy with other work (wall time is not)."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def worker(args) -> dict:
    """One measurement in this (fresh) process."""
    if args.threads:
        _limit_threads(args.threads[0], args.worker == "torch" or (
            args.worker == "micro" and args.micro_impl == "torch"))
    if args.worker == "micro":
        return micro(args.micro_impl)
    step, program = make(args.worker, args.graph, args.batch)
    wall, cpu = _time(step, args.steps, args.warmup)
    out = {"impl": args.worker, "batch": args.batch, "step_ms": 1e3 * float(np.median(wall)),
           "cpu_ms": 1e3 * float(np.median(cpu))}
    if program is not None and hasattr(program, "stats"):
        out["plan"] = program.stats()
    if args.worker in ("compiled", "interpreter", "numpy"):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        step()
        out["step_peak_alloc_bytes"] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return out


def _limit_threads(n: int, torch_worker: bool) -> None:
    """As a user sets them: torch.set_num_threads in a torch worker (plus NumPy's BLAS, which
    its setup uses), sg.set_num_threads (BLAS and the intra-op pool, as device.threads does
    for a training run) in a shardgrad one; a shardgrad worker never imports torch, whose
    OpenMP runtime would share the cores with it."""
    from threadpoolctl import threadpool_limits
    _limit_threads.keep = threadpool_limits(n, user_api="blas")
    if torch_worker:
        import torch
        torch.set_num_threads(n)
    else:
        import shardgrad as sg
        sg.set_num_threads(n)


# ---- per-node overhead -----------------------------------------------------------------------

MICRO_SIZES = (8, 8, 8, 2)


def micro(impl: str) -> dict:
    """A tiny MLP step (batch 4, 8-8-8-2): kernels take well under a microsecond, so the time
    per node is the executor's own overhead."""
    if impl == "torch":
        import torch
        torch.set_num_threads(1)
        step = make_torch(4, MICRO_SIZES)
        wall, cpu = _time(step, 2000, 200)
        return {"impl": "torch", "step_us": 1e6 * float(np.median(wall)),
                "cpu_us": 1e6 * float(np.median(cpu))}
    if impl == "sg_eager":              # the same step run eagerly: its dispatch per op
        step = _eager_mlp(4, MICRO_SIZES)
        wall, cpu = _time(step, 2000, 200)
        return {"impl": impl, "step_us": 1e6 * float(np.median(wall)),
                "cpu_us": 1e6 * float(np.median(cpu))}
    graph, feeds = graph_from_ops(4, MICRO_SIZES)
    from shardgrad.graph import passes
    from shardgrad.runtime.compiled import compile
    from shardgrad.runtime.interpreter import Interpreter
    program = compile(graph) if impl == "compiled" else Interpreter(passes.simplify(graph))
    wall, cpu = _time(lambda: program.run(feeds), 2000, 200)
    nodes = len(program.graph.nodes)
    kernels = sum(bool(n.inputs) for n in program.graph.nodes)
    step_us, cpu_us = 1e6 * float(np.median(wall)), 1e6 * float(np.median(cpu))
    out = {"impl": impl, "step_us": step_us, "cpu_us": cpu_us, "graph_nodes": nodes,
           "op_nodes": kernels, "us_per_op_node": step_us / kernels,
           "cpu_us_per_op_node": cpu_us / kernels}
    if impl == "compiled":
        out["kernel_calls"] = program.stats()["steps"]
    return out


# ---- driver ------------------------------------------------------------------------------------

THREADS: int | None = None     # --threads: BLAS and torch threads in every worker


def spawn(extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    env = dict(os.environ)
    if THREADS:
        cmd += ["--threads", str(THREADS)]
        env.update({k: str(THREADS) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                               "MKL_NUM_THREADS")})
    if extra[:2] in (["--worker", "torch"], ["--worker", "numpy"]):
        # the baselines run as their users' processes do: the worker imports shardgrad, whose
        # import retunes glibc's malloc (runtime.device.keep_freed_memory), which made torch's
        # CNN step 10-25% faster than a torch user's
        env["SHARDGRAD_MALLOC"] = "0"
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _paired(rounds: list[dict[str, float]], num: str, den: str) -> dict[str, float] | None:
    r = [x[num] / x[den] for x in rounds if num in x and den in x]
    if not r:
        return None
    return {"median": round(float(np.median(r)), 3), "min": round(min(r), 3),
            "max": round(max(r), 3)}


MLP_PAIRS = (("torch/compiled", "torch", "compiled"),
             ("torch/compiled_inplace", "torch", "compiled_inplace"),
             ("compiled/numpy", "compiled", "numpy"),
             ("compiled_inplace/numpy", "compiled_inplace", "numpy"),
             ("interpreter/compiled", "interpreter", "compiled"),
             ("numpy/torch", "numpy", "torch"),
             ("torch/sg_eager", "torch", "sg_eager"))


def compare(args, line: dict, graph: str, batch: int, impls: list[str]) -> dict:
    """Every implementation once per round, each in a fresh process, the order rotating round
    by round; medians of the times and of the ratios paired within a round."""
    rounds: dict[str, list[dict[str, float]]] = {"step_ms": [], "cpu_ms": []}
    extra: dict[str, dict] = {}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        times: dict[str, dict[str, float]] = {"step_ms": {}, "cpu_ms": {}}
        for impl in order:
            res = spawn(["--worker", impl, "--batch", str(batch), "--graph", graph,
                         "--steps", str(args.steps), "--warmup", str(args.warmup)])
            for key in times:
                times[key][impl] = res[key]
            extra[impl] = {k: v for k, v in res.items() if k not in (
                "impl", "batch", "step_ms", "cpu_ms")}
        for key in times:
            rounds[key].append(times[key])
    for key, name in (("step_ms", "ratios"), ("cpu_ms", "cpu_ratios")):
        line[key] = {i: round(float(np.median([x[i] for x in rounds[key]])), 3)
                     for i in impls}
        line[name] = {label: _paired(rounds[key], num, den) for label, num, den in MLP_PAIRS
                      if num in impls and den in impls}
    line["rounds"] = rounds
    line["details"] = extra
    plan = extra.get("compiled", {}).get("plan")
    if plan:
        line["memory"] = {"planned_bytes": plan["planned_bytes"],
                          "lower_bound_bytes": plan["lower_bound_bytes"],
                          "planned/lower_bound": round(plan["planned_bytes"]
                                                       / plan["lower_bound_bytes"], 3)}
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benches", nargs="+",
                    choices=("mlp", "cnn", "gelu", "eager", "eager_cnn", "micro"),
                    default=["mlp", "cnn", "micro"])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024],
                    help="MLP batch sizes (the CNN's is 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--graph", choices=[*sorted(GRAPHS), "cnn", "gelu", "eager", "eager_cnn"],
                    default="ops",
                    help="how the MLP step graph is built (cnn: the CNN worker's own)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS))
    ap.add_argument("--no-micro", action="store_true", help="same as leaving micro out of "
                    "--benches")
    ap.add_argument("--threads", type=int, nargs="+",
                    help="BLAS/torch threads per worker, as device.threads (default: the "
                         "environment's); several: every bench at each count")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--micro-impl", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.graph in ("cnn", "gelu", "eager", "eager_cnn"):
        ap.error(f"--graph {args.graph} is for its bench's workers: run --benches {args.graph}")
    lines = []
    for threads in args.threads or [None]:
        lines += run_benches(args, threads)
    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


def run_benches(args, threads: int | None) -> list[dict]:
    global THREADS
    THREADS = threads

    try:
        import torch  # noqa: F401
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    impls = [i for i in args.impls if i != "torch" or torch_version]
    lines = []
    env = {"numpy": np.__version__, "torch": torch_version, "cpus": os.cpu_count(),
           "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2)}
    if "mlp" in args.benches:
        for batch in args.batches:
            line = {"bench": "mlp_step", "sizes": list(SIZES), "batch": batch, **env,
                    "graph": args.graph}
            lines.append(compare(args, line, args.graph, batch, impls))
    if "cnn" in args.benches:
        line = {"bench": "cnn_step", "input": [1, 28, 28], "batch": CNN_BATCH, **env,
                "graph": "frontend"}
        lines.append(compare(args, line, "cnn", CNN_BATCH,
                             [i for i in impls if i in CNN_IMPLS]))
    if "gelu" in args.benches:
        line = {"bench": "gelu_mlp_step", "sizes": list(SIZES), "batch": GELU_BATCH, **env,
                "graph": "frontend", "activation": "GELU(approximate='none')"}
        lines.append(compare(args, line, "gelu", GELU_BATCH,
                             [i for i in impls if i in GELU_IMPLS]))
    if "eager" in args.benches:
        line = {"bench": "eager_mlp_step", "sizes": list(SIZES), "batch": EAGER_BATCH, **env}
        lines.append(compare(args, line, "eager", EAGER_BATCH,
                             [i for i in [*impls, "sg_eager"] if i in EAGER_IMPLS]))
    if "eager_cnn" in args.benches:
        line = {"bench": "eager_cnn_step", "input": [1, 28, 28], "batch": CNN_BATCH, **env}
        lines.append(compare(args, line, "eager_cnn", CNN_BATCH,
                             [i for i in [*impls, "sg_eager"] if i in EAGER_IMPLS]))
    if "micro" in args.benches and not args.no_micro:
        micro_impls = ["compiled", "interpreter", "sg_eager"] + (
            ["torch"] if torch_version else [])
        runs: dict[str, list[dict]] = {i: [] for i in micro_impls}
        for r in range(args.rounds):
            for impl in micro_impls[r % len(micro_impls):] + micro_impls[:r % len(micro_impls)]:
                runs[impl].append(spawn(["--worker", "micro", "--micro-impl", impl]))
        line = {"bench": "per_node_overhead", "sizes": list(MICRO_SIZES), "batch": 4, **env,
                "results": {impl: {k: (round(float(np.median([x[k] for x in rs])), 3)
                                       if isinstance(rs[0][k], float) else rs[0][k])
                                   for k in rs[0] if k != "impl"} for impl, rs in runs.items()}}
        lines.append(line)
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
