"""``sg.save`` / ``sg.load``: a whole training checkpoint (model, optimizer, plain values) round
trips and resumes training exactly; a lone tensor; a run's final.safetensors; clear errors for
what cannot be saved; the file is replaced atomically.
"""

import os

import numpy as np
import pytest

import shardgrad as sg

F = sg.nn.functional


def model_and_opt():
    sg.manual_seed(0)
    model = sg.nn.Sequential(sg.nn.Linear(4, 8), sg.nn.BatchNorm1d(8), sg.nn.ReLU(),
                             sg.nn.Linear(8, 3))
    return model, sg.optim.Adam(model.parameters(), lr=0.01)


def train(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = sg.tensor(rng.standard_normal((8, 4)).astype(np.float32))
        y = sg.tensor(rng.integers(0, 3, 8))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_checkpoint_round_trips_and_resumes_exactly(tmp_path):
    model, opt = model_and_opt()
    train(model, opt, 3)
    path = tmp_path / "ckpt.safetensors"
    sg.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "note": "after warm-up", "lrs": [0.1, 0.01], "best": None, "empty": {}}, path)
    ck = sg.load(path)
    assert ck["epoch"] == 3 and ck["note"] == "after warm-up" and ck["lrs"] == [0.1, 0.01]
    assert ck["best"] is None and ck["empty"] == {}
    assert set(ck["model"]) == set(model.state_dict())

    restored, ropt = model_and_opt()
    restored.load_state_dict(ck["model"])
    ropt.load_state_dict(ck["optimizer"])
    train(model, opt, 2, seed=1)
    train(restored, ropt, 2, seed=1)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[k], v)


def test_a_lone_tensor_and_a_plain_safetensors_file(tmp_path):
    t = sg.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    sg.save(t, tmp_path / "t.safetensors")
    back = sg.load(tmp_path / "t.safetensors")
    assert isinstance(back, np.ndarray) and np.array_equal(back, t.numpy())

    import safetensors.numpy
    safetensors.numpy.save_file({"fc.weight": np.ones((2, 2), np.float32)},
                                str(tmp_path / "final.safetensors"))
    assert list(sg.load(tmp_path / "final.safetensors")) == ["fc.weight"]


@pytest.mark.parametrize("obj, error, match", [
    ({"a": object()}, TypeError, r"'a' is a object: save arrays, tensors"),
    ({"m": {"w": np.array(["x"])}}, TypeError, r"'m/w' is an array of <U1"),
    ({"a/b": 1}, ValueError, r"key 'a/b': keys must be non-empty strings without '/'"),
    ({1: np.ones(2)}, ValueError, r"key '1'"),
])
def test_what_cannot_be_saved_is_named(tmp_path, obj, error, match):
    path = tmp_path / "x.safetensors"
    with pytest.raises(error, match=match):
        sg.save(obj, path)
    assert not os.listdir(tmp_path)                   # nothing half-written is left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing"):
        sg.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        sg.load(bad)


def test_saving_over_a_file_replaces_it_whole(tmp_path):
    path = tmp_path / "c.safetensors"
    sg.save({"w": np.zeros(3)}, path)
    sg.save({"w": np.ones(3), "step": 2}, path)
    ck = sg.load(path)
    assert np.array_equal(ck["w"], np.ones(3)) and ck["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]
