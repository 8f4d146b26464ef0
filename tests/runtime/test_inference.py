"""Using a trained run: ``shardgrad evaluate`` (its top-1 is summary.json's test_accuracy;
top-5, per-class accuracy, the confusion matrix as JSON, text and PNG), ``predict`` (.npz and
image files) and ``export --format onnx`` (onnxruntime gives the same logits within 1e-5 on
the whole test set, float32), for mlp, cnn, resnet and transformer (text) runs."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from shardgrad.cli import main
from shardgrad.runtime.config import load_config
from shardgrad.runtime.inference import load_run, logits, metrics
from shardgrad.runtime.train import load_data, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = {
    "mlp": ["model.kind='mlp'", "model.hidden=[32]", "model.batchnorm=true",
            "model.activation='gelu'"],
    "cnn": ["model.kind='cnn'", "model.channels=[4, 8]", "model.hidden=[16]",
            "model.batchnorm=true"],
    "resnet": ["model.kind='resnet'", "model.depth=8", "model.width=4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind, sets in RUNS.items():
        out[kind] = str(root / kind)
        train(load_config(None, sets + ["train.epochs=2", "train.lr=0.05", "train.momentum=0.9",
                                        "data.prefetch=0"]), out[kind])
    return out


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_evaluate_top1_is_the_summary_accuracy(runs, kind, tmp_path, capsys):
    run_dir = runs[kind]
    assert main(["evaluate", run_dir, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    shown = json.loads(printed[-1])
    result = json.loads((tmp_path / "evaluation.json").read_text())
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert result["top1_accuracy"] == json.load(f)["test_accuracy"] == shown["top1_accuracy"]
    m = np.asarray(result["confusion_matrix"])
    assert m.sum() == result["samples"] == 359
    assert np.trace(m) / m.sum() == pytest.approx(result["top1_accuracy"])
    per_class = np.diag(m) / m.sum(axis=1)
    np.testing.assert_allclose(result["per_class_accuracy"], per_class)
    assert result["top5_accuracy"] >= result["top1_accuracy"]
    assert (tmp_path / "confusion.txt").read_text().splitlines()[0].startswith("true\\pred")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_top5_and_absent_class():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    r = metrics(scores, np.array([1, 2, 2]), 4)
    assert r["top1_accuracy"] == pytest.approx(2 / 3)
    assert r["top4_accuracy"] == 1.0
    assert r["per_class_accuracy"] == [None, 1.0, 0.5, None]
    assert r["confusion_matrix"][2] == [1, 0, 1, 0]


def test_evaluate_refuses_non_data_keys(runs, capsys, tmp_path):
    assert main(["evaluate", runs["mlp"], "--set", "data.test_fraction=0.5", "--out",
                 str(tmp_path)]) == 0                      # another split: data.* may change
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["samples"] == len(load_data(load_config(None, ["data.test_fraction=0.5"]))
                                   .y_test) > 359
    assert main(["evaluate", runs["mlp"], "--set", "train.lr=1"]) == 2
    assert "only data.* keys" in capsys.readouterr().err
    assert main(["evaluate", "/nonexistent/run"]) == 2


def test_predict_npz_and_images(runs, tmp_path, capsys):
    from PIL import Image

    run = load_run(runs["cnn"])
    x = run.data.x_test[:5]
    np.savez(tmp_path / "few.npz", x=x)
    assert main(["predict", runs["cnn"], str(tmp_path / "few.npz")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == logits(run, x).argmax(axis=1).tolist()
    for r in rows:
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    paths = []
    for i in range(3):
        a = np.round(x[i, 0] * 255).astype(np.uint8)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    assert main(["predict", runs["cnn"], *paths]) == 0
    images = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in images] == [r["label"] for r in rows[:3]]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    assert main(["predict", runs["cnn"], str(tmp_path / "small.png")]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_predict_refuses_inputs_it_cannot_score(runs, tmp_path, capsys):
    """Bad predict inputs are one line naming the file or sample (NaN used to come back as
    label 0 with NaN probabilities, printed as invalid JSON; a shape mismatch named no file);
    an .npy is read as an .npz's x."""
    run = load_run(runs["mlp"])
    x = run.data.x_test[:3].copy()
    np.save(tmp_path / "ok.npy", x)
    assert main(["predict", runs["mlp"], str(tmp_path / "ok.npy")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == logits(run, x).argmax(axis=1).tolist()
    x[1, 5] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    np.savez(tmp_path / "wide.npz", x=np.zeros((2, 65), np.float32))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    for name, said in [("nan.npz", "nan.npz[1]: holds NaN or infinite values"),
                       ("wide.npz", "wide.npz: inputs of shape (65,) do not fit this model's "
                                    "samples of shape (64,)"),
                       ("two.npz", "two.npz: holds ['a', 'b']; name the samples' array x"),
                       ("words.npy", "words.npy: samples must be numbers, found dtype <U1")]:
        assert main(["predict", runs["mlp"], str(tmp_path / name)]) == 2, name
        out = capsys.readouterr()
        assert out.out == "" and out.err == f"shardgrad predict: error: {tmp_path}/{said}\n"


def test_evaluate_on_data_the_model_cannot_take_names_the_data(runs, tmp_path, capsys):
    """--set data.* giving 12x12 images: the data is named, not the run's weights (which
    the message used to blame)."""
    x = np.random.default_rng(0).random((30, 144))
    np.savez(tmp_path / "big.npz", x=x, y=np.arange(30) % 10)
    sets = ["--set", "data.dataset='npz'", "--set", f"data.path='{tmp_path}/big.npz'"]
    assert main(["evaluate", runs["mlp"], *sets, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shardgrad evaluate: error: the data of --set data.dataset='npz' "
                          f"data.path='{tmp_path}/big.npz' (samples of shape (144,), 10 "
                          f"classes) does not fit {runs['mlp']}'s trained model: "), err
    assert "expected (32, 144), got (32, 64)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_predict_jpeg_and_png_files(runs, kind, tmp_path, capsys):
    """Image files for an image model and for an MLP trained on flattened images: each
    file's probabilities are the model's on the pixels Pillow decodes (JPEG is lossy)."""
    from PIL import Image

    run = load_run(runs[kind])
    paths = []
    for i, row in enumerate(run.data.x_test[:4]):
        paths.append(str(tmp_path / f"{i}.{'jpg' if i % 2 else 'png'}"))
        Image.fromarray(np.round(row.reshape(8, 8) * 255).astype(np.uint8)).save(paths[-1])
    assert main(["predict", runs[kind], *paths]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decoded = np.stack([np.asarray(Image.open(p), np.float32) / 255.0 for p in paths])
    scores = logits(run, decoded.reshape((4, *run.data.input_shape)))
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    assert [r["input"] for r in rows] == paths
    assert [r["label"] for r in rows] == scores.argmax(axis=1).tolist()
    np.testing.assert_allclose([r["probabilities"] for r in rows],
                               z / z.sum(axis=1, keepdims=True), atol=2e-6)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.jpg")
    assert main(["predict", runs[kind], str(tmp_path / "small.jpg")]) == 2
    assert "do not fit" in capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_onnx_export_same_logits_as_the_ir(runs, kind, tmp_path):
    out = tmp_path / "model.onnx"
    r = subprocess.run([sys.executable, "-m", "shardgrad.cli", "export", runs[kind], "--format",
                        "onnx", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run = load_run(runs[kind])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want = logits(run, run.data.x_test)
    got = np.concatenate([sess.run(None, {"x": run.data.x_test[i:i + 100]})[0]
                          for i in range(0, len(run.data.x_test), 100)])   # any batch size
    assert got.shape == want.shape == (359, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) == run.data.y_test).mean() == pytest.approx(
        json.load(open(os.path.join(runs[kind], "summary.json")))["test_accuracy"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "text")
    train(load_config(os.path.join(ROOT, "examples", "text_transformer.toml"),
                      ["train.epochs=1", "model.d_model=8", "model.heads=2", "model.ff=16",
                       "train.eval_batch_size=64", "data.prefetch=0"]), out)
    return out


def test_evaluate_predict_and_export_of_a_text_run(text_run, tmp_path, capsys):
    """The transformer's model is rebuilt with the run's vocabulary; 1,600 test samples in
    25 same-shape batches, each batch's logits kept (the executor may reuse its output
    buffer); token ids stay integers; the ONNX export (embedding gathers, the attention's
    slices, masks and softmax, layer norm, mean pooling) gives the IR's logits within 1e-5
    on the whole test set."""
    assert main(["evaluate", text_run, "--out", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(os.path.join(text_run, "summary.json")) as f:
        assert shown["top1_accuracy"] == json.load(f)["test_accuracy"]
    assert shown["samples"] == 1600
    run = load_run(text_run)
    x = run.data.x_test[:4]
    np.savez(tmp_path / "ids.npz", x=x)
    assert main(["predict", text_run, str(tmp_path / "ids.npz")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == logits(run, x).argmax(axis=1).tolist()
    np.savez(tmp_path / "floats.npz", x=x.astype(np.float32))
    assert main(["predict", text_run, str(tmp_path / "floats.npz")]) == 2
    assert "integer token ids" in capsys.readouterr().err
    vocab = int(run.data.x_train.max()) + 1
    np.savez(tmp_path / "far.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 5, vocab, x))
    assert main(["predict", text_run, str(tmp_path / "far.npz")]) == 2
    assert f"far.npz[0]: token ids must be in [0, {vocab})" in capsys.readouterr().err
    assert main(["export", text_run, "--out", str(tmp_path / "t.onnx")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(int64)"
    want = logits(run, run.data.x_test)
    got = np.concatenate([sess.run(None, {"x": run.data.x_test[i:i + 100]})[0]
                          for i in range(0, len(run.data.x_test), 100)])
    assert got.shape == want.shape == (1600, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) == run.data.y_test).mean() == shown["top1_accuracy"]


def test_onnx_getitem_forms_and_a_deeper_text_model():
    """Every getitem form (slices, reversed slices, integers, new axes) and a 2-layer text
    transformer on padded ids: onnxruntime's logits equal the IR's within 1e-5."""
    import shardgrad as sg
    from shardgrad.runtime.models import TextTransformer
    from shardgrad.runtime.onnx_export import to_onnx
    from shardgrad.runtime.step import Predictor

    class Slices(sg.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sg.nn.Linear(6, 5)

        def forward(self, x):
            h = self.fc(x)
            return h[:, 1:4] * h[:, None, ::-1][:, 0, 1:4] + h[..., 2][:, None] - h[:, -1:]

    rng = np.random.default_rng(0)
    sg.manual_seed(0)
    ids = rng.integers(1, 50, (37, 12))
    ids[::2, 7:] = 0                                  # padding: masked keys, fewer to pool
    for model, x, dtype in [(Slices(), rng.standard_normal((9, 6)).astype(np.float32),
                             "float32"),
                            (TextTransformer(50, 12, 3, 8, 2, 2, 16, 0.0), ids, "int64")]:
        sess = ort.InferenceSession(
            to_onnx(model, x.shape[1:], input_dtype=dtype).SerializeToString(),
            providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], Predictor(model)(x),
                                   atol=1e-5, rtol=1e-5)
