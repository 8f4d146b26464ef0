"""The GPU executor's logic on the CPU: its schedule (fusion groups as one generated kernel
each, hand-written kernels for the ops that have one, views read in place, liveness) runs with
NumPy arrays while host_cuda executes the very CUDA C sources on the host; with
host_cupy standing in for cupy the executor takes its GPU path (hand-written kernels for
softmax, cross-entropy, im2col, pooling). Outputs of whole training steps (MLP, CNN; SGD,
AdamW) must match the reference interpreter, and DeviceStep must follow the same trajectory
over several steps. The same checks on a GPU are in test_gpu_runtime.py.
"""

import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "ops"))
sys.path.insert(0, str(Path(__file__).parent))
import host_cuda  # noqa: E402
import host_cupy  # noqa: E402
from cuda_cases import training_graphs  # noqa: E402
from device_step import DeviceStep  # noqa: E402

from shardgrad.graph.ir import Graph, leaf  # noqa: E402
from shardgrad.graph.passes import fusion_groups  # noqa: E402
from shardgrad.ops import elementwise as E  # noqa: E402
from shardgrad.ops import gpu  # noqa: E402
from shardgrad.ops import shape as S  # noqa: E402
from shardgrad.ops.registry import get, kernel_for  # noqa: E402
from shardgrad.runtime.gpu import FusedKernel, GPUExecutor  # noqa: E402
from shardgrad.runtime.interpreter import ExecutionError, Interpreter  # noqa: E402

pytestmark = [pytest.mark.hostcc,
              pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")]


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
        assert not [op for op in ran_alone if get(op).elementwise], \
            "every elementwise op runs in a fused kernel"


@pytest.mark.parametrize("name", ["mlp-sgd", "mlp-adam", "cnn-sgd"])
def test_gpu_path_matches_interpreter(cases, name):
    graph, feeds = cases[name]
    want = Interpreter(graph, np).run(feeds)
    exe = GPUExecutor(graph, xp=host_cupy.module())
    hand_written = {p[1] for kind, p, _ in exe.actions if kind == "op"
                    if p[1] is get(p[0].op).cuda}
    assert {gpu.cross_entropy, gpu.softmax_xent_grad} <= hand_written
    if name == "cnn-sgd":
        assert {gpu.im2col, gpu.col2im, gpu.max_pool2d, gpu.max_pool2d_grad} <= hand_written
    got = exe.run(feeds)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert rel_err(got[k], want[k]) <= 1e-5, (k, rel_err(got[k], want[k]))


@pytest.mark.parametrize("name", ["mlp-sgd", "mlp-adam", "cnn-sgd"])
def test_a_planned_executor_matches_the_interpreter_and_reuses_memory(cases, name):
    """plan=True: every value computed into a buffer of one arena planned once (liveness
    reuse), gradients named in ``into`` straight into the caller's arrays; the same outputs
    as the interpreter, run after run, in less memory than a buffer per value."""
    graph, feeds = cases[name]
    want = Interpreter(graph, np).run(feeds)
    grads = [k for k in graph.outputs if k.startswith("param/")][:2]
    into = {k: np.full(graph.outputs[k].shape, np.nan, graph.outputs[k].dtype) for k in grads}
    exe = GPUExecutor(graph, xp=host_cupy.module(), plan=True, into=into)
    stats = exe.plan.stats()
    assert stats["peak_bytes"] <= stats["arena_bytes"] < stats["naive_bytes"], stats
    assert set(exe.plan.direct) <= set(into)
    for _ in range(2):                      # a second run over the same arena
        got = exe.run(feeds)
        for k in want:
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
            assert rel_err(got[k], want[k]) <= 1e-5, (k, rel_err(got[k], want[k]))
        for k in exe.plan.direct:
            assert got[k] is into[k] and rel_err(into[k], want[k]) <= 1e-5, k


@pytest.mark.parametrize("axes", [(1, 0), (1, 0, 2, 3), (2, 0, 1)])
def test_fused_kernels_read_transposed_views_in_place(axes):
    shape = (3, 4) if len(axes) == 2 else (2, 3, 4) if len(axes) == 3 else (2, 3, 2, 5)
    x = leaf("input", shape, "float32", name="x")
    view = S.transpose(x, axes)
    c = leaf("input", view.shape[-1:], "float32", name="c")
    graph = Graph({"y": E.relu(view * 2.0 + c)})
    (group,) = fusion_groups(graph)
    kernel = FusedKernel(group)
    assert x in kernel.sources and view not in kernel.sources
    exe = GPUExecutor(graph, xp=np)
    assert [kind for kind, _, _ in exe.actions] == ["leaf", "leaf", "leaf", "group"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32),
             "c": rng.standard_normal(view.shape[-1:]).astype(np.float32)}
    np.testing.assert_allclose(exe.run(feeds)["y"], Interpreter(graph, np).run(feeds)["y"],
                               rtol=1e-6)


def test_transposed_views_are_not_copied_for_their_fused_readers(cases):
    """A transposed matmul product read by a fused group is read as the view (strided), not
    copied first. The step graphs no longer hold one (a Linear weight's gradient is built as
    the product g^T X itself since ops.linalg's VJP for y = W^T), so a graph makes one."""
    a, b = leaf("input", (4, 3), "float32", name="a"), leaf("input", (3, 5), "float32", name="b")
    c = leaf("input", (4,), "float32", name="c")
    t = S.transpose(a @ b, (1, 0))
    graph = Graph({"y": E.relu(t + c) * 2.0})
    exe = GPUExecutor(graph, xp=np)
    outputs = {n.id for n in exe.graph.outputs.values()}
    transposes = [p[0] for kind, p, _ in exe.actions if kind == "op" and p[0].op == "transpose"]
    read_by_groups = {x.id for kind, k, _ in exe.actions if kind == "group"
                      for x in k.group.inputs if x.op == "transpose"}
    assert read_by_groups, "the transposed product feeds the add+relu group"
    assert not [t for t in transposes if t.id in read_by_groups and t.id not in outputs]
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype("float32") for k, s in
             (("a", (4, 3)), ("b", (3, 5)), ("c", (4,)))}
    np.testing.assert_allclose(exe.run(feeds)["y"], Interpreter(graph).run(feeds)["y"],
                               rtol=1e-6)


def test_scalar_feeds_are_uploaded_once_while_unchanged(cases):
    graph, feeds = cases["mlp-adam"]
    exe = GPUExecutor(graph, xp=host_cupy.module())
    lr = next(n for n in exe.graph.nodes if n.op == "input" and n.name == "lr")
    first = exe.leaf(lr, {"lr": np.float32(0.1)})
    assert exe.leaf(lr, {"lr": np.float32(0.1)}) is first
    changed = exe.leaf(lr, {"lr": np.float32(0.2)})
    assert changed is not first and float(changed) == np.float32(0.2)


def test_hand_written_kernels_are_scheduled(cases):
    graph, _ = cases["cnn-sgd"]
    exe = GPUExecutor(graph, xp=np)
    ops = {payload[0].op for kind, payload, _ in exe.actions if kind == "op"}
    assert {"im2col", "col2im", "max_pool2d", "max_pool2d_grad", "cross_entropy",
            "softmax_xent_grad", "matmul"} <= ops
    cupy_like = types.ModuleType("cupy")             # on cupy the CUDA kernel is chosen
    assert kernel_for("im2col", cupy_like) is gpu.im2col
    assert kernel_for("im2col", np) is get("im2col").forward
    assert kernel_for("matmul", cupy_like) is get("matmul").forward


@pytest.mark.parametrize("path", ["generic", "gpu"])
def test_failures_name_the_node(cases, path):
    graph, feeds = cases["mlp-sgd"]
    bad = dict(feeds, y=np.full_like(feeds["y"], 99))
    xp = np if path == "generic" else host_cupy.module()
    with pytest.raises(ExecutionError, match="cross_entropy.*label 99 out of range"):
        GPUExecutor(graph, xp=xp).run(bad)


@pytest.mark.parametrize("path", ["generic", "gpu"])
def test_device_step_follows_the_interpreter(cases, path):
    graph, feeds = cases["mlp-adam"]
    params = {k: feeds[k] for k in graph.meta["params"]}
    states = {k: feeds[k] for k in graph.meta["states"] if k in feeds}
    xp = np if path == "generic" else host_cupy.module()
    step = DeviceStep(graph, params, states, xp=xp)
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


def test_host_launcher_builds_a_library_once_for_ranks_on_threads():
    launcher = host_cuda.HostLauncher()
    code = 'extern "C" __global__ void sg_twice(float* x) { x[0] *= 2; }'
    with ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(lambda _: launcher.library(code), range(4)))
    assert launcher.compiles == 1 and all(lib is libs[0] for lib in libs)
