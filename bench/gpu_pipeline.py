"""Pipelines and data parallelism on the GPU against the CPU runs, for bench/gpu_check.sh: the
digits MLP trained one epoch with dp = 2 (2 ranks: compile_step's GPU step, its flat gradient
buffer allreduced a bucket at a time), parallel.pp = 2 (2 ranks) and dp = 2 x pp = 2 (4
ranks), every rank on GPU 0, once with device.type = "cuda" and once on the CPU, in float32
and float64; prints one JSON line with each case's largest parameter difference relative to
the largest parameter (targets: 1e-5 in float32, 1e-10 in float64) and both runs' wall times.

    python bench/gpu_pipeline.py [--cases 2x1 1x2 2x2] [--dtypes float32 float64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = {"float32": 1e-5, "float64": 1e-10}
SETS = ["train.epochs=1", "train.batch_size=64", "model.hidden=[64]", "device.threads=1",
        "parallel.microbatches=2", "train.log_every=1000"]


def train(n: int, sets: list[str], out: str) -> dict:
    cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-n",
           str(n), sys.executable, "-m", "shardgrad", "train",
           os.path.join(ROOT, "examples", "digits_mlp.toml"), "--out", out]
    for s in SETS + sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "SHARDGRAD_PROGRESS": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def case(dp: int, pp: int, dtype: str, tmp: str) -> dict:
    import safetensors.numpy

    sets = [f"parallel.dp={dp}", f"parallel.pp={pp}", f'train.dtype="{dtype}"']
    runs = {}
    for device in ("cpu", "cuda"):
        out = os.path.join(tmp, f"{dp}x{pp}-{dtype}-{device}")
        runs[device] = (train(dp * pp, [*sets, f'device.type="{device}"'], out),
                        safetensors.numpy.load_file(os.path.join(out, "final.safetensors")))
    cpu, gpu = runs["cpu"][1], runs["cuda"][1]
    scale = max(float(np.abs(v).max()) for v in cpu.values())
    diff = max(float(np.abs(gpu[k].astype(np.float64) - v).max()) for k, v in cpu.items())
    return {"dp": dp, "pp": pp, "dtype": dtype, "ranks": dp * pp,
            "max_rel_diff": diff / scale, "target": TARGET[dtype],
            "ok": diff / scale <= TARGET[dtype],
            "wall_s_cpu": runs["cpu"][0]["wall_s"], "wall_s_cuda": runs["cuda"][0]["wall_s"],
            "test_accuracy_cuda": runs["cuda"][0]["test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["2x1", "1x2", "2x2"], help="DPxPP meshes")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    args = ap.parse_args()
    if shutil.which("mpirun") is None:
        print(json.dumps({"bench": "gpu_pipeline", "skipped": "no mpirun on this machine"}))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.cases:
            dp, pp = (int(v) for v in c.split("x"))
            for dtype in args.dtypes:
                try:
                    results.append(case(dp, pp, dtype, tmp))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    results.append({"dp": dp, "pp": pp, "dtype": dtype, "ok": False,
                                    "error": str(e)[-600:]})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "gpu_pipeline", "ok": all(r["ok"] for r in results),
                      "cases": results}))


if __name__ == "__main__":
    main()
