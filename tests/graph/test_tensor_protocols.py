"""A Tensor behaves as Python and NumPy code expects a torch.Tensor to: truth value, float/int/
index conversion, len and iteration, ``np.asarray``, elementwise ``==``, ``requires_grad_``,
``zero_``, frozen leaves left out of ``backward``, and no growth of the leaf table over steps.
"""

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph import tensor as T
from shardgrad.graph.ir import ShapeError


def test_scalar_conversions_and_truth_value():
    t = sg.tensor([1.0, 2.0, 3.0])
    s = t.sum()
    assert float(s) == 6.0 and int(sg.tensor(3)) == 3 and bool(s > 1) is True
    assert bool(sg.tensor([0.0])) is False
    assert [10, 11, 12][sg.tensor(2)] == 12
    with pytest.raises(ValueError, match=r"bool\(\) of a tensor with 3 elements .* ambiguous"):
        bool(t)
    with pytest.raises(ValueError, match="float"):
        float(t)
    with pytest.raises(TypeError, match="only integer tensors can be used as an index"):
        [1, 2][sg.tensor(1.0)]


def test_len_iteration_and_numpy_conversion():
    t = sg.tensor(np.arange(6.0).reshape(3, 2))
    assert len(t) == 3
    rows = list(t)
    assert len(rows) == 3 and all(isinstance(r, sg.Tensor) for r in rows)
    np.testing.assert_array_equal(rows[1].numpy(), [2.0, 3.0])
    np.testing.assert_array_equal(np.asarray(t), np.arange(6.0).reshape(3, 2))
    assert np.asarray(t, dtype=np.float32).dtype == np.float32
    with pytest.raises(TypeError, match="len"):
        len(sg.tensor(1.0))
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        iter(sg.tensor(1.0))
    r = np.ones(3) + sg.tensor(np.ones(3), requires_grad=True)   # the Tensor's op, not NumPy's
    assert isinstance(r, sg.Tensor) and r.requires_grad


def test_equality_is_elementwise_and_tensors_stay_hashable():
    pred, y = sg.tensor([0, 2, 1]), sg.tensor([0, 1, 1])
    assert int((pred == y).sum()) == 2
    np.testing.assert_array_equal((pred != y).numpy(), [False, True, False])
    assert len({pred, y}) == 2 and pred in {pred: 1}


def test_traced_tensors_refuse_python_control_flow():
    model = sg.nn.Linear(2, 2)

    def loss(out, y):
        if out.sum() > 0:      # depends on a value the trace does not have
            return sg.functional.cross_entropy(out, y)
        return sg.functional.cross_entropy(-out, y)

    step = sg.compile_step(model, loss, sg.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ShapeError, match=r"bool\(\) of a traced tensor .* sg.where"):
        step(np.ones((4, 2), np.float32), np.zeros(4, np.int64))


def test_non_numeric_data_is_refused():
    for bad in ("abc", [None, 1.0], {"a": 1}):
        with pytest.raises(TypeError, match=r"tensor\(\) takes numbers"):
            sg.tensor(bad)


def test_frozen_leaves_get_no_gradient():
    w = sg.tensor([1.0, 2.0], requires_grad=True)
    frozen = sg.tensor([3.0, 4.0], requires_grad=True)
    frozen.requires_grad = False
    (w * frozen).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [3.0, 4.0])
    assert frozen.grad is None


def test_requires_grad_of_a_result_made_without_grad_makes_it_a_leaf():
    # torch's nn tutorial: w = torch.randn(784, 10) / math.sqrt(784); w.requires_grad_()
    w = sg.tensor([1.0, 2.0]) * 2.0
    w.requires_grad_()
    (w * w).sum().backward()                              # its gradient was silently None
    np.testing.assert_array_equal(w.grad.numpy(), [4.0, 8.0])
    sg.optim.SGD([w], lr=0.5).step()                      # was: can't optimize a non-leaf
    np.testing.assert_array_equal(w.numpy(), [0.0, 0.0])


def test_requires_grad_and_zero_in_place():
    z = sg.tensor([1.0, 2.0])
    assert z.requires_grad_() is z and z.requires_grad
    (z * z).sum().backward()
    np.testing.assert_array_equal(z.grad.numpy(), [2.0, 4.0])
    z.grad.zero_()
    np.testing.assert_array_equal(z.grad.numpy(), [0.0, 0.0])
    with pytest.raises(ShapeError, match="only floating-point"):
        sg.tensor([1, 2]).requires_grad_()
    with pytest.raises(NotImplementedError, match="create_graph"):
        (z * z).sum().backward(create_graph=True)
    (z * z).sum().backward(retain_graph=True)          # accepted, as in torch


def test_the_leaf_table_does_not_grow_with_steps():
    model = sg.nn.Linear(3, 2)
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = sg.tensor(np.ones((4, 3), np.float32))

    def train(steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()

    train(2)
    before = len(T._LEAVES)
    train(30)
    assert len(T._LEAVES) == before


def test_factory_functions_as_torch():
    assert sg.zeros(2, 3).shape == (2, 3) and sg.ones((4,)).numpy().sum() == 4
    assert sg.zeros().shape == () and sg.full((2, 2), 7.0).numpy().tolist() == [[7, 7], [7, 7]]
    assert sg.full(3, 1.5).dtype == "float32"
    t = sg.randn(5, 4, dtype="float64")
    assert sg.zeros_like(t).dtype == "float64" and sg.ones_like(t).shape == (5, 4)
    assert sg.arange(4).numpy().tolist() == [0, 1, 2, 3] and sg.arange(4).dtype == "int64"
    assert sg.arange(0, 1, 0.25).dtype == "float32" and len(sg.arange(0, 1, 0.25)) == 4
    r = sg.randint(3, 7, size=(100,))
    assert r.dtype == "int64" and 3 <= int(r.numpy().min()) and int(r.numpy().max()) < 7
    below = sg.randint(10, (50,)).numpy()          # torch.randint(high, size): from 0
    assert below.shape == (50,) and 0 <= below.min() and below.max() < 10
    assert sg.randint(3, 7, (2, 2)).shape == (2, 2)
    u = sg.rand(1000).numpy()
    assert 0 <= u.min() and u.max() < 1
    w = sg.randn(3, requires_grad=True)
    assert w.requires_grad
    with pytest.raises(ShapeError, match="non-negative integers"):
        sg.zeros(2, -1)
    with pytest.raises(ValueError, match="high .* must be greater than low"):
        sg.randint(5, 5)


def test_manual_seed_drives_randn_and_parameter_init():
    sg.manual_seed(3)
    a, la = sg.randn(4), sg.nn.Linear(2, 2)
    sg.manual_seed(3)
    b, lb = sg.randn(4), sg.nn.Linear(2, 2)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(la.weight.numpy(), lb.weight.numpy())


def test_stack_joins_along_a_new_axis_with_gradients():
    xs = [sg.tensor(np.full(3, float(i)), requires_grad=True) for i in range(4)]
    s = sg.stack(xs, axis=1)
    assert s.shape == (3, 4)
    np.testing.assert_array_equal(s.numpy(), np.stack([x.numpy() for x in xs], axis=1))
    (s * sg.tensor(np.arange(12.0).reshape(3, 4))).sum().backward()
    np.testing.assert_array_equal(xs[2].grad.numpy(), [2.0, 6.0, 10.0])
    assert sg.stack(xs, axis=-1).shape == (3, 4)
    with pytest.raises(ShapeError, match="axis 2 out of range"):
        sg.stack(xs, axis=2)


def test_stack_and_cat_take_torchs_dim():
    a, b = sg.tensor(np.ones((2, 3))), sg.tensor(np.zeros((2, 3)))
    assert sg.stack([a, b], dim=1).shape == (2, 2, 3)
    assert sg.stack([a, b], dim=-1).shape == (2, 3, 2)
    np.testing.assert_array_equal(sg.cat([a, b], dim=1).numpy(),
                                  np.concatenate([np.ones((2, 3)), np.zeros((2, 3))], axis=1))
    with pytest.raises(TypeError, match=r"stack: give axis= \(NumPy\) or dim= \(torch\)"):
        sg.stack([a, b], axis=1, dim=1)
    with pytest.raises(TypeError, match="concat: give axis="):
        sg.cat([a, b], axis=1, dim=0)


@pytest.mark.parametrize("dtype", ["int64", "uint8", "bool"])
def test_min_and_argmin_of_integers_and_bools(dtype):
    # neg takes floats only (min and argmin raised), and an unsigned value negated wraps
    a = np.array([[4, 5, 3], [0, 9, 2]]).astype(dtype)
    x = sg.tensor(a)
    assert x.min().dtype == dtype and x.min().item() == a.min()
    np.testing.assert_array_equal(x.argmin(), a.argmin())        # flattened, as NumPy and torch
    np.testing.assert_array_equal(x.argmin(dim=-1), a.argmin(axis=-1))
    values, indices = x.min(dim=1)
    assert values.dtype == dtype
    np.testing.assert_array_equal(values.numpy(), a.min(axis=1))
    np.testing.assert_array_equal(indices.numpy(), a.argmin(axis=1))


def test_torch_names_for_reductions_and_views():
    a = np.array([[1.0, 5.0, 3.0], [4.0, 2.0, 6.0]])
    x = sg.tensor(a, requires_grad=True)
    values, indices = x.max(dim=1)
    np.testing.assert_array_equal(values.numpy(), a.max(axis=1))
    np.testing.assert_array_equal(indices.numpy(), a.argmax(axis=1))
    assert x.max(dim=1, keepdim=True).indices.shape == (2, 1)
    np.testing.assert_array_equal(x.min(dim=0).values.numpy(), a.min(axis=0))
    assert float(x.min()) == 1.0 and x.argmin(dim=1).numpy().tolist() == [0, 1]
    assert x.sum(dim=0, keepdim=True).shape == (1, 3) and float(x.mean(dim=None)) == a.mean()
    np.testing.assert_allclose(x.var().numpy(), a.var())
    np.testing.assert_allclose(x.std(axis=0, ddof=1).numpy(), a.std(axis=0, ddof=1))
    np.testing.assert_allclose(sg.functional.softmax(x, dim=1).sum(axis=1).numpy(), [1, 1])
    np.testing.assert_array_equal(x.clamp(2, 4).numpy(), a.clip(2, 4))
    assert x.view(3, 2).shape == (3, 2) and x.unsqueeze(0).squeeze(0).shape == (2, 3)
    assert x.permute(1, 0).shape == (3, 2) and x.unsqueeze(1).flatten(1, 2).shape == (2, 3)
    assert (x.long().dtype, x.float().dtype, x.numel(), x.dim()) == ("int64", "float32", 6, 2)
    x.min(dim=1).values.sum().backward()                  # the minima get the gradient
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(TypeError, match="axis= .* or dim= .*, not both"):
        x.sum(axis=0, dim=1)
    # out of range or start after end: torch's error (was a wrapped dim or an inserted one)
    with pytest.raises(ShapeError, match=r"flatten\(2, 1\) of a 3-d tensor"):
        x.unsqueeze(0).flatten(2, 1)
    with pytest.raises(ShapeError, match=r"flatten\(3, -1\)"):
        x.unsqueeze(0).flatten(3)
    assert sg.tensor(2.0).flatten().shape == (1,)
