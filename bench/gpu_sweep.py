"""Every example config trained through the CLI on the CPU and on a GPU, and the two runs
compared: fp32, bf16 and fp16 precision, dp = 2 and pp = 2 under mpirun.

    python bench/gpu_sweep.py --stand-in                 # CuPy's stand-in (tests/runtime):
    python bench/gpu_sweep.py --stand-in --configs digits_mlp.toml --variants fp32 dp2
    python bench/gpu_sweep.py                            # on a machine with a GPU and CuPy

Each run is one epoch (``train.epochs=1``), in a fresh process (``mpirun -n 2`` for dp2 and
pp2); ``--stand-in`` runs the GPU side on host_cupy's device arrays with host_cuda running
the CUDA kernels, so it checks what a GPU run computes, not its speed. Prints one JSON line
a run pair (train loss and test accuracy of both, their relative difference, exit codes and
the last lines of a failed run's log), then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": (1, []), "bf16": (1, ['train.precision="bf16"']),
            "fp16": (1, ['train.precision="fp16"']), "dp2": (2, ["parallel.dp=2"]),
            "pp2": (2, ["parallel.pp=2"])}


def _one(argv: list[str]) -> int:
    """``shardgrad train ARGV`` in this process, with CuPy's stand-in where SG_STAND_IN=1."""
    if os.environ.get("SG_STAND_IN") == "1":
        sys.path.insert(0, str(ROOT / "tests" / "runtime"))
        import host_cupy
        cupy = host_cupy.device_module()
        sys.modules["cupy"] = cupy
        host_cupy.install(cupy)
    from shardgrad import cli
    return cli.main(argv)


def _run(config: Path, variant: str, device: str, stand_in: bool, out: Path,
         timeout: float) -> dict:
    ranks, sets = VARIANTS[variant]
    sets = ["train.epochs=1", *sets] + (['device.type="cuda"'] if device == "cuda" else [])
    cmd = [sys.executable, __file__, "--one", "train", str(config), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0",
           "SG_STAND_IN": "1" if stand_in and device == "cuda" else "0"}
    if ranks > 1:
        cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe",
               "-x", "SG_STAND_IN", "-x", "SHARDGRAD_PROGRESS", "-x", "PYTHONPATH",
               "-n", str(ranks), *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, text = 124, f"timed out after {timeout} s"
    summary = next((json.loads(line) for line in reversed(text.splitlines())
                    if line.startswith("{")), {})
    res = {"exit": rc, "train_loss": summary.get("train_loss"),
           "test_accuracy": summary.get("test_accuracy")}
    if rc:
        res["log_tail"] = text[-1500:]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stand-in", action="store_true")
    ap.add_argument("--configs", nargs="+",
                    default=sorted(p.name for p in (ROOT / "examples").glob("*.toml")))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a run")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sg_sweep.") as tmp:
        for name in args.configs:
            for variant in args.variants:
                pair = {side: _run(ROOT / "examples" / name, variant, side, args.stand_in,
                                   Path(tmp) / f"{name}-{variant}-{side}", args.timeout)
                        for side in ("cpu", "cuda")}
                res = {"config": name, "variant": variant, **pair}
                a, b = pair["cpu"]["train_loss"], pair["cuda"]["train_loss"]
                if a is not None and b is not None:
                    res["loss_rel_diff"] = abs(a - b) / max(abs(a), 1e-30)
                print(json.dumps(res), flush=True)
                results.append(res)
    failed = [f"{r['config']} {r['variant']}" for r in results
              if r["cpu"]["exit"] or r["cuda"]["exit"]]
    print(json.dumps({"runs": len(results), "failed": failed, "stand_in": args.stand_in,
                      "max_loss_rel_diff": {f"{r['config']} {r['variant']}": r.get(
                          "loss_rel_diff") for r in results}}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        sys.exit(_one(sys.argv[2:]))
    sys.exit(main())
