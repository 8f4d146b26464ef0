"""sg.optim.lr_scheduler against torch.optim.lr_scheduler (CPU): the lr sequences over many
steps, state_dict / load_state_dict (through sg.save), and a scheduled training run, eager
and compiled (one trace), against torch's."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shardgrad as sg
from shardgrad.optim.lr_scheduler import StepLR

sys.path.insert(0, str(Path(__file__).parent))
from seeded import mlp, torch_twin  # noqa: E402

F = sg.nn.functional
L, TL = sg.optim.lr_scheduler, torch.optim.lr_scheduler
# the sequences step torch's schedulers without an optimizer step, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


class Warmup:
    """A callable object: LambdaLR saves its attributes, not a lambda's."""

    def __init__(self, n):
        self.n = n

    def __call__(self, epoch):
        return min(1.0, (epoch + 1) / self.n)


SCHEDULES = {
    "step": lambda m, o: m.StepLR(o, step_size=5, gamma=0.5),
    "multistep": lambda m, o: m.MultiStepLR(o, milestones=[3, 7, 7, 20], gamma=0.3),
    "exponential": lambda m, o: m.ExponentialLR(o, gamma=0.93),
    "cosine": lambda m, o: m.CosineAnnealingLR(o, T_max=10, eta_min=0.001),
    "cosine-no-min": lambda m, o: m.CosineAnnealingLR(o, T_max=7),
    "lambda": lambda m, o: m.LambdaLR(o, lambda e: 0.95 ** e),
    "lambda-object": lambda m, o: m.LambdaLR(o, Warmup(6)),
    "linear": lambda m, o: m.LinearLR(o, start_factor=0.25, total_iters=8),
    "linear-down": lambda m, o: m.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=5),
}


def _sg_opt(lr=0.1, kind="sgd"):
    w = sg.tensor(np.ones(2, np.float32), requires_grad=True)
    return sg.optim.SGD([w], lr=lr, momentum=0.9) if kind == "sgd" else sg.optim.Adam([w], lr)


def _torch_opt(lr=0.1, kind="sgd"):
    w = torch.ones(2, requires_grad=True)
    return torch.optim.SGD([w], lr=lr, momentum=0.9) if kind == "sgd" else \
        torch.optim.Adam([w], lr)


def _sequence(sched, opt, steps):
    out = [sched.get_last_lr()[0]]
    for _ in range(steps):
        sched.step()
        out.append(sched.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == out[-1]
    return out


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lr_sequence_equals_torch(name, kind):
    opt, topt = _sg_opt(0.1, kind), _torch_opt(0.1, kind)
    ours = _sequence(SCHEDULES[name](L, opt), opt, 60)
    theirs = _sequence(SCHEDULES[name](TL, topt), topt, 60)
    assert ours == theirs                                 # same recurrences, same floats
    assert opt.param_groups[0]["initial_lr"] == 0.1 and opt.lr == theirs[-1]


@pytest.mark.parametrize("name", SCHEDULES)
def test_state_dict_resumes_the_sequence(name, tmp_path):
    opt = _sg_opt()
    whole = _sequence(SCHEDULES[name](L, opt), opt, 25)
    opt = _sg_opt()
    sched = SCHEDULES[name](L, opt)
    first = _sequence(sched, opt, 10)
    state = sched.state_dict()
    if name != "lambda-object":     # its saved attributes are a list of dicts: not sg.save's
        sg.save({"scheduler": state}, tmp_path / "ckpt.safetensors")
        state = sg.load(tmp_path / "ckpt.safetensors")["scheduler"]
    opt = _sg_opt()                                      # a fresh run, as after a restart
    sched = SCHEDULES[name](L, opt)
    sched.load_state_dict(state)
    assert sched.last_epoch == 10 and opt.lr == first[-1]   # the optimizer's lr restored
    np.testing.assert_allclose(first + _sequence(sched, opt, 15)[1:], whole, rtol=1e-15)


def test_state_dict_keeps_a_callable_objects_attributes_not_a_lambda():
    opt = _sg_opt()
    assert L.LambdaLR(opt, lambda e: 1.0).state_dict()["lr_lambdas"] == [None]
    warm = Warmup(4)
    sched = L.LambdaLR(opt, warm)
    assert sched.state_dict()["lr_lambdas"] == [{"n": 4}]
    state = sched.state_dict()
    state["lr_lambdas"] = [{"n": 9}]
    sched.load_state_dict(state)
    assert warm.n == 9


def _pair(seed=0):
    model = mlp(4, 8, 3, sg.nn.Tanh, seed)
    return model, torch_twin(model, torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                                        torch.nn.Linear(8, 3)))


@pytest.mark.parametrize("name", ["step", "cosine", "linear"])
def test_scheduled_training_compiled_equals_eager_and_torch(name):
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 4)), rng.integers(0, 3, 8)) for _ in range(24)]
    results = {}
    for mode in ("eager", "compiled", "torch"):
        model, ref = _pair()
        if mode == "torch":
            opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
            sched = SCHEDULES[name](TL, opt)
        else:
            opt = sg.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
            sched = SCHEDULES[name](L, opt)
            step = sg.compile_step(model, F.cross_entropy, opt)
        for x, y in batches:
            if mode == "compiled":
                step(x, y)
            elif mode == "eager":
                opt.zero_grad()
                F.cross_entropy(model(sg.tensor(x)), sg.tensor(y)).backward()
                opt.step()
            else:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y)).backward()
                opt.step()
            sched.step()
        results[mode] = (ref.state_dict() if mode == "torch" else model.state_dict())
        if mode == "compiled":
            assert len(step._compiled) == 1, "a new lr must not retrace the step"
    for k, v in results["torch"].items():
        np.testing.assert_allclose(results["eager"][k], v.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(results["compiled"][k], v.numpy(), rtol=1e-10, atol=1e-12)


def test_imports_and_errors_as_torch():
    import shardgrad.optim.lr_scheduler as mod

    assert mod is sg.optim.lr_scheduler and StepLR is mod.StepLR
    with pytest.raises(TypeError, match="is not an Optimizer"):
        StepLR(object(), step_size=2)
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(_sg_opt(), step_size=2, last_epoch=3)
    with pytest.raises(ValueError, match="Starting multiplicative factor"):
        L.LinearLR(_sg_opt(), start_factor=0.0)
    with pytest.raises(ValueError, match="Expected 1 lr_lambdas"):
        L.LambdaLR(_sg_opt(), [lambda e: 1.0, lambda e: 1.0])
    opt = _sg_opt(0.5)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    assert sched.get_last_lr() == [0.25] and sched.last_epoch == 1
    assert StepLR(opt, step_size=1).base_lrs == [0.5]     # initial_lr kept from the first
