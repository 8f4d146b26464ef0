"""The PyTorch-like front end: eager tensors, backward, modules, optimizers, compile_step."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.ir import ShapeError

sys.path.insert(0, str(Path(__file__).parent))
from seeded import float64_seeded  # noqa: E402


def _mse(out, y):
    return ((out - y) * (out - y)).mean()


def _data(n=16, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, k))


def test_colah_eager_backward():
    a, b = sg.tensor(2.0, requires_grad=True), sg.tensor(1.0, requires_grad=True)
    e = (a + b) * (b + 1)
    e.backward()
    assert e.item() == 6.0 and a.grad.item() == 2.0 and b.grad.item() == 5.0


def test_backward_accumulates_and_zero_grad():
    w = sg.tensor([1.0, -2.0], requires_grad=True)
    for _ in range(2):
        (w * w).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 2 * 2 * np.array([1.0, -2.0]))


def test_no_grad_records_nothing():
    w = sg.tensor([1.0], requires_grad=True)
    with sg.no_grad():
        y = w * 3
    assert not y.requires_grad
    with pytest.raises(ShapeError, match="does not require grad"):
        y.sum().backward()


def test_non_scalar_backward_needs_gradient():
    w = sg.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ShapeError, match="scalar"):
        (w * 2).backward()
    (w * 2).backward(np.ones(2, np.float32))
    np.testing.assert_allclose(w.grad.numpy(), [2.0, 2.0])


def test_int_tensor_cannot_require_grad():
    with pytest.raises(ShapeError, match="floating-point"):
        sg.tensor([1, 2], requires_grad=True)


def test_operator_shape_error_names_user_line():
    a, b = sg.tensor(np.ones((2, 3), np.float32)), sg.tensor(np.ones((4, 5), np.float32))
    with pytest.raises(ShapeError) as e:
        a @ b
    msg = str(e.value)
    assert "matmul" in msg and "f32[2,3]" in msg and "f32[4,5]" in msg
    assert "test_frontend.py" in msg


def test_methods_match_numpy():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    t = sg.tensor(x)
    np.testing.assert_allclose(t.sum(axis=1).numpy(), x.sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(t.mean(axis=0, keepdims=True).numpy(), x.mean(0, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_allclose(t.max().numpy(), x.max())
    np.testing.assert_allclose(t.T.numpy(), x.T)
    np.testing.assert_allclose(t.reshape(4, 3).numpy(), x.reshape(4, 3))
    np.testing.assert_allclose(t.exp().log().numpy(), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.tanh().numpy(), np.tanh(x), rtol=1e-6)
    np.testing.assert_allclose((2 - t).numpy(), 2 - x)
    np.testing.assert_allclose((t ** 2).numpy(), x ** 2, rtol=1e-6)


def _mlp(seed=0, dtype="float64"):
    sg.set_default_dtype(dtype)
    try:
        sg.manual_seed(seed)
        return sg.nn.Sequential(sg.nn.Linear(4, 8), sg.nn.Tanh(), sg.nn.Linear(8, 3))
    finally:
        sg.set_default_dtype("float32")


@pytest.mark.parametrize("make_opt", [
    lambda ps: sg.optim.SGD(ps, lr=0.1),
    lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: sg.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    lambda ps: sg.optim.AdamW(ps, lr=0.01),
])
def test_compiled_step_equals_eager_training(make_opt):
    x, y = _data()
    model = _mlp()
    start = model.state_dict()
    opt = make_opt(list(model.parameters()))
    eager_losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = _mse(model(sg.tensor(x)), sg.tensor(y))
        loss.backward()
        opt.step()
        eager_losses.append(loss.item())
    eager = model.state_dict()
    model.load_state_dict(start)
    step = sg.compile_step(model, _mse, make_opt(list(model.parameters())))
    losses = [step(x, y) for _ in range(4)]
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-12)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, eager[k], rtol=1e-12, atol=1e-15)
    assert eager_losses[-1] < eager_losses[0]


def test_sgd_matches_hand_written_update():
    model = _mlp()
    p0 = {k: v.copy() for k, v in model.state_dict().items()}
    x, y = _data()
    opt = sg.optim.SGD(model.parameters(), lr=0.5)
    loss = _mse(model(sg.tensor(x)), sg.tensor(y))
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    opt.step()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, p0[k] - 0.5 * grads[k], rtol=1e-12)


def test_adam_first_step_moves_each_weight_by_lr():
    model = _mlp()
    p0 = model.state_dict()
    x, y = _data()
    step = sg.compile_step(model, _mse, sg.optim.Adam(model.parameters(), lr=1e-3))
    step(x, y)
    for k, v in model.state_dict().items():   # |m_hat / sqrt(v_hat)| = 1 on step one
        np.testing.assert_allclose(np.abs(v - p0[k]), 1e-3, rtol=1e-4)


def test_state_dict_round_trip_and_errors():
    model = _mlp()
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    other = _mlp(seed=1)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    bad = dict(sd)
    bad.pop("0.bias")
    bad["extra"] = np.zeros(1)
    bad["2.weight"] = np.zeros((2, 2))
    with pytest.raises(KeyError) as e:
        other.load_state_dict(bad)
    msg = str(e.value)
    assert "0.bias" in msg and "extra" in msg and "2.weight" in msg and "(3, 8)" in msg
    partial = {"0.weight": sd["0.weight"]}
    other.load_state_dict(partial, strict=False)


def test_linear_rejects_wrong_width():
    model = _mlp()
    with pytest.raises(ShapeError, match="Linear\\(4, 8\\)"):
        model(sg.tensor(np.ones((2, 5))))


def test_step_graph_structure():
    model = _mlp()
    step = sg.compile_step(model, _mse, sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = _data()
    step(x, y)
    g = step.graph
    assert {n.name for n in g.params} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert {"loss", "grad/0.weight", "param/2.bias",
            "state/optim/0.bias/momentum_buffer"} <= set(g.outputs)
    text = str(g)
    assert "matmul(x, %" in text and "return (loss=" in text


def test_modules_api():
    model = sg.nn.Sequential(sg.nn.Linear(4, 8), sg.nn.ReLU(), sg.nn.Linear(8, 2))
    assert len(list(model.parameters())) == 4
    assert len(model) == 3 and isinstance(model[1], sg.nn.ReLU)
    assert "Linear(in_features=4, out_features=8)" in repr(model)
    model.eval()
    assert not model[0].training


def test_dropout_draws_a_new_mask_each_compiled_step():
    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(4, 64), sg.nn.Dropout(0.5), sg.nn.Linear(64, 3))
    step = sg.compile_step(model, _mse, sg.optim.SGD(model.parameters(), lr=0.0))
    x, y = _data()
    losses = [step(x.astype(np.float32), y.astype(np.float32)) for _ in range(3)]
    assert len(set(losses)) == 3                     # lr=0: only the mask changes
    assert "step" in {n.name for n in step.graph.inputs}
    model.eval()
    out = model(sg.tensor(x.astype(np.float32)))
    np.testing.assert_array_equal(out.numpy(), model(sg.tensor(x.astype(np.float32))).numpy())


def test_cnn_compiled_step_equals_eager():
    with float64_seeded():
        model = sg.nn.Sequential(
            sg.nn.Conv2d(1, 4, 3, padding=1), sg.nn.BatchNorm2d(4), sg.nn.ReLU(),
            sg.nn.MaxPool2d(2), sg.nn.Flatten(), sg.nn.Linear(4 * 4 * 4, 10))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 1, 8, 8)), rng.integers(0, 10, size=8)
    start = model.state_dict()
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loss = sg.nn.functional.cross_entropy(model(sg.tensor(x)), y)
        loss.backward()
        opt.step()
    eager = model.state_dict()
    model.load_state_dict(start)
    step = sg.compile_step(model, sg.nn.functional.cross_entropy,
                           sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for _ in range(2):
        step(x, y)
    for k, v in model.state_dict().items():     # includes BatchNorm's running statistics
        np.testing.assert_allclose(v, eager[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_public_functions_build_differentiable_ops():
    x = sg.tensor([[1.0, -2.0], [3.0, 0.5]], requires_grad=True)
    y = sg.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
    out = sg.cat([x, sg.maximum(x, y), sg.where(x > 0, x, y)], axis=1) @ sg.ones(6, 1)
    out.sum().backward()
    # maximum splits a tie (0.5 vs 0.5) evenly between its inputs
    np.testing.assert_allclose(x.grad.numpy(), [[3.0, 1.0], [3.0, 2.5]])
    np.testing.assert_allclose(y.grad.numpy(), [[0.0, 2.0], [0.0, 0.5]])
    assert sg.concat is sg.cat


def test_where_with_scalar_branches():
    x = sg.tensor([-1.0, 2.0])
    np.testing.assert_array_equal(sg.where(x > 0, 1.0, 0.0).numpy(), [0.0, 1.0])  # was an
    assert sg.where(x > 0, 1, 0).dtype == "int64"         # AttributeError: 'float' ... 'dtype'
    assert sg.where(x > 0, x, 0).dtype == sg.where(x > 0, 0.0, x).dtype == "float32"


def test_backward_gradient_must_match_the_output():
    w = sg.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ShapeError, match=r"gradient given for .* is float32\[2, 2\]: it must "
                                         r"match the output's float32\[2\]"):
        (w * 2).backward(np.ones((2, 2), np.float32))
    with pytest.raises(ShapeError, match=r"float64\[2\]: it must match the output's float32"):
        (w * 2).backward(np.ones(2))
    assert w.grad is None


def test_functional_layer_norm_takes_an_int_shape_as_torch():
    x = sg.tensor(np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(sg.nn.functional.layer_norm(x, 3).numpy(),
                               sg.nn.functional.layer_norm(x, (3,)).numpy())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_and_nll_losses_match_their_formulas(reduction):
    F = sg.nn.functional
    rng = np.random.default_rng(0)
    z, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    y = np.array([0, 3, 1, 1, 2], np.int32)
    reduce = {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction]
    np.testing.assert_allclose(F.mse_loss(sg.tensor(z), t, reduction).numpy(),
                               reduce((z - t) ** 2))
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    a = sg.tensor(z, requires_grad=True)
    nll = F.nll_loss(F.log_softmax(a), y, reduction=reduction)   # torch's order: weight third
    np.testing.assert_allclose(nll.numpy(), reduce(-logp[np.arange(5), y]))
    if reduction != "none":                 # nll_loss(log_softmax(z), y) == cross_entropy(z, y)
        np.testing.assert_allclose(nll.numpy(), F.cross_entropy(sg.tensor(z), y,
                                                                      reduction=reduction)
                                   .numpy())
        nll.backward()
        onehot = np.eye(4)[y]
        scale = 1 / 5 if reduction == "mean" else 1.0
        np.testing.assert_allclose(a.grad.numpy(), (np.exp(logp) - onehot) * scale, atol=1e-12)


def test_loss_functions_reject_bad_input():
    F = sg.nn.functional
    z = sg.tensor(np.zeros((5, 4)))
    with pytest.raises(ShapeError, match=r"nll_loss needs .* got \(5, 4\) and \(3,\)"):
        F.nll_loss(z, np.zeros(3, np.int64))
    with pytest.raises(ShapeError, match="indices must be integers"):
        F.nll_loss(z, np.zeros(5))
    with pytest.raises(ValueError, match="mse_loss: reduction must be one of"):
        F.mse_loss(z, np.zeros((5, 4)), reduction="avg")
