"""On a GPU: the GPU executor on whole training steps against the reference interpreter,
DeviceStep's trajectory over several steps, device selection and transfers, and device
buffers through the communicators (pinned staging over in-process ranks, NCCL on one rank).
Skipped where CuPy or a CUDA device is missing.
"""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "ops"))
from cuda_cases import training_graphs  # noqa: E402

from shardgrad.runtime import device as D  # noqa: E402
from shardgrad.runtime.comm import SingleProcess  # noqa: E402
from shardgrad.runtime.interpreter import Interpreter  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not D.cuda_available(), reason="needs CuPy and a CUDA device")]


def rel_err(got, want) -> float:
    got = np.asarray(got.get() if hasattr(got, "get") else got, np.float64)
    want = np.asarray(want.get() if hasattr(want, "get") else want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.fixture(scope="module")
def cases():
    return training_graphs()


def test_device_selection_and_transfers():
    import cupy as cp
    assert D.resolve("cuda", local_rank=0) == D.Device("cuda", 0)
    assert D.xp_for("cuda") is cp
    D.use("cuda:0")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    dx = D.to_device(x, "cuda")
    assert D.is_device_array(dx) and D.array_module(dx) is cp
    assert D.to_device(dx, "cuda") is dx
    D.synchronize()
    np.testing.assert_array_equal(D.to_host(dx), x)
    with pytest.raises(D.DeviceError, match="is not among"):
        D.resolve(f"cuda:{D.device_count()}")


@pytest.mark.parametrize("name", ["mlp-sgd", "mlp-adam", "cnn-sgd"])
def test_gpu_step_matches_interpreter(cases, name):
    from shardgrad.runtime.gpu import GPUExecutor
    graph, feeds = cases[name]
    want = Interpreter(graph, np).run(feeds)
    got = GPUExecutor(graph).run(feeds)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-5, (name, k, rel_err(got[k], want[k]))


@pytest.mark.parametrize("name", ["mlp-adam", "cnn-sgd"])
def test_device_step_follows_the_interpreter(cases, name):
    sys.path.insert(0, str(Path(__file__).parent))
    from device_step import DeviceStep
    graph, feeds = cases[name]
    params = {k: feeds[k] for k in graph.meta["params"]}
    states = {k: feeds[k] for k in graph.meta["states"] if k in feeds}
    step = DeviceStep(graph, params, states)
    ref = Interpreter(graph, np)
    cur = dict(feeds)
    rng = np.random.default_rng(3)
    for t in range(1, 6):
        x = rng.standard_normal(feeds["x"].shape).astype(np.float32)
        y = rng.integers(0, 5, feeds["y"].shape)
        want = ref.run({**cur, "x": x, "y": y, "lr": np.float32(0.05), "t": np.float32(t)})
        assert rel_err(step(x, y, 0.05, t), want["loss"]) <= 1e-5, t
        cur.update({k: want[f"param/{k}"] for k in params})
        cur.update({k: want[f"state/{k}"] for k in states if f"state/{k}" in want})
        for k in params:
            assert rel_err(step.params[k], cur[k]) <= 1e-4, (t, k)


def test_staged_allreduce_of_cupy_buffers_over_threads():
    import cupy as cp

    from shardgrad.runtime.gpu_comm import GPUCommunicator
    from shardgrad.runtime.threadcomm import ThreadGroup
    comms = ThreadGroup(2, timeout_s=20).communicators()
    out = [None, None]

    def rank(r):
        cp.cuda.Device(0).use()
        g = GPUCommunicator(comms[r], cuda_aware=False)
        buf = cp.arange(1000, dtype=cp.float32) * (r + 1)
        g.allreduce_(buf)
        g.bcast_(buf, root=1)
        out[r] = (buf.get(), g.staged_bytes)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank's thread did not end within 60 s"
    for values, staged in out:
        np.testing.assert_array_equal(values, np.arange(1000, dtype=np.float32) * 3)
        assert staged == 8000


def test_nccl_on_one_rank():
    import cupy as cp
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL is not available to CuPy here")
    from shardgrad.runtime.gpu_comm import NCCLCommunicator
    comm = NCCLCommunicator(SingleProcess())
    buf = cp.arange(10, dtype=cp.float32)
    comm.allreduce_(buf)
    comm.bcast_(buf, 0)
    np.testing.assert_array_equal(buf.get(), np.arange(10, dtype=np.float32))
    host = np.ones(3)
    assert comm.allreduce_(host) is host
