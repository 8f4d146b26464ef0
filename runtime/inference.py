"""Using a trained run: rebuild its model from RUN_DIR (summary.json's config and
final.safetensors, or the latest checkpoint), ``evaluate`` it on its test split (top-1/top-5,
per-class accuracy, confusion matrix as text, JSON and a PNG) and ``predict`` labels and
probabilities for an .npz or image files. Imports graph and runtime.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardgrad.graph.nn import Module, manual_seed
from shardgrad.runtime import config as cfg
from shardgrad.runtime import datasets
from shardgrad.runtime.data import DataError, Dataset
from shardgrad.runtime.models import build_model, vocab_size
from shardgrad.runtime.step import Predictor


@dataclass
class Run:
    """A trained run: its config, the model with the trained state (eval mode), its data."""

    config: cfg.Config
    model: Module
    data: Dataset
    weights: str


def _run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a shardgrad summary ({e})") from None
    from shardgrad.runtime.train import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise DataError(f"{run_dir}: no summary.json or checkpoints/epoch_<k>.safetensors: not "
                        f"a shardgrad run directory (shardgrad train CONFIG --out {run_dir})")
    try:
        return json.loads(load_checkpoint(ckpt)[1]["config"])
    except (KeyError, ValueError) as e:
        raise DataError(f"{ckpt}: its metadata lacks the run's config ({e})") from None


def load_run(run_dir: str, overrides: Sequence[str] = ()) -> Run:
    """The model ``run_dir`` trained, with its final (or latest checkpoint's) state, and its
    data (``overrides``: ``--set data....`` items, e.g. another split or data set)."""
    from shardgrad.runtime.train import default_dtype, latest_checkpoint, load_checkpoint, load_data

    if not os.path.isdir(run_dir):
        raise DataError(f"{run_dir}: no such run directory")
    raw = _run_config(run_dir)
    for item in overrides:
        name, value = cfg.parse_set(item)
        section, _, key = name.partition(".")
        if section != "data":
            raise cfg.ConfigError(f"--set {item}: only data.* keys may change for a trained "
                                  f"model")
        raw.setdefault("data", {})[key] = value
    config = cfg.from_dict(raw)
    data = load_data(config)
    weights = os.path.join(run_dir, "final.safetensors")
    if not os.path.isfile(weights):
        weights = latest_checkpoint(run_dir)
        if weights is None:
            raise DataError(f"{run_dir}: no final.safetensors or checkpoint to load")
    tensors, _ = load_checkpoint(weights)
    with default_dtype(config.train.dtype):
        manual_seed(config.train.seed)
        model = build_model(config, data.input_shape, data.num_classes,
                            vocab_size(data.x_train))   # a transformer's, as training drew it
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    except (KeyError, ValueError) as e:
        # with --set data.*: the data, not the weights, is what changed
        cause = (f"the data of --set {' '.join(overrides)} (samples of shape "
                 f"{tuple(data.input_shape)}, {data.num_classes} classes) does not fit "
                 f"{run_dir}'s trained model" if overrides
                 else f"{weights} does not fit the model of {run_dir}'s config")
        raise DataError(f"{cause}: {e.args[0] if e.args else e}") from None
    model.eval()
    return Run(config, model, data, weights)


def logits(run: Run, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """The model's logits for ``x``, in batches (the run's ``train.eval_batch_size``)."""
    from shardgrad.runtime.train import make_executor

    batch_size = batch_size or run.config.train.eval_batch_size
    predict = Predictor(run.model, make_executor(run.config.train.executor))
    parts = [predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, run.data.num_classes))


def metrics(scores: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (top-k for fewer than 5 classes), per-class accuracy (None
    for a class absent from ``y``) and the confusion matrix (rows: true, columns: predicted)."""
    n = len(y)
    pred = scores.argmax(axis=1)
    k = min(5, num_classes)
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (y, pred), 1)
    support = confusion.sum(axis=1)
    return {
        "samples": int(n),
        "top1_accuracy": float((pred == y).sum() / max(n, 1)),
        f"top{k}_accuracy": float((topk == y[:, None]).any(axis=1).sum() / max(n, 1)),
        "per_class_accuracy": [float(confusion[c, c] / support[c]) if support[c] else None
                               for c in range(num_classes)],
        "confusion_matrix": confusion.tolist(),
    }


def confusion_text(confusion: Sequence[Sequence[int]]) -> str:
    """The confusion matrix as aligned text: a row per true class, a column per prediction."""
    m = np.asarray(confusion)
    width = max(len(str(m.max(initial=0))), len(str(len(m) - 1)), 4)
    head = "true\\pred".rjust(9) + "".join(str(c).rjust(width + 1) for c in range(len(m)))
    rows = [str(r).rjust(9) + "".join(str(v).rjust(width + 1) for v in m[r])
            for r in range(len(m))]
    return "\n".join([head, *rows]) + "\n"


def confusion_png(confusion: Sequence[Sequence[int]], path: str, title: str) -> bool:
    """Draw the confusion matrix to ``path`` with matplotlib; False when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    m = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(m), 0.8 + 0.5 * len(m)))
    im = ax.imshow(m, cmap="Blues")
    if len(m) <= 20:
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")
    if len(m) <= 20:
        ax.set_xticks(range(len(m)))
        ax.set_yticks(range(len(m)))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def evaluate(run_dir: str, overrides: Sequence[str] = (), out_dir: str | None = None
             ) -> dict[str, Any]:
    """Evaluate ``run_dir``'s model on its test split; write ``evaluation.json``,
    ``confusion.txt`` and ``confusion.png`` into ``out_dir`` (default ``run_dir``)."""
    run = load_run(run_dir, overrides)
    result = metrics(logits(run, run.data.x_test), run.data.y_test, run.data.num_classes)
    result["weights"] = run.weights
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    text = confusion_text(result["confusion_matrix"])
    with open(os.path.join(out_dir, "confusion.txt"), "w") as f:
        f.write(text)
    png = os.path.join(out_dir, "confusion.png")
    result["confusion_png"] = png if confusion_png(
        result["confusion_matrix"], png, f"{run_dir}: top-1 {result['top1_accuracy']:.4f}") \
        else None
    with open(os.path.join(out_dir, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


def read_inputs(run: Run, inputs: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Samples for the model from an .npy, an .npz (array ``x``, else its only array) or
    image files (converted to the model's channels; their size must be the training
    images'); DataError naming the file or sample that does not fit."""
    shape = run.data.input_shape
    tokens = run.data.x_train.dtype.kind in "iu"     # a text model's integer token ids
    dtype = run.data.x_train.dtype if tokens else run.config.train.dtype
    if len(inputs) == 1 and inputs[0].endswith((".npz", ".npy")):
        path = where = inputs[0]
        x = _read_array(path)
        if x.ndim == 0:
            raise DataError(f"{path}: holds one number; give an array of samples")
        if tokens and x.dtype.kind not in "iu":
            raise DataError(f"{path}: this model takes integer token ids, got {x.dtype}")
        x = (x / 255.0) if x.dtype == np.uint8 and not tokens else x
        names = [f"{path}[{i}]" for i in range(len(x))]
    else:
        missing = [p for p in inputs if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{missing[0]}: no such file")
        if tokens:
            raise DataError("this model takes integer token ids: give an .npz")
        if len(shape) == 3:
            mode = {1: "L", 3: "RGB"}.get(shape[0])
            if mode is None:
                raise DataError(f"this model takes {shape[0]}-channel images: give an .npz")
            x = datasets.read_images(list(inputs), mode)
        else:   # an MLP on images: flattened (C, H, W) rows, as the data sets flatten them
            x = datasets.read_images(list(inputs), "L")
            if x.shape[2] * x.shape[3] * 3 == shape[0]:
                x = datasets.read_images(list(inputs), "RGB")
            x = x.reshape(len(x), -1)
        x, names, where = x / 255.0, list(inputs), inputs[0]
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: samples must be numbers, found dtype {x.dtype}")
    rows = x.reshape(len(x), int(np.prod(x.shape[1:])))
    if not tokens:
        # NaN or infinity would come back as label 0 with NaN probabilities (not even JSON)
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if bad.size:
            raise DataError(f"{names[bad[0]]}: holds NaN or infinite values")
    else:
        vocab = run.config.model.vocab_size or vocab_size(run.data.x_train)
        bad = np.flatnonzero(((rows < 0) | (rows >= vocab)).any(axis=1))
        if bad.size:
            at = bad[0]
            raise DataError(f"{names[at]}: token ids must be in [0, {vocab}) (this model's "
                            f"vocabulary), found {int(x.min())}..{int(x.max())}")
    x = np.asarray(x, dtype)
    flat = int(np.prod(shape))
    if x.ndim >= 2 and int(np.prod(x.shape[1:])) == flat:
        x = x.reshape((len(x), *shape))
    else:
        raise DataError(f"{where}: inputs of shape {x.shape[1:]} do not fit this model's "
                        f"samples of shape {shape}")
    return x, names


def _read_array(path: str) -> np.ndarray:
    """The samples of an .npy file, or of an .npz's array ``x`` (else its only array)."""
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as f:
            names = f.files
            key = "x" if "x" in names else names[0] if len(names) == 1 else None
            if key is not None:
                return f[key]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable {path[-4:]} file ({e})") from None
    raise DataError(f"{path}: holds {names}; name the samples' array x")


def predict(run_dir: str, inputs: Sequence[str]) -> list[dict[str, Any]]:
    """For each input sample: its predicted label and the softmax probabilities."""
    run = load_run(run_dir)
    x, names = read_inputs(run, inputs)
    scores = logits(run, x).astype(np.float64)
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return [{"input": n, "label": int(p.argmax()), "probabilities": [round(float(v), 6)
                                                                    for v in p]}
            for n, p in zip(names, probs, strict=True)]


__all__ = ["Run", "confusion_png", "confusion_text", "evaluate", "load_run",
           "logits", "metrics", "predict", "read_inputs"]
