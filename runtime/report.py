"""``shardgrad report RUN_DIR``: a finished (or running) run's curves and summary, read from
its metrics.jsonl and summary.json, drawn with matplotlib into RUN_DIR/report.png and
written as RUN_DIR/report.md. Imports runtime.config and matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from shardgrad.runtime.config import ConfigError

# summary.json's figures, in the order report.md lists them
SHOWN = ("test_accuracy", "train_loss", "steps", "epochs", "wall_s", "step_time_s",
         "samples_per_s", "world_size", "num_params", "params_sha256", "resumed_from")


def read_run(run_dir: str) -> tuple[list[dict], dict]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line dropped) and its summary
    ({} while the run has none); ConfigError when the directory holds no run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: not a shardgrad run directory "
                          f"(shardgrad train CONFIG --out {run_dir} writes one)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    summary = {}
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                summary = json.load(f)
            except ValueError as e:
                raise ConfigError(f"{path}: not a shardgrad summary ({e})") from None
        if not isinstance(summary, dict):
            raise ConfigError(f"{path}: not a shardgrad summary (a JSON object)")
    return records, summary


def _series(records: Sequence[Mapping], kind: str, key: str) -> tuple[list, list, list]:
    rows = [r for r in records if r["kind"] == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows], [r["epoch"] for r in rows]


def plot(records: Sequence[Mapping], path: str, title: str) -> None:
    """Loss, test accuracy, learning rate and samples/s against steps (bottom axis) and
    epochs (top axis) as one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("shardgrad report needs matplotlib: pip install 'shardgrad[plot]' "
                          "(from a checkout: pip install -e '.[plot]')") from None
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt

    epochs = [r for r in records if r["kind"] == "epoch"]
    last = max((r["step"] for r in records), default=1)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], "loss", [("step", "loss", "train loss (logged steps)"),
                              ("epoch", "train_loss", "train loss (epoch mean)")]),
        (axes[0, 1], "test accuracy", [("epoch", "test_accuracy", "test accuracy")]),
        (axes[1, 0], "learning rate", [("step", "lr", "lr")]),
        (axes[1, 1], "samples/s", [("step", "samples_per_s", "samples/s (global)")]),
    ]
    for ax, ylabel, lines in panels:
        for kind, key, label in lines:
            xs, ys, _ = _series(records, kind, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "epoch" else None, markersize=3,
                        label=label)
        ax.set_xlim(0, last)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        if epochs:   # the top axis counts epochs at the steps where they ended
            top = ax.secondary_xaxis("top")
            top.set_xticks([r["step"] for r in epochs], [str(r["epoch"]) for r in epochs])
            top.set_xlabel("epoch")
    if not any(_series(records, "step", "samples_per_s")[0]):
        axes[1, 1].text(0.5, 0.5, "no samples/s in metrics.jsonl", ha="center",
                        transform=axes[1, 1].transAxes)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(run_dir: str, records: Sequence[Mapping], summary: Mapping[str, Any]) -> str:
    """report.md: the summary's figures, the epochs as a table and the curves' image."""
    lines = [f"# Run {os.path.basename(os.path.abspath(run_dir))}", ""]
    if summary:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(summary[k])} |" for k in SHOWN if k in summary]
        config = summary.get("config", {})
        p = config.get("parallel", {})
        lines += ["", f"Config: model {config.get('model', {}).get('kind')} "
                      f"{config.get('model', {}).get('hidden')}, batch "
                      f"{config.get('train', {}).get('batch_size')}, dp {p.get('dp')}, "
                      f"pp {p.get('pp')}, device {config.get('device', {}).get('type')}."]
    else:
        lines.append("No summary.json yet: the run has not finished.")
    epochs = [r for r in records if r["kind"] == "epoch"]
    if epochs:
        lines += ["", "| epoch | step | train loss | test accuracy | lr | wall s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['step']} | {_fmt(r['train_loss'])} | "
                  f"{_fmt(r['test_accuracy'])} | {_fmt(r['lr'])} | {_fmt(r['wall_s'])} |"
                  for r in epochs]
    lines += ["", "![curves](report.png)", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(run_dir: str) -> list[str]:
    """Write ``run_dir/report.png`` and ``run_dir/report.md``; returns their paths."""
    records, summary = read_run(run_dir)
    png, md = os.path.join(run_dir, "report.png"), os.path.join(run_dir, "report.md")
    plot(records, png, f"shardgrad run {os.path.basename(os.path.abspath(run_dir))}")
    with open(md, "w") as f:
        f.write(markdown(run_dir, records, summary))
    return [png, md]


__all__ = ["markdown", "plot", "read_run", "report"]
