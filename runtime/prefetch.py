"""The training loop's batches: gathered (and augmented) in a background thread a few
batches ahead of the step, and on a GPU copied to the device there too, so the step never
waits on NumPy indexing or a host-to-device copy it could have overlapped.

Augmentation (random crop after zero padding, horizontal flip) draws one decision per
sample from (seed, epoch), whatever the rank or world size, so data parallelism sees the
same augmented global batch as one process. Imports runtime (data, device).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from shardgrad.runtime import trace
from shardgrad.runtime.data import DistributedSampler, batch_indices

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead (``depth`` 0: in the
    caller's thread). An exception in the producer is raised in the consumer at the item it
    replaced; closing the iterator early (a step that raised) stops the producer."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:   # handed to the consumer, which raises it
            put(_Raised(e))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="shardgrad-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


class Augment:
    """Random crop with ``pad`` pixels of zero padding and/or a horizontal flip, for images
    (N, C, H, W). Sample i of epoch e is cropped at an offset and flipped or not as
    ``default_rng((seed, e))`` decides for index i among ``n`` samples."""

    def __init__(self, n: int, pad: int = 0, flip: bool = False, seed: int = 0):
        self.n, self.pad, self.flip, self.seed = n, pad, flip, seed
        self._epoch, self._draws = None, None

    def __bool__(self) -> bool:
        return bool(self.pad or self.flip)

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            offsets = rng.integers(0, 2 * self.pad + 1, size=(self.n, 2))
            flips = rng.random(self.n) < 0.5 if self.flip else np.zeros(self.n, bool)
            self._epoch, self._draws = epoch, (offsets, flips)
        return self._draws

    def __call__(self, x: np.ndarray, take: np.ndarray, epoch: int) -> np.ndarray:
        offsets, flips = self._draw(epoch)
        h, w = x.shape[-2:]
        p = self.pad
        if p:
            padded = np.pad(x, ((0, 0),) * (x.ndim - 2) + ((p, p), (p, p)))
            out = np.empty_like(x)
            for i, (dy, dx) in enumerate(offsets[take]):
                out[i] = padded[i, ..., dy:dy + h, dx:dx + w]
        else:
            out = x.copy()
        flip = flips[take]
        out[flip] = out[flip][..., ::-1]
        return out


def device_copier(device) -> Callable[[np.ndarray], Any] | None:
    """A function copying a host batch to GPU ``device`` on a stream of its own and waiting
    for it (in the prefetch thread, so the step's stream is not held up), or None for the
    CPU."""
    if device is None or not device.is_cuda:
        return None
    from shardgrad.runtime import device as dev

    cp = dev.xp_for(device)
    index = device.index or 0
    streams: dict[int, Any] = {}

    def copy(a: np.ndarray):
        with cp.cuda.Device(index), trace.span("copy to GPU", "copy", bytes=int(a.nbytes)):
            stream = streams.setdefault(threading.get_ident(), cp.cuda.Stream(non_blocking=True))
            with stream:
                out = cp.asarray(a)
            stream.synchronize()
            return out

    return copy


def epoch_batches(x: np.ndarray, y: np.ndarray, sampler: DistributedSampler, batch_size: int,
                  epoch: int, augment: Augment | None = None,
                  to_device: Callable[[np.ndarray], Any] | None = None
                  ) -> Iterator[tuple[Any, Any]]:
    """This rank's (x, y) batches of ``epoch`` (``batch_size`` is global), as
    runtime.data.batches, augmented and copied to the device when asked."""
    sampler.set_epoch(epoch)
    for take in batch_indices(sampler, batch_size):
        xb, yb = x[take], y[take]
        if augment:
            xb = augment(xb, take, epoch)
        if to_device is not None:
            xb, yb = to_device(xb), to_device(yb)
        yield xb, yb


__all__ = ["Augment", "device_copier", "epoch_batches", "prefetch"]
