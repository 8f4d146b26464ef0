"""What a training run shows while it runs: the progress bar (epoch, loss, last test
accuracy), one readable line per epoch on stderr, TensorBoard event files (``log.tensorboard``),
the step timings behind summary.json's ``step_time_s`` and ``samples_per_s``, and each rank's
timeline (``debug.trace``, runtime.trace). The training loop calls one Monitor; only rank 0
shows, every rank writes its own timeline. Imports runtime (config, device, trace).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from shardgrad.runtime import config as cfg
from shardgrad.runtime import device as dev
from shardgrad.runtime import trace

# Figures in metrics.jsonl and summary.json read off the clock: they differ between two runs
# that compute the same thing.
TIMINGS = ("wall_s", "step_time_s", "samples_per_s")


class Monitor:
    """Rank ``rank``'s view of a run of ``total`` steps of ``batch_size`` samples (the global
    batch), starting after ``initial`` steps (a resumed run). Call ``step_begin`` /
    ``step_end`` around each training step, ``record`` with each metrics record, and
    ``close`` at the end; ``summary()`` gives ``step_time_s`` (the median wall time of a
    step on this rank, data loading excluded) and ``samples_per_s`` (the global batch over
    it)."""

    def __init__(self, config: cfg.ConfigLike, out_dir: str | None, rank: int, total: int,
                 initial: int = 0, world_size: int = 1):
        config = cfg.from_dict(config)
        self.rank, self.epochs = rank, config.train.epochs
        self.batch_size = config.train.batch_size
        self.show = rank == 0
        self.steps = initial
        self.tracer = self.trace_path = self._cm = None
        if config.debug.trace and out_dir is not None:
            self.trace_path = os.path.join(out_dir, "trace", f"rank{rank}.json")
            if rank == 0:   # an earlier, larger job's timelines would be merged with these
                for r, path in trace.rank_files(out_dir):
                    if r >= world_size:
                        os.remove(path)
            self._cm = trace.tracing(rank, self.trace_path)
            self.tracer = self._cm.__enter__()
        self.cuda = dev.Device.parse(config.device.type).is_cuda
        self.bar = tqdm(total=total, initial=initial, unit="step", desc="train", leave=False,
                        disable=not self.show or not cfg.progress_enabled())
        self.times: list[float] = []
        self._t0 = 0.0
        self._last = (initial, time.perf_counter())   # (steps, when) at the last record
        self.accuracy: float | None = None
        self.tb = None
        if self.show and out_dir is not None and config.log.tensorboard:
            self.tb = _tensorboard(os.path.join(out_dir, "tensorboard"))

    def epoch_begin(self, epoch: int) -> None:
        """Show the 0-based ``epoch`` on the bar."""
        self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)

    def step_begin(self) -> None:
        if self.tracer is not None:
            self._context = self.tracer.context
            self.tracer.context += (("in", "step"),)   # the graph `shardgrad graph` draws
            if self.cuda:
                self._events = _cuda_event(), _cuda_event()
                self._events[0].record()
        self._t0 = time.perf_counter()

    def step_end(self) -> None:
        t1 = time.perf_counter()
        self.times.append(t1 - self._t0)
        self.steps += 1
        if self.tracer is not None:
            self.tracer.context = self._context
            ns = lambda t: int(t * 1e9)   # perf_counter and perf_counter_ns share a clock
            self.tracer.span("step", "step", ns(self._t0), ns(t1), step=self.steps)
            if self.cuda:
                self._events[1].record()
                self.tracer.gpu_step(self.steps, *self._events)
        self.bar.update(1)

    def data(self, batches):
        """``batches``, each one's loading recorded on the timeline."""
        return trace.traced_iter(batches) if self.tracer is not None else batches

    @contextlib.contextmanager
    def span(self, name: str, cat: str = "host", **args: Any):
        """A context recording ``name`` on the timeline; the nodes run inside (evaluation's)
        carry ``"in": name``."""
        if self.tracer is None:
            yield
            return
        with self.tracer.timed(name, cat, **args), self.tracer.annotate(**{"in": name}):
            yield

    def rate(self, steps: int) -> float:
        """Samples a second since the previous call (data loading and logging included)."""
        done, when = self._last
        now = time.perf_counter()
        self._last = (steps, now)
        return (steps - done) * self.batch_size / max(now - when, 1e-9)

    def record(self, rec: Mapping[str, Any]) -> None:
        """Show a metrics record (``"kind"`` step or epoch) and log it to TensorBoard; an
        epoch record ends with one line on stderr."""
        if not self.show:
            return
        step = rec["step"]
        if rec["kind"] == "step":
            post = {"loss": f"{rec['loss']:.4f}"}
            if self.accuracy is not None:
                post["test_acc"] = f"{self.accuracy:.4f}"
            self.bar.set_postfix(post, refresh=False)
            scalars = {"train/loss": rec["loss"], "train/lr": rec["lr"],
                       "train/samples_per_s": rec.get("samples_per_s")}
        else:
            self.accuracy = rec["test_accuracy"]
            self.bar.set_postfix(test_acc=f"{self.accuracy:.4f}", refresh=False)
            tqdm.write(epoch_line(rec, self.epochs, self.step_time_s()), file=sys.stderr)
            scalars = {"epoch/train_loss": rec["train_loss"],
                       "epoch/test_accuracy": rec["test_accuracy"], "epoch/lr": rec["lr"]}
        if self.tb is not None:
            for tag, value in scalars.items():
                if value is not None:
                    self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def step_time_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def summary(self) -> dict[str, float | None]:
        t = self.step_time_s()
        return {"step_time_s": t, "samples_per_s": self.batch_size / t if t else None}

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


def traced_comm(config: cfg.ConfigLike, comm):
    """``comm``, its calls recorded on the timeline when ``debug.trace`` is on."""
    config = cfg.from_dict(config)
    return trace.TracedComm(comm) if config.debug.trace else comm


def _cuda_event():
    return dev.xp_for("cuda").cuda.Event()   # the CuPy the GPU executor runs on


def epoch_line(rec: Mapping[str, Any], epochs: int, step_time_s: float | None) -> str:
    """``epoch 3/10  step 135  train_loss 0.2109  test_accuracy 0.9610  lr 0.1  4.21 s``,
    with the median step time when known."""
    line = (f"epoch {rec['epoch']}/{epochs}  step {rec['step']}  train_loss "
            f"{rec['train_loss']:.4f}  test_accuracy {rec['test_accuracy']:.4f}  lr "
            f"{rec['lr']:.4g}  {rec['wall_s']:.2f} s")
    return line + (f"  step {step_time_s * 1e3:.2f} ms" if step_time_s else "")


def _tensorboard(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise cfg.ConfigError("log.tensorboard = true needs tensorboardX: pip install "
                              "'shardgrad[tensorboard]' (from a checkout: pip install -e "
                              "'.[tensorboard]')") from None
    return SummaryWriter(logdir)


__all__ = ["TIMINGS", "Monitor", "epoch_line", "traced_comm"]
