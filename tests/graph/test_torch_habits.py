"""Torch users' habits on sg.Tensor, against torch (CPU, float64): the calls that used to give
a silently different result (transpose(0, 1), argmax(), max(1)) or fail (size(), index
arrays and masks, item assignment, in-place ops, retain_grad, &, |, ~)."""

import numpy as np
import pytest
import torch

import shardgrad as sg

RNG = np.random.default_rng(0)


def both(a, grad=True):
    return sg.tensor(a, requires_grad=grad), torch.tensor(a, requires_grad=grad)


def check(s, t, s_leaves=(), t_leaves=()):
    """Values equal; then the gradients of a random weighting of the outputs."""
    np.testing.assert_allclose(s.numpy(), t.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert s.shape == tuple(t.shape)
    if s_leaves:
        w = RNG.standard_normal(t.shape)
        (s * sg.tensor(w)).sum().backward()
        (t * torch.tensor(w)).sum().backward()
        for a, b in zip(s_leaves, t_leaves, strict=True):
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_transpose_of_two_dims_swaps_them_as_torch():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    check(s.transpose(0, 1), t.transpose(0, 1), [s], [t])       # was the identity permutation
    b = RNG.standard_normal((2, 3, 4))
    for dims in [(0, 2), (-1, -2), (1, 0)]:
        check(sg.tensor(b).transpose(*dims), torch.tensor(b).transpose(*dims))
    check(sg.tensor(b).transpose(2, 0, 1), torch.tensor(b).permute(2, 0, 1))   # NumPy's form
    check(sg.tensor(b).mT, torch.tensor(b).mT)
    check(sg.tensor(a).t(), torch.tensor(a).t())


def test_argmax_without_a_dim_is_over_the_flattened_tensor():
    a = RNG.standard_normal((3, 4))
    assert sg.tensor(a).argmax().shape == () and int(sg.tensor(a).argmax()) == int(
        torch.tensor(a).argmax())
    assert int(sg.tensor(a).argmin()) == int(torch.tensor(a).argmin())
    check(sg.tensor(a).argmax(dim=1, keepdim=True), torch.tensor(a).argmax(dim=1, keepdim=True))


def test_max_and_min_called_the_torch_way():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    _, pred = s.max(1)                         # was the values alone: unpacking split rows
    np.testing.assert_array_equal(pred.numpy(), t.max(1)[1].numpy())
    check(s.max(1)[0], t.max(1)[0], [s], [t])
    check(sg.tensor(a).min(0, True).values, torch.tensor(a).min(0, True).values)
    b = RNG.standard_normal((3, 4))
    check(sg.tensor(a).max(sg.tensor(b)), torch.tensor(a).max(torch.tensor(b)))
    assert sg.tensor(a).max(axis=1).shape == (3,)       # NumPy's keyword: the values


def test_size_is_callable_as_in_torch():
    x = sg.zeros(2, 3, 4)
    assert x.size() == (2, 3, 4) and x.size(1) == 3 and x.size(-1) == 4
    assert x.size == 24 and x.view(x.size(0), -1).shape == (2, 12)
    with pytest.raises(IndexError, match="size\\(3\\): dimension out of range"):
        x.size(3)


@pytest.mark.parametrize("index", [
    lambda m: [2, 0, 2],
    lambda m: m.tensor([[1, -1], [0, 2]]),
    lambda m: (slice(None), m.tensor([3, 0])),
    lambda m: (m.tensor([0, 2]), m.tensor([1, 3])),          # logits[arange(n), labels]
    lambda m: (m.tensor([0, 2]), slice(1, 3), m.tensor([1, 3])),   # apart: their dims lead
    lambda m: (Ellipsis, m.tensor([1, 1])),
    lambda m: (1, slice(None), m.tensor([0, 2])),
    lambda m: m.tensor([True, False, True]),
])
def test_index_arrays_and_masks(index):
    a = RNG.standard_normal((3, 4, 5))
    s, t = both(a)
    check(s[index(sg)], t[index(torch)], [s], [t])


def test_bool_mask_of_the_whole_tensor():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    check(s[s > 0], t[t > 0], [s], [t])


def test_index_arrays_trace_into_a_compiled_step():
    def loss(logits, y):          # the label's log-probability, picked by two index arrays
        return -logits.log_softmax(dim=1)[sg.arange(y.shape[0]), y].mean()

    x, y = RNG.standard_normal((6, 4)), RNG.integers(0, 3, 6)
    steps = []
    for _ in range(2):
        sg.manual_seed(0)
        model = sg.nn.Linear(4, 3)
        model.double()
        steps.append((model, sg.optim.SGD(model.parameters(), lr=0.5)))
    (m1, o1), (m2, o2) = steps
    step = sg.compile_step(m1, loss, o1)
    for _ in range(2):
        got = step(x, y)
        o2.zero_grad()
        want = sg.nn.functional.cross_entropy(m2(sg.tensor(x)), sg.tensor(y))
        want.backward()
        o2.step()
        assert got == pytest.approx(float(want), rel=1e-12)
    np.testing.assert_allclose(m1.weight.numpy(), m2.weight.numpy(), rtol=1e-12)


@pytest.mark.parametrize("index, value", [
    (lambda m: 0, lambda v: v), (lambda m: (slice(None), 1), lambda v: 2.5),
    (lambda m: (slice(0, 2), slice(1, 4, 2)), lambda v: v[:2]),
    (lambda m: m.tensor([2, 0]), lambda v: -1.0)])
def test_item_assignment(index, value):
    a, v = RNG.standard_normal((3, 4)), RNG.standard_normal(4)
    s, t = both(a)
    sv, tv = both(v)
    s2, t2 = s * 1, t * 1
    s2[index(sg)] = value(sv)
    t2[index(torch)] = value(tv)
    uses_v = not isinstance(value(sv), float)
    check(s2, t2, [s, sv] if uses_v else [s], [t, tv] if uses_v else [t])


def test_mask_assignment_keeps_gradients_and_traces():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    s2, t2 = s * 2, t * 2
    s2[s < 0] = 0.0
    t2[t < 0] = 0.0
    check(s2, t2, [s], [t])

    def loss(out, y):
        out = out * 1
        out[out < 0] = 0.0                      # a mask of the tensor's shape is traceable
        return (out * out).mean()

    sg.manual_seed(0)
    m = sg.nn.Linear(3, 2)
    step = sg.compile_step(m, loss, sg.optim.SGD(m.parameters(), lr=0.1))
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    want = float(loss(m(sg.tensor(x)), None))
    assert step(x, np.zeros(5)) == pytest.approx(want, rel=1e-6)


def test_manual_sgd_with_in_place_updates_under_no_grad():
    a = RNG.standard_normal(3)
    s, t = both(a)
    for _ in range(3):
        ((s * s).sum() + s.sum()).backward()
        ((t * t).sum() + t.sum()).backward()
        with sg.no_grad():
            s -= 0.1 * s.grad                   # was a new tensor: s lost requires_grad
        with torch.no_grad():
            t -= 0.1 * t.grad
        s.grad.zero_()
        t.grad.zero_()
    assert s.requires_grad and s.is_leaf
    np.testing.assert_allclose(s.numpy(), t.detach().numpy(), rtol=1e-12)


def test_in_place_on_a_leaf_that_requires_grad_is_refused_as_in_torch():
    s = sg.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad .* in-place"):
        s += 1
    with pytest.raises(RuntimeError, match="in-place"):
        s[0] = 3.0


def test_in_place_ops_on_results_keep_the_history():
    a, b = RNG.standard_normal((2, 3)), RNG.standard_normal(3)
    s, t = both(a)
    sb, tb = both(b)
    s2, t2 = s * 2, t * 2
    s2.add_(sb, alpha=0.5).mul_(sb).sub_(1.0).div_(3.0).clamp_(-0.5, 0.5)
    t2.add_(tb, alpha=0.5).mul_(tb).sub_(1.0).div_(3.0).clamp_(-0.5, 0.5)
    s2 += sb
    t2 += tb
    check(s2, t2, [s, sb], [t, tb])
    with pytest.raises(sg.ShapeError, match="in-place ops cannot broadcast"):
        sg.zeros(3).add_(sg.zeros(2, 3))


def test_init_style_in_place_fills():
    w = sg.nn.Linear(3, 2).weight
    with sg.no_grad():
        w.fill_(0.5)
        assert np.all(w.numpy() == 0.5) and w.is_leaf and w.requires_grad
        w.copy_(sg.ones(2, 3))
        assert np.all(w.numpy() == 1.0)
        w.normal_(0.0, 0.02)
        w.uniform_(-0.1, 0.1)
        assert np.all(np.abs(w.numpy()) <= 0.1)


def test_retain_grad_and_is_leaf():
    s, t = both(np.array([1.0, 2.0]))
    sy, ty = s * 3, t * 3
    sy.retain_grad()
    ty.retain_grad()
    (sy * sy).sum().backward()
    (ty * ty).sum().backward()
    np.testing.assert_allclose(sy.grad.numpy(), ty.grad.numpy())
    np.testing.assert_allclose(s.grad.numpy(), t.grad.numpy())
    assert s.is_leaf and not sy.is_leaf and sg.tensor([1.0]).is_leaf


def test_bool_operators_and_reductions():
    a = RNG.standard_normal((3, 4))
    s, t = sg.tensor(a), torch.tensor(a)
    for f in [lambda x: (x > 0) & (x < 1), lambda x: (x > 0) | (x < -1),
              lambda x: ~(x > 0), lambda x: (x > 0) ^ (x > 0.5), lambda x: (x > -5).all(),
              lambda x: (x > 1).any(), lambda x: (x > 0).any(dim=1),
              lambda x: (x > -1).all(dim=0, keepdim=True), lambda x: x.all()]:
        np.testing.assert_array_equal(f(s).numpy(), f(t).numpy())
    with pytest.raises(TypeError, match="only bool tensors"):
        sg.tensor([1, 2]) & sg.tensor([1, 0])


def test_var_and_std_with_torch_keywords_are_unbiased():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    check(s.var(dim=1), t.var(dim=1), [s], [t])
    check(sg.tensor(a).std(dim=0, keepdim=True), torch.tensor(a).std(dim=0, keepdim=True))
    check(sg.tensor(a).var(dim=1, unbiased=False), torch.tensor(a).var(dim=1, unbiased=False))
    check(sg.tensor(a).var(dim=1, correction=0), torch.tensor(a).var(dim=1, correction=0))
    np.testing.assert_allclose(sg.tensor(a).var().numpy(), a.var())      # NumPy's default


def test_small_torch_methods():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    check(s.square().rsqrt().log1p(), t.square().rsqrt().log1p(), [s], [t])
    check(sg.tensor(a).sign(), torch.tensor(a).sign())
    assert sg.tensor(a).to("float32").dtype == "float32" and sg.tensor(a).to(
        np.float32).dtype == "float32"
    assert sg.tensor([1, 2]).type_as(sg.tensor(a)).dtype == "float64"
    x = sg.tensor(a)
    assert x.contiguous() is x


def test_a_torch_state_dict_with_batch_norm_loads_and_module_dtype_casts():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    tm.train()
    tm(torch.randn(5, 3, dtype=torch.float64))          # running statistics off their start
    sm = sg.nn.Sequential(sg.nn.Linear(3, 4), sg.nn.BatchNorm1d(4)).double()
    sm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})  # num_batches_tracked
    sm.eval()
    tm.eval()
    x = RNG.standard_normal((5, 3))
    check(sm(sg.tensor(x)), tm(torch.tensor(x)))
    with pytest.raises(KeyError, match=r"missing keys \['1.bias'\]"):
        sm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items() if k != "1.bias"})
    assert sm.float()[0].weight.dtype == "float32" and sm[1].running_var.dtype == "float32"
    assert sm.to(np.float64)[1].weight.dtype == "float64"


def test_gradients_at_ties_and_boundaries_follow_torch():
    # clamp split the gradient in half at a boundary (maximum/minimum's tie rule); max(dim)
    # shared it between tied elements instead of giving it to the returned index; the
    # 2-norm's gradient at zero was nan
    for f, a in [(lambda x: x.clamp(0.0, 2.0), [-1.0, 0.0, 2.0, 3.0]),
                 (lambda x: x.clamp(min=0.0), [0.0, 1.0]),
                 (lambda x: x.max(dim=0)[0], [1.0, 3.0, 3.0]),
                 (lambda x: x.min(0).values, [1.0, 1.0, 3.0]),
                 (lambda x: x.max(), [1.0, 3.0, 3.0]),
                 (lambda x: x.norm(), [0.0, 0.0]),
                 (lambda x: x.reshape(1, 2).norm(dim=1), [0.0, 0.0])]:
        s, t = both(np.array(a))
        check(f(s), f(t), [s], [t])


def test_integer_negation_and_flip():
    check(-sg.tensor([1, -2]), -torch.tensor([1, -2]))
    a = RNG.standard_normal((2, 3))
    s, t = both(a)
    check(s.flip(0, 1), t.flip(0, 1), [s], [t])
    check(sg.tensor(a).flip(-1), torch.tensor(a).flip(-1))


def test_torch_dtype_names_and_factories():
    x = sg.zeros(2, 3, dtype=sg.float64)
    assert x.dtype == sg.float64 and x.to(sg.float32).dtype == sg.float32
    assert sg.tensor([1, 2], dtype=sg.long).dtype == "int64" and sg.ones(2, dtype=sg.bool).all()
    check(sg.eye(3, dtype=sg.float64), torch.eye(3, dtype=torch.float64))
    check(sg.linspace(0, 1, 5, dtype=sg.float64), torch.linspace(0, 1, 5, dtype=torch.float64))
    check(sg.full_like(x, 2.5), torch.full_like(torch.zeros(2, 3, dtype=torch.float64), 2.5))
    a = np.arange(3.0)
    s = sg.from_numpy(a)
    a[0] = 5.0
    assert s.numpy()[0] == 0.0 and sg.randn_like(x).shape == (2, 3)
    check(sg.clamp(sg.tensor(a), 1.0, 2.0), torch.clamp(torch.tensor(a), 1.0, 2.0))
    check(sg.softmax(sg.tensor(a), dim=0), torch.softmax(torch.tensor(a), dim=0))


def test_more_torch_methods_and_function_forms():
    a = RNG.standard_normal((3, 4))
    s, t = both(a)
    check(s.clone().logsumexp(dim=1), t.clone().logsumexp(dim=1), [s], [t])
    for f in [lambda m, x: m.sum(x, dim=1), lambda m, x: m.mean(x, 0),
              lambda m, x: m.max(x, 1)[0], lambda m, x: m.amax(x, dim=0),
              lambda m, x: m.transpose(x, 0, 1), lambda m, x: m.tril(x, -1),
              lambda m, x: m.triu(x), lambda m, x: m.index_select(x, 1, m.tensor([3, 0])),
              lambda m, x: m.narrow(x, 1, 1, 2), lambda m, x: m.erf(x),
              lambda m, x: m.outer(x[0], x[1]), lambda m, x: m.mm(x, x.t()),
              lambda m, x: m.pow(x, 2), lambda m, x: x.reciprocal() + x.log2().nan_to_num(0)
              if m is torch else x.reciprocal() + sg.where(x.isnan(), 0.0, x.log2()),
              lambda m, x: m.stack(m.unbind(x, 1), 0), lambda m, x: x.view_as(x.t()),
              lambda m, x: m.masked_select(x, x > 0), lambda m, x: x.amin(1, keepdim=True)]:
        s, t = both(np.abs(a) + 0.5)
        check(f(sg, s), f(torch, t), [s], [t])
    x = np.array([1.0, np.nan, np.inf, 0.0])
    for f in [lambda m, v: m.isnan(v), lambda m, v: m.isfinite(v),
              lambda m, v: m.nonzero(v).reshape(-1)]:
        np.testing.assert_array_equal(f(sg, sg.tensor(x)).numpy(), f(torch, torch.tensor(x)))
    w = sg.tensor([1.0], requires_grad=True)
    with sg.set_grad_enabled(False):
        assert not (w * 2).requires_grad
    assert (w * 2).requires_grad and sg.is_tensor(w) and not sg.is_tensor(1.0)
    assert sg.allclose(sg.ones(2), np.ones(2)) and sg.equal(sg.ones(2), sg.ones(2))
    assert sg.zeros(2).new_zeros(3, 1).shape == (3, 1) and sg.ones(1).new_tensor([1.5]).dtype


def test_backward_of_a_one_element_tensor_of_any_shape():
    s, t = both(np.array([[1.0, 2.0]]))
    (s * s).sum(dim=1).backward()                 # shape (1,): refused, torch takes it
    (t * t).sum(dim=1).backward()
    np.testing.assert_allclose(s.grad.numpy(), t.grad.numpy())
    with pytest.raises(sg.ShapeError, match="needs a scalar"):
        (s * s).backward()


def test_squeeze_of_a_dim_not_of_size_one_is_a_no_op_as_in_torch():
    a = RNG.standard_normal((3, 1, 2))
    for dims in [0, 1, -1, (0, 1)]:
        check(sg.tensor(a).squeeze(dims), torch.tensor(a).squeeze(dims))
    check(sg.tensor(a).squeeze(), torch.tensor(a).squeeze())
