"""RMSprop, Adagrad and add_param_group against torch in float64: eager and compiled, with
param groups and an LR schedule, and a state_dict round trip mid-run equal to the
uninterrupted run."""

import numpy as np
import pytest
import torch

import shardgrad as sg

RNG = np.random.default_rng(7)
X, Y = RNG.standard_normal((8, 4)), RNG.integers(0, 3, 8)
F = sg.nn.functional

CASES = [("RMSprop", {}),
         ("RMSprop", dict(lr=0.02, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.9,
                          centered=True)),
         ("RMSprop", dict(lr=0.01, momentum=0.5)),
         ("Adagrad", {}),
         ("Adagrad", dict(lr=0.05, lr_decay=0.1, weight_decay=0.05,
                          initial_accumulator_value=0.1, eps=1e-8))]


def models(n=2):
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                             torch.nn.Linear(5, 3)).double()
    state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    out = []
    for _ in range(n):
        m = sg.nn.Sequential(sg.nn.Linear(4, 5), sg.nn.Tanh(), sg.nn.Linear(5, 3)).double()
        m.load_state_dict(state)
        out.append(m)
    return tm, out


def groups(m):
    return [{"params": [m[0].weight, m[2].weight]},
            {"params": [m[0].bias, m[2].bias], "lr": 0.03, "weight_decay": 0.0}]


def batch(i):
    return X * (1.0 + 0.5 * (i % 3)), Y


def torch_step(tm, topt, i):
    x, y = batch(i)
    topt.zero_grad()
    torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y)).backward()
    topt.step()


def eager_step(m, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    F.cross_entropy(m(sg.tensor(x)), sg.tensor(y)).backward()
    opt.step()


def assert_same(tm, m, rtol=1e-10):
    for (n, p), q in zip(tm.named_parameters(), m.parameters(), strict=True):
        np.testing.assert_allclose(q.numpy(), p.detach().numpy(), rtol=rtol, atol=1e-13,
                                   err_msg=n)


@pytest.mark.parametrize("name, kw", CASES)
def test_matches_torch_eager_and_compiled_with_groups_and_a_schedule(name, kw):
    tm, (m1, m2) = models()
    topt = getattr(torch.optim, name)(groups(tm), **kw)
    o1 = getattr(sg.optim, name)(groups(m1), **kw)
    o2 = getattr(sg.optim, name)(groups(m2), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(topt, 2, 0.5)] + [
        sg.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (o1, o2)]
    step = sg.compile_step(m1, F.cross_entropy, o1)
    for i in range(5):
        torch_step(tm, topt, i)
        step(*batch(i))
        eager_step(m2, o2, i)
        for s in scheds:
            s.step()
    assert_same(tm, m1)
    assert_same(tm, m2)
    assert len(step._compiled) == 1          # the schedule scales every group: no retrace
    assert [g["lr"] for g in o1.param_groups] == pytest.approx(
        [g["lr"] for g in topt.param_groups])
    for k in torch.optim.Optimizer.state_dict(topt)["state"][0]:
        if k != "step":
            np.testing.assert_allclose(o2.state[0][k].numpy(),
                                       topt.state[tm[0].weight][k].numpy(), rtol=1e-10)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name, kw", [CASES[1], CASES[4]])
def test_state_dict_round_trip_mid_run_equals_the_uninterrupted_run(name, kw, compiled):
    _, (whole, first, second) = models(3)

    def run(m, opt, steps):
        step = sg.compile_step(m, F.cross_entropy, opt) if compiled else None
        for i in steps:
            step(*batch(i)) if step else eager_step(m, opt, i)

    o_whole = getattr(sg.optim, name)(groups(whole), **kw)
    run(whole, o_whole, range(5))
    o_first = getattr(sg.optim, name)(groups(first), **kw)
    run(first, o_first, range(2))
    saved = {k: v.copy() for k, v in o_first.state_dict().items()}
    second.load_state_dict(first.state_dict())
    o_second = getattr(sg.optim, name)(groups(second), **kw)
    o_second.load_state_dict(saved)
    assert int(o_second.state_dict()["step"]) == 2
    run(second, o_second, range(2, 5))
    for p, q in zip(whole.parameters(), second.parameters(), strict=True):
        np.testing.assert_array_equal(q.numpy(), p.numpy())
    for k, v in o_whole.state_dict().items():
        np.testing.assert_array_equal(o_second.state_dict()[k], v, err_msg=k)


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.1, momentum=0.9)),
                                      ("Adam", dict(lr=0.01, weight_decay=0.01)),
                                      CASES[1], CASES[4]])
def test_add_param_group_matches_torch(name, kw):
    tm, (m1, m2) = models()
    topt = getattr(torch.optim, name)([tm[0].weight, tm[2].weight], **kw)
    o1 = getattr(sg.optim, name)([m1[0].weight, m1[2].weight], **kw)
    o2 = getattr(sg.optim, name)([m2[0].weight, m2[2].weight], **kw)
    step = None
    for i in range(5):
        if i == 2:                          # the biases join, with their own lr
            topt.add_param_group({"params": [tm[0].bias, tm[2].bias], "lr": 0.03})
            for o, m in ((o1, m1), (o2, m2)):
                o.add_param_group({"params": [m[0].bias, m[2].bias], "lr": 0.03})
            step = sg.compile_step(m1, F.cross_entropy, o1)
        torch_step(tm, topt, i)
        step(*batch(i)) if step else eager_step(m1, o1, i)
        eager_step(m2, o2, i)
    assert_same(tm, m1)
    assert_same(tm, m2)
    ours, theirs = o2.param_groups[1], topt.param_groups[1]
    for k, v in ours.items():                # the rest filled from the constructor's values
        if k != "params":
            assert v == pytest.approx(theirs[k]), k
    assert len(ours["params"]) == 2
    # the biases' step count starts at their group (torch's per-parameter "step"), saved too
    assert len(o2.state_dict()) == 2 + 4 * len(o2.state[0])
    assert int(o2.state_dict()["group1.first_step"]) == 2


def test_add_param_group_errors_are_clear():
    m = sg.nn.Linear(2, 2)
    opt = sg.optim.RMSprop([m.weight], momentum=0.9)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [m.bias, m.weight]})
    with pytest.raises(ValueError, match="unknown keys \\['betas'\\]"):
        opt.add_param_group({"params": [m.bias], "betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="momentum_buffer state exists for all"):
        opt.add_param_group({"params": [m.bias], "momentum": 0.0})
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {m.bias}})
    with pytest.raises(TypeError, match="a dict with 'params'"):
        opt.add_param_group([m.bias])
    assert len(opt.params) == 1 and len(opt.param_groups) == 1    # nothing added
    # a step made before add_param_group feeds the state it had then: refused, not wrong
    step = sg.compile_step(m, F.mse_loss, opt)
    x, y = np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)
    step(x, y)
    opt.add_param_group({"params": m.bias, "lr": 0.1})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["alpha"] == 0.99
    with pytest.raises(ValueError, match="make the step again"):
        step(x, y)
    sg.compile_step(m, F.mse_loss, opt)(x, y)


@pytest.mark.parametrize("make, match", [
    (lambda w: sg.optim.RMSprop([w], lr=-1), "learning rate"),
    (lambda w: sg.optim.RMSprop([w], alpha=-0.1), "alpha"),
    (lambda w: sg.optim.RMSprop([w], eps=-1), "epsilon"),
    (lambda w: sg.optim.RMSprop([w], momentum=-1), "momentum"),
    (lambda w: sg.optim.RMSprop([w], weight_decay=-1), "weight_decay"),
    (lambda w: sg.optim.Adagrad([w], lr_decay=-1), "lr_decay"),
    (lambda w: sg.optim.Adagrad([w], initial_accumulator_value=-1), "initial_accumulator"),
    (lambda w: sg.optim.Adagrad([w], eps=-1), "epsilon"),
])
def test_bad_hyper_parameters_are_value_errors_as_torch(make, match):
    with pytest.raises(ValueError, match=match):
        make(sg.tensor(np.ones(2), requires_grad=True))


def test_rmsprop_momentum_and_centered_cannot_change_kind():
    w = sg.tensor(np.ones(2), requires_grad=True)
    opt = sg.optim.RMSprop([w])
    with pytest.raises(ValueError, match="momentum_buffer state"):
        opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="grad_avg state"):
        opt.param_groups[0]["centered"] = True
    opt.param_groups[0]["alpha"] = 0.5
    assert opt.alpha == 0.5


def test_state_dict_round_trip_keeps_an_added_group_s_step_count():
    _, (whole, first, second) = models(3)

    def make(m, added):
        opt = sg.optim.Adam([m[0].weight, m[2].weight], lr=0.01)
        if added:
            opt.add_param_group({"params": [m[0].bias, m[2].bias], "lr": 0.03})
        return opt

    o_whole, o_first = make(whole, False), make(first, False)
    for i in range(5):
        if i == 2:
            for o, m in ((o_whole, whole), (o_first, first)):
                o.add_param_group({"params": [m[0].bias, m[2].bias], "lr": 0.03})
        eager_step(whole, o_whole, i)
        if i < 3:
            eager_step(first, o_first, i)
    second.load_state_dict(first.state_dict())
    o_second = make(second, True)                 # the group re-added, then the state loaded
    o_second.load_state_dict(o_first.state_dict())
    step = sg.compile_step(second, F.cross_entropy, o_second)
    for i in range(3, 5):
        step(*batch(i))
    for p, q in zip(whole.parameters(), second.parameters(), strict=True):
        np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=1e-12, atol=1e-15)
    bad = o_first.state_dict() | {"group1.first_step": np.zeros(2, np.int64)}
    with pytest.raises(ValueError, match=r"group1\.first_step: expected \(\), got \(2,\)"):
        o_second.load_state_dict(bad)


@pytest.mark.parametrize("name, kw, other", [
    # a group's initial_accumulator_value is unread: torch starts every sum at the
    # constructor's value
    ("Adagrad", dict(initial_accumulator_value=0.2), dict(initial_accumulator_value=0.0,
                                                          lr_decay=0.5)),
    ("RMSprop", dict(momentum=0.9, centered=True), dict(alpha=0.5, momentum=0.2, eps=1e-3))])
def test_a_group_s_own_rule_constants_match_torch(name, kw, other):
    tm, (m1, m2) = models()

    def two(m):
        return [{"params": [m[0].weight, m[2].weight]},
                {"params": [m[0].bias, m[2].bias], **other}]

    topt = getattr(torch.optim, name)(two(tm), **kw)
    o1, o2 = (getattr(sg.optim, name)(two(m), **kw) for m in (m1, m2))
    step = sg.compile_step(m1, F.cross_entropy, o1)
    for i in range(5):
        torch_step(tm, topt, i)
        step(*batch(i))
        eager_step(m2, o2, i)
    assert_same(tm, m1)
    assert_same(tm, m2)
