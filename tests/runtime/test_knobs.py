"""The training knobs: gradient accumulation (4 batches of 8 == one of 32 in float64, also
under dp and pp), global-norm gradient clipping (as torch's clip_grad_norm_, eager and
compiled, the same under dp and pp as alone), label smoothing (as torch's),
warm-up and the step / multistep / cosine / linear schedules (as torch's schedulers), AdamW
by config and keeping the last K checkpoints."""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

import shardgrad as sg
from shardgrad.runtime.config import load_config
from shardgrad.runtime.threadcomm import run_ranks
from shardgrad.runtime.train import lr_at, train

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
from seeded import mlp, torch_twin  # noqa: E402

BASE = ["data.dataset='digits'", "train.dtype='float64'", "model.hidden=[32]",
        "train.epochs=2", "train.lr=0.05", "train.momentum=0.9", "train.log_every=1000",
        "data.prefetch=0"]


def _final(config, tmp_path, name, world=1):
    out = str(tmp_path / name)
    if world == 1:
        train(config, out)
    else:
        run_ranks(world, lambda comm: train(config, out, comm=comm), timeout_s=120)
    return safetensors.numpy.load_file(os.path.join(out, "final.safetensors"))


def _close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.timeout(300)
def test_accumulate_4_of_8_equals_one_batch_of_32(tmp_path):
    whole = _final(load_config(None, BASE + ["train.batch_size=32"]), tmp_path, "whole")
    acc = _final(load_config(None, BASE + ["train.batch_size=8", "train.accumulate=4"]),
                 tmp_path, "acc")
    _close(acc, whole, 1e-9)
    dp = _final(load_config(None, BASE + ["train.batch_size=8", "train.accumulate=4",
                                          "parallel.dp=2"]), tmp_path, "dp", world=2)
    _close(dp, whole, 1e-9)
    pp = _final(load_config(None, BASE + ["model.hidden=[32, 16]", "train.batch_size=8",
                                          "train.accumulate=4", "parallel.pp=2",
                                          "parallel.microbatches=2"]), tmp_path, "pp", world=2)
    pp_whole = _final(load_config(None, BASE + ["model.hidden=[32, 16]", "train.batch_size=32"]),
                      tmp_path, "ppw")
    _close(pp, pp_whole, 1e-9)


@pytest.mark.parametrize("compiled", [False, True])
def test_grad_clip_matches_torch(compiled):
    model = mlp(5, 7, 3, sg.nn.Tanh)
    ref = torch_twin(model, torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                                torch.nn.Linear(7, 3)))
    opt = sg.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt.max_grad_norm = 0.05
    topt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    rng = np.random.default_rng(0)
    step = sg.compile_step(model, sg.nn.functional.cross_entropy, opt) if compiled else None
    for _ in range(4):
        x, y = rng.standard_normal((16, 5)) * 3, rng.integers(0, 3, 16)
        if compiled:
            step(x, y)
        else:
            opt.zero_grad()
            sg.nn.functional.cross_entropy(model(sg.tensor(x)), y).backward()
            opt.step()
            clipped = [p.grad.numpy().copy() for p in model.parameters()]
        topt.zero_grad()
        torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y)).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm > 0.05                                  # the clip is active
        if not compiled:   # sg.nn.utils.clip_grad_norm_ as torch's, on the unclipped grads
            ours = sg.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            assert float(ours) == pytest.approx(float(norm), rel=1e-10)
            for p, q, before in zip(model.parameters(), ref.parameters(), clipped, strict=True):
                np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-10)
                assert np.abs(before).max() > np.abs(p.grad.numpy()).max()
        topt.step()
    got = dict(ref.named_parameters())
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, got[k].detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(300)
def test_grad_clip_same_under_dp_and_pp(tmp_path):
    sets = BASE + ["model.hidden=[32, 16]", "train.batch_size=32", "train.grad_clip=0.1",
                   "train.lr=0.5"]
    alone = _final(load_config(None, sets), tmp_path, "alone")
    free = _final(load_config(None, sets + ["train.grad_clip=0"]), tmp_path, "free")
    assert max(np.abs(alone[k] - free[k]).max() for k in alone) > 1e-3   # clipping acts
    _close(_final(load_config(None, sets + ["parallel.dp=2"]), tmp_path, "dp", 2), alone, 1e-9)
    # the norm over all stages (real mpirun: tests/runtime/test_knobs_mpi.py)
    pipe = ["parallel.pp=2", "parallel.microbatches=2"]
    _close(_final(load_config(None, sets + pipe), tmp_path, "pp", 2), alone, 1e-9)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("knobs", [
    ["train.label_smoothing=0.1", "train.warmup_steps=5", "train.lr_schedule='multistep'",
     "train.lr_milestones=[1]", "train.grad_clip=0.1"],
    ["train.optimizer='adamw'", "train.lr=0.003", "train.weight_decay=0.01",
     "train.lr_schedule='cosine'", "train.accumulate=2", "train.batch_size=16"]])
def test_knobs_together_same_under_dp(knobs, tmp_path):
    # (pp = 2 and dp = 2 x pp = 2 with them: tests/runtime/test_knobs_mpi.py, real mpirun)
    sets = BASE + ["train.batch_size=32", "train.keep_checkpoints=1"] + knobs
    alone = _final(load_config(None, sets), tmp_path, "alone")
    _close(_final(load_config(None, sets + ["parallel.dp=2"]), tmp_path, "dp", 2), alone, 1e-9)
    assert os.listdir(tmp_path / "dp" / "checkpoints") == ["epoch_2.safetensors"]


def test_grad_clip_stage_without_parameters_joins_the_norm():
    # a stage of only tanh has no gradients: its update still runs the allreduce (of zero)
    from shardgrad.graph.trace import trace_step
    from shardgrad.partition.pipeline import pipeline

    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(5, 7), sg.nn.Tanh(), sg.nn.Linear(7, 3))
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    opt.max_grad_norm = 0.5
    graph = trace_step(model, sg.nn.functional.cross_entropy, opt, ((4, 5), "float32"),
                       ((4,), "int64"))
    names = graph.names()
    tanh = next(names[n.id] for n in graph.nodes if n.op == "tanh")
    plan = pipeline(graph, 3, [tanh, "2.weight"])
    assert [s.params for s in plan.stages] == [["0.weight", "0.bias"], [],
                                               ["2.weight", "2.bias"]]
    for s in plan.stages:
        ops = [n.op for n in s.update.nodes]
        assert ops.count("allreduce") == 1 and "grad_norm" in s.update.outputs


def test_label_smoothing_matches_torch():
    rng = np.random.default_rng(1)
    logits, y = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    for reduction in ("mean", "sum", "none"):
        x = sg.tensor(logits, requires_grad=True)
        loss = sg.nn.functional.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2)
        tx = torch.tensor(logits, requires_grad=True)
        tloss = torch.nn.functional.cross_entropy(tx, torch.tensor(y), reduction=reduction,
                                                  label_smoothing=0.2)
        np.testing.assert_allclose(loss.numpy(), tloss.detach().numpy(), rtol=1e-12)
        loss.sum().backward()
        tloss.sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_label_smoothing_config_trains(tmp_path):
    a = train(load_config(None, BASE + ["train.label_smoothing=0.1", "train.epochs=1"]), None)
    b = train(load_config(None, BASE + ["train.epochs=1"]), None)
    assert a["params_sha256"] != b["params_sha256"]
    assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.1 and a["test_accuracy"] > 0.5


def _torch_lrs(make, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_torch():
    S = torch.optim.lr_scheduler
    per_epoch, epochs = 5, 6
    total = per_epoch * epochs

    def ours(*sets):
        config = load_config(None, ["train.lr=0.1", f"train.epochs={epochs}", *sets])
        return [lr_at(config, s, total) for s in range(total)]

    cos = _torch_lrs(lambda o: S.CosineAnnealingLR(o, total), total)
    np.testing.assert_allclose(ours("train.lr_schedule='cosine'"), cos, rtol=1e-12)
    lin = _torch_lrs(lambda o: S.LinearLR(o, 1.0, 0.0, total), total)
    np.testing.assert_allclose(ours("train.lr_schedule='linear'"), lin, rtol=1e-12, atol=1e-15)
    # step / multistep count epochs: torch's epoch-level scheduler.step(), repeated per batch
    step = [v for v in _torch_lrs(lambda o: S.StepLR(o, 2, 0.5), epochs) for _ in range(per_epoch)]
    np.testing.assert_allclose(ours("train.lr_schedule='step'", "train.lr_step_size=2",
                                    "train.lr_gamma=0.5"), step, rtol=1e-12)
    multi = [v for v in _torch_lrs(lambda o: S.MultiStepLR(o, [1, 4], 0.1), epochs)
             for _ in range(per_epoch)]
    np.testing.assert_allclose(ours("train.lr_schedule='multistep'", "train.lr_milestones=[1, 4]"),
                               multi, rtol=1e-12)
    warm = ours("train.lr_schedule='cosine'", "train.warmup_steps=4")
    assert warm[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    rest = _torch_lrs(lambda o: S.CosineAnnealingLR(o, total - 4), total - 4)
    np.testing.assert_allclose(warm[4:], rest, rtol=1e-12)
    assert ours("train.warmup_steps=3")[:4] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1])
    assert not math.isnan(sum(ours("train.lr_schedule='linear'", "train.warmup_steps=40")))


def test_adamw_by_config_matches_the_optimizer(tmp_path):
    from shardgrad.runtime.train import make_optimizer, setup

    config = load_config(None, BASE + ["train.optimizer='adamw'", "train.lr=0.01",
                                       "train.weight_decay=0.01"])
    opt = make_optimizer(config, setup(config)[0].parameters())
    assert type(opt) is sg.optim.AdamW and opt.weight_decay == 0.01   # torch-tested there
    assert train(config, None)["test_accuracy"] > 0.8


def test_keep_checkpoints(tmp_path):
    train(load_config(None, BASE + ["train.epochs=3", "train.keep_checkpoints=2"]),
          str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
        "epoch_2.safetensors", "epoch_3.safetensors"]


def test_python_accumulate_and_cross_entropy_module():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((32, 5)), rng.integers(0, 3, 32)
    finals = []
    for k in (1, 4):
        model = mlp(5, 7, 3, sg.nn.Tanh)
        loss = sg.nn.CrossEntropyLoss(label_smoothing=0.1)
        step = sg.compile_step(model, loss, sg.optim.SGD(model.parameters(), lr=0.3),
                               accumulate=k)
        for _ in range(3):
            step(x, y)
        finals.append(model.state_dict())
    _close(finals[1], finals[0], 1e-12)
    torch_loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.tensor(x[:, :3]),
                                                                torch.tensor(y))
    ours = sg.nn.CrossEntropyLoss(label_smoothing=0.1)(sg.tensor(x[:, :3]), y)
    assert float(ours) == pytest.approx(float(torch_loss), rel=1e-12)
