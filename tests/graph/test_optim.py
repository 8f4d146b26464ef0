"""sg.optim against torch.optim (CPU): argument checks, param_groups (an LR schedule changes
eager and compiled steps alike), zero_grad(set_to_none) and load_state_dict's errors."""

import numpy as np
import pytest
import torch

import shardgrad as sg

F = sg.nn.functional


def _pair(seed=0):
    """An sg MLP and a torch copy of it."""
    sg.manual_seed(seed)
    model = sg.nn.Sequential(sg.nn.Linear(4, 6), sg.nn.Tanh(), sg.nn.Linear(6, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            v.copy_(torch.tensor(model.state_dict()[k]))
    return model, ref


def _batch(i):
    rng = np.random.default_rng(i)
    return rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8)


def _step_both(model, opt, ref, topt, x, y, step=None):
    """One cross-entropy step of ``model`` (eagerly, or by the compiled ``step``) and of its
    torch copy ``ref`` on the batch ``x``, ``y``."""
    if step is not None:
        step(x, y)
    else:
        opt.zero_grad()
        F.cross_entropy(model(sg.tensor(x)), sg.tensor(y)).backward()
        opt.step()
    topt.zero_grad()
    torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y)).backward()
    topt.step()


def _w():
    return sg.tensor(np.ones(2, np.float32), requires_grad=True)


@pytest.mark.parametrize("make, match", [
    (lambda: sg.optim.SGD([_w()], lr=-0.1), "learning rate"),
    (lambda: sg.optim.SGD([_w()], lr=0.1, momentum=-0.5), "momentum"),
    (lambda: sg.optim.SGD([_w()], lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda: sg.optim.Adam([_w()], betas=(1.0, 0.999)), "beta parameter at index 0"),
    (lambda: sg.optim.Adam([_w()], betas=(0.9, -0.1)), "beta parameter at index 1"),
    (lambda: sg.optim.Adam([_w()], eps=-1e-8), "epsilon"),
    (lambda: sg.optim.AdamW([_w()], weight_decay=-0.01), "weight_decay"),
    (lambda: sg.optim.SGD([_w() * 2], lr=0.1), "non-leaf"),
])
def test_bad_hyper_parameters_are_value_errors_as_torch(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_params_must_be_an_iterable_of_tensors_and_may_be_a_generator():
    with pytest.raises(TypeError, match=r"params\[0\] is numpy.ndarray"):
        sg.optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        sg.optim.SGD(_w(), lr=0.1)
    model, ref = _pair()
    opt = sg.optim.Adam(p for p in model.parameters())
    topt = torch.optim.Adam(p for p in ref.parameters())
    assert len(opt.params) == 4
    for i in range(2):
        _step_both(model, opt, ref, topt, *_batch(i))
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[k], v.numpy(), rtol=1e-5, atol=1e-6)


def test_a_parameter_listed_twice_is_updated_once():
    w = _w()
    opt = sg.optim.SGD([w, w], lr=0.5)
    (w * w).sum().backward()
    opt.step()
    np.testing.assert_allclose(w.numpy(), [0.0, 0.0])


@pytest.mark.parametrize("compiled", [False, True])
def test_param_groups_lr_schedule_matches_torch(compiled):
    model, ref = _pair()
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    step = sg.compile_step(model, F.cross_entropy, opt) if compiled else None
    for i in range(4):
        for g, tg in zip(opt.param_groups, topt.param_groups, strict=True):
            g["lr"], tg["lr"] = 0.1 * 0.5 ** i, 0.1 * 0.5 ** i
            if i == 2:                                  # a rule constant: the step retraces
                g["weight_decay"] = tg["weight_decay"] = 0.5
        _step_both(model, opt, ref, topt, *_batch(i), step)
    assert opt.lr == 0.1 * 0.5 ** 3 and opt.weight_decay == 0.5
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[k], v.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)


def test_param_group_reads_the_optimizers_hyper_parameters():
    opt = sg.optim.Adam([_w()], lr=0.01, betas=(0.8, 0.9))
    group = opt.param_groups[0]
    assert group["params"] == opt.params and group["lr"] == 0.01
    assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-8
    group["betas"] = (0.5, 0.6)
    assert (opt.b1, opt.b2) == (0.5, 0.6)
    group.setdefault("initial_lr", group["lr"])         # as torch's LR schedulers do
    assert opt.param_groups[0]["initial_lr"] == 0.01 and "initial_lr" in group
    with pytest.raises(KeyError, match="'params' are fixed"):
        group["params"] = []
    with pytest.raises(ValueError, match="momentum"):
        sg.optim.SGD([_w()], lr=0.1).param_groups[0]["momentum"] = 0.9


def test_zero_grad_set_to_none_false_zeroes_the_gradients():
    w, v = _w(), _w()
    opt = sg.optim.SGD([w, v], lr=0.1)
    (w * 3).sum().backward()
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(w.grad.numpy(), [0.0, 0.0])
    assert v.grad is None                              # as torch: no gradient stays None
    opt.zero_grad()
    assert w.grad is None


def test_load_state_dict_names_a_mis_shaped_entry():
    opt = sg.optim.Adam([_w()])
    state = opt.state_dict()
    state["0.exp_avg"] = np.zeros((3, 1), np.float32)
    with pytest.raises(ValueError, match=r"0\.exp_avg: expected \(2,\), got \(3, 1\)"):
        opt.load_state_dict(state)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"].numpy(), [0.0, 0.0])


class _RuleByOps(sg.optim.SGD):
    """SGD with the rule run op by op (its own class: the in-place step is SGD's alone)."""

    def rule(self, p, g, state, lr, t):
        return super().rule(p, g, state, lr, t)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True,
                                                          "weight_decay": 0.01}])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_updates_numpy_parameters_in_place_bitwise_as_the_rule(kw, dtype):
    """The eager CPU step writes into the parameter and momentum arrays (as torch's), with
    the rule's own float ops in its order: the same bits as the rule run op by op."""
    models = []
    sg.set_default_dtype(dtype)
    try:
        for _ in range(2):
            sg.manual_seed(3)
            models.append(sg.nn.Sequential(sg.nn.Linear(4, 6), sg.nn.Tanh(),
                                           sg.nn.Linear(6, 3)))
    finally:
        sg.set_default_dtype("float32")
    fast = sg.optim.SGD(models[0].parameters(), lr=0.1, **kw)
    slow = _RuleByOps(models[1].parameters(), lr=0.1, **kw)
    arrays = [p.data for p in models[0].parameters()]
    for i in range(3):
        x, y = _batch(i)
        for m, opt in zip(models, (fast, slow), strict=True):
            opt.zero_grad()
            F.cross_entropy(m(sg.tensor(x.astype(dtype))), sg.tensor(y)).backward()
            opt.step()
    for a, p, q in zip(arrays, models[0].parameters(), models[1].parameters(), strict=True):
        assert p.data is a                      # updated in place
        np.testing.assert_array_equal(p.numpy(), q.numpy())
        assert p.dtype == dtype
