"""Start-up and step time of ``shardgrad train --launcher ray`` against ``mpirun -n N shardgrad
train`` on one machine, with a Ray cluster already running (started here, as a user's would
be), in fresh processes, alternating and paired.

    python bench/bench_ray_startup.py                      # digits MLP, 2 ranks, 5 pairs
    python bench/bench_ray_startup.py --pairs 7 --ranks 2 --epochs 2
    python bench/bench_ray_startup.py --baseline /tmp/before   # also an earlier tree's Ray

Time to first step: from the command's start to the first step record in metrics.jsonl
(``train.log_every = 1``; polled every 10 ms). Step time: median gap between consecutive step
records' ``wall_s`` (the first 3 left out; millisecond resolution) and summary.json's
``step_time_s``. The Ray runs' own phase
times come from the launcher's ``start-up:`` line; ``ray_launcher_s`` is when that line came
(the launcher handing over to mpirun) and ``ranks_to_first_step_s`` the time from there (from
the start, for mpirun) to the first step. Prints one JSON object; other processes
share the cores, so it quotes the load (``os.getloadavg``) and per-pair differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = re.compile(r"start-up: (.*)")


def run(launcher: str, config: str, ranks: int, epochs: int, env: dict) -> dict:
    out = tempfile.mkdtemp(prefix=f"sg-{launcher}-")
    sets = ["--set", f"parallel.dp={ranks}", "--set", "train.log_every=1",
            "--set", f"train.epochs={epochs}"]
    cmd = [sys.executable, "-m", "shardgrad", "train", config, "--out", out, *sets]
    if launcher.startswith("ray"):
        cmd += ["--launcher", "ray"]
    else:
        cmd = ["mpirun", "-n", str(ranks), "--allow-run-as-root", "--oversubscribe", *cmd]
    metrics = os.path.join(out, "metrics.jsonl")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[tuple[float, str]] = []   # (seconds since the start, stderr line)

    def read_stderr():
        for line in proc.stderr:
            lines.append((time.monotonic() - t0, line))
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    first = None
    while proc.poll() is None and first is None:
        try:
            with open(metrics) as f:
                if '"kind": "step"' in f.read():
                    first = time.monotonic() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    proc.stdout.read()   # (stderr is the reader's)
    proc.wait(timeout=600)
    total = time.monotonic() - t0
    reader.join(10)
    stderr = "".join(line for _, line in lines)
    # when the Ray launcher handed over to mpirun (its start-up line)
    handover = next((t for t, line in lines if PHASES.search(line)), math.nan)
    if proc.returncode:
        raise SystemExit(f"{launcher} run failed:\n{stderr[-2000:]}")
    steps = [json.loads(line) for line in open(metrics)]
    walls = [r["wall_s"] for r in steps if r.get("kind") == "step"][3:]
    gaps = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    m = PHASES.search(stderr)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"first_step_s": first, "total_s": total, "step_gap_s": statistics.median(gaps),
            "step_time_s": summary.get("step_time_s", math.nan),
            "phases": m.group(1) if m else None, "mpirun_start_s": handover,
            "ranks_to_first_step_s": first - (0.0 if launcher == "mpirun" else handover)}


def stats(runs: dict[str, list[dict]], key: str) -> dict:
    """Median, min and max of ``key`` per launcher, and of the paired differences of each
    Ray launcher from mpirun (and of Ray from the baseline's)."""
    def summary(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    out = {launcher: summary([r[key] for r in rs]) for launcher, rs in runs.items()}
    pairs = [(a, "mpirun") for a in runs if a != "mpirun"]
    if "ray_baseline" in runs:
        pairs.append(("ray", "ray_baseline"))
    for a, b in pairs:
        out[f"{a}_minus_{b}"] = summary([x[key] - y[key] for x, y in
                                         zip(runs[a], runs[b], strict=True)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "examples", "digits_mlp.toml"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--baseline", metavar="PYTHONPATH",
                   help="also run the Ray launcher of the shardgrad at this PYTHONPATH (e.g. a "
                        "`git archive` of an earlier commit), in the same rotation")
    args = p.parse_args()
    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.ranks),
             include_dashboard=False, logging_level="ERROR")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               SHARDGRAD_PROGRESS="0")
    envs = {"mpirun": env, "ray": env}
    if args.baseline:
        envs["ray_baseline"] = dict(env, PYTHONPATH=args.baseline)
    runs: dict[str, list[dict]] = {launcher: [] for launcher in envs}
    load = [os.getloadavg()[0]]
    run("ray", args.config, args.ranks, 1, env)   # warm the cluster's worker pool once
    order = list(envs)
    for i in range(args.pairs):
        for launcher in order[i % len(order):] + order[:i % len(order)]:   # rotated
            runs[launcher].append(run(launcher, args.config, args.ranks, args.epochs,
                                      envs[launcher]))
        load.append(os.getloadavg()[0])
    ray.shutdown()

    print(json.dumps({"ranks": args.ranks, "pairs": args.pairs, "epochs": args.epochs,
                      "load_1min": load, "first_step_s": stats(runs, "first_step_s"),
                      "step_time_s": stats(runs, "step_time_s"),
                      "step_gap_s": stats(runs, "step_gap_s"), "total_s": stats(runs, "total_s"),
                      "ranks_to_first_step_s": stats(runs, "ranks_to_first_step_s"),
                      "launcher_s": {k: [r["mpirun_start_s"] for r in rs]
                                     for k, rs in runs.items() if k != "mpirun"},
                      "ray_phases": {k: [r["phases"] for r in rs]
                                     for k, rs in runs.items() if k != "mpirun"}}, indent=1))


if __name__ == "__main__":
    main()
