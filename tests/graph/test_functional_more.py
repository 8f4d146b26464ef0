"""torch's other common functions, modules and initialisers (F.pad, one_hot, normalize, the
L1 / smooth L1 / Huber / BCE losses, softplus, elu, relu6, hardtanh, logsigmoid, mish,
nn.init), against torch in float64: values and gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import shardgrad as sg
import shardgrad.nn.functional as F
import shardgrad.nn.init as init

RNG = np.random.default_rng(5)


def compare(ours, theirs, *arrays):
    s = [sg.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    t = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    got, want = ours(*s), theirs(*t)
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert got.dtype == str(want.dtype).removeprefix("torch.")
    if want.requires_grad:
        g = RNG.standard_normal(tuple(want.shape))
        (got * sg.tensor(g)).sum().backward()
        (want * torch.tensor(g)).sum().backward()
        for a, b in zip(s, t, strict=True):
            if b.grad is not None:
                np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10,
                                           atol=1e-14)


X = RNG.standard_normal((3, 4)) * 3
X[0, 0], X[0, 1] = 0.0, 30.0


@pytest.mark.parametrize("name, kw", [("softplus", {}), ("softplus", dict(beta=2.0,
                                      threshold=5.0)), ("elu", dict(alpha=0.5)),
                                      ("relu6", {}), ("hardtanh", dict(min_val=-2.0)),
                                      ("logsigmoid", {}), ("mish", {})])
def test_activations(name, kw):
    compare(lambda x: getattr(F, name)(x, **kw), lambda x: getattr(TF, name)(x, **kw), X)


@pytest.mark.parametrize("module, kw", [("ELU", {}), ("Softplus", dict(beta=0.5)),
                                        ("ReLU6", {}), ("Hardtanh", {}), ("Mish", {}),
                                        ("LogSigmoid", {}), ("LogSoftmax", dict(dim=0))])
def test_activation_modules(module, kw):
    compare(getattr(sg.nn, module)(**kw), getattr(torch.nn, module)(**kw), X)


@pytest.mark.parametrize("pad", [(1, 2), (0, 1, 2, 0), (-1, 2), (1, 1, -1, 0, 2, 0)])
def test_pad(pad):
    compare(lambda x: F.pad(x, pad, value=0.5), lambda x: TF.pad(x, pad, value=0.5),
            RNG.standard_normal((2, 3, 4)))


def test_one_hot_and_normalize():
    y = np.array([[0, 2], [1, 3]])
    compare(lambda a: F.one_hot(a), lambda a: TF.one_hot(a), y)
    compare(lambda a: F.one_hot(a, 6), lambda a: TF.one_hot(a, 6), y)
    a = RNG.standard_normal((3, 4))
    a[1] = 0.0
    compare(lambda x: F.normalize(x), lambda x: TF.normalize(x), a)
    compare(lambda x: F.normalize(x, p=1.0, dim=0), lambda x: TF.normalize(x, p=1.0, dim=0), a)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_and_binary_losses(reduction):
    x, y = RNG.standard_normal((4, 3)) * 2, RNG.standard_normal((4, 3))
    for ours, theirs in [(F.l1_loss, TF.l1_loss),
                         (lambda a, b, **k: F.smooth_l1_loss(a, b, beta=0.5, **k),
                          lambda a, b, **k: TF.smooth_l1_loss(a, b, beta=0.5, **k)),
                         (lambda a, b, **k: F.huber_loss(a, b, delta=0.7, **k),
                          lambda a, b, **k: TF.huber_loss(a, b, delta=0.7, **k))]:
        compare(lambda a, b, f=ours: f(a, b, reduction=reduction),
                lambda a, b, f=theirs: f(a, b, reduction=reduction), x, y)
    p, t = RNG.uniform(0.01, 0.99, (4, 3)), RNG.uniform(0, 1, (4, 3))
    edge = p.copy()
    edge[0, 0], edge[0, 1] = 0.0, 1.0      # each log clamped at -100, as torch: finite
    np.testing.assert_allclose(F.binary_cross_entropy(sg.tensor(edge), t, reduction=reduction)
                               .numpy(), TF.binary_cross_entropy(torch.tensor(edge),
                               torch.tensor(t), reduction=reduction).numpy(), rtol=1e-12)
    compare(lambda a, b: F.binary_cross_entropy(a, b, reduction=reduction),
            lambda a, b: TF.binary_cross_entropy(a, b, reduction=reduction), p, t)
    w = RNG.uniform(0.5, 2, (3,))
    compare(lambda a, b: sg.nn.BCELoss(weight=w, reduction=reduction)(a, b),
            lambda a, b: torch.nn.BCELoss(weight=torch.tensor(w), reduction=reduction)(a, b),
            p, t)
    for ours, theirs in [(sg.nn.L1Loss, torch.nn.L1Loss), (sg.nn.SmoothL1Loss,
                         torch.nn.SmoothL1Loss), (sg.nn.HuberLoss, torch.nn.HuberLoss)]:
        compare(ours(reduction=reduction), theirs(reduction=reduction), x, y)


def test_unflatten():
    compare(sg.nn.Unflatten(1, (2, 3)), torch.nn.Unflatten(1, (2, 3)),
            RNG.standard_normal((4, 6, 2)))


def test_init_functions_keep_the_parameter_and_draw_torch_s_ranges():
    sg.manual_seed(0)
    conv = sg.nn.Conv2d(16, 32, 3)
    w = conv.weight
    fan_in, fan_out = 16 * 9, 32 * 9
    for fn, bound in [(init.kaiming_uniform_, math.sqrt(6 / fan_in)),
                      (lambda t: init.xavier_uniform_(t, gain=init.calculate_gain("relu")),
                       math.sqrt(2) * math.sqrt(6 / (fan_in + fan_out))),
                      (lambda t: init.uniform_(t, -0.3, 0.3), 0.3)]:
        assert fn(w) is w and w.requires_grad and w.is_leaf
        assert np.abs(w.numpy()).max() <= bound and np.abs(w.numpy()).max() > 0.95 * bound
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    assert w.numpy().std() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    init.trunc_normal_(w, std=0.02)
    assert np.abs(w.numpy()).max() <= 2.0 and w.numpy().std() == pytest.approx(0.02, rel=0.1)
    init.zeros_(conv.bias)
    assert not conv.bias.numpy().any() and conv.bias.dtype == "float32"
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu", 0.2))
    with pytest.raises(ValueError, match="fewer than 2"):
        init.xavier_uniform_(conv.bias)


def test_functional_dropout_draws_a_new_mask_each_call_and_each_compiled_step():
    # its seed defaulted to 0: every eager call, and every step of a compiled step, dropped
    # the same elements
    x = sg.ones(2000)
    a, b = (F.dropout(x, 0.5).numpy() for _ in range(2))
    assert not np.array_equal(a, b) and abs(a.mean() - 1.0) < 0.1
    assert np.array_equal(F.dropout(x, 0.5, training=False).numpy(), x.numpy())

    class Net(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = sg.nn.Linear(50, 50)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, self.training)

    sg.manual_seed(0)
    m = Net()
    step = sg.compile_step(m, lambda out, y: (out * out).mean(), sg.optim.SGD(m.parameters(), 0.0))
    losses = {step(np.ones((4, 50), np.float32), np.zeros(4)) for _ in range(3)}
    assert len(losses) == 3
