"""A pipeline stage keeps its parameters and optimizer state between steps (no per-step
allgather: counted on a stage's communicator), ``gather`` assembles the whole model (every
parameter, buffer and optimizer state equal to the local run's), a step retraced with another
cut takes the values it needs from their holders, and non-blocking sends are completed before
the step returns, their buffers untouched until then (a communicator that delivers a send only
when the sender next calls into it, as MPI progresses). A training run's only per-step
collective is the loss program's allreduce."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.nn import functional as F
from shardgrad.runtime import train as tr
from shardgrad.runtime.comm import Communicator, Request
from shardgrad.runtime.config import load_config
from shardgrad.runtime.pipeline import (
    Mesh,
    PipelineProgram,
    PipelineTransform,
    gather,
    plan_pipeline,
)
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_cases as cases  # noqa: E402

STEPS, BATCH = cases.STEPS, cases.BATCH


class Counting(Communicator):
    """``inner`` with every call counted by method name, and the bytes each moves."""

    def __init__(self, inner: Communicator):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.calls: Counter = Counter()
        self.nbytes: Counter = Counter()

    def _count(self, name, buf=None):
        self.calls[name] += 1
        self.nbytes[name] += getattr(buf, "nbytes", 0)

    def allreduce_(self, buf, op="sum"):
        self._count("allreduce_", buf)
        return self.inner.allreduce_(buf, op)

    def bcast_(self, buf, root=0):
        self._count("bcast_", buf)
        return self.inner.bcast_(buf, root)

    def bcast_obj(self, obj, root=0):
        self._count("bcast_obj")
        return self.inner.bcast_obj(obj, root)

    def allgather_obj(self, obj):
        self._count("allgather_obj")
        return self.inner.allgather_obj(obj)

    def allgather_(self, x, out):
        self._count("allgather_", x)
        return self.inner.allgather_(x, out)

    def send(self, buf, dest, tag=0):
        self._count("send", buf)
        return self.inner.send(buf, dest, tag)

    def isend(self, buf, dest, tag=0):
        self._count("isend", buf)
        return self.inner.isend(buf, dest, tag)

    def recv_(self, buf, source, tag=0):
        self._count("recv_", buf)
        return self.inner.recv_(buf, source, tag)


class _Pending(Request):
    def __init__(self, comm, buf, dest, tag):
        self.comm, self.buf, self.dest, self.tag = comm, buf, dest, tag
        self.sent = buf.copy()           # what the runner handed over
        self.done = self.waited = False

    def complete(self) -> None:
        if not self.done:
            if not np.array_equal(self.buf, self.sent):
                self.comm.overwritten += 1
            self.comm.inner.send(self.buf, self.dest, self.tag)   # the buffer as it is now
            self.done = True

    def wait(self) -> None:
        self.waited = True
        self.comm.progress()


class Deferred(Counting):
    """A send leaves only when its sender next calls into the communicator (a receive, a
    collective, a wait), reading its buffer then: a runner that reused a send buffer before
    the send completed would deliver the wrong values (and is counted in ``overwritten``)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.pending: list[_Pending] = []
        self.requests: list[_Pending] = []
        self.overwritten = 0

    def progress(self) -> None:
        for p in self.pending:
            p.complete()
        self.pending.clear()

    def isend(self, buf, dest, tag=0):
        self._count("isend", buf)
        self.requests.append(_Pending(self, buf, dest, tag))
        self.pending.append(self.requests[-1])
        return self.requests[-1]

    def recv_(self, buf, source, tag=0):
        self.progress()
        return super().recv_(buf, source, tag)

    def bcast_(self, buf, root=0):
        self.progress()
        return super().bcast_(buf, root)

    def allreduce_(self, buf, op="sum"):
        self.progress()
        return super().allreduce_(buf, op)

    def allgather_obj(self, obj):
        self.progress()
        return super().allgather_obj(obj)


def _train(comm, kind="mlp", m=4, schedule="1f1b", steps=STEPS, wrap=Counting):
    """``steps`` pipelined steps on pp = comm.world_size ranks; returns the wrapped
    communicator's counts after step 1 and after the last step, the model before and after
    ``gather``, and the optimizer's state after it."""
    comm = wrap(comm)
    model, opt, image = cases.build(kind)
    x, y = cases.digits(image)
    mesh = Mesh.of(comm, 1, comm.world_size)
    step = sg.compile_step(model, F.cross_entropy, opt,
                           executor=lambda g: PipelineProgram(
                               plan_pipeline(g, mesh, m, schedule, world=comm), mesh, world=comm),
                           transform=PipelineTransform(m))
    counts = []
    for i in range(steps):
        lo = i % STEPS * BATCH
        step(x[lo:lo + BATCH], y[lo:lo + BATCH])
        assert all(r.waited for r in getattr(comm, "requests", [])), "a send not waited on"
        counts.append((Counter(comm.calls), Counter(comm.nbytes)))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    gather(step, mesh)
    after = {k: v.copy() for k, v in model.state_dict().items()}
    gathered = comm.calls["allgather_obj"] - counts[-1][0]["allgather_obj"]
    return {"counts": counts, "before": before, "after": after, "gathered": gathered,
            "optim": {k: np.array(v) for k, v in opt.state_dict().items()},
            "owned": set(step.graph_for(x[:BATCH], y[:BATCH])[1].owned), "comm": comm}


def _reference(kind, steps=STEPS):
    model, opt, image = cases.build(kind)
    x, y = cases.digits(image)
    step = sg.compile_step(model, F.cross_entropy, opt)
    for i in range(steps):
        step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    return ({k: v.copy() for k, v in model.state_dict().items()},
            {k: np.array(v) for k, v in opt.state_dict().items()})


@pytest.mark.timeout(60)
def test_steps_run_no_collective_but_the_loss_allreduce():
    steps, m = 4, 4
    results = run_ranks(2, lambda comm: _train(comm, m=m, steps=steps), timeout_s=30)
    for r in results:
        first, last = r["counts"][0], r["counts"][-1]
        calls = last[0] - first[0]
        nbytes = last[1] - first[1]
        # per step: the loss program's one 8-byte allreduce over the pipeline, m sends
        # (isend) and m receives, nothing else
        assert calls == Counter({"allreduce_": steps - 1, "isend": m * (steps - 1),
                                 "recv_": m * (steps - 1)}), calls
        assert nbytes["allreduce_"] == 8 * (steps - 1)
        assert "allgather_obj" not in last[0] and "send" not in last[0]
        assert r["gathered"] == 1           # the model is assembled once, when asked


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,pp,schedule", [("mlp", 2, "1f1b"), ("cnn", 2, "gpipe"),
                                              ("mlp4", 4, "1f1b")])
def test_gather_assembles_the_local_runs_model_and_optimizer_state(kind, pp, schedule):
    results = run_ranks(pp, lambda comm: _train(comm, kind, m=2, schedule=schedule),
                        timeout_s=30)
    want, want_optim = _reference(kind)
    for r in results:
        assert cases.max_rel_err(r["after"], want) < 1e-9
        assert cases.max_rel_err(r["optim"], want_optim) < 1e-9
        # before the gather a stage's model holds its own parameters only: the others are
        # still the initial ones
        init = {k: v for k, v in cases.build(kind)[0].state_dict().items()}
        mine = {k for k in want if k in r["owned"]}
        assert mine and cases.max_rel_err({k: r["before"][k] for k in mine},
                                          {k: want[k] for k in mine}) < 1e-9
        for k in set(want) - mine:
            assert np.array_equal(r["before"][k], init[k]), k


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_sends_complete_before_their_buffers_are_reused(schedule):
    results = run_ranks(2, lambda comm: _train(comm, "cnn", m=4, schedule=schedule,
                                               wrap=Deferred), timeout_s=30)
    want, _ = _reference("cnn")
    for r in results:
        assert r["comm"].overwritten == 0
        assert r["comm"].calls["isend"] == 4 * STEPS
        assert cases.max_rel_err(r["after"], want) < 1e-9


@pytest.mark.timeout(60)
def test_a_step_retraced_with_another_cut_takes_the_values_it_needs():
    # batches of 32 rows cut after the first Linear, then batches of 16 cut after the second:
    # the second program's stage 0 owns 2.weight, which stage 1 updated until then
    m, sizes = 2, [32, 32, 16, 16]

    def rank(comm):
        model, opt, _ = cases.build("mlp4")
        x, y = cases.digits(False)
        mesh = Mesh.of(comm, 1, 2)
        cuts = iter([["2.weight"], ["4.weight"]])
        step = sg.compile_step(model, F.cross_entropy, opt, transform=PipelineTransform(m),
                               executor=lambda g: PipelineProgram(
                                   plan_pipeline(g, mesh, m, "1f1b", next(cuts), world=comm),
                                   mesh, world=comm))
        lo = 0
        for b in sizes:
            step(x[lo:lo + b], y[lo:lo + b])
            lo += b
        gather(step, mesh)
        return {k: v.copy() for k, v in model.state_dict().items()}

    finals = run_ranks(2, rank, timeout_s=30)
    model, opt, _ = cases.build("mlp4")
    x, y = cases.digits(False)
    step = sg.compile_step(model, F.cross_entropy, opt)
    lo = 0
    for b in sizes:
        step(x[lo:lo + b], y[lo:lo + b])
        lo += b
    for got in finals:
        assert cases.max_rel_err(got, model.state_dict()) < 1e-9



@pytest.mark.timeout(120)
def test_a_pipelined_training_run_logs_the_loss_programs_loss_without_another_allreduce(
        tmp_path, monkeypatch):
    """``shardgrad train`` with pp=2, a step record every step: each step's only allreduce
    is its loss program's (one float32 over the pipeline: the loss is the global mean on
    every rank already and is logged as it is), no per-step broadcast, and the logged losses
    are the pp=1 run's within float32 rounding."""
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    sets = ["train.epochs=1", "train.batch_size=64", "model.hidden=[16]", "device.threads=1",
            "train.log_every=1", "model.batchnorm=false"]
    mlp = str(Path(__file__).resolve().parents[2] / "examples" / "digits_mlp.toml")
    pp2 = load_config(mlp, [*sets, "parallel.pp=2", "parallel.microbatches=4"])

    def rank(comm):
        comm = Counting(comm)
        summary = tr.train(pp2, str(tmp_path / "pp2") if comm.rank == 0 else None, comm=comm)
        return summary, comm.calls, comm.nbytes

    results = run_ranks(2, rank, timeout_s=100)
    steps = results[0][0]["steps"]
    for _, calls, nbytes in results:
        assert calls["allreduce_"] == steps > 0 and nbytes["allreduce_"] == 4 * steps
        assert calls["bcast_"] < steps      # the model's state at the start, not the loss
    ref = tr.train(load_config(mlp, sets), str(tmp_path / "pp1"))
    logged = lambda run: [r["loss"] for r in map(json.loads, (
        tmp_path / run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(logged("pp2")) == steps
    np.testing.assert_allclose(logged("pp2"), logged("pp1"), rtol=1e-5)
    assert results[0][0]["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
