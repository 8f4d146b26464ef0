"""The optional GPU libraries (ops.gpu_libs): the lazy probe, the choice by measurement per
call shape, the fallbacks, and what ``step.stats()["libraries"]`` says, on host_cupy's
stand-in with a fake nvmath-python (fake_gpu_libs: cuBLASLt's GEMM + epilogue in NumPy) or
none. Every run is compared with the CPU step. Whether cuBLASLt is faster on a real GPU is
bench/gpu_check.sh's ``libs`` part.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fake_gpu_libs  # noqa: E402
import host_cupy  # noqa: E402

import shardgrad as sg  # noqa: E402
from shardgrad.graph import passes  # noqa: E402
from shardgrad.ops import gpu as gpu_ops  # noqa: E402
from shardgrad.ops import gpu_libs  # noqa: E402
from shardgrad.runtime import device as D  # noqa: E402
from shardgrad.runtime.interpreter import Interpreter  # noqa: E402

F = sg.nn.functional
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stand_in(monkeypatch):
    yield host_cupy.install(host_cupy.device_module(), monkeypatch)
    gpu_libs.reset()


def library(monkeypatch, mode="ok", faster=True):
    """Install a fake cuBLASLt whose calls the timer sees as faster (or slower) than the own
    kernels'."""
    fake = fake_gpu_libs.module(mode)
    gpu_libs.install("cublaslt", fake, "available (fake)")

    def timer(xp, fn):
        before = fake.executes
        fn()
        return (1e-6 if faster else 1e-3) if fake.executes > before else 1e-4
    monkeypatch.setattr(gpu_libs, "timer", timer)
    return fake


def mlp(act="relu"):
    sg.manual_seed(0)
    a = sg.nn.ReLU() if act == "relu" else sg.nn.GELU(approximate="tanh")
    return sg.nn.Sequential(sg.nn.Linear(12, 16), a, sg.nn.Linear(16, 16), sg.nn.ReLU(),
                            sg.nn.Linear(16, 4))


def run(device, act="relu", steps=3):
    m = mlp(act).to(device)
    step = sg.compile_step(m, F.cross_entropy,
                           sg.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    x = sg.tensor(rng.standard_normal((8, 12)).astype(np.float32), device=device)
    y = sg.tensor(rng.integers(0, 4, 8), device=device)
    losses = [float(step(x, y)) for _ in range(steps)]
    return losses, {k: np.asarray(v) for k, v in m.state_dict().items()}, step


def same_as_cpu(gpu, cpu):
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-5)
    for k, v in cpu[1].items():
        np.testing.assert_allclose(gpu[1][k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_probe_says_what_is_missing_and_how_to_install_it(monkeypatch):
    gpu_libs.reset()
    monkeypatch.setitem(sys.modules, "nvmath", None)       # any import of nvmath now fails
    monkeypatch.setitem(sys.modules, "cudnn", None)
    try:
        for lib in ("cublaslt", "cudnn"):
            mod, note = gpu_libs.probe(lib)
            assert mod is None and note.startswith("absent (")
            assert note.endswith("pip install -e '.[gpu-libs]'")
    finally:
        gpu_libs.reset()


def test_without_the_library_the_step_runs_the_own_kernels_and_says_so(stand_in, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvmath", None)
    monkeypatch.setitem(sys.modules, "cudnn", None)
    gpu_libs.reset()
    cpu = run("cpu")
    gpu = run("cuda")
    same_as_cpu(gpu, cpu)
    graph = gpu[2]._program.graph
    assert not any(n.op == "matmul_bias_act" for n in graph.nodes)     # the graph as before
    libs = gpu[2].stats()["libraries"]
    for lib in ("cublaslt", "cudnn"):
        assert libs[lib]["probe"].startswith("absent (") and libs[lib]["choices"] == {}


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_a_faster_library_runs_each_linear_layer_as_one_gemm(stand_in, monkeypatch, act):
    cpu = run("cpu", act)
    fake = library(monkeypatch)
    gpu = run("cuda", act)
    same_as_cpu(gpu, cpu)
    fused = [n for n in gpu[2]._program.graph.nodes if n.op == "matmul_bias_act"]
    # relu layers take the epilogue (their backward reads step(relu(z))); gelu keeps z: BIAS
    assert [n.attrs["act"] for n in fused] == ([act, "relu", "none"] if act == "relu"
                                               else ["none", "relu", "none"])
    choices = gpu[2].stats()["libraries"]["cublaslt"]["choices"]
    assert len(choices) == 3 and all(c["path"] == "cublaslt" and c["why"] == "measured"
                                     for c in choices.values())
    # a measurement each shape in step 1 (1 check + 5 timed), then one GEMM a layer a step
    assert fake.executes == 3 * (1 + gpu_libs.REPS) + 3 * 2
    assert fake.plans == 3


def test_a_slower_library_is_measured_once_and_not_used(stand_in, monkeypatch):
    cpu = run("cpu")
    fake = library(monkeypatch, faster=False)
    gpu = run("cuda")
    same_as_cpu(gpu, cpu)
    choices = gpu[2].stats()["libraries"]["cublaslt"]["choices"]
    assert {c["path"] for c in choices.values()} == {"own"}
    assert all(c["cublaslt_us"] > c["own_us"] for c in choices.values())
    assert fake.executes == 3 * (1 + gpu_libs.REPS)


def cnn():
    sg.manual_seed(0)
    return sg.nn.Sequential(sg.nn.Conv2d(2, 4, 3, padding=1), sg.nn.ReLU(), sg.nn.MaxPool2d(2),
                            sg.nn.Conv2d(4, 6, 3, stride=2, padding=1), sg.nn.ReLU(),
                            sg.nn.Flatten(), sg.nn.Linear(6 * 2 * 2, 3))


def run_cnn(device, steps=3):
    m = cnn().to(device)
    step = sg.compile_step(m, F.cross_entropy,
                           sg.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    rng = np.random.default_rng(3)
    x = sg.tensor(rng.standard_normal((5, 2, 8, 8)).astype(np.float32), device=device)
    y = sg.tensor(rng.integers(0, 3, 5), device=device)
    losses = [float(step(x, y)) for _ in range(steps)]
    return losses, {k: np.asarray(v) for k, v in m.state_dict().items()}, step


def conv_library(monkeypatch, faster=True, mode="ok"):
    fake = fake_gpu_libs.cudnn_module(mode)
    gpu_libs.install("cudnn", fake, "available (fake)")
    monkeypatch.setitem(sys.modules, "nvmath", None)        # cuDNN alone

    def timer(xp, fn):
        before = fake.executes
        fn()
        return (1e-6 if faster else 1e-3) if fake.executes > before else 1e-4
    monkeypatch.setattr(gpu_libs, "timer", timer)
    return fake


@pytest.mark.parametrize("faster", [True, False])
def test_convolutions_through_cudnn_or_the_own_kernels_equal_the_cpu(stand_in, monkeypatch,
                                                                     faster):
    cpu = run_cnn("cpu")
    fake = conv_library(monkeypatch, faster)
    gpu = run_cnn("cuda")
    same_as_cpu(gpu, cpu)
    ops = [n.op for n in gpu[2]._program.graph.nodes]
    # two forwards, two weight gradients, the second conv's input gradient; no im2col left
    assert (ops.count("conv_fprop"), ops.count("conv_wgrad"), ops.count("conv_dgrad"),
            ops.count("im2col"), ops.count("col2im")) == (2, 2, 1, 0, 0)
    choices = gpu[2].stats()["libraries"]["cudnn"]["choices"]
    assert len(choices) == 5
    assert {c["path"] for c in choices.values()} == ({"cudnn"} if faster else {"own"})
    assert fake.graphs == 5 and fake.executes == 5 * (1 + gpu_libs.REPS) + (
        5 * 2 if faster else 0)


@pytest.mark.parametrize("lib, mode, why", [
    ("cublaslt", "raise", "cublaslt failed: RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"),
    ("cublaslt", "wrong", "cublaslt differs from the own kernel"),
    ("cudnn", "raise", "cudnn failed: RuntimeError"),
    ("cudnn", "wrong", "cudnn differs from the own kernel")])
def test_a_failing_or_wrong_library_leaves_the_own_kernels(stand_in, monkeypatch, lib, mode,
                                                           why):
    """The MLP's GEMMs through cuBLASLt, the CNN's convolutions through cuDNN (5 shapes)."""
    step, install = (run, library) if lib == "cublaslt" else (run_cnn, conv_library)
    cpu = step("cpu")
    install(monkeypatch, mode=mode)
    gpu = step("cuda")
    same_as_cpu(gpu, cpu)
    choices = gpu[2].stats()["libraries"][lib]["choices"]
    assert choices and all(c["path"] == "own" and c["why"].startswith(why)
                           for c in choices.values())
    assert lib == "cublaslt" or len(choices) == 5


def test_the_conv_pass_keeps_the_step_s_values():
    m = cnn()
    step = sg.compile_step(m, F.cross_entropy, sg.optim.SGD(m.parameters(), lr=0.1))
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, 3)
    graph, _ = step.graph_for(sg.tensor(x), sg.tensor(y))
    convs = passes.conv_library(graph)
    assert not any(n.op in ("im2col", "col2im") for n in convs.nodes)
    feeds = {k: np.asarray(v) for k, v in m.state_dict().items()}
    feeds.update(x=x, y=y, lr=np.float32(0.1))
    want, got = Interpreter(graph).run(feeds), Interpreter(convs).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_epilogue_pass_keeps_the_step_s_values():
    m = mlp()
    step = sg.compile_step(m, F.cross_entropy, sg.optim.SGD(m.parameters(), lr=0.1))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 12)), rng.integers(0, 4, 5)
    graph, _ = step.graph_for(sg.tensor(x.astype(np.float32)), sg.tensor(y))
    fused = passes.gemm_epilogues(graph)
    ops = [n.op for n in fused.nodes]
    assert ops.count("matmul_bias_act") == 3 and ops.count("relu") == 0
    steps = [n for n in fused.nodes if n.op == "step"]
    assert steps and all(s.inputs[0].op == "matmul_bias_act" for s in steps)
    feeds = {k: np.asarray(v) for k, v in m.state_dict().items()}
    feeds.update(x=x.astype(np.float32), y=y, lr=np.float32(0.1))
    want, got = Interpreter(graph).run(feeds), Interpreter(fused).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", [(128, 784, 512), (1024, 512, 10), (3, 5, 7)])
def test_cublaslt_on_a_gpu_gives_the_own_kernels_values(act, shape):
    """The real library's glue (operand order, bias broadcast, result layout), on a GPU with
    nvmath-python: its product against the own kernels', a Linear's transposed weight."""
    if not D.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    gpu_libs.reset()
    mod, note = gpu_libs.probe("cublaslt")
    if mod is None:
        pytest.skip(note)
    import cupy
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((m, k)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).T
    b = cupy.asarray(rng.standard_normal(n).astype(np.float32))
    lib = gpu_libs.cublaslt_bias_act(cupy, x, w, b, act, cupy.empty((m, n), np.float32))
    want = np.asarray(REF[act](x.get() @ w.get() + b.get()))
    np.testing.assert_allclose(lib.get(), want, rtol=1e-3, atol=1e-3)
    gpu_libs.reset()


REF = {"none": lambda z: z, "relu": lambda z: np.maximum(z, 0),
       "gelu": lambda z: fake_gpu_libs.ACTS["GELU_BIAS"](z)}


@pytest.mark.gpu
@pytest.mark.parametrize("window", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (0, 0))])
def test_cudnn_on_a_gpu_gives_the_own_kernels_values(window):
    """The real cuDNN glue (descriptors, strides, addresses, stream), on a GPU with its
    frontend: each of the three calls against the own kernels'."""
    if not D.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    gpu_libs.reset()
    mod, note = gpu_libs.probe("cudnn")
    if mod is None:
        pytest.skip(note)
    import cupy
    stride, padding = window
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((8, 16, 14, 14)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32))
    gpu_libs.install("cudnn", None, "off: the own kernels")
    y = gpu_ops.conv_fprop(cupy, x, w, stride, padding)
    own = {"fprop": y, "dgrad": gpu_ops.conv_dgrad(cupy, y, w, x.shape, stride, padding),
           "wgrad": gpu_ops.conv_wgrad(cupy, x, y, (3, 3), stride, padding)}
    gpu_libs.reset()
    args = {"fprop": (x, w), "dgrad": (y, w), "wgrad": (x, y)}
    for kind, want in own.items():
        got = gpu_libs.cudnn_conv(cupy, kind, *args[kind], cupy.empty_like(want), stride,
                                  padding)
        # TF32 would show here: the step's own check (1e-4) would then keep the own kernels
        np.testing.assert_allclose(got.get(), want.get(), rtol=1e-3, atol=1e-3, err_msg=kind)
    gpu_libs.reset()


def test_under_autocast_the_libraries_step_aside(stand_in, monkeypatch):
    # bf16 layers are cast around their GEMMs: neither rewrite matches, the own kernels run
    library(monkeypatch)
    gpu_libs.install("cudnn", fake_gpu_libs.cudnn_module(), "available (fake)")
    losses = {}
    for device in ("cpu", "cuda"):
        m = cnn().to(device)
        step = sg.compile_step(m, F.cross_entropy, sg.optim.SGD(m.parameters(), lr=0.05),
                               precision="bf16")
        rng = np.random.default_rng(3)
        x = sg.tensor(rng.standard_normal((5, 2, 8, 8)).astype(np.float32), device=device)
        y = sg.tensor(rng.integers(0, 3, 5), device=device)
        losses[device] = [float(step(x, y)) for _ in range(2)]
    ops = {n.op for n in step._program.graph.nodes}
    assert not ops & {"matmul_bias_act", "conv_fprop", "conv_dgrad", "conv_wgrad"}
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-4)
