"""Optimizer parameter groups as torch's: per-group lr and hyper-parameters (e.g. no weight
decay on biases), eager and compiled, under an LR schedule, equal to torch in float64."""

import numpy as np
import pytest
import torch

import shardgrad as sg

RNG = np.random.default_rng(4)
X, Y = RNG.standard_normal((8, 4)), RNG.integers(0, 3, 8)


def models():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                             torch.nn.Linear(5, 3)).double()
    state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    out = []
    for _ in range(2):
        m = sg.nn.Sequential(sg.nn.Linear(4, 5), sg.nn.Tanh(), sg.nn.Linear(5, 3)).double()
        m.load_state_dict(state)
        out.append(m)
    return tm, out


def groups(m, torch_side):
    weights = [m[0].weight, m[2].weight]
    biases = [m[0].bias, m[2].bias]
    return [{"params": weights}, {"params": biases, "lr": 0.02, "weight_decay": 0.0}]


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
                                      ("Adam", dict(lr=0.01, weight_decay=0.05)),
                                      ("AdamW", dict(lr=0.01, weight_decay=0.1))])
def test_groups_eager_and_compiled_under_a_schedule(name, kw):
    tm, (m1, m2) = models()
    topt = getattr(torch.optim, name)(groups(tm, True), **kw)
    o1 = getattr(sg.optim, name)(groups(m1, False), **kw)
    o2 = getattr(sg.optim, name)(groups(m2, False), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(topt, 2, 0.5)] + [
        sg.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (o1, o2)]
    step = sg.compile_step(m1, sg.nn.functional.cross_entropy, o1)
    for _ in range(5):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(X)), torch.tensor(Y)).backward()
        topt.step()
        step(X, Y)
        o2.zero_grad()
        sg.nn.functional.cross_entropy(m2(sg.tensor(X)), sg.tensor(Y)).backward()
        o2.step()
        for s in scheds:
            s.step()
    for m in (m1, m2):
        for (n, p), q in zip(tm.named_parameters(), m.parameters(), strict=True):
            np.testing.assert_allclose(q.numpy(), p.detach().numpy(), rtol=1e-11, atol=1e-13,
                                       err_msg=n)
    assert len(step._compiled) == 1          # the schedule scales every group: no retrace
    assert [g["lr"] for g in o1.param_groups] == pytest.approx(
        [g["lr"] for g in topt.param_groups])
    assert o1.param_groups[1]["weight_decay"] == 0.0 and len(o1.param_groups[1]["params"]) == 2


def test_group_errors_are_clear():
    m = sg.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown keys \\['momentum'\\]"):
        sg.optim.Adam([{"params": [m.weight], "momentum": 0.9}])
    with pytest.raises(ValueError, match="momentum buffers exist for all parameters or none"):
        sg.optim.SGD([{"params": [m.weight]}, {"params": [m.bias], "momentum": 0.9}], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        sg.optim.SGD([{"params": [m.weight]}, {"params": [m.weight]}], lr=0.1)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_amsgrad_matches_torch_eager_and_compiled(name):
    tm, (m1, m2) = models()
    kw = dict(lr=0.05, amsgrad=True, weight_decay=0.01)
    topt = getattr(torch.optim, name)(tm.parameters(), **kw)
    o1, o2 = (getattr(sg.optim, name)(m.parameters(), **kw) for m in (m1, m2))
    step = sg.compile_step(m1, sg.nn.functional.cross_entropy, o1)
    for i in range(6):
        x = X * (1.0 if i % 2 else 3.0)           # gradients that shrink: the max matters
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(Y)).backward()
        topt.step()
        step(x, Y)
        o2.zero_grad()
        sg.nn.functional.cross_entropy(m2(sg.tensor(x)), sg.tensor(Y)).backward()
        o2.step()
    for m in (m1, m2):
        for p, q in zip(tm.parameters(), m.parameters(), strict=True):
            np.testing.assert_allclose(q.numpy(), p.detach().numpy(), rtol=1e-10, atol=1e-13)
    assert "0.max_exp_avg_sq" in o2.state_dict()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_default_hyperparameters_are_torch_s(name):
    # SGD's lr defaulted to 0.01 where torch's is 1e-3: SGD(model.parameters()) trained 10x
    # faster than the same line in torch
    ours = getattr(sg.optim, name)([sg.nn.Linear(2, 2).weight])
    theirs = getattr(torch.optim, name)([torch.nn.Linear(2, 2).weight])
    for k, v in ours.param_groups[0].items():
        if k != "params" and k in theirs.defaults:
            assert v == pytest.approx(theirs.defaults[k]), k
