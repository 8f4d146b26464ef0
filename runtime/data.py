"""Data: scikit-learn's bundled digits, MNIST-format IDX files, and PyTorch's
DistributedSampler rules for seeded, sharded batching.

Everything here returns NumPy arrays; nothing is downloaded. Imports only NumPy, the
standard library and scikit-learn (runtime/ is where files are read).
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """A data file that cannot be read as promised: the message names the file, what was
    expected and what was found."""


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: ``x`` float (N, ...) in [0, 1], ``y`` int64 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A stratified split: within each class, a fixed permutation (``default_rng(seed)``)
    sends the first round(test_fraction * class size) samples to the test set. Both parts
    keep the original sample order, so the split depends on nothing but (y, fraction, seed)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[:round(test_fraction * len(idx))]] = True
    return x[~test], y[~test], x[test], y[test]


def load_digits(dtype="float32", image: bool = False, test_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes, no download).

    Pixels (0..16) are scaled to [0, 1]; ``x`` is (N, 64), or (N, 1, 8, 8) with ``image``.
    The split is ``split(x, y, test_fraction, seed)``: 80/20 stratified by default, i.e.
    1438 train and 359 test samples.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(dtype)
    y = bunch.target.astype(np.int64)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return Dataset(*split(x, y, test_fraction, seed), num_classes=10)


# A generated corpus for text classifiers: sentences of filler words with 1 or 3 sentiment
# words, each negated by a preceding "not" with probability 0.3; the label is the sign of the
# summed polarity. A bag of words cannot tell "not good" from "good", so attention has to.
TEXT_PAD, TEXT_NOT, TEXT_WORDS = 0, 1, 10      # ids: padding, "not", then 10 positive, 10
TEXT_VOCAB = 64                                # negative and the rest filler


def load_text(n: int = 8000, length: int = 16, test_fraction: float = 0.2,
              seed: int = 0) -> Dataset:
    """``n`` generated token-id sentences (int64 (N, length), 0-padded at the end, 6 to
    ``length`` tokens) labelled negative (0) or positive (1); the same for the same ``seed``
    (which also draws the split)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, length), np.int64)
    y = np.zeros(n, np.int64)
    first_filler = 2 + 2 * TEXT_WORDS
    for i in range(n):
        size = int(rng.integers(6, length + 1))
        row = rng.integers(first_filler, TEXT_VOCAB, size)
        k = int(rng.choice([1, 3]))
        spots = np.sort(rng.choice(np.arange(1, size), k, replace=False))
        total = 0
        for at in spots:
            positive = bool(rng.random() < 0.5)
            row[at] = 2 + int(rng.integers(TEXT_WORDS)) + (0 if positive else TEXT_WORDS)
            negated = rng.random() < 0.3 and row[at - 1] >= first_filler
            if negated:
                row[at - 1] = TEXT_NOT
            total += (1 if positive else -1) * (-1 if negated else 1)
        x[i, :size], y[i] = row, int(total > 0)
    return Dataset(*split(x, y, test_fraction, seed), num_classes=2)


# IDX: 2 zero bytes, a type code, the number of dimensions, then each dimension as a
# big-endian uint32, then the data, big-endian (http://yann.lecun.com/exdb/mnist/).
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: gzip data is damaged or truncated ({e})") from None
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (plain or gzip-compressed, detected by content), in
    native byte order. Raises DataError naming the file for a wrong magic number, an
    unknown type code, a truncated header or data, or trailing bytes."""
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header: expected at least 4 bytes, found "
                        f"{len(raw)}")
    if raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file: expected magic bytes 00 00 <type> <ndim>, "
                        f"found {raw[:4].hex(' ')}")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{k:02X} ({np.dtype(v).name})" for k, v in IDX_TYPES.items())
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                        f"found {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dt = np.dtype(IDX_TYPES[code])
    need = header + math.prod(dims) * dt.itemsize
    if len(raw) != need:
        what = "truncated IDX data" if len(raw) < need else "trailing bytes after IDX data"
        raise DataError(f"{path}: {what}: shape {dims} of {dt.name} needs {need} bytes, "
                        f"found {len(raw)}")
    return np.frombuffer(raw, dt, offset=header).reshape(dims).astype(dt.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}.get(array.dtype)
    if code is None:
        raise DataError(f"{path}: IDX cannot store dtype {array.dtype}")
    data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            + array.astype(IDX_TYPES[code]).tobytes())
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _idx_pair(images: str, labels: str, dtype, image: bool, num_classes: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim < 2:
        raise DataError(f"{images}: expected images of shape (N, H, W) or (N, D), found "
                        f"shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{labels}: expected labels of shape (N,), found shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{images} holds no images (its first dimension is 0)")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = (x / scale).astype(dtype)
    if image:
        x = x.reshape(len(x), 1, *x.shape[1:]) if x.ndim == 3 else x
    else:
        x = x.reshape(len(x), -1)
    # the training labels must name every class up to the largest (a stray 200 among 0..9
    # would make a 201-class model); test labels, any of the training's classes
    validate_labels(y, num_classes, labels, complete=num_classes is None)
    return x, y.astype(np.int64)


def load_idx_dataset(images: str, labels: str, test_images: str | None = None,
                     test_labels: str | None = None, dtype="float32", image: bool = False,
                     test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """An MNIST-format data set: uint8 images scaled to [0, 1], flattened to (N, H*W), or
    (N, 1, H, W) with ``image``; labels int64. Without test files the test set is
    ``split(x, y, test_fraction, seed)``."""
    x, y = _idx_pair(images, labels, dtype, image)
    if (test_images is None) != (test_labels is None):
        raise DataError("give both test_images and test_labels, or neither")
    if test_images is None:
        parts = split(x, y, test_fraction, seed)
    else:
        parts = (x, y, *_idx_pair(test_images, test_labels, dtype, image,
                                  int(y.max()) + 1))
        if parts[2].shape[1:] != x.shape[1:]:
            raise DataError(f"{test_images}: test images of shape {parts[2].shape[1:]} differ "
                            f"from the training images' {x.shape[1:]}")
    num_classes = int(max(parts[1].max(initial=0), parts[3].max(initial=0))) + 1
    return Dataset(*parts, num_classes=num_classes)


def validate_labels(y: np.ndarray, num_classes: int | None = None, where: str = "labels",
                    complete: bool = False) -> int:
    """The number of classes of labels ``y``: ``num_classes`` when given, else max(y) + 1.

    Raises DataError naming ``where`` (the file or data set) unless ``y`` is one integer label
    per sample, each in [0, num_classes): float labels, negative labels and labels past the
    last class are refused here, at load, rather than failing inside the loss later. With
    ``complete`` (and no ``num_classes``), every class from 0 to the largest label must occur.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,), found shape {y.shape}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DataError(f"{where}: label {float(y[bad[0]])!r} at index {bad[0]} is not a "
                            f"whole number; labels must be integers (class indices)")
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "b" and y.size == 0):
        raise DataError(f"{where}: labels must be integers (class indices), found dtype "
                        f"{y.dtype}")
    if num_classes is not None and num_classes < 1:
        raise DataError(f"{where}: num_classes must be at least 1, got {num_classes}")
    if y.size == 0:
        return num_classes or 0
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        at = int(np.flatnonzero(y < 0)[0])
        raise DataError(f"{where}: label {int(y[at])} at index {at} is negative; labels must "
                        f"be class indices in [0, num_classes)")
    if num_classes is not None and hi >= num_classes:
        at = int(np.flatnonzero(y >= num_classes)[0])
        raise DataError(f"{where}: label {int(y[at])} at index {at} is out of range for "
                        f"{num_classes} classes (labels must be in [0, {num_classes}))")
    classes = np.unique(y) if complete and num_classes is None else None
    if classes is not None and len(classes) != hi + 1:
        gaps = np.flatnonzero(classes != np.arange(len(classes)))
        first = int(gaps[0]) if gaps.size else len(classes)
        raise DataError(f"{where}: label {hi} at index {int(np.argmax(y))}, but "
                        f"{hi + 1 - len(classes)} class(es) below it never occur (first: "
                        f"{first}); labels must be 0..K-1 with every class present")
    return num_classes if num_classes is not None else hi + 1


class DistributedSampler:
    """The indices one rank reads each epoch, by the rules of PyTorch's
    ``torch.utils.data.DistributedSampler``:

    - every rank draws the same permutation of ``range(n)``, seeded by ``seed + epoch``
      (``set_epoch`` changes it; NumPy's ``default_rng`` stands in for torch's generator);
    - unless ``drop_last``, the list is padded by repeating its head until its length is
      a multiple of ``world_size``; with ``drop_last`` the tail is cut instead;
    - rank ``r`` takes ``indices[r::world_size]``, so all ranks get ``len(self)`` indices.
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if n < 1:
            raise ValueError(f"cannot sample from an empty data set (n={n})")
        self.n, self.world_size, self.rank = n, world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if drop_last and n % world_size:
            self.num_samples = math.ceil((n - world_size) / world_size)
        else:
            self.num_samples = math.ceil(n / world_size)
        self.total_size = self.num_samples * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def global_indices(self) -> np.ndarray:
        """The padded (or cut) epoch order shared by all ranks, before striding."""
        if self.shuffle:
            idx = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        else:
            idx = np.arange(self.n)
        if self.drop_last:
            return idx[:self.total_size]
        pad = self.total_size - len(idx)
        return np.concatenate([idx, np.resize(idx, pad)]) if pad else idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def indices(self) -> np.ndarray:
        return self.global_indices()[self.rank:self.total_size:self.world_size]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Global steps per epoch for ``n`` samples and a global ``batch_size``."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_indices(sampler: DistributedSampler, batch_size: int, drop_last: bool = True
                  ) -> Iterator[np.ndarray]:
    """The sample indices of this rank's batches for the sampler's current epoch.

    ``batch_size`` is the GLOBAL batch size; each rank takes batch_size / world_size indices.
    Global batch b is positions [b*B, (b+1)*B) of ``sampler.global_indices()``, split across
    ranks by the sampler's stride. With ``drop_last`` only the n // B full batches are made,
    so padding never enters a batch and every global batch holds the same samples whatever
    the world size.
    """
    world = sampler.world_size
    if batch_size < world or batch_size % world:
        raise ValueError(f"global batch size {batch_size} must be a positive multiple of the "
                         f"world size {world}")
    local = batch_size // world
    idx = sampler.indices()
    for b in range(num_batches(sampler.n, batch_size, drop_last)):
        yield idx[b * local:(b + 1) * local]


def batches(x: np.ndarray, y: np.ndarray, sampler: DistributedSampler, batch_size: int,
            drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This rank's (x, y) batches for the sampler's current epoch, by ``batch_indices``
    (``batch_size`` is global)."""
    for take in batch_indices(sampler, batch_size, drop_last):
        yield x[take], y[take]


__all__ = ["DataError", "Dataset", "DistributedSampler", "batch_indices", "batches",
           "load_digits", "load_idx_dataset", "num_batches", "read_idx", "split",
           "validate_labels", "write_idx"]
