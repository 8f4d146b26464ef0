"""The classifiers a config can name: ``model.kind = "mlp" | "cnn" | "resnet" |
"transformer"``, from sg.nn.

Parameter initialisation draws from sg.nn's seeded generator, so the caller seeds it
(``sg.manual_seed(train.seed)``) and every rank builds the same parameters. Imports graph.nn
and runtime.config (for its error type).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shardgrad.graph import nn
from shardgrad.graph.tensor import arange
from shardgrad.runtime import config as cfg
from shardgrad.runtime.config import ConfigError, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _dense(layers: list, width_in: int, widths: Sequence[int], m: ModelConfig, seed: int) -> int:
    for i, width in enumerate(widths):
        layers.append(nn.Linear(width_in, width))
        if m.batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[m.activation]())
        if m.dropout:
            layers.append(nn.Dropout(m.dropout, seed=seed * 1000 + i))
        width_in = width
    return width_in


def mlp(m: ModelConfig, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden width, then Linear."""
    layers: list[nn.Module] = [] if len(input_shape) == 1 else [nn.Flatten()]
    width = _dense(layers, math.prod(input_shape), m.hidden, m, seed)
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def cnn(m: ModelConfig, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Per entry of ``channels``: Conv2d(3x3, padding 1) -> [BatchNorm2d] -> activation ->
    MaxPool2d(2); then Flatten, the ``hidden`` dense layers and a Linear classifier. For 8x8
    digits and channels [16, 32]: 1x8x8 -> 16x4x4 -> 32x2x2 -> 128 -> ... -> 10."""
    if len(input_shape) != 3:
        raise ConfigError(f"model.kind = 'cnn' needs image input (C, H, W), got shape "
                         f"{tuple(input_shape)}")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in m.channels:
        if h < 2 or w < 2:
            raise ConfigError(f"model.channels = {m.channels}: too many pooling blocks for "
                             f"{tuple(input_shape)[1:]} images")
        layers.append(nn.Conv2d(c, out, 3, padding=1))
        if m.batchnorm:
            layers.append(nn.BatchNorm2d(out))
        layers += [ACTIVATIONS[m.activation](), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    width = _dense(layers, c * h * w, m.hidden, m, seed)
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class TextTransformer(nn.Module):
    """Token ids (N, T), 0 for padding -> token + learned position embeddings -> ``layers``
    TransformerEncoderLayers (padding masked out) -> mean over the real tokens -> Linear."""

    def __init__(self, vocab: int, length: int, num_classes: int, d_model: int, heads: int,
                 layers: int, ff: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model, padding_idx=0)
        self.positions = nn.Embedding(length, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d_model, num_classes)
        self.length = length

    def forward(self, x):
        pad = x == 0
        h = self.tokens(x) + self.positions(arange(self.length, device=x.device)).unsqueeze(0)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        keep = (x != 0).astype(h.dtype).unsqueeze(-1)
        return self.head((h * keep).sum(1) / keep.sum(1).clip(min=1.0))


def parameter_count(config: cfg.ConfigLike, input_shape: Sequence[int], num_classes: int
                    ) -> int | None:
    """How many parameters ``build_model`` would make, counted without building it (None for
    a kind this does not know): the dense layers' weights and biases (and batch norm's two
    per feature), and for a CNN its convolutions'."""
    config = cfg.from_dict(config)
    m = config.model
    if m.kind == "mlp":
        width, count = math.prod(input_shape), 0
    elif m.kind == "cnn" and len(input_shape) == 3:
        c, h, w = input_shape
        count = 0
        for out in m.channels:
            count += out * c * 9 + out + (2 * out if m.batchnorm else 0)
            c, h, w = out, h // 2, w // 2
        width = c * h * w
    else:
        return None
    for hidden in m.hidden:
        count += width * hidden + hidden + (2 * hidden if m.batchnorm else 0)
        width = hidden
    return count + width * num_classes + num_classes


def memory_limit() -> int | None:
    """The bytes this process may still allocate: the free memory the kernel reports
    (MemAvailable), or less under an address-space limit (``ulimit -v``); None if unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            limits.append(max(soft - used, 0))
    except (OSError, ValueError, ImportError):
        pass
    return min(limits) if limits else None


# Arrays per parameter a training step holds at the least: the parameter, its gradient and
# the optimizer's state (SGD with momentum: 1, Adam/AdamW: 2).
_COPIES = {"sgd": 2, "adam": 4, "adamw": 4}


def check_size(config: cfg.ConfigLike, input_shape: Sequence[int], num_classes: int) -> None:
    """ConfigError, before anything is allocated, when the model's parameters, gradients and
    optimizer state alone would not fit in the memory this process may allocate."""
    config = cfg.from_dict(config)
    count = parameter_count(config, input_shape, num_classes)
    limit = memory_limit()
    if count is None or limit is None:
        return
    t = config.train
    copies = _COPIES.get(t.optimizer, 2) + (1 if t.optimizer == "sgd" and t.momentum
                                               else 0)
    need = count * np.dtype(t.dtype).itemsize * copies
    if need > limit:
        m = config.model
        raise ConfigError(f"model.kind = {m.kind!r} with model.hidden = {m.hidden} makes "
                          f"{count:,} parameters: {need:,} bytes ({need / 2**30:.1f} GiB) for "
                          f"them, their gradients and the optimizer's state in {t.dtype}, "
                          f"more than the {limit:,} bytes ({limit / 2**30:.1f} GiB) this "
                          f"process may allocate (free memory, ulimit -v)")


def resnet(m: ModelConfig, input_shape: Sequence[int], num_classes: int, seed: int = 0
           ) -> nn.Module:
    """sg.nn.ResNet(model.depth, model.width) for (C, H, W) images."""
    if len(input_shape) != 3:
        raise ConfigError(f"model.kind = 'resnet' needs image input (C, H, W), got shape "
                          f"{tuple(input_shape)}")
    if (m.depth - 2) % 6:
        raise ConfigError(f"model.depth = {m.depth}: a ResNet has 6n + 2 layers (8, 14, 20, "
                          f"32, ...)")
    return nn.ResNet(m.depth, m.width, input_shape[0], num_classes)


def transformer(m: ModelConfig, input_shape: Sequence[int], num_classes: int, seed: int = 0,
                vocab: int = 0) -> nn.Module:
    """A text classifier over integer token ids (N, T): see TextTransformer."""
    if len(input_shape) != 1:
        raise ConfigError(f"model.kind = 'transformer' needs token ids (N, T), got samples of "
                          f"shape {tuple(input_shape)}")
    vocab = m.vocab_size or vocab
    if vocab < 1:
        raise ConfigError("model.kind = 'transformer' needs integer token ids (data.dataset = "
                          "'text') or model.vocab_size")
    if m.d_model % m.heads:
        raise ConfigError(f"model.heads = {m.heads} must divide model.d_model = "
                          f"{m.d_model}")
    return TextTransformer(vocab, input_shape[0], num_classes, m.d_model, m.heads,
                           m.layers, m.ff, m.dropout)


BUILDERS = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "transformer": transformer}
IMAGE_MODELS = ("cnn", "resnet")


def vocab_size(x) -> int:
    """The vocabulary integer token ids ``x`` need (largest id + 1); 0 for non-integer data."""
    return int(x.max()) + 1 if x.dtype.kind in "iu" and x.size else 0


def build_model(config: cfg.ConfigLike, input_shape: Sequence[int], num_classes: int,
                vocab: int = 0) -> nn.Module:
    """The model ``config.model`` describes, for inputs of ``input_shape`` (one sample;
    ``vocab``: the token ids' vocabulary, for text). Seed sg.nn first (``sg.manual_seed``):
    this draws the initial parameters. ConfigError when it would not fit in memory
    (``check_size``)."""
    config = cfg.from_dict(config)
    m = config.model
    check_size(config, input_shape, num_classes)
    try:
        if m.kind == "transformer":
            return transformer(m, input_shape, num_classes, config.train.seed, vocab)
        return BUILDERS[m.kind](m, input_shape, num_classes, config.train.seed)
    except MemoryError as e:   # what the estimate does not count (a kind it does not know)
        raise ConfigError(f"the model of this config does not fit in memory: {e}") from None


def image_input(config: cfg.ConfigLike) -> bool:
    """Whether the model wants (N, C, H, W) images rather than flat vectors."""
    config = cfg.from_dict(config)
    return config.model.kind in IMAGE_MODELS


__all__ = ["ACTIVATIONS", "BUILDERS", "IMAGE_MODELS", "TextTransformer", "build_model",
           "check_size", "cnn", "image_input", "memory_limit", "mlp", "parameter_count",
           "resnet", "transformer", "vocab_size"]
