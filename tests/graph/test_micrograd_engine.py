"""micrograd's own engine tests (karpathy/micrograd, test/test_engine.py, MIT licence), run
unchanged against shardgrad's eager Tensor through a one-line shim: a Value is a 0-d float64
tensor that requires grad. Values and gradients are compared with torch, as micrograd does;
its tolerance checks call abs() on a tensor (``abs(amg.grad - apt.grad.item()) < tol``)."""

import torch

import shardgrad as sg


def Value(x):  # noqa: N802 - micrograd's name
    return sg.tensor(float(x), dtype="float64", requires_grad=True)


def test_sanity_check():

    x = Value(-4.0)
    z = 2 * x + 2 + x
    q = z.relu() + z * x
    h = (z * z).relu()
    y = h + q + q * x
    y.backward()
    xmg, ymg = x, y

    x = torch.Tensor([-4.0]).double()
    x.requires_grad = True
    z = 2 * x + 2 + x
    q = z.relu() + z * x
    h = (z * z).relu()
    y = h + q + q * x
    y.backward()
    xpt, ypt = x, y

    # forward pass went well
    assert ymg.data == ypt.data.item()
    # backward pass went well
    assert xmg.grad == xpt.grad.item()


def test_more_ops():

    a = Value(-4.0)
    b = Value(2.0)
    c = a + b
    d = a * b + b**3
    c += c + 1
    c += 1 + c + (-a)
    d += d * 2 + (b + a).relu()
    d += 3 * d + (b - a).relu()
    e = c - d
    f = e**2
    g = f / 2.0
    g += 10.0 / f
    g.backward()
    amg, bmg, gmg = a, b, g

    a = torch.Tensor([-4.0]).double()
    b = torch.Tensor([2.0]).double()
    a.requires_grad = True
    b.requires_grad = True
    c = a + b
    d = a * b + b**3
    c = c + c + 1
    c = c + 1 + c + (-a)
    d = d + d * 2 + (b + a).relu()
    d = d + 3 * d + (b - a).relu()
    e = c - d
    f = e**2
    g = f / 2.0
    g = g + 10.0 / f
    g.backward()
    apt, bpt, gpt = a, b, g

    tol = 1e-6
    # forward pass went well
    assert abs(gmg.data - gpt.data.item()) < tol
    # backward pass went well
    assert abs(amg.grad - apt.grad.item()) < tol
    assert abs(bmg.grad - bpt.grad.item()) < tol


def test_the_shim_compares_tensors_not_arrays():
    """The checks above reach Tensor's __abs__, __sub__, __lt__ and __bool__ (grad is a
    Tensor), and the values are torch's to the last bit."""
    a = Value(-4.0)
    (a * a * a).backward()
    assert isinstance(a.grad, sg.Tensor) and isinstance(abs(a.grad - 48.0), sg.Tensor)
    assert abs(a.grad - 48.0) < 1e-12 and abs(-a.grad).item() == 48.0
