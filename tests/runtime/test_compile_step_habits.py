"""sg.compile_step as a torch user drives it: the model's train/eval mode at each call, a
smaller last batch, int32 labels, a forward returning a tuple; each step equal to the eager
step (loss.backward(); optimizer.step()) in float64."""

import numpy as np
import pytest

import shardgrad as sg

RNG = np.random.default_rng(1)
X, Y = RNG.standard_normal((10, 4)), RNG.integers(0, 3, 10)


class Net(sg.nn.Module):
    def __init__(self, returns_tuple=False):
        super().__init__()
        self.l1, self.bn = sg.nn.Linear(4, 6), sg.nn.BatchNorm1d(6)
        self.drop, self.l2 = sg.nn.Dropout(0.0), sg.nn.Linear(6, 3)
        self.returns_tuple = returns_tuple

    def forward(self, x):
        h = self.bn(self.l1(x)).relu()
        out = self.l2(self.drop(h))
        return (out, h) if self.returns_tuple else out


def pair(**kw):
    made = []
    for _ in range(2):
        sg.manual_seed(0)
        m = Net(**kw).double()
        made.append((m, sg.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)))
    return made


def eager_step(model, opt, loss_fn, x, y):
    opt.zero_grad()
    loss = loss_fn(model(sg.tensor(x)), sg.tensor(y))
    loss.backward()
    opt.step()
    return float(loss)


def assert_same(m1, m2):
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=n)


def test_each_call_runs_in_the_model_s_current_mode():
    # the step was traced in train mode whatever the model's mode: an eval-mode step used the
    # batch statistics and updated the running ones, unlike the eager step
    (m1, o1), (m2, o2) = pair()
    loss_fn = sg.nn.functional.cross_entropy
    step = sg.compile_step(m1, loss_fn, o1)
    for mode, (a, b) in zip([True, False, True, False], [(0, 4), (4, 8), (0, 8), (8, 10)],
                            strict=True):
        m1.train(mode)
        m2.train(mode)
        assert step(X[a:b], Y[a:b]) == pytest.approx(eager_step(m2, o2, loss_fn, X[a:b], Y[a:b]),
                                                     rel=1e-12)
        assert_same(m1, m2)
    assert not m1.training and not m1.bn.training      # the step leaves the modes alone


def test_last_smaller_batch_int32_labels_and_a_tuple_output():
    (m1, o1), (m2, o2) = pair(returns_tuple=True)

    def loss_fn(out, y):
        logits, hidden = out
        return sg.nn.functional.cross_entropy(logits, y) + 0.01 * (hidden * hidden).mean()

    step = sg.compile_step(m1, loss_fn, o1)
    for a, b in [(0, 4), (4, 8), (8, 10)]:
        y = Y[a:b].astype(np.int32)
        assert step(X[a:b], y) == pytest.approx(eager_step(m2, o2, loss_fn, X[a:b], y),
                                                rel=1e-12)
    assert_same(m1, m2)


def test_python_control_flow_on_a_traced_value_is_one_clear_error():
    class Branchy(Net):
        def forward(self, x):
            h = self.l1(x)
            return self.l2(h * 2 if h.sum() > 0 else h)

    sg.manual_seed(0)
    m = Branchy()
    step = sg.compile_step(m, sg.nn.functional.cross_entropy, sg.optim.SGD(m.parameters(), 0.1))
    with pytest.raises(sg.ShapeError, match="Python control flow cannot depend on it"):
        step(X.astype(np.float32), Y)


def test_item_assignment_and_augmented_assignment_in_a_traced_forward():
    class Writes(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = sg.nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            h[:, 0] = 0.0
            h[..., 2] *= 3.0             # h[..., 2] read, scaled, written back
            h += 1.0
            return h

    results = []
    for compiled in (True, False):
        sg.manual_seed(0)
        m = Writes().double()
        opt = sg.optim.SGD(m.parameters(), lr=0.1)
        step = sg.compile_step(m, sg.nn.functional.cross_entropy, opt)
        for _ in range(2):
            loss = step(X, Y) if compiled else eager_step(m, opt, sg.nn.functional.cross_entropy,
                                                          X, Y)
        results.append((loss, m.lin.weight.numpy().copy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12)
