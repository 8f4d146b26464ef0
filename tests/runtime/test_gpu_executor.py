"""The GPU executor's logic on the CPU: its schedule (fusion groups as one generated kernel
each, hand-written kernels for the ops that have one, liveness) runs with NumPy arrays while
runtime.host_cuda executes the very CUDA C sources on the host. Outputs of whole training
steps (MLP, CNN; SGD, AdamW) must match the reference interpreter, and DeviceStep must follow
the same trajectory over several steps. The same checks on a GPU are in test_gpu_runtime.py.
"""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "ops"))
from cuda_cases import training_graphs  # noqa: E402

from shardgrad.graph.passes import ELEMENTWISE  # noqa: E402
from shardgrad.ops import gpu  # noqa: E402
from shardgrad.ops.registry import get  # noqa: E402
from shardgrad.runtime import host_cuda  # noqa: E402
from shardgrad.runtime.gpu import DeviceStep, GPUExecutor  # noqa: E402
from shardgrad.runtime.interpreter import ExecutionError, Interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def host():
    saved = gpu.launch
    gpu.launch = host_cuda.HostLauncher()
    yield gpu.launch
    gpu.launch = saved


@pytest.fixture(scope="module")
def cases():
    return training_graphs()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("name", ["mlp-sgd", "mlp-adam", "cnn-sgd"])
@pytest.mark.parametrize("fuse", [True, False])
def test_step_matches_interpreter(cases, name, fuse):
    graph, feeds = cases[name]
    want = Interpreter(graph, np).run(feeds)
    exe = GPUExecutor(graph, fuse=fuse, xp=np)
    got = exe.run(feeds)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert rel_err(got[k], want[k]) <= 1e-5, (k, rel_err(got[k], want[k]))
    if fuse:
        assert exe.n_fused >= 5 and len(exe.actions) < len(graph.nodes)
        ran_alone = [p[0].op for kind, p, _ in exe.actions if kind == "op"]
        assert not set(ran_alone) & ELEMENTWISE, "every elementwise op runs in a fused kernel"


def test_hand_written_kernels_are_scheduled(cases):
    graph, _ = cases["cnn-sgd"]
    exe = GPUExecutor(graph, xp=np)
    ops = {payload[0].op for kind, payload, _ in exe.actions if kind == "op"}
    assert {"im2col", "col2im", "max_pool2d", "max_pool2d_grad", "cross_entropy",
            "softmax_xent_grad", "matmul"} <= ops
    cupy_like = types.ModuleType("cupy")             # on cupy the CUDA kernel is chosen
    assert gpu.kernel(get("im2col"), cupy_like) is gpu.im2col
    assert gpu.kernel(get("im2col"), np) is get("im2col").forward
    assert gpu.kernel(get("matmul"), cupy_like) is get("matmul").forward


def test_failures_name_the_node(cases):
    graph, feeds = cases["mlp-sgd"]
    bad = dict(feeds, y=np.full_like(feeds["y"], 99))
    with pytest.raises(ExecutionError, match="cross_entropy.*label 99 out of range"):
        GPUExecutor(graph, xp=np).run(bad)


def test_device_step_follows_the_interpreter(cases):
    graph, feeds = cases["mlp-adam"]
    params = {k: feeds[k] for k in graph.meta["params"]}
    states = {k: feeds[k] for k in graph.meta["states"] if k in feeds}
    step = DeviceStep(graph, params, states, xp=np)
    ref = Interpreter(graph, np)
    cur = dict(feeds)
    rng = np.random.default_rng(7)
    for t in range(1, 4):
        x = rng.standard_normal(feeds["x"].shape).astype(np.float32)
        y = rng.integers(0, 5, feeds["y"].shape)
        want = ref.run({**cur, "x": x, "y": y, "lr": np.float32(0.01), "t": np.float32(t)})
        loss = step(x, y, 0.01, t)
        assert rel_err(loss, want["loss"]) <= 1e-5
        for k in params:
            cur[k] = want[f"param/{k}"]
            assert rel_err(step.params[k], cur[k]) <= 1e-5, k
        for k in states:
            cur[k] = want.get(f"state/{k}", cur[k])
            assert rel_err(step.states[k], cur[k]) <= 1e-5, k
