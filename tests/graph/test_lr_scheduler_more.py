"""torch's other LR schedulers (ConstantLR, PolynomialLR, CosineAnnealingWarmRestarts,
OneCycleLR with momentum cycling, SequentialLR, ReduceLROnPlateau): the lr (and momentum)
at every step equal to torch's."""

import numpy as np
import pytest
import torch

import shardgrad as sg
from shardgrad.optim import lr_scheduler as S

TL = torch.optim.lr_scheduler


def optimizers(kind="sgd"):
    p, q = sg.nn.Linear(2, 2).weight, torch.nn.Linear(2, 2).weight
    if kind == "adam":
        return sg.optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    return sg.optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)


def trajectory(opt, sched, steps, key="lr", metrics=None):
    out = []
    for i in range(steps):
        out.append(opt.param_groups[0][key])
        sched.step(*([metrics[i]] if metrics is not None else []))
    return out


@pytest.mark.parametrize("name, kw", [
    ("ConstantLR", dict(factor=0.5, total_iters=3)),
    ("PolynomialLR", dict(total_iters=6, power=2.0)),
    ("CosineAnnealingWarmRestarts", dict(T_0=3, T_mult=2, eta_min=0.01)),
    ("OneCycleLR", dict(max_lr=0.5, total_steps=20)),
    ("OneCycleLR", dict(max_lr=0.5, epochs=4, steps_per_epoch=5, three_phase=True,
                        anneal_strategy="linear")),
])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_schedules_equal_torch(name, kw, kind):
    ours, theirs = optimizers(kind)
    a, b = getattr(S, name)(ours, **kw), getattr(TL, name)(theirs, **kw)
    steps = 20
    np.testing.assert_allclose(trajectory(ours, a, steps), trajectory(theirs, b, steps),
                               rtol=1e-12)
    if name == "OneCycleLR":          # the momentum (beta1) cycles the other way
        key = "betas" if kind == "adam" else "momentum"
        got, want = ours.param_groups[0][key], theirs.param_groups[0][key]
        np.testing.assert_allclose(np.ravel(got), np.ravel(want), rtol=1e-12)


def test_sequential_warmup_then_cosine():
    ours, theirs = optimizers()
    a = S.SequentialLR(ours, [S.LinearLR(ours, start_factor=0.1, total_iters=3),
                              S.CosineAnnealingLR(ours, T_max=6)], milestones=[3])
    b = TL.SequentialLR(theirs, [TL.LinearLR(theirs, start_factor=0.1, total_iters=3),
                                 TL.CosineAnnealingLR(theirs, T_max=6)], milestones=[3])
    np.testing.assert_allclose(trajectory(ours, a, 12), trajectory(theirs, b, 12), rtol=1e-12)
    assert a.get_last_lr() == pytest.approx(b.get_last_lr())


@pytest.mark.parametrize("kw", [dict(patience=1), dict(mode="max", factor=0.5, cooldown=1,
                                                        threshold_mode="abs", min_lr=0.02)])
def test_reduce_on_plateau(kw):
    ours, theirs = optimizers()
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    a, b = S.ReduceLROnPlateau(ours, **kw), TL.ReduceLROnPlateau(theirs, **kw)
    np.testing.assert_allclose(trajectory(ours, a, 12, metrics=metrics),
                               trajectory(theirs, b, 12, metrics=metrics), rtol=1e-12)


def test_one_cycle_drives_a_compiled_step():
    # the momentum is a constant of the traced update: each new value retraces the step
    sg.manual_seed(0)
    model = sg.nn.Linear(3, 2)
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    sched, ref = S.OneCycleLR(opt, max_lr=0.5, total_steps=4), TL.OneCycleLR(theirs, 0.5, 4)
    step = sg.compile_step(model, sg.nn.functional.cross_entropy, opt)
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    for _ in range(4):
        assert np.isfinite(step(x, y))
        sched.step()
        ref.step()
        assert (opt.lr, opt.momentum) == pytest.approx(
            (theirs.param_groups[0]["lr"], theirs.param_groups[0]["momentum"]), rel=1e-12)
