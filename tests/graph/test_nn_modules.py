"""sg.nn modules against torch.nn (CPU): tied weights, containers, attribute assignment,
BatchNorm, Conv2d padding and sizes, and the small modules torch code reaches for."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

import shardgrad as sg

nn = sg.nn
F = sg.nn.functional


def _copy_into(torch_model, model):
    """Give ``torch_model`` ``model``'s parameters and buffers (same dotted names)."""
    own = model.state_dict()
    with torch.no_grad():
        for k, v in torch_model.state_dict().items():
            if k in own:
                v.copy_(torch.tensor(own[k]))


def _rng(seed=0):
    return np.random.default_rng(seed)


class _Tied(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.enc = mod.Linear(4, 4)
        self.again = self.enc                 # one module under two attributes
        self.dec = mod.Linear(4, 4)
        self.dec.weight = self.enc.weight     # one Parameter under two names

    def forward(self, x):
        return self.dec(self.again(self.enc(x).tanh()).tanh())


class _TorchTied(torch.nn.Module):
    forward = _Tied.forward

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(4, 4)
        self.again = self.enc
        self.dec = torch.nn.Linear(4, 4)
        self.dec.weight = self.enc.weight


@pytest.mark.parametrize("compiled", [False, True])
def test_tied_weights_update_once_per_step_as_torch(compiled):
    sg.manual_seed(0)
    model, ref = _Tied(nn), _TorchTied()
    _copy_into(ref, model)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    assert len(list(model.modules())) == len(list(ref.modules())) == 3
    opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    step = sg.compile_step(model, F.mse_loss, opt) if compiled else None
    for i in range(3):
        x, y = _rng(i).normal(size=(5, 4)).astype(np.float32), np.zeros((5, 4), np.float32)
        if compiled:
            step(x, y)
        else:
            opt.zero_grad()
            F.mse_loss(model(sg.tensor(x)), sg.tensor(y)).backward()
            opt.step()
        topt.zero_grad()
        torch.nn.functional.mse_loss(ref(torch.tensor(x)), torch.tensor(y)).backward()
        topt.step()
    want = ref.state_dict()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_sequential_takes_an_ordered_dict_and_rejects_what_is_not_a_module():
    seq = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 3)), ("act", nn.ReLU())]))
    assert list(seq.state_dict()) == ["fc.weight", "fc.bias"] and len(seq) == 2
    with pytest.raises(TypeError, match="argument 0 is list"):
        nn.Sequential([nn.Linear(2, 3), nn.ReLU()])
    with pytest.raises(TypeError, match=r"argument 1 is the class .*ReLU"):
        nn.Sequential(nn.Linear(2, 3), nn.ReLU)
    with pytest.raises(TypeError, match="entry 'act'"):
        nn.Sequential(OrderedDict(fc=nn.Linear(2, 3), act=np.zeros(2)))


def test_sequential_slices_iterates_and_appends_as_torch():
    seq = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 4))
    tail = seq[1:]
    assert isinstance(tail, nn.Sequential) and list(tail._modules) == ["1", "2"]
    assert tail[1] is seq[2] and seq[-1] is seq[2]
    assert [type(m).__name__ for m in seq] == ["Linear", "Tanh", "Linear"]
    seq.append(nn.ReLU())
    assert len(seq) == 4 and list(seq._modules)[-1] == "3"
    assert seq(sg.tensor(np.ones((1, 2), np.float32))).shape == (1, 4)


def test_assigning_a_non_parameter_over_a_parameter_is_a_type_error_as_torch():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError) as e:
        m.weight = np.zeros((2, 2))
    assert str(e.value) == ("cannot assign 'numpy.ndarray' as parameter 'weight' "
                            "(sg.nn.Parameter or None expected)")
    seq = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="as child module '0'"):
        setattr(seq, "0", 3)
    m.bias = None                                   # allowed: no bias from now on
    assert [n for n, _ in m.named_parameters()] == ["weight"] and m.bias is None
    assert list(m.state_dict()) == ["weight"]
    m.bias = nn.Parameter(np.ones(2, np.float32))
    assert m.bias is m._parameters["bias"]


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm1d_matches_torch(shape, momentum):
    bn, ref = nn.BatchNorm1d(3, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    for i in range(3):
        x = (_rng(i).normal(size=shape) * (i + 1) + i).astype(np.float32)
        out, want = bn(sg.tensor(x)), ref(torch.tensor(x))
        np.testing.assert_allclose(out.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    for k, v in ref.state_dict().items():
        if k == "num_batches_tracked" and momentum is not None:
            continue                        # torch counts always; sg only when it is used
        np.testing.assert_allclose(bn.state_dict()[k], v.numpy(), rtol=1e-5, err_msg=k)
    bn.eval(), ref.eval()
    x = _rng(9).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(bn(sg.tensor(x)).numpy(), ref(torch.tensor(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_batchnorm_rejects_the_wrong_rank():
    with pytest.raises(ValueError, match=r"expected 4D input \(N, C, H, W\), got shape \(4, 3\)"):
        nn.BatchNorm2d(3)(sg.tensor(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        nn.BatchNorm1d(3)(sg.tensor(np.ones((4, 3, 2, 2), np.float32)))


def test_cumulative_batchnorm_compiled_equals_eager():
    def make():
        sg.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=None), nn.Linear(3, 2))

    compiled, eager = make(), make()
    step = sg.compile_step(compiled, F.mse_loss, sg.optim.SGD(compiled.parameters(), lr=0.1))
    opt = sg.optim.SGD(eager.parameters(), lr=0.1)
    for i in range(3):
        x, y = _rng(i).normal(size=(8, 4)).astype(np.float32), np.zeros((8, 2), np.float32)
        step(x, y)
        opt.zero_grad()
        F.mse_loss(eager(sg.tensor(x)), sg.tensor(y)).backward()
        opt.step()
    want = eager.state_dict()
    assert int(want["1.num_batches_tracked"]) == 3
    for k, v in compiled.state_dict().items():
        np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel", [3, 4, (2, 3)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_string_padding_matches_torch(kernel, padding):
    sg.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding=padding)
    ref = torch.nn.Conv2d(2, 3, kernel, padding=padding)
    _copy_into(ref, conv)
    x = _rng().normal(size=(2, 2, 7, 6)).astype(np.float32)
    out = conv(sg.tensor(x))
    want = ref(torch.tensor(x)).detach().numpy()
    assert out.shape == want.shape
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_conv2d_same_padding_needs_stride_one():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be"):
        nn.Conv2d(3, 4, 3, padding="full")


@pytest.mark.parametrize("make, name", [
    (lambda: nn.Conv2d(3, 0, 3), "out_channels"),
    (lambda: nn.Conv2d(0, 4, 3), "in_channels"),
    (lambda: nn.Conv2d(3, 4, 0), "kernel_size"),
    (lambda: nn.Conv2d(3, 4, (3, -1)), "kernel_size"),
    (lambda: nn.Conv2d(3, 4, 3, stride=0), "stride"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), "padding"),
    (lambda: nn.Linear(0, 4), "in_features"),
    (lambda: nn.Linear(4, -2), "out_features"),
    (lambda: nn.BatchNorm1d(0), "num_features"),
])
def test_non_positive_sizes_are_value_errors_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_module_list_identity_and_tree_walks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 3)])
            self.layers.append(nn.Linear(3, 1))
            self.skip = nn.Identity(54, unused=1)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x).tanh()
            return self.skip(x)

    net = Net()
    assert list(net.state_dict())[:2] == ["layers.0.weight", "layers.0.bias"]
    assert len(net.layers) == 3 and net.layers[-1] is net.layers[2]
    assert isinstance(net.layers[1:], nn.ModuleList) and len(net.layers[1:]) == 2
    assert [n for n, _ in net.named_children()] == ["layers", "skip"]
    assert list(net.children()) == [net.layers, net.skip]
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen == ["Linear", "Linear", "Linear", "ModuleList", "Identity", "Net"]
    with pytest.raises(TypeError, match="entry 3"):
        net.layers.append(nn.Linear)
    x = sg.tensor(np.ones((4, 2), np.float32))
    assert net(x).shape == (4, 1)


def test_requires_grad_freezes_in_eager_and_compiled_steps():
    sg.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    assert model[0].requires_grad_(False) is model[0]
    x, y = _rng().normal(size=(4, 2)).astype(np.float32), np.zeros((4, 1), np.float32)
    F.mse_loss(model(sg.tensor(x)), sg.tensor(y)).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    w0 = model[0].weight.numpy().copy()
    sg.compile_step(model, F.mse_loss, sg.optim.SGD(model.parameters(), lr=0.1))(x, y)
    np.testing.assert_array_equal(model[0].weight.numpy(), w0)
    model.requires_grad_()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("unfreeze", ["module", "attribute"])
def test_unfreezing_after_new_data_records_gradients(unfreeze):
    # frozen, a parameter given new data (a checkpoint, Module.to) was a leaf no more, so
    # unfreezing it only set the flag and backward left its gradient None silently
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    model.load_state_dict(model.state_dict())
    if unfreeze == "module":
        model.requires_grad_()
    else:
        for p in model.parameters():
            p.requires_grad = True
    model(sg.tensor(np.ones((1, 3), np.float32))).sum().backward()
    np.testing.assert_array_equal(model.weight.grad.numpy(), np.ones((2, 3)))
    with pytest.raises(sg.ShapeError, match="only floating-point"):
        sg.tensor([1, 2]).requires_grad = True


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_modules_match_torch(reduction):
    z = _rng().normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 1, 2])
    target = _rng(1).normal(size=(5, 4)).astype(np.float32)
    ce = nn.CrossEntropyLoss(reduction=reduction)(sg.tensor(z), sg.tensor(labels))
    want = torch.nn.CrossEntropyLoss(reduction=reduction)(torch.tensor(z), torch.tensor(labels))
    np.testing.assert_allclose(ce.numpy(), want.numpy(), rtol=1e-5)
    mse = nn.MSELoss(reduction=reduction)(sg.tensor(z), sg.tensor(target))
    want = torch.nn.MSELoss(reduction=reduction)(torch.tensor(z), torch.tensor(target))
    np.testing.assert_allclose(mse.numpy(), want.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        nn.MSELoss(reduction="avg")


def test_module_zero_grad_set_to_none_false_zeroes_as_torch():
    model = nn.Linear(2, 1)
    model(sg.tensor(np.ones((3, 2), np.float32))).sum().backward()
    model.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(model.weight.grad.numpy(), np.zeros((1, 2), np.float32))
    model.zero_grad()
    assert model.weight.grad is None
