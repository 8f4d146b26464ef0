"""Paired before/after timing of two shardgrad trees (e.g. main and a branch) with
bench/bench_step.py's workers: fresh processes, the trees alternating round by round, one BLAS
thread, the per-round ratio after/before; prints one JSON line per case.

    git worktree add /tmp/before main   # or: git archive main | tar -x -C /tmp/before/shardgrad
    python bench/bench_trees.py --before /tmp/before --after . --rounds 5

A tree is a directory holding the package as ``shardgrad`` (put on PYTHONPATH) or the
package itself (its parent is used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASES = {
    "mlp128": (["--worker", "compiled", "--batch", "128", "--graph", "ops", "--steps", "40",
                "--warmup", "5"], "cpu_ms"),
    "cnn64": (["--worker", "compiled", "--graph", "cnn", "--batch", "64", "--steps", "10",
               "--warmup", "3"], "cpu_ms"),
    "micro": (["--worker", "micro", "--micro-impl", "compiled"], "cpu_us_per_op_node"),
    "micro_interp": (["--worker", "micro", "--micro-impl", "interpreter"],
                     "cpu_us_per_op_node"),
}


def root(tree: str) -> tuple[str, str]:
    """(PYTHONPATH entry, package directory) of ``tree``: a package directory itself is
    linked as ``shardgrad`` into a temporary directory."""
    tree = os.path.abspath(tree)
    if os.path.isdir(os.path.join(tree, "shardgrad")):
        return tree, os.path.join(tree, "shardgrad")
    link = tempfile.mkdtemp(prefix="sg_tree_")
    os.symlink(tree, os.path.join(link, "shardgrad"))
    return link, tree


def measure(tree: tuple[str, str], args: list[str], key: str) -> float:
    path, pkg = tree
    env = dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(pkg, "bench", "bench_step.py"), *args],
                         capture_output=True, text=True, env=env, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])[key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    a = ap.parse_args()
    trees = {"before": root(a.before), "after": root(a.after)}
    res = {c: {"before": [], "after": []} for c in a.cases}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for c in a.cases:
            for side in order:
                res[c][side].append(measure(trees[side], *CASES[c]))
    for c in a.cases:
        b, f = res[c]["before"], res[c]["after"]
        ratios = [y / x for x, y in zip(b, f, strict=True)]
        print(json.dumps({"case": c, "metric": CASES[c][1], "before_median": statistics.median(b),
                          "after_median": statistics.median(f),
                          "after/before": round(statistics.median(ratios), 3),
                          "range": [round(min(ratios), 3), round(max(ratios), 3)],
                          "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
