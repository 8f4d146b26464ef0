"""Trace overhead: the median step time (summary.json's step_time_s) of the same training run
with ``debug.trace`` off and on, in fresh processes, alternating, paired. Prints JSON: each
pair's times, the medians, and the ratio on / off (the target is <= 1.05).

  python bench/bench_trace.py [--pairs 5] [--config examples/digits_mlp.toml] [--set K=V]...

``--inproc``: instead, in one process, the training step of the config (the compiled TrainStep
on one batch) called ``--blocks`` x 100 times, the executor core's tracer off and on in
alternate calls; the median call time of each, their ratio and the median paired ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def step_time(config: str, sets: list[str], trace: bool, out: str) -> float:
    argv = [sys.executable, "-m", "shardgrad", "train", config, "--out", out]
    for s in [*sets, f"debug.trace={'true' if trace else 'false'}"]:
        argv += ["--set", s]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["step_time_s"]


def inproc(config_path: str, sets: list[str], blocks: int) -> dict:
    import time

    from threadpoolctl import threadpool_limits

    from shardgrad.graph import walk
    from shardgrad.runtime import trace
    from shardgrad.runtime.config import load_config
    from shardgrad.runtime.train import setup

    config = load_config(config_path, sets)
    _, optimizer, step, data = setup(config)
    b = config.train.batch_size
    x, y = data.x_train[:b], data.y_train[:b]
    optimizer.lr = 0.0
    times = {False: [], True: []}
    tracer = trace.Tracer()
    with threadpool_limits(config.device.threads or None, user_api="blas"):
        float(step(x, y))
        for i in range(blocks * 100):   # calls alternate: the machine drifts between them less
            on = i % 2 == 1
            walk.set_tracer(tracer if on else None)
            t = time.perf_counter()
            float(step(x, y))
            times[on].append(time.perf_counter() - t)
        walk.set_tracer(None)
    pairs = [b / a for a, b in zip(times[False], times[True], strict=True)]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"config": config_path, "sets": sets, "calls_each": len(times[True]),
            "median_off_s": off, "median_on_s": on, "ratio": on / off,
            "median_pair_ratio": statistics.median(pairs), "load": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--config", default="examples/digits_mlp.toml")
    p.add_argument("--set", dest="sets", action="append",
                   default=["train.epochs=3", "device.threads=1"])
    p.add_argument("--inproc", action="store_true")
    p.add_argument("--blocks", type=int, default=40)
    a = p.parse_args()
    if a.inproc:
        print(json.dumps(inproc(a.config, a.sets, a.blocks), indent=1))
        return
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):   # alternate which goes first: the machine drifts
            order = [False, True] if i % 2 == 0 else [True, False]
            for trace in order:
                t = step_time(a.config, a.sets, trace, os.path.join(tmp, f"{i}{trace}"))
                (on if trace else off).append(t)
    ratios = [b / x for x, b in zip(off, on, strict=True)]
    print(json.dumps({"config": a.config, "sets": a.sets, "off_s": off, "on_s": on,
                      "median_off_s": statistics.median(off),
                      "median_on_s": statistics.median(on),
                      "ratio_median": statistics.median(on) / statistics.median(off),
                      "pair_ratios": ratios, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
