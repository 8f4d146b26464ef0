"""One training step of an MLP (784-512-512-10, float32, MSE loss, SGD), timed for shardgrad's
compiled Program, the reference interpreter, a hand-written NumPy step and PyTorch eager (when
torch is installed), plus the per-node overhead on a tiny MLP and the planner's memory figures.

    python bench/bench_step.py                       # batches 128 and 1024, JSON lines
    python bench/bench_step.py --batches 128 --rounds 3 --out bench/step.json
    python bench/bench_step.py --graph frontend      # the step graph traced by sg.compile_step

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
    """The step built directly from ops: x@w+b, relu, MSE, autodiff.grad, p - lr*g."""
    from shardgrad.graph import autodiff
    from shardgrad.graph.ir import Graph, leaf
    from shardgrad.ops import elementwise as E
    from shardgrad.ops import reduce as R

    x = leaf("input", (batch, sizes[0]), "float32", name="x")
    y = leaf("input", (batch, sizes[-1]), "float32", name="y")
    h, params = x, []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        w = leaf("param", (a, b), "float32", name=f"w{i}")
        bias = leaf("param", (b,), "float32", name=f"b{i}")
        params += [w, bias]
        h = h @ w + bias
        if i < len(sizes) - 2:
            h = E.relu(h)
    d = h - y
    g = autodiff.grad(Graph({"loss": R.mean(d * d)}))
    outs = {"loss": g.outputs["loss"]}
    for p in params:
        outs[f"param/{p.name}"] = p - lr * g.outputs[f"grad/{p.name}"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((batch, sizes[0])).astype(np.float32),
             "y": rng.standard_normal((batch, sizes[-1])).astype(np.float32)}
    for p in params:
        feeds[p.name] = (rng.standard_normal(p.shape) / np.sqrt(p.shape[0])).astype(np.float32)
    return Graph(outs), feeds


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


IMPLS = ("compiled", "compiled_inplace", "interpreter", "numpy", "torch")


def make(impl: str, graph_name: str, batch: int, sizes=SIZES):
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
        env.update({k: str(THREADS) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                               "MKL_NUM_THREADS")})
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--graph", choices=sorted(GRAPHS), default="ops")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS))
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--threads", type=int, help="BLAS/torch threads per worker (default: "
                    "the environment's); 1 keeps a shared, busy machine from oversubscribing")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--micro-impl", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    global THREADS
    THREADS = args.threads

    try:
        import torch  # noqa: F401
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    impls = [i for i in args.impls if i != "torch" or torch_version]
    lines = []
    env = {"numpy": np.__version__, "torch": torch_version, "cpus": os.cpu_count(),
           "threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2),
           "graph": args.graph}
    for batch in args.batches:
        rounds: dict[str, list[dict[str, float]]] = {"step_ms": [], "cpu_ms": []}
        extra: dict[str, dict] = {}
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            times: dict[str, dict[str, float]] = {"step_ms": {}, "cpu_ms": {}}
            for impl in order:
                res = spawn(["--worker", impl, "--batch", str(batch), "--graph", args.graph,
                             "--steps", str(args.steps), "--warmup", str(args.warmup)])
                for key in times:
                    times[key][impl] = res[key]
                extra[impl] = {k: v for k, v in res.items() if k not in (
                    "impl", "batch", "step_ms", "cpu_ms")}
            for key in times:
                rounds[key].append(times[key])
        pairs = (("torch/compiled", "torch", "compiled"),
                 ("torch/compiled_inplace", "torch", "compiled_inplace"),
                 ("compiled/numpy", "compiled", "numpy"),
                 ("compiled_inplace/numpy", "compiled_inplace", "numpy"),
                 ("interpreter/compiled", "interpreter", "compiled"),
                 ("numpy/torch", "numpy", "torch"))
        line = {"bench": "mlp_step", "sizes": list(SIZES), "batch": batch, **env}
        for key, name in (("step_ms", "ratios"), ("cpu_ms", "cpu_ratios")):
            line[key] = {i: round(float(np.median([x[i] for x in rounds[key]])), 3)
                         for i in impls}
            line[name] = {label: _paired(rounds[key], num, den) for label, num, den in pairs
                          if num in impls and den in impls}
        line["details"] = extra
        plan = extra.get("compiled", {}).get("plan")
        if plan:
            line["memory"] = {"planned_bytes": plan["planned_bytes"],
                              "lower_bound_bytes": plan["lower_bound_bytes"],
                              "planned/lower_bound": round(plan["planned_bytes"]
                                                           / plan["lower_bound_bytes"], 3)}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if not args.no_micro:
        micro_impls = ["compiled", "interpreter"] + (["torch"] if torch_version else [])
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
    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
