"""The JSON summary of bench/gpu_check.sh: each part's exit code and time, the benchmark
results (the last JSON line of each bench log) and the test counts and failures.

    python bench/gpu_summary.py OUTDIR START_EPOCH STATUS_FILE
"""

from __future__ import annotations

import json
import os
import re
import sys
import time


def read(outdir: str, name: str) -> str:
    path = os.path.join(outdir, f"{name}.log")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def summarize(outdir: str, start: int, status_file: str) -> dict:
    parts = {}
    if os.path.exists(status_file):
        for line in open(status_file):
            name, rc, secs = line.split()
            parts[name] = {"exit": int(rc), "seconds": int(secs),
                           "timed_out": rc in ("124", "137")}
    out: dict = {"total_seconds": int(time.time()) - start, "parts": parts}
    for name in ("env", "steps", "cli", "fused", "pipeline", "capture", "libs"):
        objs = [line for line in read(outdir, name).splitlines() if line.startswith("{")]
        try:
            out[name] = json.loads(objs[-1]) if objs else None
        except json.JSONDecodeError:
            out[name] = None
    # each case's line, also those printed before the part was stopped at its time limit
    cases = {}
    for line in read(outdir, "steps").splitlines():
        if line.startswith('{"part": "step"'):
            try:
                case = json.loads(line)
            except json.JSONDecodeError:
                continue
            cases[case["case"]] = case
    out["steps"] = cases
    out["speeds"] = {k: {"speed": v.get("speed"), "target": v.get("target_speed"),
                         "meets_target": v.get("meets_target"),
                         "error": v.get("shardgrad_error")}
                     for k, v in cases.items()}
    for name in ("tests",):
        text = read(outdir, name)
        counts = [line for line in text.splitlines()
                  if re.search(r"\d+ (passed|failed|error|skipped)", line)]
        failed = set(re.findall(r"(\S+::\S+)\s+(?:FAILED|ERROR)", text))
        failed |= set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M))
        out[name] = {"result": counts[-1].strip("= ") if counts else None,
                     "failed": sorted(failed)}
    return out


if __name__ == "__main__":
    print(json.dumps(summarize(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
