"""ResNet for small images (He et al. 2016, section 4.2: the CIFAR-10 networks): a 3x3 stem,
three stages of basic residual blocks at widths w, 2w, 4w (the last two halve the image),
global average pooling and a linear classifier; depth = 6n + 2 for n blocks a stage.
Imports graph.nn's modules only.
"""

from __future__ import annotations

from shardgrad.graph.nn import (
    BatchNorm2d,
    Conv2d,
    Linear,
    Module,
    ReLU,
    Sequential,
)


class BasicBlock(Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)), the shortcut a strided 1x1
    convolution with batch norm where the shape changes (the paper's option B), else x."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.relu = ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential(Conv2d(in_channels, out_channels, 1, stride=stride,
                                              bias=False), BatchNorm2d(out_channels))
        else:
            self.shortcut = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class GlobalAvgPool(Module):
    """(N, C, H, W) -> (N, C): the mean over each channel's positions."""

    def forward(self, x):
        return x.mean(axis=(2, 3))


class ResNet(Sequential):
    """``ResNet(depth=20, width=16)`` is the paper's ResNet-20 for 3x32x32 images; any
    (C, H, W) input works (28x28 MNIST: 28 -> 14 -> 7 before pooling). A Sequential of stem,
    blocks, pooling and classifier, so pipelines can cut it between blocks."""

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 3,
                 num_classes: int = 10):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), "
                             f"got {depth}")
        if width < 1:
            raise ValueError(f"ResNet: width must be positive, got {width}")
        n = (depth - 2) // 6
        layers: list[Module] = [Conv2d(in_channels, width, 3, padding=1, bias=False),
                                BatchNorm2d(width), ReLU()]
        c = width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(c, out, stride=2 if stage and i == 0 else 1))
                c = out
        super().__init__(*layers, GlobalAvgPool(), Linear(c, num_classes))
        self.depth, self.width = depth, width


__all__ = ["BasicBlock", "GlobalAvgPool", "ResNet"]
