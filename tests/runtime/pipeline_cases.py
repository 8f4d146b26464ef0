"""Shared by the pipeline equivalence tests: digits models, the local reference run, and the
same steps pipelined on a communicator (threads in-process, or real ranks when this file
runs under mpirun). As a script it runs the named cases and prints one JSON line on rank 0:

    mpirun --allow-run-as-root --oversubscribe -n 4 python tests/runtime/pipeline_cases.py \
        [--data digits.npz] mlp4:1:4:2:gpipe mlp:2:2:2:1f1b

(a case is kind:dp:pp:micro_batches:schedule; ``--data`` names an .npz with ``x`` and ``y``
saved by ``save_digits``, so the ranks need not import scikit-learn: 5 s on 4 busy ranks).
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np

import shardgrad as sg
from shardgrad.graph.nn import functional as F
from shardgrad.runtime.pipeline import (
    Mesh,
    PipelineProgram,
    PipelineTransform,
    gather,
    plan_pipeline,
)

STEPS, BATCH = 3, 32
_build_lock = threading.Lock()
_data: dict[str, np.ndarray] = {}


def save_digits(path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(path, x=d.data[:STEPS * BATCH] / 16.0, y=d.target[:STEPS * BATCH])


def digits(image: bool) -> tuple[np.ndarray, np.ndarray]:
    if not _data:
        from sklearn.datasets import load_digits

        d = load_digits()
        _data.update(x=d.data[:STEPS * BATCH] / 16.0, y=d.target[:STEPS * BATCH])
    x = _data["x"].astype("float64")
    return (x.reshape(-1, 1, 8, 8) if image else x), _data["y"].astype(np.int64)


CLIP = 0.1    # below every step's gradient norm here (0.17-0.54 for mlp, mlp4, cnn): all clip


def build(kind: str):
    """(model, optimizer, image input?) for ``kind``: "mlp" (64-32-10), "mlp4" (deep enough
    for 4 stages: 64-32-32-32-10), "mlpbn" (64-32-BatchNorm-10) or "cnn" (conv 1->4, pool,
    conv 4->8, pool, linear); a "clip" suffix sets the optimizer's ``max_grad_norm`` (the
    global norm over every stage)."""
    if kind.endswith("clip"):
        model, opt, image = build(kind[:-len("clip")])
        opt.max_grad_norm = CLIP
        return model, opt, image
    with _build_lock:
        saved = sg.get_default_dtype()
        sg.set_default_dtype("float64")
        sg.manual_seed(0)
        nn = sg.nn
        if kind == "cnn":
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(32, 10))
            opt = sg.optim.Adam(model.parameters(), lr=0.01)
        elif kind == "mlpbn":
            model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(),
                                  nn.Linear(32, 10))
            opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            widths = [64, 32, 10] if kind == "mlp" else [64, 32, 32, 32, 10]
            layers = []
            for a, b in zip(widths, widths[1:], strict=False):
                layers += [nn.Linear(a, b), nn.Tanh()]
            model = nn.Sequential(*layers[:-1])
            opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sg.set_default_dtype(saved)
    return model, opt, kind == "cnn"


def reference(kind: str, steps: int = STEPS) -> dict[str, np.ndarray]:
    """Final parameters (and buffers) of ``steps`` full-batch steps with the reference
    interpreter."""
    model, opt, image = build(kind)
    x, y = digits(image)
    step = sg.compile_step(model, F.cross_entropy, opt)
    for i in range(steps):
        step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    return {k: v.copy() for k, v in model.state_dict().items()}


def pipelined(comm, kind: str, dp: int, pp: int, m: int, schedule: str,
              executor=None, balance="cost", steps: int = STEPS) -> dict[str, np.ndarray]:
    """The same steps on a dp x pp mesh over ``comm``: replica d takes rows [d*B/dp, ...)
    of each global batch, in ``m`` micro-batches; every rank ends with the whole model
    (``gather``: between steps each stage holds only its own parameters).
    ``executor`` runs the stages' programs (default: the reference interpreter)."""
    model, opt, image = build(kind)
    x, y = digits(image)
    mesh = Mesh.of(comm, dp, pp)
    step = sg.compile_step(model, F.cross_entropy, opt,
                           executor=lambda g: PipelineProgram(
                               plan_pipeline(g, mesh, m, schedule, balance, world=comm), mesh,
                               executor=executor, world=comm),
                           transform=PipelineTransform(m))
    per = BATCH // dp
    for i in range(steps):
        lo = i * BATCH + mesh.replica * per
        step(x[lo:lo + per], y[lo:lo + per])
    gather(step, mesh)
    return {k: v.copy() for k, v in model.state_dict().items()}


def max_rel_err(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    return max(float(np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k]))) for k in want)


def parse(case: str) -> tuple[str, int, int, int, str]:
    kind, dp, pp, m, schedule = case.split(":")
    return kind, int(dp), int(pp), int(m), schedule


def main(args: list[str]) -> None:
    from shardgrad.runtime.mpi import MPICommunicator

    cases = list(args)
    if cases[:1] == ["--data"]:
        with np.load(cases[1]) as f:
            _data.update(x=f["x"], y=f["y"])
        cases = cases[2:]
    comm = MPICommunicator(timeout_s=60)
    results = {}
    for case in cases:
        kind, dp, pp, m, schedule = parse(case)
        got = pipelined(comm, kind, dp, pp, m, schedule)
        results[case] = max_rel_err(got, reference(kind))
    if comm.rank == 0:
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
