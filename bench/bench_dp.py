"""Data-parallel training throughput: samples/s of 2 ranks against 1 (target >= 1.6x), the
deterministic, overlap and ZeRO-1 modes against the default, the default against packing
buckets by copying (``copy_dp2``: the compiled executor's ``elide_packs=False``, as before
gradients were computed into their buckets), and PyTorch DDP (gloo) on the same setup when
torch is installed (optional: ``pip install torch==2.13.0``).

    python bench/bench_dp.py                         # JSON lines, one per measurement + summary
    python bench/bench_dp.py --rounds 5 --steps 40 --out bench/dp.json
    python bench/bench_dp.py --rounds 15 --steps 200 --only shardgrad_dp1 shardgrad_dp2 \
        shardgrad_copy_dp2               # more rounds of the comparisons that matter to you

Setup: MLP 784-512-512-10, float32, cross-entropy, SGD, 128 samples per rank, one BLAS thread
per rank (OMP/OPENBLAS/MKL_NUM_THREADS=1), compiled executor, the step of
``sg.distributed.data_parallel_step`` (the one ``shardgrad train`` runs). Every measurement
is a fresh ``mpirun -n R``; the variants alternate within each round and the figures are
medians over rounds (ratios paired within a round). Open MPI yields when idle
(runtime.config's default; the busypoll variant turns it off). Other processes share the 2
cores: see the spread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
from common import SIZES, mlp

PER_RANK = 128


def variants(args) -> list[tuple[str, int, list[str]]]:
    out = []
    for ranks in (1, 2):
        out.append((f"shardgrad_dp{ranks}", ranks, ["--impl", "shardgrad"]))
        out.append((f"shardgrad_det_dp{ranks}", ranks, ["--impl", "shardgrad",
                                                        "--deterministic"]))
    out.append(("shardgrad_overlap_dp2", 2, ["--impl", "shardgrad", "--overlap"]))
    out.append(("shardgrad_busypoll_dp2", 2, ["--impl", "shardgrad", "--busy-poll"]))
    out.append(("shardgrad_copy_dp2", 2, ["--impl", "shardgrad", "--copy-packs"]))
    out.append(("shardgrad_zero_dp2", 2, ["--impl", "shardgrad", "--zero"]))
    if args.torch:
        out += [(f"torch_ddp{r}", r, ["--impl", "torch"]) for r in (1, 2)]
    return [v for v in out if not args.only or v[0] in args.only]


def launch(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               SHARDGRAD_PROGRESS="0")
    results: dict[str, list[float]] = {}
    lines = []
    for rnd in range(args.rounds):
        todo = variants(args)
        todo = todo[rnd % len(todo):] + todo[:rnd % len(todo)]
        for name, ranks, extra in todo:
            yield_when_idle = "0" if "--busy-poll" in extra else "1"  # runtime.config's default
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
                   "--mca", "mpi_yield_when_idle", yield_when_idle,
                   sys.executable, __file__, "--worker", "--steps", str(args.steps),
                   "--executor", args.executor, *extra]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec.update(variant=name, round=rnd)
            lines.append(rec)
            print(json.dumps(rec), flush=True)
            results.setdefault(name, []).append(rec["samples_per_s"])

    def paired(a: str, b: str) -> float | None:
        if a not in results or b not in results:
            return None
        return round(float(np.median(np.asarray(results[a]) / np.asarray(results[b]))), 3)

    summary = {
        "bench": "dp_summary", "rounds": args.rounds, "steps": args.steps,
        "executor": args.executor,
        "samples_per_s_median": {k: round(float(np.median(v)), 1) for k, v in results.items()},
        "samples_per_s_min_max": {k: [round(min(v), 1), round(max(v), 1)]
                                  for k, v in results.items()},
        "speedup_dp2_vs_dp1": paired("shardgrad_dp2", "shardgrad_dp1"),
        "speedup_copy_dp2_vs_dp1": paired("shardgrad_copy_dp2", "shardgrad_dp1"),
        "in_place_vs_copy_dp2": paired("shardgrad_dp2", "shardgrad_copy_dp2"),
        "deterministic_vs_default_dp1": paired("shardgrad_det_dp1", "shardgrad_dp1"),
        "deterministic_vs_default_dp2": paired("shardgrad_det_dp2", "shardgrad_dp2"),
        "overlap_vs_blocking_dp2": paired("shardgrad_overlap_dp2", "shardgrad_dp2"),
        "busypoll_vs_yield_dp2": paired("shardgrad_busypoll_dp2", "shardgrad_dp2"),
        "zero_vs_default_dp2": paired("shardgrad_zero_dp2", "shardgrad_dp2"),
        "torch_speedup_ddp2_vs_ddp1": paired("torch_ddp2", "torch_ddp1"),
        "shardgrad_dp2_vs_torch_ddp2": paired("shardgrad_dp2", "torch_ddp2"),
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in lines + [summary]))


def _time_steps(step, barrier, steps: int) -> float:
    for _ in range(5):
        step()
    barrier()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    barrier()
    return time.perf_counter() - t


def worker_shardgrad(args) -> dict:
    import shardgrad as sg
    from shardgrad.runtime.compiled import compile as compiled_executor
    from shardgrad.runtime.interpreter import Interpreter
    from shardgrad.runtime.mpi import MPICommunicator

    comm = MPICommunicator(timeout_s=300.0)
    model, opt = mlp()
    make = Interpreter
    if args.executor == "compiled":
        make = functools.partial(compiled_executor, elide_packs=not args.copy_packs)
    # the data-parallel step shardgrad train runs too (runtime.dp.ParallelStep)
    step = sg.distributed.data_parallel_step(
        model, sg.functional.cross_entropy, opt, comm, deterministic=args.deterministic,
        chunks=4, overlap=args.overlap, zero=int(args.zero), executor=make)
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((PER_RANK, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], PER_RANK)
    seconds = _time_steps(lambda: step(x, y), comm.barrier, args.steps)
    return {"rank": comm.rank, "ranks": comm.world_size, "seconds": seconds}


def worker_torch(args) -> dict:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    port = world.bcast(29500 + os.getpid() % 1000 if world.rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world.rank,
                            world_size=world.size)
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES, SIZES[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers[:-1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(world.rank)
    x = torch.randn(PER_RANK, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (PER_RANK,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    seconds = _time_steps(step, world.Barrier, args.steps)
    dist.destroy_process_group()
    return {"rank": world.rank, "ranks": world.size, "seconds": seconds}


def worker(args) -> None:
    rec = worker_torch(args) if args.impl == "torch" else worker_shardgrad(args)
    if rec["rank"] == 0:
        rec["samples_per_s"] = round(rec["ranks"] * PER_RANK * args.steps / rec["seconds"], 1)
        rec["ms_per_step"] = round(rec["seconds"] / args.steps * 1e3, 3)
        print(json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--executor", default="compiled", choices=("compiled", "interpreter"))
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--out")
    p.add_argument("--only", nargs="+", help="run only these variants (names as printed)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="shardgrad", help=argparse.SUPPRESS)
    p.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--busy-poll", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--copy-packs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch and not args.worker:
        try:
            import torch  # noqa: F401
        except ImportError:
            args.torch = False
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
