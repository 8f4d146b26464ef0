"""``sg.utils.data``: TensorDataset and DataLoader, as torch.utils.data users write them.

Batches are NumPy arrays (arrays on a GPU stay there), not Tensors: compile_step, the
data-parallel step and eager modules all take them as they are, with no copy. The order is
runtime.data's: a DistributedSampler (this process alone when none is given) cut into
batches by ``batch_indices``. Imports graph.tensor and runtime (data, device).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from shardgrad.graph.tensor import Tensor
from shardgrad.runtime.data import DistributedSampler, batch_indices, num_batches
from shardgrad.runtime.device import is_device_array


def _array(t):
    if isinstance(t, Tensor):
        return t.data
    return t if is_device_array(t) else np.asarray(t)


class Dataset:
    """Base class of map-style data sets, as torch's: define ``__len__`` and ``__getitem__``
    (a sample: an array, a number, or a tuple, list or dict of them)."""

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} does not define __getitem__")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not define __len__")


class Subset(Dataset):
    """The samples of ``dataset`` at ``indices``, in that order."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __getitem__(self, index):
        if isinstance(index, list | np.ndarray):
            return self.dataset[[self.indices[int(i)] for i in index]]
        return self.dataset[self.indices[index]]

    def __len__(self) -> int:
        return len(self.indices)


def random_split(dataset, lengths, seed: int | None = None) -> list[Subset]:
    """Disjoint random Subsets of the given lengths (or fractions summing to 1, the remainder
    spread one each from the first), as torch.utils.data.random_split; ``seed`` fixes the
    permutation (torch's ``generator=``)."""
    n = len(dataset)
    lengths = list(lengths)
    if lengths and all(0 <= f <= 1 for f in lengths) and abs(sum(lengths) - 1) < 1e-9 and (
            sum(lengths) != n):
        counts = [int(np.floor(n * f)) for f in lengths]
        for i in range(n - sum(counts)):
            counts[i % len(counts)] += 1
        lengths = counts
    if sum(lengths) != n:
        raise ValueError("Sum of input lengths does not equal the length of the input dataset!")
    order = np.random.default_rng(seed).permutation(n)
    ends = np.cumsum(lengths)
    return [Subset(dataset, order[e - k:e]) for k, e in zip(lengths, ends, strict=True)]


def default_collate(samples: list):
    """A batch from a list of samples, as torch's default_collate: arrays and numbers
    stacked (a new first axis), tuples and lists field by field, dicts key by key."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: default_collate([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple | list):
        fields = [default_collate(list(f)) for f in zip(*samples, strict=True)]
        return tuple(fields) if isinstance(first, tuple) else fields
    return np.stack([_array(v) for v in samples])


class TensorDataset(Dataset):
    """Sample i is ``(t[i] for t in tensors)``: arrays or Tensors of one length, kept as
    arrays in ``tensors``."""

    def __init__(self, *tensors):
        self.tensors = tuple(_array(t) for t in tensors)
        if not self.tensors or any(t.ndim == 0 or len(t) != len(self.tensors[0])
                                   for t in self.tensors):
            raise ValueError(f"Size mismatch between tensors: TensorDataset needs arrays of "
                             f"one length, got shapes {[t.shape for t in self.tensors]}")

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])


class DataLoader:
    """Batches of ``dataset`` (a TensorDataset, or anything with ``len`` and ``[i]``), made
    by ``collate_fn`` from a list of samples (default_collate: stacked arrays, tuples and
    dicts of them).

    ``shuffle``: a new order each pass (epoch), drawn from ``seed`` and the pass number, so a
    seeded loader repeats its orders; with ``seed=None`` one is drawn at random when the
    loader is made. ``sampler``: a runtime.data.DistributedSampler for data-parallel scripts
    (exclusive with ``shuffle``; call its ``set_epoch`` each epoch, as in torch). Then
    ``batch_size`` is this rank's, as in torch, and the batches are those of
    runtime.data.batches for the global batch ``batch_size * world_size``: with ``drop_last``
    a last batch only the sampler's padding would fill is dropped too, so every global batch
    holds distinct samples.
    """

    def __init__(self, dataset, batch_size: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None,
                 sampler: DistributedSampler | None = None, collate_fn=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size should be a positive integer value, but got "
                             f"batch_size={batch_size}")
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.collate_fn = collate_fn or default_collate
        self._own_sampler = sampler is None
        if sampler is None:
            seed = int(np.random.SeedSequence().entropy) if seed is None else seed
            sampler = DistributedSampler(len(dataset), shuffle=shuffle, seed=seed)
        elif not isinstance(sampler, DistributedSampler):
            raise TypeError(f"sampler must be a runtime.data.DistributedSampler, got "
                            f"{type(sampler).__name__}")
        elif sampler.n != len(dataset):
            raise ValueError(f"the sampler draws from {sampler.n} samples but the dataset "
                             f"holds {len(dataset)}")
        self.sampler = sampler

    def __len__(self) -> int:
        return num_batches(self.sampler.n, self.batch_size * self.sampler.world_size,
                           self.drop_last)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        takes = list(batch_indices(self.sampler, self.batch_size * self.sampler.world_size,
                                   self.drop_last))
        if self._own_sampler:
            self.sampler.set_epoch(self.sampler.epoch + 1)   # the next pass, a new order
        return (self._fetch(take) for take in takes)

    def _fetch(self, take: np.ndarray) -> Any:
        if isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate:
            return self.dataset[take]
        # sample by sample, then collated: a dataset of single arrays gave their elements
        # as fields (a tuple of columns) instead of one stacked batch
        return self.collate_fn([self.dataset[int(i)] for i in take])


__all__ = ["DataLoader", "Dataset", "Subset", "TensorDataset", "default_collate", "random_split"]
