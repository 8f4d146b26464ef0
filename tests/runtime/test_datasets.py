"""Named data sets (runtime.datasets), label validation, the prefetching loader and
augmentation (runtime.prefetch). Downloads are tested against a local HTTP server on
127.0.0.1 serving small fixture files, never the network."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from shardgrad.runtime import datasets
from shardgrad.runtime.config import load_config
from shardgrad.runtime.data import (
    DataError,
    DistributedSampler,
    batches,
    validate_labels,
    write_idx,
)
from shardgrad.runtime.prefetch import Augment, epoch_batches, prefetch
from shardgrad.runtime.train import load_data


class _Server:
    """Files by path, served on 127.0.0.1; ``truncate`` paths promise more bytes than they
    send; ``hits`` counts the requests per path."""

    def __init__(self, files: dict[str, bytes], truncate=()):
        self.files, self.truncate, self.hits = files, set(truncate), {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):   # noqa: N802 - http.server's name
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if self.path in server.truncate
                                 else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _idx_bytes(a: np.ndarray, tmp_path) -> bytes:
    path = tmp_path / "scratch.gz"
    write_idx(path, a)
    return path.read_bytes()


# ------------------------------------------------------------------ labels


def test_validate_labels_infers_and_checks():
    assert validate_labels(np.array([0, 2, 1])) == 3
    assert validate_labels(np.array([0, 1], np.uint8), 10) == 10
    with pytest.raises(DataError, match=r"f\.npz: label -1 at index 1 is negative"):
        validate_labels(np.array([0, -1]), where="f.npz")
    with pytest.raises(DataError, match=r"label 10 at index 2 is out of range for 10 classes"):
        validate_labels(np.array([0, 9, 10]), 10)
    with pytest.raises(DataError, match="must be integers"):
        validate_labels(np.array([0.0, 1.5]))
    with pytest.raises(DataError, match=r"shape \(N,\)"):
        validate_labels(np.zeros((2, 2), np.int64))


def test_cli_bad_labels_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((20, 4), np.float32), y=np.array([0, 1] * 9 + [1, 7]))
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndataset = "npz"\npath = "{path}"\nnum_classes = 3\n'
                   f'[train]\nepochs = 1\nbatch_size = 4\n')
    r = subprocess.run([sys.executable, "-m", "shardgrad.cli", "train", str(cfg), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "label 7 at index 19 is out of range for 3 classes" in lines[0]


# ------------------------------------------------------------------ mnist5k


def test_mnist5k_offline_split():
    data = datasets.load_mnist5k("float32", image=True)
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.num_classes == 10
    assert np.bincount(data.y_test).tolist() == [100] * 10      # stratified 80/20
    assert data.x_train.dtype == np.float32
    assert 0.0 == data.x_train.min() < data.x_train.max() == 1.0
    flat = datasets.load_mnist5k("float64")
    assert flat.x_train.shape == (4000, 784) and flat.x_train.dtype == np.float64
    np.testing.assert_allclose(flat.x_train.reshape(-1, 1, 28, 28), data.x_train, atol=1e-7)


def test_mnist5k_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'shardgrad\[data\]'"):
        datasets.load_mnist5k()


# ------------------------------------------------------------------ downloads


def test_download_verifies_caches_and_is_atomic(tmp_path):
    body = b"fixture bytes " * 1000
    with _Server({"/a.bin": body}) as srv:
        remote = datasets.Remote(srv.url + "/a.bin", _sha(body))
        path = str(tmp_path / "cache" / "a.bin")
        assert datasets.download(remote, path, progress=False) == path
        assert open(path, "rb").read() == body
        datasets.download(remote, path, progress=False)       # cached: not fetched again
        assert srv.hits == {"/a.bin": 1}
    assert os.listdir(tmp_path / "cache") == ["a.bin"]       # no temporary file left


def test_download_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    body = b"y" * 300_000
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "1")
    with _Server({"/big.bin": body}) as srv:
        datasets.download(datasets.Remote(srv.url + "/big.bin", _sha(body)),
                          str(tmp_path / "big.bin"))
    err = capsys.readouterr().err
    assert "big.bin" in err and "/300k" in err        # tqdm's bar: name, bytes of the total
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")     # and none when turned off
    with _Server({"/big.bin": body}) as srv:
        datasets.download(datasets.Remote(srv.url + "/big.bin", _sha(body)),
                          str(tmp_path / "again.bin"))
    assert capsys.readouterr().err == ""


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    with _Server({"/a.bin": b"tampered"}) as srv:
        remote = datasets.Remote(srv.url + "/a.bin", _sha(b"original"))
        path = tmp_path / "a.bin"
        with pytest.raises(DataError, match=r"SHA-256 of the download is .* not the published"):
            datasets.download(remote, str(path), progress=False)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"tampered")                             # a bad file already in the cache
    with pytest.raises(DataError, match=r"does not match the published .* delete it"):
        datasets.download(remote, str(path), progress=False)


def test_download_truncated_leaves_nothing(tmp_path):
    body = b"x" * 10000
    with _Server({"/a.bin": body}, truncate={"/a.bin"}) as srv:
        remote = datasets.Remote(srv.url + "/a.bin", _sha(body))
        with pytest.raises(DataError, match="cut short"):
            datasets.download(remote, str(tmp_path / "a.bin"), progress=False)
    assert os.listdir(tmp_path) == []


def test_download_offline_names_url_and_place(tmp_path):
    with socket.socket() as s:        # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = datasets.Remote(f"http://127.0.0.1:{port}/t10k.gz", "0" * 64)
    path = str(tmp_path / "mnist" / "t10k.gz")
    with pytest.raises(DataError) as e:
        datasets.download(remote, path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and remote.url in msg and f"put it at {path}" in msg


def _fixture_remotes(monkeypatch, srv, name, files: dict[str, bytes]):
    remotes = {k: datasets.Remote(f"{srv.url}/{name}/{k}.gz", _sha(b)) for k, b in files.items()}
    monkeypatch.setitem(datasets.REMOTES, name, remotes)


def test_mnist_download_through_config(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, 30).astype(np.uint8),
              "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "test_labels": np.arange(10, dtype=np.uint8)}
    files = {k: _idx_bytes(a, tmp_path) for k, a in arrays.items()}
    monkeypatch.setenv("SHARDGRAD_DATA", str(tmp_path / "cache"))
    with _Server({f"/fashion_mnist/{k}.gz": b for k, b in files.items()}) as srv:
        _fixture_remotes(monkeypatch, srv, "fashion_mnist", files)
        config = load_config(None, ["data.dataset='fashion_mnist'", "model.kind='cnn'"])
        data = load_data(config)
        load_data(config)                                        # second use: from the cache
        assert set(srv.hits.values()) == {1}
    assert data.x_train.shape == (30, 1, 28, 28) and data.num_classes == 10
    np.testing.assert_allclose(data.x_test[:, 0] * 255, arrays["test_images"], atol=1e-3)
    np.testing.assert_array_equal(data.y_train, arrays["train_labels"])
    assert sorted(os.listdir(tmp_path / "cache" / "fashion_mnist")) == sorted(
        f"{k}.gz" for k in files)


def test_cifar10_archive(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                 b"labels": list(rng.integers(0, 10, 4))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = buf.getvalue()
    with _Server({"/cifar10/archive.gz": archive}) as srv:
        _fixture_remotes(monkeypatch, srv, "cifar10", {"archive": archive})
        data = datasets.load_cifar10(image=True, root=str(tmp_path), num_classes=10)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert datasets.load_cifar10(root=str(tmp_path)).x_train.shape == (20, 3072)   # cached


# ------------------------------------------------------------------ folder and npz


def test_folder_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c, name in enumerate(["cat", "dog", "emu"]):
        os.makedirs(tmp_path / name)
        for i in range(5):
            a = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
            a[0, 0] = c
            Image.fromarray(a).save(tmp_path / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    data, classes = datasets.load_folder(str(tmp_path), image=True, test_fraction=0.2)
    assert classes == ["cat", "dog", "emu"] and data.num_classes == 3
    assert data.x_train.shape == (12, 3, 6, 7) and data.x_test.shape == (3, 3, 6, 7)
    png = np.asarray(Image.open(tmp_path / "dog" / "1.png")).transpose(2, 0, 1) / 255.0
    assert any(np.allclose(x, png) for x in np.concatenate([data.x_train, data.x_test]))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "emu" / "odd.png")
    with pytest.raises(DataError, match=r"odd\.png: image of 5x5 differs"):
        datasets.load_folder(str(tmp_path))


def test_npz_both_layouts(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "xy.npz", x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
             y=np.repeat(np.arange(4), 10))
    data = datasets.load_npz(str(tmp_path / "xy.npz"), image=True)
    assert data.x_train.shape == (32, 1, 8, 8) and data.num_classes == 4
    np.savez(tmp_path / "tt.npz", x_train=rng.random((6, 5)), y_train=np.arange(6) % 2,
             x_test=rng.random((2, 5)), y_test=np.array([0, 1]))
    config = load_config(None, ["data.dataset='npz'", f"data.path='{tmp_path / 'tt.npz'}'",
                                "data.num_classes=5"])
    data = load_data(config)
    assert data.x_train.shape == (6, 5) and data.num_classes == 5
    np.savez(tmp_path / "half.npz", x_train=np.zeros((2, 2)), y_train=np.zeros(2, int))
    with pytest.raises(DataError, match="lacks x_test, y_test"):
        datasets.load_npz(str(tmp_path / "half.npz"))


def test_folder_and_npz_that_cannot_train_a_classifier(tmp_path, capsys):
    """One class (trained to loss 0 and accuracy 1.0), an empty class subfolder (silently a
    class with no sample), data.num_classes other than the subfolders, NaN in an .npz's
    samples (reported as divergence at step 1), an empty x_test (a reshape's traceback):
    each one line naming the folder, file or sample."""
    from PIL import Image

    from shardgrad.cli import main

    def folder(name, classes, n=6):
        for c in classes:
            os.makedirs(tmp_path / name / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(
                    tmp_path / name / c / f"{i}.png")
        return str(tmp_path / name)

    one, empty = folder("one", ["a"]), folder("empty", ["a", "b"])
    os.makedirs(tmp_path / "empty" / "c")
    two = folder("two", ["a", "b"])
    x = np.random.default_rng(0).random((20, 5))
    x[13, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(20) % 2)
    np.savez(tmp_path / "notest.npz", x_train=x[:12], y_train=np.arange(12) % 2,
             x_test=x[:0], y_test=np.zeros(0, np.int64))
    cases = [(["data.dataset='folder'", f"data.path='{one}'"],
              f"{one}: every label is 0 (one class); a classifier needs two or more classes"),
             (["data.dataset='folder'", f"data.path='{empty}'"],
              f"{empty}/c: no PNG or JPEG files (each class subfolder needs at least one image)"),
             (["data.dataset='folder'", f"data.path='{two}'", "data.num_classes=3"],
              f"data.num_classes = 3 but {two} has 2 class subfolders (a, b)"),
             (["data.dataset='npz'", f"data.path='{tmp_path}/nan.npz'"],
              f"{tmp_path}/nan.npz (x): sample 13 holds NaN or infinite values"),
             (["data.dataset='npz'", f"data.path='{tmp_path}/notest.npz'"],
              f"{tmp_path}/notest.npz: x_test has no samples; leave out x_test and y_test to "
              f"split a test set off x_train")]
    for sets, said in cases:
        with pytest.raises(DataError) as e:
            load_data(load_config(None, sets))
        assert str(e.value) == said
        (tmp_path / "c.toml").write_text("")
        argv = ["train", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--set",
                "train.batch_size=2"]
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 2
        assert capsys.readouterr().err == f"shardgrad train: error: {said}\n"
    assert load_data(load_config(None, ["data.dataset='folder'", f"data.path='{two}'",
                                        "data.num_classes=2"])).num_classes == 2


# ------------------------------------------------------------------ prefetch, augment


def test_prefetch_same_batches_and_errors():
    x, y = np.arange(100.0).reshape(50, 2), np.arange(50)
    sampler = DistributedSampler(50, seed=4)
    sampler.set_epoch(3)
    want = list(batches(x, y, sampler, 8))
    got = list(prefetch(epoch_batches(x, y, sampler, 8, 3), depth=2))
    assert len(got) == len(want) == 6
    for (a, b), (c, d) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)

    def broken():
        yield 1
        raise ValueError("bad batch 2")

    it = prefetch(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch 2"):
        next(it)
    endless = prefetch(iter(int, 1), depth=3)       # closing early stops the producer thread
    next(endless)
    endless.close()
    assert not any(t.name == "shardgrad-prefetch" for t in threading.enumerate())


def test_augment_deterministic_and_world_size_free():
    rng = np.random.default_rng(5)
    x, y = rng.random((16, 1, 6, 6)), np.arange(16)
    aug = Augment(16, pad=2, flip=True, seed=7)
    one = np.concatenate([b for b, _ in epoch_batches(x, y, DistributedSampler(16, seed=1),
                                                       8, 2, aug)])
    halves = [list(epoch_batches(x, y, DistributedSampler(16, 2, r, seed=1), 8, 2,
                                 Augment(16, pad=2, flip=True, seed=7))) for r in (0, 1)]
    # global batch b of one process = rank 0's then rank 1's rows, strided by the sampler
    for b in range(2):
        merged = np.empty((8, 1, 6, 6))
        merged[0::2], merged[1::2] = halves[0][b][0], halves[1][b][0]
        np.testing.assert_array_equal(merged, one[b * 8:(b + 1) * 8])
    assert not np.array_equal(one, x[DistributedSampler(16, seed=1).indices()])
    plain = Augment(16)
    assert not plain
    flip = Augment(16, flip=True, seed=0)
    out = flip(x, np.arange(16), 0)
    flipped = flip._draw(0)[1]
    np.testing.assert_array_equal(out[flipped], x[flipped][..., ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])
    crop = Augment(16, pad=1, seed=0)(x, np.arange(16), 0)
    assert crop.shape == x.shape and np.isclose(crop, 0).sum() > 0   # zero padding shows


def test_augment_needs_images(tmp_path):
    from shardgrad.runtime.config import ConfigError
    from shardgrad.runtime.train import train

    config = load_config(None, ["data.hflip=true", "train.epochs=1"])
    with pytest.raises(ConfigError, match="augment images"):
        train(config, None)


def test_gzip_fixture_roundtrip(tmp_path):
    """The IDX fixture bytes the download tests serve are gzip (as the published files)."""
    assert gzip.decompress(_idx_bytes(np.arange(3, dtype=np.uint8), tmp_path))[:4] == \
        b"\x00\x00\x08\x01"


def test_prefetch_copies_batches_to_the_gpu(monkeypatch):
    """On a GPU the prefetch thread hands the step device arrays (CuPy stand-in: the host
    CUDA emulation, whose arrays say they are on GPU 0 and refuse NumPy operands)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import host_cupy

    from shardgrad.graph.device import Device
    from shardgrad.runtime.prefetch import device_copier
    from shardgrad.runtime.step import TrainStep
    from shardgrad.runtime.train import train

    host_cupy.install(host_cupy.device_module(), monkeypatch)
    copy = device_copier(Device.parse("cuda:0"))
    batch = copy(np.arange(6.0).reshape(2, 3))
    assert isinstance(batch, host_cupy.DeviceArray) and batch.get().tolist() == [[0, 1, 2],
                                                                                  [3, 4, 5]]
    assert device_copier(Device.parse("cpu")) is None
    seen = []
    call = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__",
                        lambda self, x, y: seen.append((type(x), type(y))) or call(self, x, y))
    config = load_config(None, ["device.type='cuda'", "train.epochs=1", "model.hidden=[16]",
                                "data.prefetch=2"])
    summary = train(config, None)
    assert len(seen) == summary["steps"] > 0
    assert set(seen) == {(host_cupy.DeviceArray, host_cupy.DeviceArray)}
