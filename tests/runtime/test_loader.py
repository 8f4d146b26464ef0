"""sg.utils.data (runtime/loader.py) against torch.utils.data (CPU): TensorDataset, the
DataLoader's batches and len, seeded shuffling per epoch, a DistributedSampler as sampler
(runtime.data.batches' batches), and training through compile_step from a loader."""

import numpy as np
import pytest
import torch

import shardgrad as sg
from shardgrad.runtime.data import DistributedSampler, batches
from shardgrad.utils.data import DataLoader, TensorDataset


def _data(n=23):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, n)


def test_imports_as_torch():
    import shardgrad.utils.data as mod

    assert mod is sg.utils.data and mod.DataLoader is DataLoader


def test_tensor_dataset_rows_as_torch():
    x, y = _data()
    ds, ref = TensorDataset(sg.tensor(x), y), torch.utils.data.TensorDataset(
        torch.tensor(x), torch.tensor(y))
    assert len(ds) == len(ref) == 23
    for got, want in zip(ds[5], ref[5], strict=True):
        np.testing.assert_array_equal(got, want.numpy())
    with pytest.raises(ValueError, match="Size mismatch"):
        TensorDataset(x, y[:-1])


@pytest.mark.parametrize("batch_size", [1, 4, 23, 40])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_in_order_equal_torch(batch_size, drop_last):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, drop_last=drop_last)
    ref = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.tensor(x), torch.tensor(y)), batch_size=batch_size, drop_last=drop_last)
    got, want = list(loader), list(ref)
    assert len(loader) == len(ref) == len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert isinstance(gx, np.ndarray)
        np.testing.assert_array_equal(gx, wx.numpy())
        np.testing.assert_array_equal(gy, wy.numpy())


def test_shuffle_draws_a_new_seeded_order_each_epoch():
    x, y = _data()
    orders = []
    for _ in range(2):                                   # two loaders, same seed
        loader = DataLoader(TensorDataset(x, np.arange(23)), batch_size=5, shuffle=True, seed=3)
        orders.append([np.concatenate([b for _, b in loader]) for _epoch in range(3)])
    for order in orders[0]:
        assert sorted(order) == list(range(23))         # every sample once per epoch
    assert all((a == b).all() for a, b in zip(*orders, strict=True))   # reproducible
    assert not (orders[0][0] == orders[0][1]).all()     # a new order each epoch
    other = DataLoader(TensorDataset(x, np.arange(23)), batch_size=5, shuffle=True, seed=4)
    assert not (np.concatenate([b for _, b in other]) == orders[0][0]).all()
    unseeded = [np.concatenate([b for _, b in DataLoader(TensorDataset(x, np.arange(23)),
                                                         batch_size=23, shuffle=True)])
                for _ in range(2)]
    assert not (unseeded[0] == unseeded[1]).all()       # seed=None: a random one


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_sampler_gives_the_ranks_their_shares(drop_last):
    x, y = _data(21)
    world, per_rank = 2, 4
    for shuffle in (False, True):
        ranks = []
        for r in range(world):
            sampler = DistributedSampler(21, world, r, shuffle=shuffle, seed=5)
            sampler.set_epoch(2)
            loader = DataLoader(TensorDataset(x, y), batch_size=per_rank, sampler=sampler,
                                drop_last=drop_last)
            want = list(batches(x, y, sampler, per_rank * world, drop_last))
            got = list(loader)
            assert len(loader) == len(got) == len(want)
            for (gx, gy), (wx, wy) in zip(got, want, strict=True):
                np.testing.assert_array_equal(gx, wx)
                np.testing.assert_array_equal(gy, wy)
            ranks.append(got)
        if not shuffle and not drop_last:                # torch's own sampler and loader
            for r in range(world):
                ref = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y)),
                    batch_size=per_rank, sampler=torch.utils.data.DistributedSampler(
                        range(21), world, r, shuffle=False))
                assert len(ref) == len(ranks[r])
                for (gx, _), (wx, _) in zip(ranks[r], ref, strict=True):
                    np.testing.assert_array_equal(gx, wx.numpy())


def test_a_map_style_dataset_is_stacked():
    class Squares:
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return np.full(2, i, np.float32), i * i

    xb, yb = list(DataLoader(Squares(), batch_size=3))[2]
    np.testing.assert_array_equal(xb, [[6, 6]])
    np.testing.assert_array_equal(yb, [36])


def test_bad_arguments_are_torchs_errors():
    ds = TensorDataset(*_data())
    with pytest.raises(ValueError, match="positive integer"):
        DataLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match="mutually exclusive"):
        DataLoader(ds, shuffle=True, sampler=DistributedSampler(23))
    with pytest.raises(ValueError, match="draws from 5 samples"):
        DataLoader(ds, sampler=DistributedSampler(5))


def test_compiled_training_from_a_loader_equals_slicing():
    x, y = _data(40)
    params = []
    for use_loader in (True, False):
        sg.manual_seed(0)
        model = sg.nn.Sequential(sg.nn.Linear(3, 8), sg.nn.ReLU(), sg.nn.Linear(8, 4))
        opt = sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = sg.compile_step(model, sg.nn.functional.cross_entropy, opt)
        for _ in range(2):
            if use_loader:
                for xb, yb in DataLoader(TensorDataset(x, y), batch_size=8):
                    step(xb, yb)
            else:
                for i in range(0, 40, 8):
                    step(x[i:i + 8], y[i:i + 8])
        params.append(model.state_dict())
    for k in params[0]:
        np.testing.assert_array_equal(params[0][k], params[1][k])


def test_samples_of_one_array_dicts_subsets_and_random_split():
    # a data set whose samples are single arrays was batched field by field: a batch of
    # (3,) samples came back as a tuple of 3 columns instead of one (B, 3) array
    from shardgrad.utils.data import DataLoader, Dataset, Subset, random_split

    class Rows(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full(3, i, np.float32)

    class Records(Rows):
        def __getitem__(self, i):
            return {"x": np.full(2, i), "y": i, "pair": (i, -i)}

    batches = list(DataLoader(Rows(), batch_size=2))
    assert [b.shape for b in batches] == [(2, 3), (2, 3), (1, 3)]
    assert batches[2][0, 0] == 4
    first = next(iter(DataLoader(Records(), batch_size=3)))
    assert first["x"].shape == (3, 2) and first["y"].tolist() == [0, 1, 2]
    assert [p.tolist() for p in first["pair"]] == [[0, 1, 2], [0, -1, -2]]
    sizes = [len(b) for b in DataLoader(Rows(), batch_size=2, collate_fn=list)]
    assert sizes == [2, 2, 1]
    a, b = random_split(Rows(), [3, 2], seed=0)
    assert sorted([int(a[i][0]) for i in range(3)] + [int(b[i][0]) for i in range(2)]) == [
        0, 1, 2, 3, 4]
    again = random_split(Rows(), [0.6, 0.4], seed=0)
    assert again[0].indices == a.indices and len(Subset(Rows(), [4, 0])) == 2
    with pytest.raises(ValueError, match="Sum of input lengths"):
        random_split(Rows(), [3, 3])
