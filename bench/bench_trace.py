"""Trace overhead: the median step time (summary.json's step_time_s) of the same training run
with ``debug.trace`` off and on, in fresh processes, alternating, paired. Prints JSON: each
pair's times, the medians, and the ratio on / off (the target is <= 1.05).

  python bench/bench_trace.py [--pairs 5] [--config examples/digits_mlp.toml] [--set K=V]...
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--config", default="examples/digits_mlp.toml")
    p.add_argument("--set", dest="sets", action="append",
                   default=["train.epochs=3", "device.threads=1"])
    a = p.parse_args()
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
