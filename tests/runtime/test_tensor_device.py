"""Tensors on a device, as a PyTorch user writes them: ``sg.tensor(..., device=)``, ``.to()``,
``Module.to("cuda")``, eager training with the optimizer state following the parameters,
``compile_step`` and ``Predictor`` running a GPU model on the GPU executor, and clear errors
for mixed devices, a move with history and a missing CuPy.

Each GPU case runs twice: on host_cupy's stand-in (DeviceArrays that refuse to mix with NumPy
arrays, the CUDA kernels run on the host), and on a real GPU where CuPy sees one. Results are
compared with the same code on the CPU.
"""

import sys

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.device import Device, DeviceError
from shardgrad.runtime import device as D

F = sg.nn.functional


def on_device(x) -> bool:
    return D.is_device_array(x)


def rel(a, b) -> float:
    a, b = (np.asarray(D.to_host(v), np.float64) for v in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def data(n=16, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def mlp(dtype="float64"):
    sg.manual_seed(0)
    with_dtype = sg.get_default_dtype()
    sg.set_default_dtype(dtype)
    try:
        return sg.nn.Sequential(sg.nn.Linear(8, 16), sg.nn.BatchNorm1d(16), sg.nn.ReLU(),
                                sg.nn.Linear(16, 3))
    finally:
        sg.set_default_dtype(with_dtype)


# -- the CPU: device= and .to() without a GPU -------------------------------------------------

def test_cpu_tensors_report_the_cpu_and_stay_put():
    t = sg.tensor([1.0, 2.0], device="cpu")
    assert t.device == Device("cpu") and t.device == "cpu" and str(t.device) == "cpu"
    assert not t.is_cuda and t.to("cpu") is t and t.cpu() is t
    assert sg.zeros(2, 3, device="cpu").device.type == "cpu"
    m = mlp()
    assert m.to("cpu") is m and m.cpu() is m
    assert isinstance(next(m.parameters()).data, np.ndarray)


def test_cuda_without_cupy_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # any import of cupy now fails
    with pytest.raises(DeviceError, match=r"CuPy is not installed: pip install -e '\.\[gpu\]'"):
        sg.tensor([1.0], device="cuda")
    with pytest.raises(DeviceError, match="CuPy is not installed"):
        mlp().to("cuda:0")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cpu:0", "cuda:x"])
def test_bad_device_specs_name_the_spec(spec):
    with pytest.raises(DeviceError, match=f"device {spec!r}: expected 'cpu', 'cuda'|"
                                          f"device {spec!r}: 'cpu' takes no index"):
        sg.tensor([1.0], device=spec)


# -- on a device --------------------------------------------------------------------------------

def test_eager_ops_and_gradients_stay_on_the_device(cuda):
    x_host = np.arange(6.0).reshape(2, 3)
    x = sg.tensor(x_host, device="cuda", requires_grad=True)
    assert x.device == "cuda:0" and x.is_cuda and on_device(x.data)
    four = sg.tensor(4.0, dtype="float64")              # a 0-d CPU tensor may join
    y = ((x * 2.0 + 1.0).relu() / four).sum()
    assert on_device(y.data) and "device='cuda:0'" in repr(y)
    y.backward()
    assert on_device(x.grad.data)
    np.testing.assert_allclose(x.grad.numpy(), np.full((2, 3), 0.5))
    assert isinstance(x.numpy(), np.ndarray) and np.array_equal(x.numpy(), x_host)
    assert y.item() == pytest.approx(((x_host * 2 + 1) / 4).sum())
    back = x.cpu()
    assert back.device == "cpu" and back.requires_grad and isinstance(back.data, np.ndarray)


def test_gradients_of_constants_alone_are_on_the_leafs_device(cuda):
    # x.sum()'s and a bias's gradient are the seed broadcast: no device operand computes them
    x = sg.tensor(np.arange(6.0).reshape(2, 3), device="cuda", requires_grad=True)
    b = sg.tensor(np.zeros(3), device="cuda", requires_grad=True)
    x.sum().backward()
    (x + b).mean().backward()
    assert on_device(x.grad.data) and on_device(b.grad.data)
    np.testing.assert_allclose(b.grad.numpy(), np.full(3, 1 / 3))
    x.grad = None
    x.backward(np.full((2, 3), 2.0))                       # a host gradient is moved over
    assert on_device(x.grad.data)
    np.testing.assert_allclose(x.grad.numpy(), np.full((2, 3), 2.0))
    sg.optim.SGD([x, b], lr=0.1).step()                     # was: sub on cpu and cuda:0
    assert on_device(x.data) and on_device(b.data)


def test_module_to_moves_the_gradients_too(cuda):
    sg.manual_seed(0)
    model = sg.nn.Linear(3, 2)
    F.cross_entropy(model(sg.tensor(np.ones((4, 3), "float32"))), np.array([0, 1, 0, 1])) \
        .backward()
    opt = sg.optim.SGD(model.parameters(), lr=0.1)
    model.to("cuda")                                       # between backward and step
    assert all(on_device(p.grad.data) for p in model.parameters())
    opt.step()                                             # was: sub on cpu and cuda:0
    assert all(on_device(p.data) for p in model.parameters())


def test_mixed_devices_are_an_error_naming_both(cuda):
    a = sg.tensor(np.ones(3), device="cuda")
    with pytest.raises(DeviceError, match=r"add: expected all tensors on one device, found "
                                          r"cpu and cuda:0; move them with \.to\(device\)"):
        a + sg.tensor(np.ones(3))
    with pytest.raises(DeviceError, match="matmul: .* found cpu and cuda:0"):
        sg.tensor(np.ones((2, 3))) @ sg.tensor(np.ones((3, 2)), device="cuda")
    assert on_device((a + 1).data) and on_device((a * np.float64(2)).data)


def test_moving_a_tensor_with_history_is_refused(cuda):
    w = sg.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(DeviceError, match=r"Tensor.to\('cuda'\) of a tensor with autograd "
                                          r"history .* move the leaves"):
        (w * 2).to("cuda")
    with sg.no_grad():
        assert (w * 2).to("cuda").is_cuda                  # no history, nothing to lose
    moved = w.to("cuda")
    assert moved.requires_grad and moved.is_cuda
    (moved * moved).sum().backward()
    np.testing.assert_allclose(moved.grad.numpy(), 2 * np.ones(3))


@pytest.mark.parametrize("make_opt", [
    lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: sg.optim.AdamW(ps, lr=1e-2),
], ids=["sgd", "adamw"])
def test_eager_training_on_the_device_matches_the_cpu(cuda, make_opt):
    x, y = data()
    runs = {}
    for where in ("cpu", "cuda"):
        model = mlp()
        opt = make_opt(model.parameters())      # made before the move: its state follows
        model.to(where)
        xt, yt = sg.tensor(x, device=where), sg.tensor(y, device=where)
        losses = []
        for _ in range(4):
            loss = F.cross_entropy(model(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[where] = (losses, model, opt)
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-10)
    model, opt = runs["cuda"][1:]
    assert all(on_device(p.data) for p in model.parameters())
    assert all(on_device(v.data) for st in opt.state for v in st.values())
    assert on_device(model[1].running_mean.data)
    cpu_state, gpu_state = runs["cpu"][1].state_dict(), model.state_dict()
    for k, v in gpu_state.items():
        assert isinstance(v, np.ndarray)
        assert rel(v, cpu_state[k]) < 1e-10, k


def test_load_state_dict_copies_onto_the_model_device(cuda):
    src, dst = mlp(), mlp().to("cuda")
    for p in src.parameters():
        p.data = p.data + 1.0
    dst.load_state_dict(src.state_dict())
    assert all(on_device(p.data) for p in dst.parameters())
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, src.state_dict()[k])


def test_compile_step_runs_a_gpu_model_on_the_gpu_executor(cuda):
    x, y = data(n=32)
    runs = {}
    for where in ("cpu", "cuda"):
        model = mlp().to(where)
        opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = sg.compile_step(model, F.cross_entropy, opt)
        feed_x = sg.tensor(x, device=where) if where == "cuda" else x   # either works
        losses = [step(feed_x, y) for _ in range(5)]
        runs[where] = ([float(v) for v in losses], model)
        if where == "cuda":
            # the loss is a 0-d Tensor on the device (as torch's); the state is the step's
            assert all(isinstance(v, sg.Tensor) and on_device(v.data) for v in losses)
            assert step.stats()["path"] == "flat-sgd"
            assert type(step._compiled[next(iter(step._compiled))][1].exe).__name__ == \
                "GPUExecutor"
            assert all(on_device(p.data) for p in model.parameters())
            model.eval()
            assert isinstance(sg.Predictor(model)(x), np.ndarray)
            acc = sg.accuracy(model, sg.tensor(x, device="cuda"), y)
            runs["acc"] = (acc, sg.accuracy(runs["cpu"][1].eval(), x, y))
            for labels in (cuda.asarray(y), sg.tensor(y, device="cuda")):   # labels there too
                assert sg.accuracy(model, feed_x, labels) == acc
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-10)
    assert runs["acc"][0] == runs["acc"][1]


def test_a_device_constant_in_a_traced_model_becomes_a_host_constant(cuda):
    class Scaled(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = sg.nn.Linear(8, 3)
            self.scale = sg.tensor(np.full(3, 0.5), device="cuda")   # a plain attribute

        def forward(self, x):
            return self.lin(x) * self.scale

    sg.manual_seed(0)
    sg.set_default_dtype("float64")
    try:
        model = Scaled().to("cuda")
    finally:
        sg.set_default_dtype("float32")
    x, y = data()
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    eager = F.cross_entropy(model(sg.tensor(x, device="cuda")), sg.tensor(y, device="cuda"))
    assert float(step(x, y)) == pytest.approx(eager.item(), rel=1e-12)
    consts = [n for n in step.graph.nodes if n.op == "const"]
    assert consts and not any(on_device(n.attrs["value"]) for n in consts)


def test_data_parallel_step_of_one_process_runs_a_gpu_model_there(cuda):
    x, y = data(n=32)
    losses = {}
    for where in ("cpu", "cuda"):
        model = mlp().to(where)
        opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = sg.distributed.data_parallel_step(model, F.cross_entropy, opt)
        # on the GPU the loss is a lazy 0-d device Tensor, as compile_step's there
        losses[where] = [float(step(x, y)) for _ in range(3)]
        assert all(on_device(p.data) == (where == "cuda") for p in model.parameters())
        # one process: compile_step's own GPU step (state on the device), the CPU's program
        assert step.stats()["path"] == ("flat-sgd" if where == "cuda" else "host-feeds")
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-10)
