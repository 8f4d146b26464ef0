"""The MLP step's GEMMs (batch 128, 784-512-512: forward x @ W^T, the input gradient g @ W, the
weight gradient g^T @ x) on one thread, through each OpenBLAS the C runtime can call: NumPy's
bundled one and the scipy-openblas64 wheel's (runtime.native.gemm_blas), called as the
runtime calls them (sg_gemm, one block); with ``--torch``, torch's own (MKL) beside them. The
quarter-quantile of ``--reps`` calls, in ms; one JSON line per library.

    python bench/bench_blas.py --reps 40 --torch --out bench/bench_blas.jsonl
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import numpy as np

# (name, A's shape, B's shape, layout): "nt" is A @ B^T, "nn" A @ B, "tn" A^T @ B
CASES = [("fwd 784->512", (128, 784), (512, 784), "nt"),
         ("fwd 512->512", (128, 512), (512, 512), "nt"),
         ("dx 512->784", (128, 512), (512, 784), "nn"),
         ("dW 784x512", (128, 512), (128, 784), "tn"),
         ("dW 512x512", (128, 512), (128, 512), "tn")]


def quartile(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 4] * 1e3


def operands(a_shape, b_shape, layout, rng):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    return {"nt": (a, b.T), "nn": (a, b), "tn": (a.T, b)}[layout]


def shardgrad_lines(reps: int) -> list[dict]:
    from threadpoolctl import threadpool_limits

    from shardgrad.runtime import native
    threadpool_limits(1, user_api="blas")
    rt = native.runtime()
    if rt is None:
        raise SystemExit(f"no C runtime here: {native.runtime_error()}")
    libs = {"numpy": native.blas(), "wheel": native.gemm_blas()}
    lines = []
    for name, lib in libs.items():
        if lib is None or (name == "wheel" and lib is libs["numpy"]):
            continue
        rt.gemm = lib
        line = {"bench": "blas_gemm", "blas": name, "path": lib.path, "threads": 1}
        rng = np.random.default_rng(0)
        for case, a_shape, b_shape, layout in CASES:
            a, b = operands(a_shape, b_shape, layout, rng)
            out = np.empty((a.shape[0], b.shape[1]), np.float32)
            args = (ctypes.c_longlong * 17)(*native._gemm_args(rt, 1, a, b, out))
            line[case] = round(quartile(lambda args=args: rt.lib.sg_gemm(args), reps), 4)
        lines.append(line)
    rt.gemm = native.gemm_blas()
    return lines


def torch_line(reps: int) -> dict:
    import torch
    torch.set_num_threads(1)
    line = {"bench": "blas_gemm", "blas": "torch", "torch": torch.__version__, "threads": 1}
    rng = np.random.default_rng(0)
    for case, a_shape, b_shape, layout in CASES:
        a, b = (torch.from_numpy(x) for x in operands(a_shape, b_shape, layout, rng))
        line[case] = round(quartile(lambda a=a, b=b: a @ b, reps), 4)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--torch", action="store_true", help="time torch's GEMMs too")
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args()
    lines = shardgrad_lines(args.reps)
    if args.torch:
        lines.append(torch_line(args.reps))
    for line in lines:
        print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
