"""Eager backward plans (graph.tensor._gradients): from the second backward of a forward graph
of one structure, the gradient graph's kernels run from a kept plan instead of being built
anew. A replay must give the bits the built graph gives, step after step, on new data, and
must never carry values from one step into another."""

import sys
import threading

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph import tensor as tensor_module
from shardgrad.graph.ir import const
from shardgrad.ops import registry
from shardgrad.ops.shape import reshape

F = sg.nn.functional


def _mlp():
    return sg.nn.Sequential(sg.nn.Linear(6, 16), sg.nn.ReLU(), sg.nn.Linear(16, 16),
                            sg.nn.GELU(), sg.nn.Linear(16, 3))


def _cnn():
    return sg.nn.Sequential(sg.nn.Conv2d(1, 4, 3, padding=1), sg.nn.BatchNorm2d(4),
                            sg.nn.ReLU(), sg.nn.MaxPool2d(2), sg.nn.Dropout(0.25),
                            sg.nn.Flatten(), sg.nn.Linear(4 * 4 * 4, 3))


def _text():
    class Net(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = sg.nn.Embedding(20, 8)
            self.enc = sg.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1,
                                                     batch_first=True)
            self.head = sg.nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)).mean(dim=1))
    return Net()


def _data(kind, i, batch):
    rng = np.random.default_rng(100 + i)
    y = sg.tensor(rng.integers(0, 3, batch))
    if kind == "cnn":
        return sg.tensor(rng.normal(size=(batch, 1, 8, 8)).astype(np.float32)), y
    if kind == "text":
        return sg.tensor(rng.integers(0, 20, (batch, 5))), y
    return sg.tensor(rng.normal(size=(batch, 6)).astype(np.float32)), y


def _train(kind: str, opt_name: str, steps: int = 6) -> dict:
    """Parameters and losses after ``steps`` eager steps on new batches each step, the last
    batch smaller (another structure, planned apart)."""
    sg.manual_seed(3)
    sg.nn.Dropout._instances[0] = 0         # dropout's seeds count its instances
    model = {"mlp": _mlp, "cnn": _cnn, "text": _text}[kind]()
    opt = (sg.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam" else
           sg.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    losses = []
    for i in range(steps):
        x, y = _data(kind, i, 8 if i < steps - 2 else 5)
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) + 1e-3 * (out ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return {"losses": losses, **{k: np.array(v) for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("kind, opt_name", [("mlp", "sgd"), ("cnn", "adam"), ("text", "adam")])
def test_replayed_steps_equal_built_ones_bit_for_bit(kind, opt_name, monkeypatch):
    tensor_module._PLANS.clear()
    replayed = _train(kind, opt_name)
    assert any(p is not None for p in tensor_module._PLANS.values()), "no plan was made"
    monkeypatch.setattr(tensor_module, "_PLANS_MAX", 0)
    built = _train(kind, opt_name)
    assert replayed.keys() == built.keys()
    for k in built:
        np.testing.assert_array_equal(replayed[k], built[k], err_msg=k)


def test_a_folded_exponent_is_checked_before_a_replay():
    """pow's VJP folds a const exponent's value into the gradient (y x^(y-1), or the guarded
    form where y has zeros): a plan made with one exponent must not serve another."""
    x = sg.tensor(np.array([0.0, 1.5, 2.0, -3.0]), requires_grad=True)
    for c in ([2.0, 2.0, 3.0, 1.0], [2.0, 2.0, 3.0, 1.0], [2.0, 2.0, 3.0, 1.0],
              [0.5, 3.0, -1.0, 2.0], [0.0, 2.0, 0.0, 4.0], [0.0, 2.0, 0.0, 4.0]):
        c = np.array(c)
        x.grad = None
        (x ** sg.tensor(c)).sum().backward()
        xv = x.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            want = np.where(c == 0, 0.0, c * xv ** (c - 1))
        np.testing.assert_array_equal(x.grad.numpy(), want)


def test_a_gradient_changed_in_place_does_not_reach_the_next_step(monkeypatch):
    """A gradient that is (a view of) a constant the plan keeps is handed out as a copy:
    writing into one step's gradient leaves the next step's alone. The op here has a VJP
    that returns a reshaped constant (a writeable view of it)."""
    def vjp(g, x, out):
        return (reshape(const(np.full(x.size, 2.0, x.dtype)), shape=x.shape),)
    monkeypatch.setitem(registry.REGISTRY, "plan_test_double", registry.OpDef(
        "plan_test_double", infer=registry.same_infer, forward=lambda xp, x: 2 * x, vjp=vjp))
    x = sg.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    for _ in range(4):
        x.grad = None
        tensor_module.apply(lambda n: registry.apply("plan_test_double", n), x).backward(
            sg.tensor(np.ones((2, 3))))
        g = x.grad.numpy()
        np.testing.assert_array_equal(g, np.full((2, 3), 2.0))
        assert g.flags.writeable
        g[...] = -7.0


def test_gradients_accumulate_and_retained_grads_match(monkeypatch):
    """What backward hands out besides leaf gradients (retain_grad, accumulation over
    several backward calls) is the same with plans as without."""
    def run():
        sg.manual_seed(0)
        lin = sg.nn.Linear(4, 3)
        out = None
        for i in range(4):
            x = sg.tensor(np.random.default_rng(i).normal(size=(5, 4)).astype(np.float32))
            h = lin(x)
            h.retain_grad()
            (h.tanh() ** 2).sum().backward()
            out = h.grad.numpy()
        return lin.weight.grad.numpy(), lin.bias.grad.numpy(), out
    tensor_module._PLANS.clear()
    replayed = run()
    monkeypatch.setattr(tensor_module, "_PLANS_MAX", 0)
    built = run()
    for a, b in zip(built, replayed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_backward_with_their_own_folded_constants():
    """Two threads differentiate x ** c with their own changing exponents at once: the
    values a VJP rule folds in are recorded per thread, so neither replays the other's."""
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        x = sg.tensor(np.array([0.5, 1.5, 2.0]), requires_grad=True)
        for i in range(150):
            c = np.array([2.0, 3.0, 1.0]) if i % 3 else rng.uniform(0.5, 4.0, 3).round(1)
            x.grad = None
            (x ** sg.tensor(c)).sum().backward()
            want = c * x.numpy() ** (c - 1)
            if not np.array_equal(x.grad.numpy(), want):
                errors.append((seed, i, c))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # the threads interleave inside backward
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]


def test_the_plans_are_bounded():
    tensor_module._PLANS.clear()
    for n in range(1, tensor_module._PLANS_MAX + 20):
        x = sg.tensor(np.ones(n), requires_grad=True)
        (x * 3.0).sum().backward()
        (x * 3.0).sum().backward()
        assert len(tensor_module._PLANS) <= tensor_module._PLANS_MAX


def test_a_bad_gradient_is_refused_after_replays_too():
    x = sg.tensor(np.ones((2, 3)), requires_grad=True)
    for _ in range(3):
        (x * 2.0).backward(sg.tensor(np.ones((2, 3))))
    with pytest.raises(sg.ShapeError, match="must match the output's"):
        (x * 2.0).backward(sg.tensor(np.ones(3)))
    with pytest.raises(sg.ShapeError, match="must match the output's"):
        (x * 2.0).backward(sg.tensor(np.ones((2, 3), np.float32)))
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 6.0))
