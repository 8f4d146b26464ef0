"""The public API on a GPU as a user reaches it (``model.to("cuda")``, eager steps,
``sg.compile_step`` with ``precision=``), for the models and layers the GPU sweep of
examples/*.toml found broken: exact GELU off the fused kernels (eager, and under bf16 where
the casts keep it alone), the text transformer's position ids and embedding gradient.

Each case runs on host_cupy's stand-in (the CUDA kernels on the host) and, where CuPy sees a
GPU, on it (the ``cuda`` fixture, tests/runtime/conftest.py); every result is compared with
the same code on the CPU.
"""

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.runtime.models import TextTransformer

F = sg.nn.functional
pytestmark = pytest.mark.timeout(120)


def gelu_mlp():
    sg.manual_seed(0)
    return sg.nn.Sequential(sg.nn.Linear(6, 8), sg.nn.GELU(), sg.nn.Linear(8, 3))


def text_model():
    sg.manual_seed(0)
    return TextTransformer(vocab=12, length=5, num_classes=3, d_model=8, heads=2, layers=1,
                           ff=16, dropout=0.0)


def batch(kind):
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 12, (6, 5)) if kind == "text"
         else rng.standard_normal((6, 6)).astype(np.float32))
    return x, rng.integers(0, 3, 6)


def eager_steps(make, kind, device, steps=2):
    m = make().to(device)
    opt = sg.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = (sg.tensor(a, device=device) for a in batch(kind))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, m.state_dict()


@pytest.mark.parametrize("kind", ["gelu", "text"])
def test_eager_training_on_the_device_equals_the_cpu(cuda, kind):
    # exact GELU's erf ran NumPy's float32 kernel on device arrays (picked by isinstance, and
    # the stand-in's arrays are ndarrays); the text model made its position ids on the CPU
    make = gelu_mlp if kind == "gelu" else text_model
    cpu, cpu_state = eager_steps(make, kind, "cpu")
    gpu, gpu_state = eager_steps(make, kind, "cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5)
    for k, v in cpu_state.items():
        np.testing.assert_allclose(np.asarray(gpu_state[k]), v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_exact_gelu_under_autocast_on_the_device(cuda, precision):
    # the casts keep erf out of the fused kernels: it runs alone, through its out= kernel
    losses = {}
    for device in ("cpu", "cuda"):
        m = gelu_mlp().to(device)
        step = sg.compile_step(m, F.cross_entropy, sg.optim.SGD(m.parameters(), lr=0.1),
                               precision=precision)
        x, y = (sg.tensor(a, device=device) for a in batch("gelu"))
        losses[device] = [float(step(x, y)) for _ in range(3)]
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-4)


def test_text_transformer_compiled_and_evaluated_on_the_device(cuda):
    x, y = batch("text")
    out = {}
    for device in ("cpu", "cuda"):
        m = text_model().to(device)
        step = sg.compile_step(m, F.cross_entropy, sg.optim.SGD(m.parameters(), lr=0.1))
        xs, ys = sg.tensor(x, device=device), sg.tensor(y, device=device)
        losses = [float(step(xs, ys)) for _ in range(2)]
        m.eval()
        with sg.no_grad():
            out[device] = (losses, m(xs).numpy())
    np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], rtol=1e-5)
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], rtol=1e-4, atol=1e-5)
