"""runtime.config: defaults, TOML files, --set parsing, and errors that name key, value and
the valid keys or choices."""

import numpy as np
import pytest

from shardgrad.runtime import config as cfg
from shardgrad.runtime.config import ConfigError, load_config, parse_set


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_file(tmp_path):
    c = load_config(_write(tmp_path, '[train]\nepochs = 3\nlr = 1\n[model]\nkind = "cnn"\n'))
    assert c["train"]["epochs"] == 3 and c["model"]["kind"] == "cnn"
    assert c["train"]["lr"] == 1.0 and isinstance(c["train"]["lr"], float)
    assert c["train"]["dtype"] == "float32" and c["train"]["batch_size"] == 64
    assert set(c) == set(cfg.SCHEMA)


@pytest.mark.parametrize("item, key, value", [
    ("train.epochs=5", "train.epochs", 5),
    ("train.lr=0.5", "train.lr", 0.5),
    ("train.nesterov=true", "train.nesterov", True),
    ("model.hidden=[32, 16]", "model.hidden", [32, 16]),
    ("train.dtype=float64", "train.dtype", "float64"),          # bare string fallback
    ('train.dtype="float64"', "train.dtype", "float64"),        # TOML string
    ("data.train_images=/data/x.idx.gz", "data.train_images", "/data/x.idx.gz"),
    ("train.optimizer = adam", "train.optimizer", "adam"),
])
def test_parse_set(item, key, value):
    assert parse_set(item) == (key, value)


def test_set_overrides_file(tmp_path):
    c = load_config(_write(tmp_path, "[train]\nepochs = 3\n"),
                    ["train.epochs=7", "train.dtype=float64", "model.hidden=[8]"])
    assert c["train"]["epochs"] == 7 and c["train"]["dtype"] == "float64"
    assert c["model"]["hidden"] == [8]


def test_set_without_equals():
    with pytest.raises(ConfigError, match="--set 'train.epochs': expected KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epoch=3"])
    msg = str(e.value)
    assert "unknown config key 'train.epoch'" in msg
    assert "train.epochs" in msg and "train.batch_size" in msg and "train.dtype" in msg


def test_unknown_section_lists_all_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "[trian]\nepochs = 3\n"))
    assert "unknown config key 'trian.epochs'" in str(e.value)
    assert "model.kind" in str(e.value) and "parallel.dp" in str(e.value)
    with pytest.raises(ConfigError, match="top-level key 'epochs' must be a \\[section\\]"):
        load_config(_write(tmp_path, "epochs = 3\n"))


@pytest.mark.parametrize("item, expect", [
    ("train.epochs=-1", "train.epochs = -1: must be >= 1"),
    ("train.epochs=2.5", "train.epochs = 2.5: expected int, got float"),
    ("train.epochs=true", "train.epochs = True: expected int, got bool"),
    ("train.lr=fast", "train.lr = 'fast': expected float, got str"),
    ("train.dtype=float16", "train.dtype = 'float16': must be one of 'float32', 'float64'"),
    ("model.kind=rnn", "model.kind = 'rnn': must be one of 'mlp', 'cnn'"),
    ("model.hidden=[32, -1]", "model.hidden = [32, -1]: must be >= 1"),
    ("model.hidden=32", "model.hidden = 32: expected a list of int"),
    ("train.optimizer=lbfgs", "'sgd', 'adam', 'adamw'"),
])
def test_bad_values(item, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert expect in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*c.toml"):
        load_config(_write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="config file .*nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml")


def test_schema_is_extensible():
    schema = {**cfg.SCHEMA, "parallel": {**cfg.SCHEMA["parallel"],
                                         "microbatches": cfg.Key(1, int, min=1)}}
    c = load_config(None, ["parallel.microbatches=4"], schema=schema)
    assert c["parallel"]["microbatches"] == 4
    with pytest.raises(ConfigError, match="parallel.microbatches = 0: must be >= 1"):
        load_config(None, ["parallel.microbatches=0"], schema=schema)


def test_hash_and_diff():
    a = load_config(None)
    b = load_config(None, ["train.epochs=99"])
    assert cfg.diff(a, b) == ["train.epochs"]
    assert cfg.config_hash(a) != cfg.config_hash(b)
    assert cfg.config_hash(a, ["train.epochs"]) == cfg.config_hash(b, ["train.epochs"])
    assert cfg.from_dict(b) == b


def test_float64_via_set_builds_float64_model():
    from shardgrad.runtime.train import setup

    c = load_config(None, ["train.dtype=float64", "model.hidden=[8]", "model.batchnorm=true"])
    model, optimizer, step, data = setup(c)
    assert data.x_train.dtype == np.float64
    assert {p.dtype for p in model.parameters()} == {"float64"}
    assert {b.dtype for _, b in model.named_buffers()} == {"float64"}
    loss = step(data.x_train[:16], data.y_train[:16])
    assert np.isfinite(loss) and step.graph.outputs["loss"].dtype == "float64"


def test_env_is_read_here_only(monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")
    assert not cfg.progress_enabled()
    with pytest.raises(KeyError, match="undocumented environment variable"):
        cfg.env("SHARDGRAD_NOT_A_THING")
