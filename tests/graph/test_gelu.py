"""GELU as torch (CPU): exact by default (through the erf op), the tanh form on request;
values and gradients eager, and a compiled training step, against torch.nn.GELU."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shardgrad as sg

sys.path.insert(0, str(Path(__file__).parent))
from seeded import mlp, torch_twin  # noqa: E402

F = sg.nn.functional


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gelu_values_and_gradients_equal_torch(approximate, dtype):
    x = np.linspace(-7, 7, 201).astype(dtype)
    t = sg.tensor(x, requires_grad=True)
    F.gelu(t, approximate=approximate).sum().backward()
    tt = torch.tensor(x, requires_grad=True)
    out = torch.nn.functional.gelu(tt, approximate=approximate)
    out.sum().backward()
    # float32: 1 + erf(x / sqrt 2) cancels for x << 0, in torch's kernel as in ours (each is
    # up to 5.4e-7 from the float64 value on this grid), so the two agree to about that
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == "float64" else {"rtol": 1e-5, "atol": 2e-6}
    np.testing.assert_allclose(F.gelu(sg.tensor(x), approximate).numpy(),
                               out.detach().numpy(), **tol)
    np.testing.assert_allclose(t.grad.numpy(), tt.grad.numpy(), **tol)


def test_gelu_module_defaults_to_the_exact_form():
    assert sg.nn.GELU().approximate == "none" and repr(sg.nn.GELU()) == "GELU(approximate='none')"
    x = np.linspace(-3, 3, 13)
    exact = sg.nn.GELU()(sg.tensor(x)).numpy()
    np.testing.assert_allclose(exact, torch.nn.GELU()(torch.tensor(x)).numpy(), rtol=1e-12)
    tanh = sg.nn.GELU("tanh")(sg.tensor(x)).numpy()
    assert 1e-5 < np.abs(exact - tanh).max() < 1e-3        # the two forms differ, a little
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        sg.nn.GELU("erf")
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        F.gelu(sg.tensor(x), approximate="fast")


def test_compiled_step_with_gelu_equals_torch():
    model = mlp(5, 16, 3, sg.nn.GELU)
    ref = torch_twin(model, torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.GELU(),
                                                torch.nn.Linear(16, 3)))
    opt = sg.optim.SGD(model.parameters(), lr=0.3)
    topt = torch.optim.SGD(ref.parameters(), lr=0.3)
    step = sg.compile_step(model, F.cross_entropy, opt)
    assert "erf" in [n.op for n in step.graph_for(np.zeros((8, 5)), np.zeros(8, np.int64))[0]
                     .nodes]
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = rng.normal(size=(8, 5)) * 2, rng.integers(0, 3, 8)
        loss = step(x, y)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-12)
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[k], v.numpy(), rtol=1e-11, atol=1e-13)
