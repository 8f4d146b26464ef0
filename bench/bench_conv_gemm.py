"""The CNN step's batched GEMMs (bench_step.py's CNN, batch 64: conv weights (O, K) against
im2col's (N, K, P) columns, and the gradients' shapes) at 1 and 2 BLAS threads, and split by
images over 2 Python threads with BLAS on one (NumPy releases the GIL in matmul): whether
OpenBLAS threads them, and what an intra-op split would gain. One JSON line per case.

    python bench/bench_conv_gemm.py --reps 50
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

CASES = {"conv1": ((16, 9), (64, 9, 676)), "conv2": ((32, 144), (64, 144, 121)),
         "conv2_wgrad": ((64, 32, 121), (64, 121, 144)), "conv2_dgrad": ((144, 32), (64, 32, 121))}


def timed(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def measure(x: np.ndarray, y: np.ndarray, pool: ThreadPoolExecutor, reps: int) -> dict:
    out = np.matmul(x, y)
    h = y.shape[0] // 2

    def half(rows):
        np.matmul(x[rows] if x.ndim == 3 else x, y[rows], out=out[rows])

    def split():
        f = pool.submit(half, slice(h, None))
        half(slice(0, h))
        f.result()

    ms = {}
    for t in (1, 2):
        with threadpool_limits(t, "blas"):
            ms[f"blas{t}"] = timed(lambda: np.matmul(x, y), reps)
    with threadpool_limits(1, "blas"):
        ms["split2_blas1"] = timed(split, reps)
    assert np.allclose(out, np.matmul(x, y), rtol=1e-5, atol=1e-4)
    return {k: round(v, 3) for k, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(1)
    for name, (a, b) in CASES.items():
        x = rng.standard_normal(a).astype(np.float32)
        y = rng.standard_normal(b).astype(np.float32)
        print(json.dumps({"case": name, "x": list(a), "y": list(b), "reps": args.reps,
                          "ms": measure(x, y, pool, args.reps),
                          "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
