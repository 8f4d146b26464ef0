"""Mixed precision (``compile_step(..., precision=)``, ``train.precision``): the autocast
pass puts every float32 matmul (linear layers, conv2d's GEMM, forward and backward) in
bf16/fp16 and leaves the rest float32; the CPU emulates it (rounding around float32 GEMMs);
fp16's dynamic loss scaling skips a step with an inf/NaN gradient and halves the scale, and
doubles it after enough finite steps, as torch's GradScaler; digits accuracy stays within
0.5 points of float32; on the GPU stand-in the GEMMs run in the low dtype itself.
"""

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import host_cupy  # noqa: E402

import shardgrad as sg  # noqa: E402
from shardgrad.graph import passes, trace  # noqa: E402
from shardgrad.graph.ir import Graph, leaf  # noqa: E402
from shardgrad.ops.linalg import matmul  # noqa: E402
from shardgrad.runtime import train as tr  # noqa: E402
from shardgrad.runtime.compiled import compile as compile_graph  # noqa: E402
from shardgrad.runtime.config import ConfigError, load_config  # noqa: E402

F = sg.nn.functional
ROOT = Path(__file__).resolve().parents[2]
LOW = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}

pytestmark = pytest.mark.timeout(300)


def mlp():
    sg.manual_seed(0)
    return sg.nn.Sequential(sg.nn.Linear(20, 32), sg.nn.ReLU(), sg.nn.Linear(32, 5))


def cnn():
    sg.manual_seed(0)
    return sg.nn.Sequential(sg.nn.Conv2d(1, 4, 3, padding=1), sg.nn.ReLU(), sg.nn.MaxPool2d(2),
                            sg.nn.Flatten(), sg.nn.Linear(4 * 4 * 4, 5))


def batch(shape=(16, 20), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 5, shape[0])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_matmul_and_only_matmuls_go_low(precision):
    for make, shape in ((mlp, (16, 20)), (cnn, (4, 1, 8, 8))):
        model = make()
        step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1),
                               precision=precision)
        step(*batch(shape))
        g = step.graph
        low = str(np.dtype(LOW[precision]))
        mms = [n for n in g.nodes if n.op == "matmul"]
        assert len(mms) >= 5 and g.meta["precision"] == precision   # forward and backward
        for n in mms:           # emulated: operands rounded to low and back, product too
            for x in n.inputs:
                assert x.op == "cast" and x.inputs[0].op == "cast" and x.inputs[0].dtype == low
        low_nodes = {n.op for n in g.nodes if n.dtype == low}
        assert low_nodes == {"cast"}                          # nothing else runs in low
        assert all(g.outputs[k].dtype == "float32" for k in g.outputs)


def test_the_emulation_is_a_low_precision_gemm_accumulating_in_float32():
    a = leaf("input", (8, 64), "float32", name="a")
    b = leaf("input", (64, 4), "float32", name="b")
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((8, 64)).astype(np.float32),
             "b": rng.standard_normal((64, 4)).astype(np.float32)}
    for precision, low in LOW.items():
        g = passes.autocast(Graph({"y": matmul(a, b)}), precision, emulate=True)
        got = compile_graph(g).run(feeds)["y"]
        r = {k: v.astype(low).astype(np.float32) for k, v in feeds.items()}
        want = (r["a"] @ r["b"]).astype(low).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, feeds["a"] @ feeds["b"])   # it did round
    assert passes.autocast(g, "fp32") is g


def test_a_bad_precision_is_one_line():
    model = mlp()
    with pytest.raises(ValueError, match=r"^precision = 'fp8': must be one of fp32, bf16, fp16$"):
        sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1),
                        precision="fp8")
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(str(ROOT / "examples" / "digits_mlp.toml"), ['train.precision="fp8"'])
    # fp16's skip reads each rank's own gradients: refused across ranks, with the way out
    with pytest.raises(ConfigError, match=r"^train.precision = 'fp16' \(dynamic loss scaling\) "
                                          r"runs in one process, without accumulation, for "
                                          r"now: use 'bf16'$"):
        tr.train(load_config(str(ROOT / "examples" / "digits_mlp.toml"),
                             ['train.precision="fp16"', "parallel.deterministic=true"]), None)


@pytest.mark.filterwarnings("ignore:overflow|invalid value:RuntimeWarning")   # the overflow itself
def test_fp16_skips_an_overflowing_step_and_halves_the_scale(monkeypatch):
    monkeypatch.setattr(trace, "GROWTH_INTERVAL", 3)
    model = mlp()
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = sg.compile_step(model, F.cross_entropy, opt, precision="fp16")
    x, y = batch()
    assert float(step.loss_scale) == 2.0 ** 16
    step(x, y)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    momentum = opt.state_dict()
    step.loss_scale.data = np.float32(2.0 ** 40)      # scaled gradients overflow float16
    loss = step(x, y)
    assert np.isfinite(loss)                            # the loss itself is not scaled
    assert float(step.loss_scale) == 2.0 ** 39
    for k, v in model.state_dict().items():             # skipped: nothing moved
        np.testing.assert_array_equal(v, before[k])
    for k, v in opt.state_dict().items():
        if k != "step":
            np.testing.assert_array_equal(v, momentum[k])
    step.loss_scale.data = np.float32(8.0)
    for _ in range(3):                                  # GROWTH_INTERVAL finite steps: x2
        step(x, y)
    assert float(step.loss_scale) == 16.0
    assert not np.array_equal(model.state_dict()["0.weight"], before["0.weight"])


def test_fp16_matches_fp32_closely_with_the_scale_unscaled():
    losses = {}
    for precision in ("fp32", "fp16", "bf16"):
        model = mlp()
        step = sg.compile_step(model, F.cross_entropy, sg.optim.Adam(model.parameters()),
                               precision=precision)
        losses[precision] = [step(*batch(seed=s)) for s in range(5)]
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=2e-3)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"] != losses["fp32"]


def test_digits_accuracy_within_half_a_point_of_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    acc = {}
    for precision in ("fp32", "bf16", "fp16"):
        config = load_config(str(ROOT / "examples" / "digits_mlp.toml"),
                             ["train.epochs=5", "device.threads=1",
                              f'train.precision="{precision}"'])
        acc[precision] = tr.train(config, str(tmp_path / precision))["test_accuracy"]
    print(acc)
    assert acc["fp32"] > 0.9
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.005 and abs(acc["fp16"] - acc["fp32"]) <= 0.005


def test_on_the_gpu_stand_in_the_gemms_run_in_the_low_dtype(monkeypatch):
    host_cupy.install(host_cupy.device_module(), monkeypatch)
    x, y = batch()
    got = {}
    for where in ("cpu", "cuda"):
        model = mlp().to(where)
        step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1),
                               precision="fp16")
        got[where] = [float(step(x, y)) for _ in range(3)]
        if where == "cuda":
            mms = [n for n in step.graph.nodes if n.op == "matmul"]
            assert mms and all(n.dtype == "float16" for n in mms)
            assert step.stats()["path"] == "graph-update"     # the skip is in the graph
            assert float(step.loss_scale) == 2.0 ** 16 and step.loss_scale.is_cuda
    assert got["cuda"] == pytest.approx(got["cpu"], rel=1e-2)
