"""``shardgrad simulate`` against measured runs on this machine: for dp=1, dp=2, pp=2 and
dp2 x pp2 (the ``shm`` preset), the predicted step time beside summary.json's step_time_s of
a real run (``shardgrad train -n N``, mpirun), alternating prediction and run, ``--reps``
rounds; prints a Markdown table of medians and the error (target: within 25%) and the load.

    python bench/validate_simulate.py [--reps 3] [--config examples/digits_mlp.toml]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SHAPES = [("dp=1", 1, 1, 1), ("dp=2", 2, 1, 1), ("pp=2", 2, 2, 4), ("dp2 x pp2", 4, 2, 4)]
SETS = ["train.epochs=2", "device.threads=1"]


def _shardgrad(*argv: str) -> str:
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "shardgrad", *argv], check=True, text=True,
                          capture_output=True, env=env, timeout=900).stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--config", default="examples/digits_mlp.toml")
    a = p.parse_args()
    sets = [x for s in SETS for x in ("--set", s)]
    rows, load = [], [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, pp, m in SHAPES:
            shape = ["--set", f"parallel.pp={pp}", "--set", f"parallel.microbatches={m}"]
            predicted, measured = [], []
            for i in range(a.reps):
                predicted.append(json.loads(_shardgrad(
                    "simulate", a.config, "--ranks", str(n), "--link", "shm", "--json",
                    *sets, *shape))["step_time_s"])
                out = os.path.join(tmp, f"{n}-{pp}-{i}")
                _shardgrad("train", "-n", str(n), a.config, "--out", out, *sets, *shape)
                with open(os.path.join(out, "summary.json")) as f:
                    measured.append(json.load(f)["step_time_s"])
            pm, mm = statistics.median(predicted), statistics.median(measured)
            rows.append((name, pm, mm, pm / mm - 1, predicted, measured))
            load.append(os.getloadavg())
    print("| shape | predicted ms | measured ms (summary.json step_time_s) | error | "
          "runs (predicted / measured ms) |")
    print("|---|---|---|---|---|")
    for name, pm, mm, err, ps, ms in rows:
        runs = ", ".join(f"{x * 1e3:.2f}/{y * 1e3:.2f}" for x, y in zip(ps, ms, strict=True))
        print(f"| {name} | {pm * 1e3:.3f} | {mm * 1e3:.3f} | {err:+.0%} | {runs} |")
    print(f"\nload averages (1, 5, 15 min) before and after each shape: "
          f"{', '.join('/'.join(f'{v:.1f}' for v in x) for x in load)}")


if __name__ == "__main__":
    main()
