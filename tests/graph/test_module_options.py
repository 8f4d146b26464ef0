"""Layer and optimizer options torch users pass, against torch in float64: BatchNorm's
affine / track_running_stats, convolutions' dilation, ModuleDict, Parameter(requires_grad=),
SGD's dampening (eager and compiled)."""

import numpy as np
import pytest
import torch

import shardgrad as sg

RNG = np.random.default_rng(3)


def run_both(sm, tm, x, train=True):
    """Outputs, input and parameter gradients and buffers of sg module ``sm`` (given ``tm``'s
    state) and torch module ``tm`` on ``x``, compared."""
    sm.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    sm.train(train)
    tm.train(train)
    sx, tx = sg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    so, to = sm(sx), tm(tx)
    np.testing.assert_allclose(so.numpy(), to.detach().numpy(), rtol=1e-10, atol=1e-12)
    w = RNG.standard_normal(tuple(to.shape))
    (so * sg.tensor(w)).sum().backward()
    (to * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(sx.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    ours = dict(sm.named_parameters())
    assert set(ours) == {n for n, _ in tm.named_parameters()}
    for n, p in tm.named_parameters():
        np.testing.assert_allclose(ours[n].grad.numpy(), p.grad.numpy(), rtol=1e-10, atol=1e-12)
    buffers = dict(sm.named_buffers())
    for n, b in tm.named_buffers():
        if n.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(buffers[n].numpy(), b.numpy(), rtol=1e-12, err_msg=n)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_affine_and_track_running_stats(affine, track, train):
    sg.set_default_dtype("float64")
    try:
        sm = sg.nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    finally:
        sg.set_default_dtype("float32")
    tm = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).double()
    if affine:
        torch.nn.init.normal_(tm.weight)
        torch.nn.init.normal_(tm.bias)
    run_both(sm, tm, RNG.standard_normal((4, 3, 5, 5)), train)
    assert ("weight" in sm.state_dict()) == affine
    assert ("running_mean" in sm.state_dict()) == track


@pytest.mark.parametrize("kw", [dict(dilation=2), dict(dilation=(2, 1), padding=2, stride=2),
                                dict(dilation=2, padding="same"),
                                dict(dilation=3, groups=2, kernel_size=2, padding="same")])
def test_conv2d_dilation(kw):
    kw = {"kernel_size": 3} | kw
    torch.manual_seed(0)
    tm = torch.nn.Conv2d(4, 6, **kw).double()
    run_both(sg.nn.Conv2d(4, 6, **kw).double(), tm, RNG.standard_normal((2, 4, 11, 10)))


def test_conv1d_dilation():
    torch.manual_seed(0)
    tm = torch.nn.Conv1d(4, 2, 3, padding=2, dilation=2).double()
    run_both(sg.nn.Conv1d(4, 2, 3, padding=2, dilation=2).double(), tm,
             RNG.standard_normal((2, 4, 9)))


def test_module_dict_registers_its_modules():
    class Heads(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = sg.nn.ModuleDict({"a": sg.nn.Linear(3, 2), "b": sg.nn.Linear(3, 1)})
            self.heads["c"] = sg.nn.Linear(3, 4)

        def forward(self, x):
            return sg.cat([h(x) for h in self.heads.values()], dim=1)

    m = Heads()
    assert [n for n, _ in m.named_parameters()] == [f"heads.{k}.{w}" for k in "abc"
                                                    for w in ("weight", "bias")]
    assert m(sg.ones(5, 3)).shape == (5, 7) and list(m.heads) == ["a", "b", "c"]
    assert "b" in m.heads and len(m.heads) == 3
    with pytest.raises(TypeError, match="not a Module instance"):
        m.heads["d"] = 3


def test_frozen_parameter():
    p = sg.nn.Parameter(np.ones(3), requires_grad=False)
    assert not p.requires_grad and p.is_leaf


@pytest.mark.parametrize("kw", [dict(momentum=0.9, dampening=0.5),
                                dict(momentum=0.8, dampening=0.1, weight_decay=0.01)])
def test_sgd_dampening_matches_torch_eager_and_compiled(kw):
    x, y = RNG.standard_normal((8, 4)), RNG.integers(0, 3, 8)
    torch.manual_seed(0)
    tm = torch.nn.Linear(4, 3).double()
    topt = torch.optim.SGD(tm.parameters(), lr=0.1, **kw)
    state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    models = []
    for _ in range(2):
        m = sg.nn.Linear(4, 3).double()
        m.load_state_dict(state)
        models.append((m, sg.optim.SGD(m.parameters(), lr=0.1, **kw)))
    (m1, o1), (m2, o2) = models
    step = sg.compile_step(m1, sg.nn.functional.cross_entropy, o1)
    for _ in range(5):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y)).backward()
        topt.step()
        step(x, y)
        o2.zero_grad()
        sg.nn.functional.cross_entropy(m2(sg.tensor(x)), sg.tensor(y)).backward()
        o2.step()
    for m in (m1, m2):
        np.testing.assert_allclose(m.weight.numpy(), tm.weight.detach().numpy(), rtol=1e-12)


def test_load_state_dict_copies_so_models_loaded_from_one_dict_stay_apart():
    # the arrays were taken as they were: two models (and the dict, and torch's own
    # tensors via .numpy()) shared memory that the in-place eager SGD step then changed
    state = sg.nn.Linear(3, 2).double().state_dict()
    a, b = sg.nn.Linear(3, 2).double(), sg.nn.Linear(3, 2).double()
    a.load_state_dict(state)
    b.load_state_dict(state)
    before = {k: v.copy() for k, v in state.items()}
    opt = sg.optim.SGD(a.parameters(), lr=0.5, momentum=0.9)
    a(sg.ones(4, 3, dtype="float64")).sum().backward()
    opt.step()
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
        np.testing.assert_array_equal(state[k], before[k])
    saved = opt.state_dict()
    opt2 = sg.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(saved)
    momentum = saved["0.momentum_buffer"].copy()
    b(sg.ones(4, 3, dtype="float64")).sum().backward()
    opt2.step()
    np.testing.assert_array_equal(saved["0.momentum_buffer"], momentum)


def test_transformer_encoder_stack_loads_torch_s_state_and_matches():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    tm = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(8).double(),
                                     enable_nested_tensor=False)
    sm = sg.nn.TransformerEncoder(
        sg.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double(), 2,
        norm=sg.nn.LayerNorm(8).double())
    mask = np.zeros((3, 5), bool)
    mask[0, -2:] = True
    x = RNG.standard_normal((3, 5, 8))
    sm.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    got = sm(sg.tensor(x), src_key_padding_mask=sg.tensor(mask))
    want = tm(torch.tensor(x), src_key_padding_mask=torch.tensor(mask))
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert sm.layers[0].linear1.weight is not sm.layers[1].linear1.weight


def test_torch_constructor_flags_people_pass():
    # nn.ReLU(inplace=True) (torchvision-style blocks), Flatten(start, end), LayerNorm(bias=),
    # Embedding.from_pretrained raised TypeError
    for make in [lambda nn: nn.ReLU(inplace=True), lambda nn: nn.LeakyReLU(0.1, inplace=True),
                 lambda nn: nn.SiLU(inplace=True), lambda nn: nn.ELU(inplace=True),
                 lambda nn: nn.ReLU6(inplace=True), lambda nn: nn.Hardtanh(inplace=True),
                 lambda nn: nn.Dropout(0.5, inplace=False), lambda nn: nn.Flatten(0, 1)]:
        sm, tm = make(sg.nn), make(torch.nn)
        tm.eval()
        sm.eval()
        x = RNG.standard_normal((3, 4, 2))
        np.testing.assert_allclose(sm(sg.tensor(x)).numpy(), tm(torch.tensor(x)).numpy(),
                                   rtol=1e-12)
    torch.manual_seed(0)
    tm = torch.nn.LayerNorm(4, bias=False).double()
    torch.nn.init.normal_(tm.weight)
    run_both(sg.nn.LayerNorm(4, bias=False).double(), tm, RNG.standard_normal((3, 4)))
    w = RNG.standard_normal((5, 3))
    e = sg.nn.Embedding.from_pretrained(sg.tensor(w))
    t = torch.nn.Embedding.from_pretrained(torch.tensor(w))
    assert not e.weight.requires_grad
    np.testing.assert_array_equal(e(sg.tensor([4, 0])).numpy(), t(torch.tensor([4, 0])).numpy())
    assert sg.nn.Embedding.from_pretrained(w, freeze=False).weight.requires_grad


@pytest.mark.parametrize("h", [5, 6])
@pytest.mark.parametrize("kw", [dict(kernel_size=2, ceil_mode=True),
                                dict(kernel_size=3, stride=2, ceil_mode=True),
                                dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                dict(kernel_size=3, stride=1, padding=1)])
@pytest.mark.parametrize("layer, extra", [("MaxPool2d", {}), ("AvgPool2d", {}),
                                          ("AvgPool2d", dict(count_include_pad=False))])
def test_pooling_ceil_mode_and_count_include_pad(h, kw, layer, extra):
    x = RNG.standard_normal((2, 3, h, h + 1))
    s, t = sg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    got, want = getattr(sg.nn, layer)(**kw, **extra)(s), getattr(torch.nn, layer)(**kw, **extra)(t)
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-14)
    g = RNG.standard_normal(tuple(want.shape))
    (got * sg.tensor(g)).sum().backward()
    (want * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(s.grad.numpy(), t.grad.numpy(), rtol=1e-12, atol=1e-14)
