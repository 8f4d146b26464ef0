"""GPU benchmarks through shardgrad's public API, each against PyTorch measured in the same
process on the same GPU:

    python bench/gpu_bench.py --part env                  # device, driver, library versions
    python bench/gpu_bench.py --part steps                # every case of issue 10's table
    python bench/gpu_bench.py --part steps --cases mlp512-b1024 cnn16-b256
    python bench/gpu_bench.py --part cli                  # shardgrad train on the GPU, one run
    python bench/gpu_bench.py --part fused                # a fused elementwise kernel vs a copy
    python bench/gpu_bench.py --part libs                 # own kernels vs cuBLASLt epilogues
    python bench/gpu_bench.py --part steps --stand-in     # the same code on the CPU (host_cupy
                                                          # and torch on the CPU): checks the
                                                          # script, times nothing of a GPU
                                                          # (tests/bench/test_gpu_bench.py)

Training steps go through what a user writes: ``model.to("cuda")``, ``sg.compile_step`` (or,
for the eager case, ``loss.backward(); opt.step()``), batches already on the device; torch
runs the same model, batch and optimizer eagerly (and under ``torch.autocast`` for the bf16
and fp16 cases, with a GradScaler for fp16; torch.compile as a reference where it compiles).
``speed`` is torch eager's time over ours (above 1: faster than torch). Times are medians of
several timed blocks after a warm-up, each block ended by a synchronize. Prints one JSON
object per part (the steps part: one per case, then a summary line).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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


def env_part(stand_in: bool = False) -> dict:
    import cupy as cp
    if stand_in:   # host_cupy has no CUDA runtime to ask
        info = {"cupy": "stand-in (tests/runtime/host_cupy)", "numpy": np.__version__,
                "device": None}
    else:
        info = {"cupy": cp.__version__, "numpy": np.__version__}
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        info["device"] = name.decode() if isinstance(name, bytes) else name
        info["sms"] = props["multiProcessorCount"]
        info["driver"] = cp.cuda.runtime.driverGetVersion()
        info["runtime"] = cp.cuda.runtime.runtimeGetVersion()
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


# name: (model kind, widths, batch, optimizer, activation, precision, eager)
CASES = {
    "mlp512-b1024": ("mlp", (512, 512), 1024, "sgd", "relu", "fp32", False),
    "mlp512-b128": ("mlp", (512, 512), 128, "sgd", "relu", "fp32", False),
    "mlp4096-b4096": ("mlp", (4096, 4096), 4096, "sgd", "relu", "fp32", False),
    "mlp512-gelu-b1024": ("mlp", (512, 512), 1024, "sgd", "gelu", "fp32", False),
    "mlp512-adam-b1024": ("mlp", (512, 512), 1024, "adam", "relu", "fp32", False),
    "cnn16-b256": ("cnn", (16, 32), 256, "sgd", "relu", "fp32", False),
    "cnn64-b256": ("cnn", (64, 128), 256, "sgd", "relu", "fp32", False),
    "eager-mlp512-b256": ("mlp", (512, 512), 256, "sgd", "relu", "fp32", True),
    "bf16-mlp4096-b4096": ("mlp", (4096, 4096), 4096, "sgd", "relu", "bf16", False),
    "fp16-mlp4096-b4096": ("mlp", (4096, 4096), 4096, "sgd", "relu", "fp16", False),
}
# issue 10's targets: speed against torch eager float32 (bf16/fp16: against torch autocast)
TARGETS = {"mlp512-b1024": 2.0, "mlp512-b128": 2.0, "mlp4096-b4096": 1.0,
           "mlp512-gelu-b1024": 2.0, "mlp512-adam-b1024": 2.0, "cnn16-b256": 1.0,
           "cnn64-b256": 1.0, "eager-mlp512-b256": 0.5, "bf16-mlp4096-b4096": 1.0}
LR, MOMENTUM = 0.01, 0.9


def _sg_model(kind: str, widths, act: str):
    import shardgrad as sg
    nn = sg.nn
    a = (lambda: nn.GELU()) if act == "gelu" else (lambda: nn.ReLU())
    if kind == "mlp":
        return nn.Sequential(nn.Linear(784, widths[0]), a(), nn.Linear(widths[0], widths[1]),
                             a(), nn.Linear(widths[1], 10))
    c1, c2 = widths
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), a(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), a(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c2 * 7 * 7, 128), a(), nn.Linear(128, 10))


def _torch_model(kind: str, widths, act: str):
    import torch.nn as tnn
    a = (lambda: tnn.GELU()) if act == "gelu" else (lambda: tnn.ReLU())
    if kind == "mlp":
        return tnn.Sequential(tnn.Linear(784, widths[0]), a(), tnn.Linear(widths[0], widths[1]),
                              a(), tnn.Linear(widths[1], 10))
    c1, c2 = widths
    return tnn.Sequential(tnn.Conv2d(1, c1, 3, padding=1), a(), tnn.MaxPool2d(2),
                          tnn.Conv2d(c1, c2, 3, padding=1), a(), tnn.MaxPool2d(2),
                          tnn.Flatten(), tnn.Linear(c2 * 7 * 7, 128), a(), tnn.Linear(128, 10))


def _stand_in() -> None:
    """CuPy replaced by tests/runtime/host_cupy's stand-in, the CUDA kernels run on the host:
    the whole script runs on a CPU (to check it; nothing it times is a GPU's)."""
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "runtime"))
    import host_cupy

    sys.modules["cupy"] = host_cupy.install(host_cupy.device_module())


def step_case(name: str, steps: int, stand_in: bool, torch_compile: bool) -> dict:
    import cupy as cp
    import torch
    import torch.nn.functional as TF

    import shardgrad as sg

    kind, widths, batch, opt_name, act, precision, eager = CASES[name]
    if stand_in:          # the shapes of the case, scaled down: the code paths are the point
        batch = min(batch, 16)
        widths = tuple(min(w, 32) for w in widths)
    shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, batch)
    tdev = "cpu" if stand_in else "cuda"
    res: dict = {"part": "step", "case": name, "batch": batch, "widths": list(widths),
                 "optimizer": "Adam" if opt_name == "adam" else f"SGD(momentum={MOMENTUM})",
                 "activation": act, "precision": precision, "eager": eager,
                 "stand_in": stand_in}
    sync = cp.cuda.get_current_stream().synchronize

    try:
        sg.manual_seed(0)
        model = _sg_model(kind, widths, act).to("cuda")
        opt = (sg.optim.Adam(model.parameters(), lr=1e-3) if opt_name == "adam"
               else sg.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        dx, dy = sg.tensor(x, device="cuda"), sg.tensor(y, device="cuda")
        if eager:
            F = sg.nn.functional

            def run():
                opt.zero_grad()
                loss = F.cross_entropy(model(dx), dy)
                loss.backward()
                opt.step()
                return loss
        else:
            kw = {} if precision == "fp32" else {"precision": precision}
            step = sg.compile_step(model, sg.nn.functional.cross_entropy, opt, **kw)

            def run():
                return step(dx, dy)
        for _ in range(3):
            run()
        res["shardgrad_ms"] = 1e3 * timed(run, sync, steps)
        res["shardgrad_loss"] = float(run())
        if not eager:
            res["shardgrad_stats"] = step.stats()
    except Exception as e:  # noqa: BLE001 - reported, the torch measurement goes on
        res["shardgrad_error"] = f"{type(e).__name__}: {e}"[:1000]

    try:
        torch.manual_seed(0)
        tm = _torch_model(kind, widths, act).to(tdev)
        topt = (torch.optim.Adam(tm.parameters(), lr=1e-3) if opt_name == "adam"
                else torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM))
        tx, ty = torch.as_tensor(x, device=tdev), torch.as_tensor(y, device=tdev)
        tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(tdev) if precision == "fp16" else None

        def trun():
            topt.zero_grad(set_to_none=True)
            if low is None:
                loss = TF.cross_entropy(tm(tx), ty)
            else:
                with torch.autocast(tdev, dtype=low):
                    loss = TF.cross_entropy(tm(tx), ty)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(topt)
                scaler.update()
            else:
                loss.backward()
                topt.step()
            return loss
        for _ in range(3):
            trun()
        key = "torch_eager_ms" if low is None else f"torch_autocast_{precision}_ms"
        res[key] = 1e3 * timed(trun, tsync, steps)
        res["torch_loss"] = trun().detach().item()
        res["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        if low is not None:
            res["torch_eager_ms"] = res[key]       # the baseline the speed is taken against
        if torch_compile:       # a reference, no target: last, as it may take long
            t0 = time.perf_counter()
            ctrun = torch.compile(trun)
            for _ in range(3):
                ctrun()
            res["torch_compile_warmup_s"] = time.perf_counter() - t0
            res["torch_compile_ms"] = 1e3 * timed(ctrun, tsync, steps)
    except Exception as e:  # noqa: BLE001 - reported
        res["torch_error"] = f"{type(e).__name__}: {e}"[:1000]
    if "shardgrad_ms" in res and "torch_eager_ms" in res:
        res["speed"] = res["torch_eager_ms"] / res["shardgrad_ms"]
    if name in TARGETS:
        res["target_speed"] = TARGETS[name]
        res["meets_target"] = res.get("speed", 0.0) >= TARGETS[name]
    return res


def steps_part(cases, steps: int, stand_in: bool, torch_compile: bool) -> list[dict]:
    out = []
    for name in cases:
        res = step_case(name, steps, stand_in, False)
        print(json.dumps(res), flush=True)
        out.append(res)
    if torch_compile and "mlp512-b1024" in cases:
        res = step_case("mlp512-b1024", steps, stand_in, True)
        res["case"] = "torch-compile-mlp512-b1024"
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def capture_part(steps: int, stand_in: bool) -> dict:
    """CUDA Graph replay of the compiled step (runtime.gpu_step's GraphReplay with the
    capture-safe GEMM of runtime.capture_gemm) against plain launches of the same step: the
    MLP 784-512-512-10 with SGD momentum at batch 128 (host-bound: where replay pays) and
    1024, and the CNN at 256; each says whether it captured (``graph``), which GEMM the
    capture used (``gemm``), both step times and the largest loss difference over the
    timed steps."""
    import cupy as cp

    import shardgrad as sg

    sync = cp.cuda.get_current_stream().synchronize
    out = {"part": "capture", "cases": {}}
    for name in ("mlp512-b128", "mlp512-b1024", "cnn16-b256"):
        kind, widths, batch, _, act, _, _ = CASES[name]
        if stand_in:
            batch, widths = min(batch, 16), tuple(min(w, 32) for w in widths)
        shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
        rng = np.random.default_rng(0)
        x = sg.tensor(rng.standard_normal(shape).astype(np.float32), device="cuda")
        y = sg.tensor(rng.integers(0, 10, batch), device="cuda")
        res: dict = {}
        losses = {}
        try:
            for graph in (False, True):
                sg.manual_seed(0)
                model = _sg_model(kind, widths, act).to("cuda")
                opt = sg.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
                step = sg.compile_step(model, sg.nn.functional.cross_entropy, opt,
                                       cuda_graph=graph)
                seen = [step(x, y) for _ in range(4)]      # warm-up, capture and a replay
                key = "graph" if graph else "plain"
                res[f"{key}_ms"] = 1e3 * timed(
                    lambda s=step, seen=seen, x=x, y=y: seen.append(s(x, y)), sync, steps)
                losses[key] = [float(v) for v in seen]
                if graph:
                    stats = step.stats()
                    res.update(graph=stats["graph"], gemm=stats["gemm"],
                               cuda_graph=stats["cuda_graph"], memory=stats["memory"])
            n = min(len(losses["graph"]), len(losses["plain"]))
            res["max_loss_diff"] = max(abs(a - b) for a, b in zip(
                losses["graph"][:n], losses["plain"][:n], strict=True))
            res["speed_vs_plain"] = res["plain_ms"] / res["graph_ms"]
        except Exception as e:  # noqa: BLE001 - reported
            res["error"] = f"{type(e).__name__}: {e}"[:1000]
        out["cases"][name] = res
        print(json.dumps({"capture_case": name, **res}), file=sys.stderr, flush=True)
    return out


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


def cli_part(epochs: int, stand_in: bool, timeout: float = 35.0) -> dict:
    """One ``shardgrad train`` run of examples/digits_mlp.toml on the GPU, as a user starts it
    (``--set device.type="cuda"``): its exit code, wall time and summary.json."""
    import os
    import subprocess
    import tempfile

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = tempfile.mkdtemp(prefix="sg_gpu_cli_")
    cmd = [sys.executable, "-m", "shardgrad", "train", "examples/digits_mlp.toml", "--out", out,
           "--set", 'device.type="cuda"', "--set", f"train.epochs={epochs}"]
    if stand_in:
        return {"part": "cli", "command": " ".join(cmd), "skipped": "stand-in: no GPU"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "SHARDGRAD_PROGRESS": "0"})
    except subprocess.TimeoutExpired as e:
        return {"part": "cli", "command": " ".join(cmd[1:]), "exit": None,
                "timed_out_after_s": timeout, "stderr_tail": str(e.stderr or "")[-1500:]}
    res = {"part": "cli", "command": " ".join(cmd[1:]), "exit": done.returncode,
           "wall_s": time.perf_counter() - t0, "stderr_tail": done.stderr[-1500:]}
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        res.update({k: summary.get(k) for k in ("test_accuracy", "train_loss", "steps",
                                                "wall_s", "epochs")})
        res["train_wall_s"] = summary.get("wall_s")
    except OSError as e:
        res["summary_error"] = str(e)
    return res


# (M, K, N, act): the linear layers of issue 10's MLP cases (batch x in -> out)
LIB_GEMMS = [(1024, 784, 512, "relu"), (1024, 512, 512, "relu"), (1024, 512, 10, "none"),
             (128, 784, 512, "relu"), (4096, 784, 4096, "relu"), (4096, 4096, 4096, "relu"),
             (1024, 512, 512, "gelu")]
# (N, C, H, W, O): the convolutions (3x3, padding 1) of issue 10's CNN cases
LIB_CONVS = [(256, 1, 28, 28, 16), (256, 16, 14, 14, 32), (256, 1, 28, 28, 64),
             (256, 64, 14, 14, 128)]
LIB_STEPS = {"cublaslt": ["mlp512-b1024", "mlp512-b128", "mlp4096-b4096", "mlp512-gelu-b1024"],
             "cudnn": ["cnn16-b256", "cnn64-b256"]}


def _lib_calls(lib: str, stand_in: bool, rng) -> list[dict]:
    """Each of the library's call shapes run once through its op's GPU kernel, which measures
    the own kernels against the library (ops.gpu_libs.choose): the choice made."""
    import cupy as cp

    from shardgrad.ops import gpu as gpu_ops
    from shardgrad.ops import gpu_libs

    def arr(*shape, scale=1.0):
        return cp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    calls = []
    shapes = LIB_GEMMS if lib == "cublaslt" else LIB_CONVS
    for shape in shapes:
        if stand_in:
            shape = tuple(min(v, 16) if isinstance(v, int) else v for v in shape)
        seen = set(gpu_libs.report()[lib]["choices"])
        try:
            if lib == "cublaslt":
                m, k, n, act = shape
                gpu_ops.matmul_bias_act(cp, arr(m, k), arr(n, k, scale=k ** -0.5).T, arr(n),
                                        act, out=cp.empty((m, n), np.float32))
            else:
                n, c, h, w, o = shape
                x, wt, st, pad = arr(n, c, h, w), arr(o, c, 3, 3, scale=(9 * c) ** -0.5), \
                    (1, 1), (1, 1)
                y = gpu_ops.conv_fprop(cp, x, wt, st, pad)
                gpu_ops.conv_dgrad(cp, y, wt, x.shape, st, pad)
                gpu_ops.conv_wgrad(cp, x, y, (3, 3), st, pad)
            new = {k: v for k, v in gpu_libs.report()[lib]["choices"].items() if k not in seen}
            calls.append({"shape": list(shape), "choices": new})
        except Exception as e:  # noqa: BLE001 - reported
            calls.append({"shape": list(shape), "error": f"{type(e).__name__}: {e}"[:500]})
    return calls


def libs_part(steps: int, stand_in: bool) -> dict:
    """The optional libraries (ops.gpu_libs, the gpu-libs extra): whether each imports; per
    call shape of issue 10's cases (linear layers for cuBLASLt, convolutions for cuDNN), the
    own kernels against the library, as a step's first call measures them; then the compiled
    steps with the libraries allowed and disabled, alternating, in this process."""
    import cupy as cp

    import shardgrad as sg
    from shardgrad.ops import gpu_libs

    res: dict = {"part": "libs", "stand_in": stand_in}
    probes = {lib: gpu_libs.probe(lib) for lib in ("cublaslt", "cudnn")}
    res["probe"] = {lib: note for lib, (_, note) in probes.items()}
    present = [lib for lib, (mod, _) in probes.items() if mod is not None]
    if not present:
        res["skipped"] = "neither nvmath-python nor cuDNN's frontend imports: own kernels only"
        return res
    rng = np.random.default_rng(0)
    res["calls"] = {lib: _lib_calls(lib, stand_in, rng) for lib in present}
    print(json.dumps(res), flush=True)      # what is known, should the steps run out of time
    sync = cp.cuda.get_current_stream().synchronize
    cases = {}
    for name in [case for lib in present for case in LIB_STEPS[lib]]:
        kind, widths, batch, _, act, _, _ = CASES[name]
        if stand_in:
            batch, widths = min(batch, 16), tuple(min(w, 32) for w in widths)
        shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
        x = sg.tensor(rng.standard_normal(shape).astype(np.float32), device="cuda")
        y = sg.tensor(rng.integers(0, 10, batch), device="cuda")
        times: dict = {"library": [], "own": []}
        try:
            for side in ("own", "library", "own", "library"):
                for lib, probed in probes.items():
                    gpu_libs.install(lib, *(probed if side == "library" else
                                            (None, "disabled for the comparison")))
                sg.manual_seed(0)
                model = _sg_model(kind, widths, act).to("cuda")
                step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                                       sg.optim.SGD(model.parameters(), lr=LR,
                                                    momentum=MOMENTUM))
                for _ in range(3):
                    step(x, y)
                times[side].append(1e3 * timed(lambda s=step, a=x, t=y: s(a, t), sync, steps,
                                               blocks=3))
                if side == "library":
                    stats = step.stats()
                    cases[name] = {"graph": stats.get("graph"), "choices": {
                        lib: stats["libraries"][lib]["choices"] for lib in present}}
            own, lib_ms = statistics.median(times["own"]), statistics.median(times["library"])
            cases[name].update(own_ms=own, library_ms=lib_ms, library_speedup=own / lib_ms,
                               own_runs_ms=times["own"], library_runs_ms=times["library"])
        except Exception as e:  # noqa: BLE001 - reported
            cases[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    for lib, probed in probes.items():
        gpu_libs.install(lib, *probed)
    res["steps"] = cases
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", required=True,
                    choices=("env", "steps", "fused", "cli", "capture", "libs"))
    ap.add_argument("--epochs", type=int, default=3, help="the cli part's training epochs")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--elements", type=int, default=None,
                    help="the fused part's array length (default 2**26; 2**16 with --stand-in, "
                         "whose host-run kernel took over 200 s at 2**26)")
    ap.add_argument("--stand-in", action="store_true",
                    help="run on the CPU with tests/runtime/host_cupy standing for CuPy")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--fake-libs", action="store_true",
                    help="with --stand-in: tests/runtime/fake_gpu_libs as nvmath-python and "
                         "cuDNN's frontend")
    args = ap.parse_args(argv)
    if args.stand_in:
        _stand_in()
    if args.part == "env":
        print(json.dumps(env_part(args.stand_in)), flush=True)
    elif args.part == "cli":
        print(json.dumps(cli_part(args.epochs, args.stand_in)), flush=True)
    elif args.part == "fused":
        elements = args.elements or (1 << 16 if args.stand_in else 1 << 26)
        print(json.dumps(fused_part(elements)), flush=True)
    elif args.part == "capture":
        print(json.dumps(capture_part(args.steps, args.stand_in)), flush=True)
    elif args.part == "libs":
        if args.fake_libs:
            import fake_gpu_libs  # on the path: _stand_in put tests/runtime there

            from shardgrad.ops import gpu_libs
            gpu_libs.install("cublaslt", fake_gpu_libs.module(), "available (fake)")
            gpu_libs.install("cudnn", fake_gpu_libs.cudnn_module(), "available (fake)")
        print(json.dumps(libs_part(args.steps, args.stand_in)), flush=True)
    else:
        res = steps_part(args.cases, args.steps, args.stand_in, not args.no_torch_compile)
        print(json.dumps({"part": "steps", "cases": {r["case"]: r for r in res}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
