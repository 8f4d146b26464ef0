"""Pipeline schedules measured under real MPI on a synthetic model with equal stages: the
GPipe bubble fraction against the textbook (p - 1) / (m + p - 1), and the activations each
stage holds at once under GPipe (m micro-batches) and 1F1B (at most p - stage).

    python bench/bench_pipeline.py                        # p = 4, m = 1 2 4 8 16, JSON
    python bench/bench_pipeline.py --p 2 --ms 5 --m 2 4 --out bench/pipeline.json
    python bench/bench_pipeline.py --step                 # pp = 2 step time, before/after

Each stage is one layer ``h = wait(h @ W)``, where ``wait`` is a bench-only op that sleeps
``ms`` (forward) or ``2 ms`` (backward) and copies its input: sleeping ranks take no CPU, so
p ranks on a 2-core machine behave like p devices and the measurement shows the schedule,
not the contention. The bubble is 1 - busy / (p * T): busy is the time all ranks spent in
forward and backward programs, T the span from the first start to the last end (ranks share
the machine's monotonic clock). Median over ``--repeats`` steps after one warm-up step.

``--step`` times whole training steps of an MLP (``--layers`` Linear+Tanh of ``--width``,
float32, SGD with momentum, ``--batch`` rows in ``--micro`` micro-batches) on ``--p`` ranks,
three ways in turn, ``--rounds`` times in the same processes: "before" as the runtime was
(blocking sends; every stage's parameters and optimizer state allgathered after each step),
"local" (each stage keeps its own; blocking sends) and "after" (each stage keeps its own;
non-blocking sends). A step's time is the slowest rank's, after a barrier; the medians'
ratios are the speed-ups, and all ways must end with the same parameters (bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

WIDTH, ROWS = 16, 4     # per micro-batch: 4 rows of 16 features (communication is negligible)


def register_wait() -> None:
    from shardgrad.ops.registry import OpDef, apply, register, same_infer
    from shardgrad.partition.pipeline import FLOP_RATE

    def forward(xp, x, seconds, back):
        time.sleep(seconds)
        return x.copy()

    register(OpDef(
        "bench_wait", infer=same_infer, forward=forward,
        vjp=lambda g, x, out, seconds, back: (apply("bench_wait", g, seconds=back,
                                                    back=seconds),),  # identity: dx = g
        cost=lambda node: (node.attrs["seconds"] * FLOP_RATE, 0.0)))


def step_graph(p: int, ms: float):
    """p equal layers h = wait(h @ W_s), MSE loss, SGD: a step graph as trace_step makes."""
    from shardgrad.graph.autodiff import grad
    from shardgrad.graph.ir import Graph, leaf
    from shardgrad.ops import reduce as R
    from shardgrad.ops.registry import apply

    x = leaf("input", (ROWS, WIDTH), "float64", name="x")
    y = leaf("input", (ROWS, WIDTH), "float64", name="y")
    lr = leaf("input", (), "float64", name="lr")
    h, params = x, []
    for s in range(p):
        w = leaf("param", (WIDTH, WIDTH), "float64", name=f"w{s}")
        params.append(w)
        h = apply("bench_wait", h @ w, seconds=ms / 1e3, back=2 * ms / 1e3)
    d = h - y
    g = grad(Graph({"loss": R.mean(d * d)}))
    outs = dict(g.outputs)
    for w in params:
        outs[f"param/{w.name}"] = w - lr * g.outputs[f"grad/{w.name}"]
    return Graph(outs, meta={"params": [w.name for w in params], "states": [],
                             "loss_scale": "mean"})


def worker(comm, args) -> dict | None:
    """One rank's share of the measurements; rank 0 returns the summary."""
    from shardgrad.partition.pipeline import pipeline
    from shardgrad.partition.schedule import ideal_bubble
    from shardgrad.runtime.pipeline import StageRunner

    p = comm.world_size
    rng = np.random.default_rng(0)
    state = {f"w{s}": rng.standard_normal((WIDTH, WIDTH)) / 4 for s in range(p)}
    runs = []
    for schedule in ("gpipe", "1f1b"):
        for m in args.m:
            plan = pipeline(step_graph(p, args.ms), p, "cost", micro_batches=m,
                            schedule=schedule)
            cuts = [[n.op for n in st.nodes] for st in plan.stages]
            runner = StageRunner(plan, comm.rank, comm)
            mine = {k: state[k] for k in plan.stages[comm.rank].params}
            x, y = rng.standard_normal((m * ROWS, WIDTH)), rng.standard_normal((m * ROWS, WIDTH))
            bubbles, wall = [], []
            for r in range(args.repeats + 1):
                comm.barrier()
                runner.step(mine, x, y, lr=np.float64(0.0))
                st = runner.stats
                rows = comm.allgather_obj([(st.t0 + s, st.t0 + e) for _, _, s, e in st.spans])
                if r == 0:
                    continue
                start = min(s for spans in rows for s, _ in spans)
                end = max(e for spans in rows for _, e in spans)
                busy = sum(e - s for spans in rows for s, e in spans)
                bubbles.append(1.0 - busy / (p * (end - start)))
                wall.append(end - start)
            peaks = comm.allgather_obj((runner.stats.peak_live, runner.stats.peak_bytes))
            ideal = ideal_bubble(p, m)
            bubble = float(np.median(bubbles))
            runs.append({
                "schedule": schedule, "p": p, "m": m, "stages": cuts,
                "bubble": round(bubble, 4), "ideal_bubble": round(ideal, 4),
                "rel_dev": round(abs(bubble - ideal) / ideal, 4) if ideal else None,
                "step_s": round(float(np.median(wall)), 4),
                "ideal_step_s": round((m + p - 1) * 3 * args.ms / 1e3, 4),
                "peak_live_micro_batches": [k for k, _ in peaks],
                "peak_activation_bytes": [b for _, b in peaks]})
    if comm.rank == 0:
        gpipe = [r for r in runs if r["schedule"] == "gpipe" and r["rel_dev"] is not None]
        onef = [r for r in runs if r["schedule"] == "1f1b"]
        return {
            "bench": "pipeline", "comm": args.comm, "p": p, "forward_ms": args.ms,
            "backward_ms": 2 * args.ms, "repeats": args.repeats,
            "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "gpipe_max_rel_dev": max(r["rel_dev"] for r in gpipe) if gpipe else None,
            "gpipe_within_10pct": all(r["rel_dev"] <= 0.10 for r in gpipe),
            "1f1b_max_live": max(max(r["peak_live_micro_batches"]) for r in onef),
            "1f1b_live_at_most_p": all(max(r["peak_live_micro_batches"]) <= p for r in onef),
            "runs": runs}
    return None


def step_worker(comm, args) -> dict | None:
    """One rank's share of ``--step``; rank 0 returns the summary."""
    import hashlib

    from threadpoolctl import threadpool_limits

    import shardgrad as sg
    from shardgrad.graph.nn import functional as F
    from shardgrad.runtime.comm import Communicator, SingleProcess
    from shardgrad.runtime.pipeline import (
        Mesh,
        PipelineProgram,
        PipelineTransform,
        gather,
        plan_pipeline,
        sync_outputs,
    )

    class Blocking(Communicator):
        """``comm`` with blocking sends (``isend`` is the Communicator's default)."""

        rank, world_size = comm.rank, comm.world_size
        allreduce_, bcast_, bcast_obj = comm.allreduce_, comm.bcast_, comm.bcast_obj
        allgather_obj, send, recv_ = comm.allgather_obj, comm.send, comm.recv_

    class Before:
        """The program as it ran before: the whole model synchronised after every step."""

        def __init__(self, program):
            self.program = program

        def run(self, feeds):
            out = self.program.run(feeds)
            self.program.mesh.held = None
            return {**out, **sync_outputs(self.program.mesh.pp_comm, out)}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.width)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    ways = ["before", "local", "after"]
    times: dict[str, list[float]] = {w: [] for w in ways}
    shas: set[str] = set()
    with threadpool_limits(1):
        for r in range(args.rounds):
            for way in ways[r % 3:] + ways[:r % 3]:
                sg.manual_seed(0)
                layers = []
                for _ in range(args.layers):
                    layers += [sg.nn.Linear(args.width, args.width), sg.nn.Tanh()]
                model = sg.nn.Sequential(*layers, sg.nn.Linear(args.width, 10))
                opt = sg.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                pp_comm = comm if way == "after" else Blocking()
                mesh = Mesh(1, comm.world_size, comm.rank, 0, pp_comm, SingleProcess())

                def make(g, mesh=mesh, way=way):
                    plan = plan_pipeline(g, mesh, args.micro, "1f1b", world=comm)
                    program = PipelineProgram(plan, mesh, world=comm)
                    return Before(program) if way == "before" else program

                step = sg.compile_step(model, F.cross_entropy, opt, executor=make,
                                       transform=PipelineTransform(args.micro))
                step(x, y)                                  # trace, cut, warm up
                for _ in range(args.repeats):
                    comm.barrier()
                    t = time.perf_counter()
                    step(x, y)
                    times[way].append(max(comm.allgather_obj(time.perf_counter() - t)))
                gather(step, mesh)
                h = hashlib.sha256()
                for _, p in model.named_parameters():
                    h.update(np.ascontiguousarray(p.numpy()).tobytes())
                shas.add(h.hexdigest())
    if comm.rank != 0:
        return None
    before, local, after = (float(np.median(times[w])) for w in ways)
    return {"bench": "pipeline_step", "comm": args.comm, "p": comm.world_size,
            "width": args.width, "layers": args.layers, "batch": args.batch,
            "micro_batches": args.micro, "steps_per_round": args.repeats,
            "rounds": args.rounds, "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "step_s_before": round(before, 4), "step_s_local": round(local, 4),
            "step_s_after": round(after, 4), "speedup": round(before / after, 3),
            "speedup_local_state": round(before / local, 3),
            "speedup_isend": round(local / after, 3), "same_params": len(shas) == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=4, help="stages = MPI ranks")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="micro-batch counts")
    ap.add_argument("--ms", type=float, default=10.0, help="forward time of a stage, ms")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--comm", choices=("mpi", "threads"), default="mpi",
                    help="ranks as mpirun processes or as threads of this process")
    ap.add_argument("--step", action="store_true",
                    help="time pp training steps of an MLP before/after (see above)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    register_wait()
    if args.step and "--p" not in sys.argv:
        args.p = 2
    work = step_worker if args.step else worker
    if args.worker:
        from shardgrad.runtime.mpi import MPICommunicator

        summary = work(MPICommunicator(timeout_s=120), args)
        if summary is not None:
            print(json.dumps(summary), flush=True)
        return
    if args.comm == "threads":
        from shardgrad.runtime.threadcomm import run_ranks

        line = json.dumps(run_ranks(args.p, lambda comm: work(comm, args), timeout_s=300)[0])
        print(line)
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(json.loads(line), indent=2) + "\n")
        return
    from shardgrad.runtime.config import set_mpi_defaults

    set_mpi_defaults()          # as the CLI does: ranks yield while they wait
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench_pipeline needs mpirun: pip install -e .[mpi]")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n",
           str(args.p), sys.executable, os.path.abspath(__file__), "--worker", "--ms",
           str(args.ms), "--repeats", str(args.repeats), "--m", *map(str, args.m),
           *(["--step"] if args.step else []), "--width", str(args.width), "--layers",
           str(args.layers), "--batch", str(args.batch), "--micro", str(args.micro),
           "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"mpirun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = proc.stdout.strip().splitlines()[-1]
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(json.loads(line), indent=2) + "\n")


if __name__ == "__main__":
    main()
