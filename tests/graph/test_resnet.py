"""sg.nn.ResNet against the same network written in torch.nn (float64): train-mode logits and
every parameter's gradient, the running statistics, eval-mode logits after a compiled SGD
step, and the config's model.kind = "resnet"."""

import numpy as np
import pytest
import torch

import shardgrad as sg
from shardgrad.runtime.config import ConfigError, load_config
from shardgrad.runtime.models import build_model

nn = sg.nn


class _TorchBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        T = torch.nn
        self.conv1 = T.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = T.BatchNorm2d(cout)
        self.conv2 = T.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = T.BatchNorm2d(cout)
        self.relu = T.ReLU()
        self.shortcut = (T.Sequential(T.Conv2d(cin, cout, 1, stride, bias=False),
                                      T.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class _TorchPool(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


def _torch_resnet(depth, width, cin, classes):
    T = torch.nn
    n = (depth - 2) // 6
    layers, c = [T.Conv2d(cin, width, 3, 1, 1, bias=False), T.BatchNorm2d(width), T.ReLU()], width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            layers.append(_TorchBlock(c, out, 2 if stage and i == 0 else 1))
            c = out
    return T.Sequential(*layers, _TorchPool(), T.Linear(c, classes)).double()


def _twins(depth=14, width=4, cin=3, classes=5):
    sg.manual_seed(0)
    with_dtype = sg.get_default_dtype()
    sg.set_default_dtype("float64")
    try:
        model = nn.ResNet(depth, width, cin, classes)
    finally:
        sg.set_default_dtype(with_dtype)
    ref = _torch_resnet(depth, width, cin, classes)
    own = model.state_dict()
    assert set(own) == {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}
    with torch.no_grad():
        for k, v in own.items():
            ref.state_dict()[k].copy_(torch.tensor(v))
    return model, ref


def test_resnet_forward_and_gradients_match_torch():
    model, ref = _twins()
    x = np.random.default_rng(1).standard_normal((6, 3, 12, 10))
    y = np.array([0, 1, 2, 3, 4, 0])
    out = model(sg.tensor(x))
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    tout = ref(torch.tensor(x))
    tloss = torch.nn.functional.cross_entropy(tout, torch.tensor(y))
    tloss.backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), grads[name].grad.numpy(), rtol=1e-8,
                                   atol=1e-12, err_msg=name)
    tbuf = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        np.testing.assert_allclose(b.numpy(), tbuf[name].numpy(), rtol=1e-10, err_msg=name)


def test_resnet_compiled_step_then_eval_matches_torch():
    model, ref = _twins(depth=8, width=3, cin=1, classes=4)
    x = np.random.default_rng(2).standard_normal((8, 1, 9, 9))
    y = np.arange(8) % 4
    step = sg.compile_step(model, nn.functional.cross_entropy,
                           sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    topt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        loss = step(x, y)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-9)
    model.eval()
    ref.eval()
    with sg.no_grad(), torch.no_grad():
        np.testing.assert_allclose(model(sg.tensor(x)).numpy(), ref(torch.tensor(x)).numpy(),
                                   rtol=1e-9, atol=1e-12)


def test_resnet_config_and_bad_depth():
    config = load_config(None, ["model.kind='resnet'", "model.depth=14", "model.width=4"])
    model = build_model(config, (1, 28, 28), 10)
    assert isinstance(model, nn.ResNet) and model.depth == 14
    assert sum(isinstance(m, nn.BasicBlock) for m in model.modules()) == 6
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        build_model(load_config(None, ["model.kind='resnet'", "model.depth=10"]), (1, 8, 8), 3)
    with pytest.raises(ConfigError, match="needs image input"):
        build_model(load_config(None, ["model.kind='resnet'"]), (64,), 3)
    with pytest.raises(ValueError, match="depth must be 6n"):
        nn.ResNet(9)
