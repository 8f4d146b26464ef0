"""GPU benchmarks, each against a baseline measured in the same process on the same GPU:

    python bench/gpu_bench.py --part env      # device, driver, library versions
    python bench/gpu_bench.py --part mlp      # MLP 784-512-512-10 step, batch 1024, vs torch
    python bench/gpu_bench.py --part cnn      # CNN step (2 conv+pool blocks), vs torch eager
    python bench/gpu_bench.py --part fused    # a fused elementwise kernel vs a D2D copy

Each part prints one JSON object. Training steps (forward, backward, SGD with momentum) run
as shardgrad's GPUExecutor through DeviceStep against PyTorch eager on the same model, batch
and optimizer; ``speed`` is torch's time over ours (above 1: faster than torch). Times are
medians of several timed blocks after a warm-up, each block ended by a synchronize.
Bandwidth counts bytes read plus bytes written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def timed(fn, sync, steps: int, blocks: int = 5) -> float:
    """Median seconds per call over ``blocks`` blocks of ``steps`` calls."""
    out = []
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / steps)
    return statistics.median(out)


def env_part() -> dict:
    import cupy as cp
    info = {"cupy": cp.__version__, "numpy": np.__version__}
    props = cp.cuda.runtime.getDeviceProperties(0)
    info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info["sms"] = props["multiProcessorCount"]
    info["driver"] = cp.cuda.runtime.driverGetVersion()
    info["runtime"] = cp.cuda.runtime.runtimeGetVersion()
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def _torch_models():
    import torch.nn as tnn

    def mlp():
        return tnn.Sequential(tnn.Linear(784, 512), tnn.ReLU(), tnn.Linear(512, 512), tnn.ReLU(),
                              tnn.Linear(512, 10))

    def cnn():
        return tnn.Sequential(tnn.Conv2d(1, 16, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                              tnn.Conv2d(16, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                              tnn.Flatten(), tnn.Linear(32 * 7 * 7, 128), tnn.ReLU(),
                              tnn.Linear(128, 10))
    return {"mlp": mlp, "cnn": cnn}


def _sg_model(kind: str):
    import shardgrad as sg
    if kind == "mlp":
        return sg.nn.Sequential(sg.nn.Linear(784, 512), sg.nn.ReLU(), sg.nn.Linear(512, 512),
                                sg.nn.ReLU(), sg.nn.Linear(512, 10))
    return sg.nn.Sequential(sg.nn.Conv2d(1, 16, 3, padding=1), sg.nn.ReLU(), sg.nn.MaxPool2d(2),
                            sg.nn.Conv2d(16, 32, 3, padding=1), sg.nn.ReLU(), sg.nn.MaxPool2d(2),
                            sg.nn.Flatten(), sg.nn.Linear(32 * 7 * 7, 128), sg.nn.ReLU(),
                            sg.nn.Linear(128, 10))


def step_part(kind: str, batch: int, steps: int) -> dict:
    import cupy as cp
    import torch
    import torch.nn.functional as TF

    import shardgrad as sg
    from shardgrad.graph.trace import trace_step
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "runtime"))
    from device_step import DeviceStep  # test support, beside the CuPy stand-in

    shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, batch)
    lr, mom = 0.01, 0.9
    res: dict = {"part": kind, "batch": batch, "optimizer": "SGD(momentum=0.9)"}

    sg.manual_seed(0)
    model = _sg_model(kind)
    opt = sg.optim.SGD(model.parameters(), lr=lr, momentum=mom)
    graph = trace_step(model, sg.nn.functional.cross_entropy, opt, (shape, "float32"),
                       ((batch,), "int64"))
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.numpy() for n, p in model.named_parameters()}
    states = {f"optim/{names[id(p)]}/{k}": v.numpy()
              for p, st in zip(opt.params, opt.state, strict=True) for k, v in st.items()}
    dx, dy = cp.asarray(x), cp.asarray(y)
    sync = cp.cuda.Device().synchronize

    try:
        step = DeviceStep(graph, params, states)
        t = [0]

        def run():
            t[0] += 1
            return step(dx, dy, lr, t[0])
        for _ in range(5):
            run()
        res["shardgrad_ms"] = 1e3 * timed(run, sync, steps)
        res["shardgrad_loss"] = float(run())
        res["fused_groups"] = step.exe.n_fused
        res["kernel_calls"] = sum(a[0] != "leaf" for a in step.exe.actions)
    except Exception as e:  # noqa: BLE001 - reported, the torch measurement goes on
        res["shardgrad_error"] = f"{type(e).__name__}: {e}"[:2000]

    try:
        torch.manual_seed(0)
        tm = _torch_models()[kind]().cuda()
        topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=mom)
        tx, ty = torch.as_tensor(x, device="cuda"), torch.as_tensor(y, device="cuda")

        def trun():
            topt.zero_grad(set_to_none=True)
            loss = TF.cross_entropy(tm(tx), ty)
            loss.backward()
            topt.step()
            return loss
        for _ in range(5):
            trun()
        res["torch_eager_ms"] = 1e3 * timed(trun, torch.cuda.synchronize, steps)
        res["torch_loss"] = trun().detach().item()
        res["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception as e:  # noqa: BLE001 - reported
        res["torch_error"] = f"{type(e).__name__}: {e}"[:2000]
    target = 1.0 if kind == "mlp" else 0.7
    res["target_speed"] = target
    if "shardgrad_ms" in res and "torch_eager_ms" in res:
        res["speed"] = res["torch_eager_ms"] / res["shardgrad_ms"]
    res["meets_target"] = res.get("speed", 0.0) >= target
    return res


def fused_part(n: int) -> dict:
    import cupy as cp

    from shardgrad.graph.ir import Graph, leaf
    from shardgrad.ops import elementwise as E
    from shardgrad.runtime.gpu import GPUExecutor

    a = leaf("input", (n,), "float32", name="a")
    b = leaf("input", (n,), "float32", name="b")
    s = leaf("input", (), "float32", name="s")
    exe = GPUExecutor(Graph({"y": E.relu(a * s + b) * 0.5 - E.tanh(b)}))
    ((_, kernel, _),) = [act for act in exe.actions if act[0] == "group"]
    group = kernel.group
    rng = cp.random.default_rng(0)
    da, db = rng.standard_normal(n, dtype=cp.float32), rng.standard_normal(n, dtype=cp.float32)
    ds = cp.asarray(np.float32(1.5))
    src, dst = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    src[...] = da
    sync = cp.cuda.Device().synchronize
    feeds = {"a": da, "b": db, "s": ds}
    inputs = [exe.leaf(x, feeds) for x in kernel.sources]     # consts too (the 0.5)
    (out,) = kernel(cp, inputs)
    want = cp.maximum(da * 1.5 + db, 0) * 0.5 - cp.tanh(db)
    err = float(cp.linalg.norm(out - want) / cp.linalg.norm(want))

    def fused():
        kernel(cp, inputs)

    def copy():
        cp.copyto(dst, src)
    for _ in range(3):
        fused()
        copy()
    tf, tc = timed(fused, sync, 20), timed(copy, sync, 20)
    fused_gbs, copy_gbs = 3 * 4 * n / tf / 1e9, 2 * 4 * n / tc / 1e9
    return {"part": "fused", "elements": n, "expression": str(group), "rel_err": err,
            "fused_ms": tf * 1e3, "fused_GBps": fused_gbs, "copy_ms": tc * 1e3,
            "copy_GBps": copy_gbs, "fraction_of_copy": fused_gbs / copy_gbs,
            "target_fraction": 0.7, "meets_target": fused_gbs / copy_gbs >= 0.7}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", required=True, choices=("env", "mlp", "cnn", "fused"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--elements", type=int, default=1 << 26)
    args = ap.parse_args(argv)
    if args.part == "env":
        res = env_part()
    elif args.part == "fused":
        res = fused_part(args.elements)
    else:
        batch = args.batch or (1024 if args.part == "mlp" else 256)
        res = step_part(args.part, batch, args.steps)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
