"""``shardgrad simulate`` against measured runs on this machine: for dp=1, dp=2, pp=2 and
dp2 x pp2 (the ``shm`` preset), the predicted step time beside summary.json's step_time_s of
a real run (``shardgrad train -n N``, mpirun). Each round predicts then runs every shape, one
right after the other, so a prediction's measurements (simulate measures each rank's step on
this machine, with the other jobs' load counted) and its run see the same load; ``--reps``
rounds. Pipelines are predicted twice: with the ``shm`` preset's alpha, and with
``--measure-link`` (the hand-over measured just then between as many ranks). Prints a Markdown
table of medians and of the paired errors (target: within 25%), the threads other jobs had
ready to run (simulate's ``elsewhere``) and the load averages.

    python bench/validate_simulate.py [--reps 3] [--config examples/digits_mlp.toml]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

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
    runs = {name: [] for name, *_ in SHAPES}    # (predicted, measured, elsewhere) per round
    load = [os.getloadavg()]
    start = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.reps):
            for name, n, pp, m in SHAPES:
                shape = ["--set", f"parallel.pp={pp}", "--set", f"parallel.microbatches={m}"]
                argv = ["simulate", a.config, "--ranks", str(n), "--link", "shm", "--json",
                        *sets, *shape]
                r = json.loads(_shardgrad(*argv))
                rm = json.loads(_shardgrad(*argv, "--measure-link")) if pp > 1 else r
                out = os.path.join(tmp, f"{n}-{pp}-{i}")
                _shardgrad("train", "-n", str(n), a.config, "--out", out, *sets, *shape)
                with open(os.path.join(out, "summary.json")) as f:
                    measured = json.load(f)["step_time_s"]
                runs[name].append((r["step_time_s"], rm["step_time_s"], measured,
                                   r["elsewhere"]))
            load.append(os.getloadavg())
    end = time.strftime("%H:%M", time.gmtime())
    print(f"{start}-{end} UTC, {a.reps} rounds\n")
    print("| shape | predicted ms (shm preset) | predicted ms (--measure-link) | measured ms "
          "(summary.json step_time_s) | error (preset / measured link) | median paired error "
          "(preset / measured link) | runs (predicted preset / measured link / measured ms, "
          "other jobs' ready threads) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        pm, lm, mm = (statistics.median(r[k] for r in rows) for k in range(3))
        paired = [statistics.median(r[k] / r[2] - 1 for r in rows) for k in range(2)]
        each = ", ".join(f"{x * 1e3:.2f}/{y * 1e3:.2f}/{z * 1e3:.2f} ({e:.0f})"
                         for x, y, z, e in rows)
        print(f"| {name} | {pm * 1e3:.3f} | {lm * 1e3:.3f} | {mm * 1e3:.3f} | "
              f"{pm / mm - 1:+.0%} / {lm / mm - 1:+.0%} | {paired[0]:+.0%} / {paired[1]:+.0%} "
              f"| {each} |")
    print(f"\nload averages (1, 5, 15 min) before and after each round: "
          f"{', '.join('/'.join(f'{v:.1f}' for v in x) for x in load)}")


if __name__ == "__main__":
    main()
