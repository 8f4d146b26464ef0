"""compile_step on a GPU model (runtime.gpu_step), on the CPU: host_cupy's DeviceArrays stand
for CuPy arrays and host_cuda runs the CUDA kernels. The step owns its state on the
device (the model's tensors are views, state_dict reads them), follows the CPU step's
trajectory for SGD / Adam / AdamW / a custom optimizer / BatchNorm buffers, returns the loss
as a lazy 0-d device Tensor, defers the label check to the loss read, and keeps its per-step
budget: kernel launches, 0 host syncs, 0 uploads, one new Node (the loss's).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import host_cuda  # noqa: E402
import host_cupy  # noqa: E402

import shardgrad as sg  # noqa: E402
from shardgrad.graph import ir  # noqa: E402
from shardgrad.ops import gpu as gpu_ops  # noqa: E402
from shardgrad.runtime import device as D  # noqa: E402
from shardgrad.runtime.comm import SingleProcess  # noqa: E402

F = sg.nn.functional
nn = sg.nn

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def launcher():
    return host_cuda.HostLauncher()


@pytest.fixture
def host(monkeypatch, launcher):
    """The stand-in for CuPy (DeviceArrays, kernels run on the host)."""
    return host_cupy.install(host_cupy.device_module(), monkeypatch, launcher)


@pytest.fixture(params=["host", pytest.param("gpu", marks=pytest.mark.gpu)])
def cuda(request):
    """The array module standing for CuPy: the stand-in, or CuPy on a real GPU."""
    if request.param == "gpu":
        if not D.cuda_available():
            pytest.skip("needs CuPy and a CUDA device")
        import cupy
        return cupy
    return request.getfixturevalue("host")


class Counts:
    """Per-step counts on the stand-in: kernel launches (hand-written and generated kernels,
    plus every array-module call on device arrays, each one kernel or library call on CuPy),
    host syncs (a device value read into Python), uploads (host data given to the device),
    new Node objects and new device arrays (``allocs``: every array that owns its memory,
    whether a function, a ufunc or a method such as ``copy`` made it; views are free)."""

    def __init__(self):
        self.launches = self.syncs = self.uploads = self.nodes = self.allocs = 0

    def __repr__(self):
        return (f"Counts(launches={self.launches}, syncs={self.syncs}, uploads={self.uploads}, "
                f"nodes={self.nodes}, allocs={self.allocs})")


NO_LAUNCH = {"empty", "empty_like", "reshape", "broadcast_to", "transpose", "ravel", "shape",
             "ndim", "size", "result_type", "may_share_memory", "shares_memory", "asarray",
             "array"}


@pytest.fixture
def counts(host, monkeypatch, launcher):
    c = Counts()
    dev = host_cupy.DeviceArray

    def counted(attr):
        def wrap(fn):
            def inner(*a, **k):
                setattr(c, attr, getattr(c, attr) + 1)
                return fn(*a, **k)
            return inner
        return wrap

    for name in ("__array_ufunc__", "__array_function__"):
        monkeypatch.setattr(dev, name, counted("launches")(getattr(dev, name)))
    # the module's functions (cupy.copyto, cupy.sum, ...), but not those that only allocate or
    # make a view: on CuPy they launch nothing
    for name, fn in vars(host).items():
        if getattr(fn, "__qualname__", "").startswith("_creates_on_device") and name not in (
                NO_LAUNCH):
            monkeypatch.setattr(host, name, counted("launches")(fn))
    monkeypatch.setattr(gpu_ops, "launch", counted("launches")(launcher))
    for name in ("item", "get", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(dev, name, counted("syncs")(getattr(dev, name)))
    for name in ("asarray", "array"):
        fn = getattr(host, name)

        def upload(x, *a, _fn=fn, **k):
            if not isinstance(x, dev):
                c.uploads += 1
            return _fn(x, *a, **k)
        monkeypatch.setattr(host, name, upload)
    on_device = host_cupy._on_device

    def counted_on_device(value):       # what functions and ufuncs return, as NumPy made it
        if isinstance(value, np.generic) or (type(value) is np.ndarray and value.base is None):
            c.allocs += 1
        return on_device(value)
    monkeypatch.setattr(host_cupy, "_on_device", counted_on_device)

    def finalize(self, obj):            # methods (copy, astype) make the subclass directly
        if self.base is None:
            c.allocs += 1
    monkeypatch.setattr(dev, "__array_finalize__", finalize, raising=False)
    init = ir.Node.__init__

    def node_init(self, *a, **k):
        c.nodes += 1
        init(self, *a, **k)
    monkeypatch.setattr(ir.Node, "__init__", node_init)
    return c


def mlp(hidden=32, classes=5, d=20):
    sg.manual_seed(0)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def cnn(classes=5):
    sg.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(),
                         nn.Linear(16, classes))


def bn_mlp(classes=5, d=20):
    sg.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))


def batches(shape, n=4, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, shape[0]))
            for _ in range(n)]


class Clipped(sg.optim.SGD):
    """A custom rule (a subclass): the step runs the update traced in the graph."""

    def rule(self, p, g, state, lr, t):
        return p - lr * g.clamp(-0.05, 0.05), {}


def _clipped_sgd(ps):
    opt = sg.optim.SGD(ps, lr=0.5, momentum=0.9)
    opt.max_grad_norm = 0.05          # train.grad_clip: the traced update clips
    return opt


OPTIMIZERS = {
    "sgd": lambda ps: sg.optim.SGD(ps, lr=0.1),
    "momentum-wd": lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda ps: sg.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: sg.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    "adamw": lambda ps: sg.optim.AdamW(ps, lr=0.01),
    "custom": lambda ps: Clipped(ps, lr=0.1),
    "grad-clip": _clipped_sgd,
    # no update kernel of their own: the traced rule runs
    "rmsprop": lambda ps: sg.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda ps: sg.optim.Adagrad(ps, lr=0.1, lr_decay=0.01,
                                           initial_accumulator_value=0.1),
}
PATHS = {"sgd": "flat-sgd", "momentum-wd": "flat-sgd", "nesterov": "flat-sgd",
         "adam": "flat-adam", "adamw": "flat-adam", "custom": "graph-update",
         "grad-clip": "graph-update", "rmsprop": "graph-update", "adagrad": "graph-update"}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_both(cuda, make_model, make_opt, data):
    """The same steps on the CPU step and the GPU step: (losses, model, optimizer, step)."""
    out = {}
    for where in ("cpu", "cuda"):
        model = make_model().to(where)
        opt = make_opt(model.parameters())
        step = sg.compile_step(model, F.cross_entropy, opt)
        feed = (lambda v: cuda.asarray(v)) if where == "cuda" else (lambda v: v)
        losses = [step(feed(x), feed(y)) for x, y in data]
        out[where] = ([float(v) for v in losses], model, opt, step, losses)
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_gpu_step_follows_the_cpu_step(cuda, name):
    out = run_both(cuda, mlp, OPTIMIZERS[name], batches((16, 20)))
    (cpu_losses, cpu_model, cpu_opt, _, _), (losses, model, opt, step, raw) = (
        out["cpu"], out["cuda"])
    assert losses == pytest.approx(cpu_losses, rel=1e-5)
    assert all(isinstance(v, sg.Tensor) and v.shape == () and v.is_cuda for v in raw)
    assert step.stats()["path"] == PATHS[name] and step.stats()["steps"] == 4
    assert opt.t == cpu_opt.t == 4
    want, got = cpu_model.state_dict(), model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert isinstance(got[k], np.ndarray) and rel(got[k], want[k]) < 1e-5, k
    for k, v in cpu_opt.state_dict().items():
        assert rel(opt.state_dict()[k], v) < 1e-4, k
    assert all(p.is_cuda for p in model.parameters())


def test_cnn_and_batchnorm_buffers_follow_the_cpu_step(cuda):
    for make, shape in ((cnn, (8, 1, 8, 8)), (bn_mlp, (16, 20))):
        out = run_both(cuda, make, OPTIMIZERS["momentum-wd"], batches(shape, n=3))
        assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
        want, got = out["cpu"][1].state_dict(), out["cuda"][1].state_dict()
        for k in want:                   # BatchNorm's running statistics included
            assert rel(got[k], want[k]) < 1e-5, (make.__name__, k)


def test_the_model_sees_each_step_and_user_writes_reach_the_step(cuda):
    model = mlp().to("cuda")
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = sg.compile_step(model, F.cross_entropy, opt)
    (x, y), (x2, y2) = batches((16, 20), n=2)
    w = model[0].weight
    step(x, y)
    before = w.numpy().copy()
    node = w.node
    step(x, y)
    assert w.node is node                       # no Node per step: the tensor is a view
    assert not np.array_equal(w.numpy(), before)
    saved = {k: v.copy() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    loss_a = float(step(x2, y2))
    model.load_state_dict(saved)               # a user write between steps is taken in
    opt.load_state_dict(saved_opt)
    assert float(step(x2, y2)) == pytest.approx(loss_a, rel=1e-6)
    assert step.stats()["rebinds"] > 0
    loss = F.cross_entropy(model(sg.tensor(x, device="cuda")), sg.tensor(y, device="cuda"))
    loss.backward()                             # eager use of the same model between steps
    opt.step()
    stepped = w.numpy().copy()
    step(x, y)
    assert not np.array_equal(w.numpy(), stepped)
    step.to_host()                              # evaluation's move to the host, then on again
    assert isinstance(w.data, np.ndarray)
    step(x, y)
    assert w.is_cuda


def test_a_bad_label_is_reported_when_the_loss_is_read(cuda):
    model = mlp().to("cuda")
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches((16, 20), n=1)[0]
    assert float(step(x, y)) > 0
    y = y.copy()
    y[3] = 7
    loss = step(x, y)                           # no sync: the step does not wait to check
    with pytest.raises(ValueError, match="label 7 out of range for 5 classes"):
        float(loss)
    y[3] = -2
    step(x, y)
    later = step(x, y[::-1].copy())             # read after more steps: still reported
    with pytest.raises(ValueError, match="label -2 out of range for 5 classes"):
        later.item()
    assert np.isfinite(float(step(x, np.abs(y))))


# The budgets below are what each step issues on the stand-in, counted per model: the
# executor's kernels (generated fusion groups, hand-written kernels, GEMMs and reductions,
# contiguity no-ops counted too), one copy per gradient into the flat buffer, one update.
# The static memory plan computes the gradients straight into the flat gradient buffer (no
# copy each: 42 -> 37 launches for the MLP) and max pooling's backward reads the forward's
# maxima (no argmax launch: CNN 72 -> 69, one copy of a transposed weight gradient added).
BUDGETS = {  # model, optimizer, batch shape, launches at most, precision
    "mlp-sgd": (mlp, "momentum-wd", (64, 20), 37, "fp32"),
    "mlp-adam": (mlp, "adam", (64, 20), 37, "fp32"),
    "cnn-sgd": (cnn, "momentum-wd", (8, 1, 8, 8), 69, "fp32"),  # 74 before gemm_batch_sums
    # precision="bf16": the matmuls' casts keep the elementwise ops out of fused kernels
    # (the generated kernels take float32/float64), but nothing is allocated either
    "mlp-bf16": (mlp, "momentum-wd", (64, 20), 52, "bf16"),
}


@pytest.mark.parametrize("name", list(BUDGETS))
def test_step_budget(host, counts, name):
    make, opt_name, shape, launches, precision = BUDGETS[name]
    model = make().to("cuda")
    step = sg.compile_step(model, F.cross_entropy, OPTIMIZERS[opt_name](model.parameters()),
                           precision=precision)
    data = [(host.asarray(x), host.asarray(y)) for x, y in batches(shape, n=3)]
    losses = [step(x, y) for x, y in data[:2]]     # warm-up: trace, compile, bind
    before = vars(counts).copy()
    loss = step(*data[2])
    used = {k: v - before[k] for k, v in vars(counts).items()}
    print(name, used, step.stats())
    assert used["syncs"] == 0 and used["uploads"] == 0, used
    assert used["nodes"] <= 1, used                # the loss Tensor's own
    assert used["launches"] <= launches, used
    # the static memory plan: after warm-up a step allocates no device array, every value is
    # computed into a buffer planned once, and buffers share memory by liveness
    assert used["allocs"] == 0, used
    memory = step.stats()["memory"]
    assert memory["unplanned"] == [], memory
    assert memory["peak_bytes"] <= memory["arena_bytes"] < memory["naive_bytes"], memory
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in losses)


# ---- CUDA Graph replay: the control flow, with capture emulated on the stand-in ----------

class _Stream:
    ptr = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def wait_event(self, event):
        pass


class _Event:
    def record(self, stream=None):
        pass


class _Graph:
    """An emulated capture: launching it runs the captured function again (the launches a
    real graph replays), its loss written into the array capture handed out."""

    def __init__(self, fn, loss, corrupt=False):
        self.fn, self.loss, self.corrupt, self.launches = fn, loss, corrupt, 0

    def launch(self, stream=None):
        self.launches += 1
        out = self.fn()
        self.loss[...] = out + 1.0 if self.corrupt else out


@pytest.fixture
def capture(host, monkeypatch):
    """Stream capture on the stand-in: returns the graphs made; ``capture.fail`` / ``.corrupt``
    make the next capture raise or its replay give wrong values."""
    from shardgrad.runtime import gpu_step
    made = []
    cuda = host.cuda
    for k, v in {"Stream": lambda **kw: _Stream(), "Event": lambda **kw: _Event(),
                 "MemoryPool": lambda: type("Pool", (), {"malloc": None})(),
                 "using_allocator": lambda malloc: _Stream(),
                 "get_current_stream": lambda: _Stream()}.items():
        monkeypatch.setattr(cuda, k, v, raising=False)

    def fake(xp, stream, fn):
        if made_opts["fail"]:
            raise RuntimeError("cuBLAS is disabled during stream capture")
        g = _Graph(fn, xp.empty((), np.float32), made_opts["corrupt"])
        made.append(g)
        return g, g.loss
    made_opts = {"fail": False, "corrupt": False}
    monkeypatch.setattr(gpu_step, "_capture", fake)
    made_opts["made"] = made
    return made_opts


@pytest.mark.parametrize("case", ["mlp-momentum", "mlp-adam", "batchnorm"])
def test_a_captured_step_replays_the_cpu_trajectory(host, capture, case):
    make, opt = {"mlp-momentum": (mlp, "nesterov"), "mlp-adam": (mlp, "adam"),
                 "batchnorm": (bn_mlp, "momentum-wd")}[case]
    out = run_both(host, make, OPTIMIZERS[opt], batches((16, 20), n=6))
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    want, got = out["cpu"][1].state_dict(), out["cuda"][1].state_dict()
    for k in want:              # each batch copied in, BatchNorm's statistics updated once
        assert rel(got[k], want[k]) < 1e-5, k
    stats = out["cuda"][3].stats()
    assert stats["cuda_graph"] and stats["graph"] == "captured", stats
    (graph,) = capture["made"]
    assert graph.launches == 6 - 2        # after 2 warm-up steps: checked once, then 3 replays


def test_a_captured_step_replays_the_cublaslt_epilogues(host, capture, monkeypatch):
    # a GPU library that won the measurement (fake_gpu_libs: cuBLASLt's GEMM + epilogue in
    # NumPy) runs inside the captured step and its replays as in plain launches
    import fake_gpu_libs

    from shardgrad.ops import gpu_libs
    fake = fake_gpu_libs.module()
    gpu_libs.install("cublaslt", fake, "available (fake)")
    monkeypatch.setattr(gpu_libs, "timer", _lib_faster(fake))
    try:
        out = run_both(host, mlp, OPTIMIZERS["nesterov"], batches((16, 20), n=6))
        stats = out["cuda"][3].stats()
    finally:
        gpu_libs.reset()
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    assert stats["graph"] == "captured", stats
    choices = stats["libraries"]["cublaslt"]["choices"]
    assert choices and {c["path"] for c in choices.values()} == {"cublaslt"}
    assert capture["made"][0].launches == 6 - 2
    # a layer: its measurement in step 1 (a check and REPS timed calls), then one GEMM in
    # each of steps 2-6, the capture and the plain step its first replay is checked against
    assert fake.executes == len(choices) * (1 + gpu_libs.REPS + 5 + 2)


def _lib_faster(fake):
    def timer(xp, fn):
        before = fake.executes
        fn()
        return 1e-6 if fake.executes > before else 1e-4
    return timer


@pytest.mark.parametrize("how", ["fail", "corrupt"])
def test_a_step_that_cannot_be_captured_runs_plain_launches(host, capture, how):
    capture[how] = True
    out = run_both(host, mlp, OPTIMIZERS["momentum-wd"], batches((16, 20), n=5))
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    want, got = out["cpu"][1].state_dict(), out["cuda"][1].state_dict()
    for k in want:
        assert rel(got[k], want[k]) < 1e-5, k
    stats = out["cuda"][3].stats()
    assert not stats["cuda_graph"]
    assert stats["graph"] == ("not captured: RuntimeError: cuBLAS is disabled during stream "
                              "capture" if how == "fail" else
                              "not captured: the replay differed from plain launches")


def test_capture_is_not_tried_where_it_cannot_work(host):
    model = mlp().to("cuda")
    step = sg.compile_step(model, F.cross_entropy, Clipped(model.parameters(), lr=0.1))
    for x, y in batches((16, 20), n=4):
        step(x, y)
    assert step.stats()["graph"] == "not captured: the traced update reads lr and t from the host"
    model = mlp().to("cuda")
    step = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1))
    for x, y in batches((16, 20), n=4):
        step(x, y)
    assert step.stats()["graph"] == "not captured: this CuPy has no stream capture"
    off = sg.compile_step(model, F.cross_entropy, sg.optim.SGD(model.parameters(), lr=0.1),
                          cuda_graph=False)
    for x, y in batches((16, 20), n=4):
        off(x, y)
    assert off.stats()["graph"] == "off" and not off.stats()["cuda_graph"]


def test_eager_ops_upload_a_python_scalar_once(host, counts):
    x = sg.tensor(np.ones((4, 3), np.float32), device="cuda")
    (x * 0.5 + 1.0).sum().item()
    before = counts.uploads
    for _ in range(5):
        y = (x * 0.5 + 1.0).sum()
    assert counts.uploads == before                 # the 0.5 and the 1.0 are on the device
    assert y.item() == pytest.approx(18.0)
    model = mlp().to("cuda")                         # an eager training step: the optimizer's
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)     # scalars too
    xs, ys = (host.asarray(v) for v in batches((16, 20), n=1)[0])
    for i in range(3):
        if i == 2:
            before = counts.uploads
        opt.zero_grad()
        F.cross_entropy(model(sg.Tensor(sg.tensor(xs).node)), sg.tensor(ys)).backward()
        opt.step()
    assert counts.uploads == before


# ---- eager GPU: the foreach optimizer step ------------------------------------------------------

def _eager_steps(model, opt, data, to):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(sg.tensor(to(x))), sg.tensor(to(y)))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_eager_gpu_step_is_one_launch_for_all_parameters(host, counts, name):
    """opt.step() on GPU parameters: SGD (momentum, Nesterov, weight decay), Adam and AdamW
    update every parameter and its state in place with one multi-tensor kernel launch (the
    pointers are kernel arguments) and upload nothing; the
    trajectory is the CPU eager one's (float64: 1e-10). A custom rule or gradient clipping
    keeps working (the rule's ops run instead)."""
    data = batches((16, 20), n=4)
    runs = {}
    for where in ("cpu", "cuda"):
        model = mlp().to(where)
        for p in model.parameters():               # float64: the rule's order, to 1e-10
            p._set_leaf(p.data.astype(np.float64))
        opt = OPTIMIZERS[name](model.parameters())
        to = (lambda v: host.asarray(v.astype(np.float64) if v.dtype == np.float32 else v)
              ) if where == "cuda" else (lambda v: v.astype(np.float64)
                                         if v.dtype == np.float32 else v)
        losses = _eager_steps(model, opt, data[:3], to)
        x, y = (to(v) for v in data[3])
        opt.zero_grad()
        F.cross_entropy(model(sg.tensor(x)), sg.tensor(y)).backward()
        before = vars(counts).copy()
        opt.step()
        used = {k: v - before[k] for k, v in vars(counts).items()}
        runs[where] = (losses, model.state_dict(), opt.state_dict(), used)
    (cpu_losses, cpu_sd, cpu_osd, _), (losses, sd, osd, used) = runs["cpu"], runs["cuda"]
    print(name, "eager opt.step():", used)
    np.testing.assert_allclose(losses, cpu_losses, rtol=1e-10)
    for k in cpu_sd:
        np.testing.assert_allclose(sd[k], cpu_sd[k], rtol=1e-10, atol=1e-12, err_msg=k)
    for k in cpu_osd:
        np.testing.assert_allclose(osd[k], cpu_osd[k], rtol=1e-10, atol=1e-12, err_msg=k)
    n_params = len(list(mlp().parameters()))
    # Adagrad's decayed lr, lr / (1 + (t - 1) lr_decay), is a new scalar each eager step
    assert used["uploads"] == (name == "adagrad") and used["syncs"] == 0, used
    if PATHS[name] == "graph-update":
        assert used["launches"] > n_params, used       # the rule's ops, one by one
    else:
        assert used["launches"] == 1, used             # budget: one launch for all 6
        assert used["nodes"] == 0, used                # updated in place: no new leaf


# launches of one eager MLP step on the stand-in: 67 with the op-by-op update, 37 with a
# launch a parameter, 32 with the multi-tensor one (1 of them the update)
EAGER_STEP_LAUNCHES = 32


def test_eager_gpu_training_step_budget(host, counts):
    """A whole eager step of the test MLP on the GPU (forward, backward, foreach SGD with
    momentum and weight decay): no upload, one host sync (eager cross_entropy checks its
    labels at the op, so a bad label raises there, as the CPU's), and at most the launches
    counted here."""
    model = mlp().to("cuda")
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    data = [tuple(host.asarray(v) for v in b) for b in batches((16, 20), n=3)]
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = vars(counts).copy()
        opt.zero_grad()
        loss = F.cross_entropy(model(sg.tensor(x)), sg.tensor(y))
        loss.backward()
        opt.step()
    used = {k: v - before[k] for k, v in vars(counts).items()}
    print("eager step:", used)
    assert used["syncs"] <= 1 and used["uploads"] == 0, used
    assert used["launches"] <= EAGER_STEP_LAUNCHES, used
    assert np.isfinite(float(loss))


# ---- data parallelism on the GPU step: the flat gradient buffer allreduced a bucket at a time --

class Replicas(SingleProcess):
    """``world_size`` ranks that hold the same values: an allreduce multiplies by the world
    size, as summing identical replicas would (so the step must give the one-rank result).
    ``calls`` records each allreduce's element count."""

    def __init__(self, world_size: int = 2):
        self.rank, self.world_size, self.calls = 0, world_size, []

    def allreduce_(self, buf, op="sum"):
        assert op == "sum"
        self.calls.append(buf.size)
        buf *= self.world_size
        return buf


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 1024])
def test_a_data_parallel_gpu_step_allreduces_its_flat_gradient_buffer(host, counts,
                                                                      bucket_bytes):
    """compile_step with the DataParallel transform and its communicator on a GPU model: the
    step owns its state (path flat-sgd), computes the gradients and the loss into one flat
    buffer and allreduces it one bucket at a time (never once a parameter), with no host
    sync, upload or allocation of its own; with identical replicas it follows the one-rank
    step."""
    from shardgrad.partition.data_parallel import DataParallel

    data = [(host.asarray(x), host.asarray(y)) for x, y in batches((64, 20), n=3)]
    runs = {}
    for world in (1, 2):
        model = mlp().to("cuda")
        comm = Replicas(world)
        step = sg.compile_step(model, F.cross_entropy, OPTIMIZERS["momentum-wd"](
            model.parameters()), transform=DataParallel(world, bucket_bytes), comm=comm)
        losses = [step(x, y) for x, y in data[:2]]
        before, calls = vars(counts).copy(), len(comm.calls)
        losses.append(step(*data[2]))
        used = {k: v - before[k] for k, v in vars(counts).items()}
        runs[world] = ([float(v) for v in losses], model.state_dict(), step, comm.calls[calls:])
        if world == 2:
            print("dp step:", used, comm.calls[calls:])
            assert used["syncs"] == 0 and used["uploads"] == 0 and used["allocs"] == 0, used
    (one, sd1, _, _), (two, sd2, step, calls) = runs[1], runs[2]
    n = sum(p.size for p in mlp().parameters())
    assert step.stats()["path"] == "flat-sgd"
    assert sum(calls) == n + 1                              # the gradients and the loss
    per_bucket = bucket_bytes // 4
    assert calls == [min(per_bucket, n + 1 - i) for i in range(0, n + 1, per_bucket)]
    assert two == pytest.approx(one, rel=1e-6)
    for k in sd1:
        assert rel(sd2[k], sd1[k]) < 1e-6, k


@pytest.mark.parametrize("make, opt_name, path, per_step", [
    (mlp, "grad-clip", "graph-update", 1),      # the rewritten graph's one bucket
    (mlp, "custom", "graph-update", 1),
    (bn_mlp, "momentum-wd", "flat-sgd", 3),     # the flat buffer and 2 unsynchronised stats
])
def test_data_parallel_gpu_steps_that_update_in_the_graph_or_average_buffers(
        host, make, opt_name, path, per_step):
    """An update traced in the graph (gradient clipping, a custom rule) takes the rewritten
    graph, whose allreduce runs on the step's communicator; batch statistics not
    synchronised in the graph are averaged after the step. Identical replicas give the
    one-rank trajectory."""
    from shardgrad.partition.data_parallel import DataParallel

    data = [(host.asarray(x), host.asarray(y)) for x, y in batches((16, 20), n=3)]
    runs = {}
    for world in (1, 2):
        model = make().to("cuda")
        comm = Replicas(world)
        step = sg.compile_step(model, F.cross_entropy, OPTIMIZERS[opt_name](
            model.parameters()), transform=DataParallel(world, 1 << 20, sync_batchnorm=False)
            if world > 1 else None, comm=comm if world > 1 else None)
        runs[world] = ([float(step(x, y)) for x, y in data], model.state_dict(), step, comm)
    (one, sd1, _, _), (two, sd2, step, comm) = runs[1], runs[2]
    assert step.stats()["path"] == path and len(comm.calls) == 3 * per_step
    assert two == pytest.approx(one, rel=1e-6)
    for k in sd1:
        assert rel(sd2[k], sd1[k]) < 1e-6, k


@pytest.mark.parametrize("make, sync", [(mlp, True), (bn_mlp, False), (bn_mlp, True)])
def test_a_data_parallel_gpu_step_replays_its_capture_and_reduces_after(host, capture, make,
                                                                        sync):
    """The data-parallel step captures its forward and backward (emulated on the stand-in)
    and allreduces the flat buffer after each replay, one collective a bucket, on the
    one-rank trajectory; a graph that communicates itself (batch norm synchronised over the
    ranks) is not captured and says why."""
    from shardgrad.partition.data_parallel import DataParallel

    data = batches((16, 20), n=5)
    runs = {}
    for world in (1, 2):
        model = make().to("cuda")
        comm = Replicas(world)
        step = sg.compile_step(model, F.cross_entropy, OPTIMIZERS["momentum-wd"](
            model.parameters()), transform=DataParallel(world, 1 << 20, sync_batchnorm=sync)
            if world > 1 else None, comm=comm if world > 1 else None)
        runs[world] = ([float(step(host.asarray(x), host.asarray(y))) for x, y in data],
                       model.state_dict(), step, comm)
    (one, sd1, _, _), (two, sd2, step, comm) = runs[1], runs[2]
    assert two == pytest.approx(one, rel=1e-6)
    stats = step.stats()
    if make is bn_mlp and sync:
        # (the running variance differs: the global batch of two replicas holds every row
        # twice, so its unbiased variance divides by 2n - 1, not n - 1)
        assert stats["graph"] == ("not captured: the step's graph communicates (synchronised "
                                  "batch norm statistics)")
        return
    for k in sd1:
        assert rel(sd2[k], sd1[k]) < 1e-6, k
    assert stats["graph"] == "captured" and stats["cuda_graph"], stats
    # a bucket a step, and the 2 unsynchronised batch statistics
    assert len(comm.calls) == 5 * (1 if make is mlp else 3), comm.calls
