"""runtime.data: digits loading and split, the IDX reader's errors, DistributedSampler rules."""

import gzip
import math

import numpy as np
import pytest

from shardgrad.runtime.data import (
    DataError,
    DistributedSampler,
    batches,
    load_digits,
    load_idx_dataset,
    read_idx,
    split,
    write_idx,
)


def torch_sampler_indices(n, num_replicas, rank, shuffle, seed, epoch, drop_last, perm):
    """torch.utils.data.DistributedSampler.__iter__ (torch 2.x), line by line, with the
    permutation ``perm(seed + epoch)`` standing in for torch.randperm."""
    if drop_last and n % num_replicas != 0:
        num_samples = math.ceil((n - num_replicas) / num_replicas)
    else:
        num_samples = math.ceil(n / num_replicas)
    total_size = num_samples * num_replicas
    indices = list(perm(seed + epoch)) if shuffle else list(range(n))
    if not drop_last:
        padding_size = total_size - len(indices)
        if padding_size <= len(indices):
            indices += indices[:padding_size]
        else:
            indices += (indices * math.ceil(padding_size / len(indices)))[:padding_size]
    else:
        indices = indices[:total_size]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 16, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_follows_torch_rules(n, world, drop_last, shuffle):
    if drop_last and n < world:                    # torch yields nothing here: nor may we
        assert all(list(DistributedSampler(n, world, r, shuffle=shuffle, drop_last=True)) == []
                   for r in range(world))
        return
    perm = lambda s: np.random.default_rng(s).permutation(n).tolist()
    for epoch in (0, 3):
        for rank in range(world):
            s = DistributedSampler(n, world, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            s.set_epoch(epoch)
            want = torch_sampler_indices(n, world, rank, shuffle, 5, epoch, drop_last, perm)
            assert list(s) == want
            assert len(s) == len(want)


def test_sampler_epochs_and_seeds():
    a, b = DistributedSampler(50, seed=1), DistributedSampler(50, seed=1)
    assert list(a) == list(b)                      # the same seed on every rank/process
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(DistributedSampler(50, seed=2)) != first
    ranks = [list(DistributedSampler(50, 4, r, seed=1)) for r in range(4)]
    assert set(sum(ranks, [])) == set(range(50))   # padding repeats, nothing is lost
    assert {len(r) for r in ranks} == {13}


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="invalid rank 2 for world_size 2"):
        DistributedSampler(10, 2, 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    n, batch = 37, 8
    x, y = np.arange(n, dtype=np.float32)[:, None], np.arange(n)
    reference = None
    for w in (1, world):
        per_rank = []
        for r in range(w):
            s = DistributedSampler(n, w, r, seed=3)
            s.set_epoch(2)
            per_rank.append([(bx, by) for bx, by in batches(x, y, s, batch)])
        assert all(len(b) == n // batch for b in per_rank)
        assert all(bx.shape == (batch // w, 1) for b in per_rank for bx, _ in b)
        glob = [sorted(np.concatenate([per_rank[r][k][1] for r in range(w)]).tolist())
                for k in range(n // batch)]
        reference = reference or glob
        assert glob == reference
    used = sum(reference, [])
    assert len(set(used)) == len(used)             # no padding inside full batches


def test_batches_rejects_indivisible_global_batch():
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        next(batches(np.zeros((10, 1)), np.zeros(10), DistributedSampler(10, 3, 0), 8))


def test_load_digits():
    d = load_digits("float32")
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    assert d.num_classes == 10 and d.input_shape == (64,)
    assert np.bincount(d.y_test).min() >= 35      # stratified: 20% of every class
    again = load_digits("float64", image=True)
    assert again.x_train.shape == (1438, 1, 8, 8) and again.x_train.dtype == np.float64
    np.testing.assert_array_equal(again.y_test, d.y_test)
    np.testing.assert_allclose(again.x_test.reshape(359, 64), d.x_test)
    other = load_digits(seed=1)
    assert not np.array_equal(other.y_test, d.y_test)


def test_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), 10)
    x = np.arange(40)
    xtr, ytr, xte, yte = split(x, y, 0.3, seed=0)
    assert np.bincount(yte).tolist() == [3, 3, 3, 3]
    assert sorted(np.concatenate([xtr, xte]).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="test_fraction"):
        split(x, y, 1.5, 0)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    a = (np.arange(60).reshape(3, 4, 5) % 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "not an IDX file" in msg and "12 34 08 01" in msg
    assert "expected magic bytes 00 00" in msg


def test_idx_unknown_type_code(tmp_path):
    path = tmp_path / "code.idx"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match=r"unknown IDX type code 0x07; expected one of 0x08"):
        read_idx(path)


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert str(path) in str(e.value)
    assert "truncated IDX header: 3 dimensions need 16 bytes, found 8" in str(e.value)
    (tmp_path / "tiny.idx").write_bytes(b"\x00")
    with pytest.raises(DataError, match="expected at least 4 bytes, found 1"):
        read_idx(tmp_path / "tiny.idx")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_truncated_data(tmp_path, suffix):
    full = tmp_path / "full.idx"
    write_idx(full, np.zeros((10, 28, 28), np.uint8))
    raw = full.read_bytes()[:-100]
    path = tmp_path / f"cut.idx{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated IDX data" in msg
    assert "shape (10, 28, 28) of uint8 needs 7856 bytes, found 7756" in msg


def test_idx_trailing_bytes_and_damaged_gzip(tmp_path):
    path = tmp_path / "long.idx"
    write_idx(path, np.zeros(4, np.uint8))
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(DataError, match="trailing bytes after IDX data: shape \\(4,\\)"):
        read_idx(path)
    gz = tmp_path / "cut.idx.gz"
    write_idx(gz, np.zeros((100, 100), np.uint8))
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match="cut.idx.gz: gzip data is damaged or truncated"):
        read_idx(gz)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


def test_load_idx_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 6, 6)).astype(np.uint8)
    labels = np.repeat(np.arange(5), 10).astype(np.uint8)
    write_idx(tmp_path / "x.idx.gz", images)
    write_idx(tmp_path / "y.idx", labels)
    d = load_idx_dataset(str(tmp_path / "x.idx.gz"), str(tmp_path / "y.idx"))
    assert d.x_train.shape == (40, 36) and d.x_test.shape == (10, 36)
    assert d.x_train.max() <= 1.0 and d.y_train.dtype == np.int64 and d.num_classes == 5
    d = load_idx_dataset(str(tmp_path / "x.idx.gz"), str(tmp_path / "y.idx"),
                         str(tmp_path / "x.idx.gz"), str(tmp_path / "y.idx"), image=True)
    assert d.x_train.shape == (50, 1, 6, 6) and d.x_test.shape == (50, 1, 6, 6)
    np.testing.assert_allclose(d.x_test[3, 0], images[3] / 255.0, rtol=1e-6)


def test_load_idx_dataset_count_mismatch(tmp_path):
    write_idx(tmp_path / "x.idx", np.zeros((5, 2, 2), np.uint8))
    write_idx(tmp_path / "y.idx", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as e:
        load_idx_dataset(str(tmp_path / "x.idx"), str(tmp_path / "y.idx"))
    assert "x.idx holds 5 images but" in str(e.value) and "y.idx holds 4 labels" in str(e.value)
    write_idx(tmp_path / "y2.idx", np.zeros((5, 2), np.uint8))
    with pytest.raises(DataError, match="expected labels of shape \\(N,\\), found shape"):
        load_idx_dataset(str(tmp_path / "x.idx"), str(tmp_path / "y2.idx"))
