"""compile_step, Predictor and accuracy used as a PyTorch user would: frozen parameters, an
optimizer over part of the model, the model's train/eval mode, and inputs that do not fit."""

import numpy as np
import pytest

import shardgrad as sg

F = sg.nn.functional


def _model(seed=0):
    sg.manual_seed(seed)
    return sg.nn.Sequential(sg.nn.Linear(4, 8), sg.nn.Tanh(), sg.nn.Linear(8, 3))


def _batches(steps=3, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n))
            for _ in range(steps)]


def _eager_steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(sg.tensor(x)), sg.tensor(y)).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda m: sg.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.5),   # holds the frozen
    lambda m: sg.optim.SGD(m[2].parameters(), lr=0.1, momentum=0.9),       # only the head
])
def test_frozen_and_unoptimized_parameters_stay_put_as_in_eager(make_opt):
    compiled, eager = _model(), _model()
    for m in (compiled, eager):
        m[0].weight.requires_grad = False
    before = compiled.state_dict()
    step = sg.compile_step(compiled, F.cross_entropy, make_opt(compiled))
    for x, y in _batches():
        step(x, y)
    _eager_steps(eager, make_opt(eager), _batches())
    after, want = compiled.state_dict(), eager.state_dict()
    np.testing.assert_array_equal(after["0.weight"], before["0.weight"])
    assert "0.weight" not in step.graph.meta["params"]
    for k in want:
        np.testing.assert_allclose(after[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.array_equal(after["2.weight"], before["2.weight"])


def test_a_parameter_the_loss_does_not_use_is_not_updated_as_in_eager():
    class Net(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.aux = sg.nn.Linear(4, 3), sg.nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)                    # aux is unused: its grad stays None

    models = []
    for compiled in (True, False):
        sg.manual_seed(0)
        model = Net()
        opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        if compiled:
            step = sg.compile_step(model, F.cross_entropy, opt)
            for x, y in _batches():
                step(x, y)
        else:
            _eager_steps(model, opt, _batches())
        models.append(model.state_dict())
    sg.manual_seed(0)
    fresh = Net().state_dict()
    for k in ("aux.weight", "aux.bias"):       # weight decay moved them in compiled steps
        np.testing.assert_array_equal(models[0][k], fresh[k])
        np.testing.assert_array_equal(models[1][k], fresh[k])
    np.testing.assert_allclose(models[0]["body.weight"], models[1]["body.weight"], rtol=1e-5,
                               atol=1e-6)


def test_tied_weights_are_one_parameter_in_the_step():
    class Tied(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = sg.nn.Linear(4, 4)
            self.again = self.enc                      # the same module under two names
            self.dec = sg.nn.Linear(4, 3)

        def forward(self, x):
            return self.dec(self.again(self.enc(x).tanh()).tanh())

    sg.manual_seed(0)
    model = Tied()
    w0 = model.enc.weight.numpy().copy()
    x, y = _batches(1)[0]
    x = sg.tensor(x)
    F.cross_entropy(model(x), sg.tensor(y)).backward()   # eager: the full gradient of enc
    g = model.enc.weight.grad.numpy()
    # one SGD update of the shared weight by its whole gradient (as torch, whose
    # named_parameters() lists it once); was KeyError 'param/enc.weight'
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    step(x.numpy(), y)
    np.testing.assert_allclose(model.enc.weight.numpy(), w0 - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert model.again.weight is model.enc.weight
    assert [k for k in step.graph.meta["params"] if k.endswith("weight")] == ["enc.weight",
                                                                             "dec.weight"]


def test_unfreezing_retraces_the_step():
    model = _model()
    model[0].weight.requires_grad = False
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batches(1)[0]
    step(x, y)
    w = model[0].weight.numpy().copy()
    model[0].weight.requires_grad = True
    step(x, y)
    assert not np.array_equal(model[0].weight.numpy(), w)


def test_tracing_leaves_the_models_mode_alone():
    model = _model()
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    step(*_batches(1)[0])                   # the step graph is a training step ...
    assert not any(m.training for m in model.modules())     # ... but the model stays in eval
    model.train()
    model[1].eval()                         # a sub-module's own mode survives too
    sg.accuracy(model, *_batches(1)[0])
    assert model.training and not model[1].training


def test_optimizer_of_another_model_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match=r"optimizer's parameters \[0, 1\] .* not parameters "
                                         r"of the Linear"):
        sg.compile_step(sg.nn.Linear(4, 3), F.cross_entropy,
                        sg.optim.SGD(model[2].parameters(), lr=0.1))


def test_accuracy_needs_one_label_per_row():
    model = _model()
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"labels of shape \(6, 1\) for 6 rows"):
        sg.accuracy(model, x, y[:, None])    # (N, 1) labels broadcast to N x N: "accuracy" 2.0
    with pytest.raises(ValueError, match=r"labels of shape \(5,\) for 6 rows"):
        sg.accuracy(model, x, y[:5])
    model.eval()
    want = float(np.mean(np.argmax(np.asarray(model(x).numpy()), axis=1) == y))
    assert sg.accuracy(model, x, y.astype(np.int32), batch_size=4) == want


def test_empty_batch_gives_nan_loss_and_zero_gradients_as_torch():
    model = sg.nn.Linear(4, 3)
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    w = model.weight.numpy().copy()
    with np.errstate(invalid="ignore"):                  # was a ZeroDivisionError while tracing
        assert np.isnan(step(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    np.testing.assert_array_equal(model.weight.numpy(), w)


def test_predictor_needs_a_model_returning_one_tensor():
    class TwoHeads(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sg.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), self.fc(x) * 2.0

    with pytest.raises(sg.ShapeError, match="TwoHeads.x. must return one Tensor of logits "
                                            "for inference .Predictor, accuracy., got tuple"):
        sg.accuracy(TwoHeads(), *_batches(1)[0])      # was AttributeError: 'tuple' ... 'node'
