"""The gradient allreduce of a data-parallel step against a raw mpi4py in-place Allreduce of
the same bytes, measured in the same run on 2 ranks (target: <= 1.1x).

    python bench/bench_allreduce.py                  # starts mpirun -n 2 itself, JSON lines
    python bench/bench_allreduce.py --ranks 4 --reps 300

Model: MLP 784-512-512-10, float32, 128 samples per rank; its step graph is rewritten by
partition.data_parallel and the bucket path it inserted (pack -> allreduce -> unpack) is run
by the reference interpreter on the step's gradients. Per repetition, after a barrier, the
variants run in rotating order: raw ``MPI.COMM_WORLD.Allreduce(IN_PLACE, buf)``; the plan's
allreduce node (its kernel's time, from a barrier just before it; watchdog on); the same
without the watchdog; the whole bucket path (pack + allreduce + unpack, skew included); and
the compiled executor running the bucket path after the kernels that compute the gradients,
timed from a barrier just before each pack to the end of its allreduce: ``compiled_copy``
packs by copying, ``compiled_in_place`` has the gradients computed into the bucket (the pack
only scales it by 1/ranks in place), both against a raw Allreduce in their own rotation;
then the whole data-parallel training step, compiled both ways (``step_copy``,
``step_in_place``). Medians over repetitions on rank 0; ratios are paired per repetition.
Other processes share the 2 cores: rerun and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from common import mlp


def launch(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(args.ranks),
           "--mca", "mpi_yield_when_idle", "0" if args.busy_poll else "1",
           sys.executable, __file__, "--worker", "--reps", str(args.reps),
           "--bucket-mb", *map(str, args.bucket_mb)]
    sys.exit(subprocess.call(cmd, env=env))


def bucket_path(plan):
    """The nodes the plan inserted, as a graph over the gradients (fed as inputs)."""
    from shardgrad.graph.ir import Graph, leaf
    from shardgrad.graph.rewrite import replace

    inserted = ("pack", "allreduce", "unpack", "transpose")
    outs = {str(i): n for i, n in enumerate(plan.graph.nodes) if n.op == "unpack"}
    sub = Graph(outs)
    mapping = {x.id: leaf("input", x.shape, x.dtype, name=f"g{x.id}")
               for n in sub.nodes if n.op in inserted for x in n.inputs
               if x.op not in inserted}
    return replace(sub, mapping)


def producers_path(plan):
    """The bucket path with the nodes that compute the packed values, their inputs fed."""
    from shardgrad.graph.ir import Graph, leaf
    from shardgrad.graph.rewrite import replace

    outs = {str(i): n for i, n in enumerate(plan.graph.nodes) if n.op == "unpack"}
    sub = Graph(outs)
    mapping = {x.id: leaf("input", x.shape, x.dtype, name=f"g{x.id}")
               for n in sub.nodes if n.op == "pack" for v in n.inputs for x in v.inputs}
    return replace(sub, mapping)


def timed_buckets(program, world, clock):
    """Wrap ``program``'s steps so that ``clock[0]`` sums, over buckets, the time from a
    barrier just before the pack (or the allreduce, when the pack has no step) to the end of
    the allreduce."""
    steps, nodes = program.steps, program.step_nodes
    for k, n in enumerate(nodes):
        starts = n.op == "pack" or (n.op == "allreduce" and nodes[k - 1].op != "pack")
        if starts:
            def start(_inner=steps[k]):
                world.Barrier()
                clock[1] = time.perf_counter()
                _inner()
            steps[k] = start
        if n.op == "allreduce":
            def end(_inner=steps[k]):
                _inner()
                clock[0] += time.perf_counter() - clock[1]
            steps[k] = end


def measure(plan, comms, reps: int, rng) -> dict[str, np.ndarray]:
    """Seconds per repetition of each variant (rank-local clocks)."""
    from mpi4py import MPI

    from shardgrad.ops import collective
    from shardgrad.runtime.compiled import compile as compiled
    from shardgrad.runtime.interpreter import Interpreter

    world = MPI.COMM_WORLD
    sub = bucket_path(plan)
    feeds = {n.name: rng.standard_normal(n.shape).astype(n.dtype) for n in sub.inputs}
    raw_buf = np.ones(sum(b.nbytes for b in plan.buckets) // 4, np.float32)
    interp = Interpreter(sub)
    kernel_time = [0.0]
    for i, n in enumerate(interp.step_nodes):
        if n.op == "allreduce":
            def timed(_inner=interp.steps[i]):
                world.Barrier()  # time the collective, not the ranks' skew in packing
                t = time.perf_counter()
                _inner()
                kernel_time[0] += time.perf_counter() - t
            interp.steps[i] = timed

    full = producers_path(plan)
    full_feeds = {n.name: rng.standard_normal(n.shape).astype(n.dtype) if n.dtype[0] == "f"
                  else np.zeros(n.shape, n.dtype) for n in full.inputs}
    clock = [0.0, 0.0]
    programs = {}
    for name, elide in (("compiled_copy", False), ("compiled_in_place", True)):
        programs[name] = compiled(full, elide_packs=elide)
        timed_buckets(programs[name], world, clock)

    def program(name):
        def run():
            clock[0] = 0.0
            with collective.bind(comms[0]):
                programs[name].run(full_feeds)
            return clock[0]
        return run

    step_feeds = {n.name: rng.standard_normal(n.shape).astype(n.dtype) if n.dtype[0] == "f"
                  else np.zeros(n.shape, n.dtype)
                  for n in plan.graph.nodes if n.op in ("input", "param", "state")}
    for name, elide in (("step_copy", False), ("step_in_place", True)):
        programs[name] = compiled(plan.graph, elide_packs=elide)

    def step(name):
        def run():
            with collective.bind(comms[0]):
                programs[name].run(step_feeds)
        return run

    def raw():
        world.Allreduce(MPI.IN_PLACE, raw_buf)

    def node(comm):
        def run():
            kernel_time[0] = 0.0
            with collective.bind(comm):
                interp.run(feeds)
            return kernel_time[0]
        return run

    # three rotations, so the compute of the later groups does not change the first's timings
    groups = [{"raw": raw, "node": node(comms[0]), "node_no_watchdog": node(comms[1]),
               "path": node(comms[0])},
              {"raw_beside_compiled": raw, "compiled_copy": program("compiled_copy"),
               "compiled_in_place": program("compiled_in_place")},
              {"step_copy": step("step_copy"), "step_in_place": step("step_in_place")}]
    times: dict[str, list[float]] = {k: [] for g in groups for k in g}
    for variants in groups:
        for rep in range(reps + 10):
            names = list(variants)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for k in names:
                world.Barrier()
                t = time.perf_counter()
                kernel = variants[k]()
                elapsed = time.perf_counter() - t
                if rep >= 10:
                    times[k].append(kernel if k.startswith(("node", "compiled")) else elapsed)
    return {k: np.asarray(v) for k, v in times.items()}


def compiled_stats(plan) -> list[int]:
    """[values computed into their bucket, values still copied] by the compiled executor."""
    from shardgrad.runtime.compiled import compile as compiled

    stats = compiled(producers_path(plan)).stats()
    return [stats["packed_in_place"], stats["pack_copies"]]


def worker(args) -> None:
    from mpi4py import MPI

    import shardgrad as sg
    from shardgrad.graph.trace import trace_step
    from shardgrad.partition.data_parallel import data_parallel
    from shardgrad.runtime.mpi import MPICommunicator

    world = MPI.COMM_WORLD
    model, opt = mlp()
    graph = trace_step(model, sg.functional.cross_entropy, opt, ((128, 784), "float32"),
                       ((128,), "int64"))
    comms = (MPICommunicator(timeout_s=300.0), MPICommunicator(timeout_s=None))
    rng = np.random.default_rng(world.rank)
    for mb in args.bucket_mb:
        plan = data_parallel(graph, world.size, bucket_bytes=int(mb * 2**20))
        t = measure(plan, comms, args.reps, rng)
        if world.rank == 0:
            print(json.dumps({
                "bench": "allreduce", "ranks": world.size, "bucket_mb": mb,
                "buckets": len(plan.buckets), "bytes": sum(b.nbytes for b in plan.buckets),
                "reps": args.reps, "yield_when_idle": os.environ.get(
                    "OMPI_MCA_mpi_yield_when_idle"),
                "ms_median": {k: round(float(np.median(v)) * 1e3, 4) for k, v in t.items()},
                "ratio_node_vs_raw": round(float(np.median(t["node"] / t["raw"])), 3),
                "ratio_node_no_watchdog_vs_raw": round(float(np.median(
                    t["node_no_watchdog"] / t["raw"])), 3),
                "ratio_path_vs_raw": round(float(np.median(t["path"] / t["raw"])), 3),
                "ratio_compiled_copy_vs_raw": round(float(np.median(
                    t["compiled_copy"] / t["raw_beside_compiled"])), 3),
                "ratio_compiled_in_place_vs_raw": round(float(np.median(
                    t["compiled_in_place"] / t["raw_beside_compiled"])), 3),
                "ratio_in_place_vs_copy": round(float(np.median(
                    t["compiled_in_place"] / t["compiled_copy"])), 3),
                "ratio_step_in_place_vs_copy": round(float(np.median(
                    t["step_in_place"] / t["step_copy"])), 3),
                "packed_in_place": compiled_stats(plan),
                "raw_ms_p10_p90": [round(float(np.percentile(t["raw"], q)) * 1e3, 4)
                                   for q in (10, 90)],
            }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[25.0, 1.0])
    p.add_argument("--busy-poll", action="store_true",
                   help="Open MPI busy-polls while waiting (default: yields, as shardgrad sets)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
