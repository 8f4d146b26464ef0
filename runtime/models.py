"""The classifiers a config can name: ``model.kind = "mlp" | "cnn" | "resnet"``, from sg.nn.

Parameter initialisation draws from sg.nn's seeded generator, so the caller seeds it
(``sg.manual_seed(train.seed)``) and every rank builds the same parameters. Imports graph.nn
and runtime.config (for its error type).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from shardgrad.graph import nn
from shardgrad.runtime.config import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _dense(layers: list, width_in: int, widths: Sequence[int], m: Mapping, seed: int) -> int:
    for i, width in enumerate(widths):
        layers.append(nn.Linear(width_in, width))
        if m["batchnorm"]:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[m["activation"]]())
        if m["dropout"]:
            layers.append(nn.Dropout(m["dropout"], seed=seed * 1000 + i))
        width_in = width
    return width_in


def mlp(m: Mapping, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden width, then Linear."""
    layers: list[nn.Module] = [] if len(input_shape) == 1 else [nn.Flatten()]
    width = _dense(layers, math.prod(input_shape), m["hidden"], m, seed)
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def cnn(m: Mapping, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Per entry of ``channels``: Conv2d(3x3, padding 1) -> [BatchNorm2d] -> activation ->
    MaxPool2d(2); then Flatten, the ``hidden`` dense layers and a Linear classifier. For 8x8
    digits and channels [16, 32]: 1x8x8 -> 16x4x4 -> 32x2x2 -> 128 -> ... -> 10."""
    if len(input_shape) != 3:
        raise ConfigError(f"model.kind = 'cnn' needs image input (C, H, W), got shape "
                         f"{tuple(input_shape)}")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in m["channels"]:
        if h < 2 or w < 2:
            raise ConfigError(f"model.channels = {m['channels']}: too many pooling blocks for "
                             f"{tuple(input_shape)[1:]} images")
        layers.append(nn.Conv2d(c, out, 3, padding=1))
        if m["batchnorm"]:
            layers.append(nn.BatchNorm2d(out))
        layers += [ACTIVATIONS[m["activation"]](), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    width = _dense(layers, c * h * w, m["hidden"], m, seed)
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def resnet(m: Mapping, input_shape: Sequence[int], num_classes: int, seed: int = 0
           ) -> nn.Module:
    """sg.nn.ResNet(model.depth, model.width) for (C, H, W) images."""
    if len(input_shape) != 3:
        raise ConfigError(f"model.kind = 'resnet' needs image input (C, H, W), got shape "
                          f"{tuple(input_shape)}")
    if (m["depth"] - 2) % 6:
        raise ConfigError(f"model.depth = {m['depth']}: a ResNet has 6n + 2 layers (8, 14, 20, "
                          f"32, ...)")
    return nn.ResNet(m["depth"], m["width"], input_shape[0], num_classes)


BUILDERS = {"mlp": mlp, "cnn": cnn, "resnet": resnet}
IMAGE_MODELS = ("cnn", "resnet")


def build_model(config: Mapping, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model ``config["model"]`` describes, for inputs of ``input_shape`` (one sample).
    Seed sg.nn first (``sg.manual_seed``): this draws the initial parameters."""
    m = config["model"]
    return BUILDERS[m["kind"]](m, input_shape, num_classes, config["train"]["seed"])


def image_input(config: Mapping) -> bool:
    """Whether the model wants (N, C, H, W) images rather than flat vectors."""
    return config["model"]["kind"] in IMAGE_MODELS


__all__ = ["ACTIVATIONS", "BUILDERS", "IMAGE_MODELS", "build_model", "cnn", "image_input", "mlp",
           "resnet"]
