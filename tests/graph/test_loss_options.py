"""Cross-entropy and NLL with torch's options (class weights, ignore_index, (N, C, d1, ...)
logits, probability targets, label smoothing), against torch in float64: values and the
logits' gradients, eager and in a compiled step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import shardgrad as sg
import shardgrad.nn.functional as F

RNG = np.random.default_rng(2)
W = np.array([1.0, 2.0, 0.5, 1.5])


def compare(ours, theirs, logits, target):
    s = sg.tensor(logits, requires_grad=True)
    t = torch.tensor(logits, requires_grad=True)
    got, want = ours(s, sg.tensor(target)), theirs(t, torch.tensor(target))
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-14)
    g = RNG.standard_normal(tuple(want.shape))
    (got * sg.tensor(g)).sum().backward()
    (want * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(s.grad.numpy(), t.grad.numpy(), rtol=1e-10, atol=1e-14)


LABELS = np.array([0, 3, -100, 2, -100, 1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [dict(weight=W), dict(ignore_index=-100), dict(), dict(
    weight=W, label_smoothing=0.2), dict(label_smoothing=0.1), dict(ignore_index=2, weight=W)])
def test_cross_entropy_options(kw, reduction):
    labels = LABELS if kw.get("ignore_index", -100) == -100 else np.abs(LABELS) % 4
    ours = dict(kw, weight=sg.tensor(W)) if "weight" in kw else kw
    theirs = dict(kw, weight=torch.tensor(W)) if "weight" in kw else kw
    compare(lambda a, b: F.cross_entropy(a, b, reduction=reduction, **ours),
            lambda a, b: TF.cross_entropy(a, b, reduction=reduction, **theirs),
            RNG.standard_normal((6, 4)), labels)
    compare(lambda a, b: sg.nn.CrossEntropyLoss(reduction=reduction, **ours)(a, b),
            lambda a, b: torch.nn.CrossEntropyLoss(reduction=reduction, **theirs)(a, b),
            RNG.standard_normal((6, 4)), labels)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_over_positions_and_probability_targets(reduction):
    logits, labels = RNG.standard_normal((2, 4, 3, 5)), RNG.integers(0, 4, (2, 3, 5))
    labels[0, 1, 2] = -100
    compare(lambda a, b: F.cross_entropy(a, b, reduction=reduction),
            lambda a, b: TF.cross_entropy(a, b, reduction=reduction), logits, labels)
    probs = RNG.dirichlet(np.ones(4), 6)
    for kw in [{}, dict(label_smoothing=0.1)]:
        compare(lambda a, b, kw=kw: F.cross_entropy(a, b, reduction=reduction,
                                                    weight=sg.tensor(W), **kw),
                lambda a, b, kw=kw: TF.cross_entropy(a, b, reduction=reduction,
                                                     weight=torch.tensor(W), **kw),
                RNG.standard_normal((6, 4)), probs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_weight_and_ignore_index(reduction):
    compare(lambda a, b: F.nll_loss(a.log_softmax(dim=1), b, weight=sg.tensor(W),
                                    reduction=reduction),
            lambda a, b: TF.nll_loss(a.log_softmax(dim=1), b, weight=torch.tensor(W),
                                     reduction=reduction), RNG.standard_normal((6, 4)), LABELS)


def test_ignored_labels_in_a_compiled_step():
    x, y = RNG.standard_normal((6, 3)), LABELS.copy()
    made = []
    for _ in range(2):
        sg.manual_seed(0)
        m = sg.nn.Linear(3, 4).double()
        made.append((m, sg.optim.SGD(m.parameters(), lr=0.5)))
    loss_fn = sg.nn.CrossEntropyLoss(weight=W, ignore_index=-100)
    step = sg.compile_step(made[0][0], loss_fn, made[0][1])
    m2, o2 = made[1]
    for _ in range(2):
        got = step(x, y)
        o2.zero_grad()
        want = loss_fn(m2(sg.tensor(x)), sg.tensor(y))
        want.backward()
        o2.step()
        assert got == pytest.approx(float(want), rel=1e-12)
    np.testing.assert_allclose(made[0][0].weight.numpy(), m2.weight.numpy(), rtol=1e-12)
