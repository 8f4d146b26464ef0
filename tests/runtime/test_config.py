"""runtime.config: defaults, TOML files, --set parsing, and errors that name key, value and
the valid keys or choices."""

import dataclasses
import json

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


def test_a_typo_suggests_the_key_and_a_file_value_names_the_file(tmp_path):
    """A misspelt key says which was meant; a bad value from the file names the file (a
    --set's names its key, as typed)."""
    with pytest.raises(ConfigError, match=r"^unknown config key 'trian.epochs' \(did you mean "
                                          r"'train.epochs'\?\); valid keys: model.kind"):
        load_config(None, ["trian.epochs=3"])
    path = _write(tmp_path, "[train]\nepochs = '3'\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: train.epochs = '3': expected int, got str"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "[model]\nhiden = [8]\n"))
    assert "unknown config key 'model.hiden' (did you mean 'model.hidden'?)" in str(e.value)
    with pytest.raises(ConfigError, match=r"^unknown config key 'foo.bar'; valid keys"):
        load_config(None, ["foo.bar=1"])                         # nothing close: no guess


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
    c = cfg.load_dict(None, ["parallel.microbatches=4"], schema=schema)
    assert c["parallel"]["microbatches"] == 4
    with pytest.raises(ConfigError, match="parallel.microbatches = 0: must be >= 1"):
        cfg.load_dict(None, ["parallel.microbatches=0"], schema=schema)


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


def test_sections_are_typed_frozen_and_checked():
    c = load_config(None, ["train.lr=1", "model.hidden=[8, 4]"])
    assert isinstance(c, cfg.Config) and isinstance(c.train, cfg.TrainConfig)
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float) and c.model.hidden == [8, 4]
    assert c["train"]["lr"] is c.train.lr and c["model"]["hidden"] == [8, 4]   # as the dict form
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 2.0
    d = c.replace({"train.lr": 0.5, "parallel.dp": 2})
    assert (d.train.lr, d.parallel.dp, c.train.lr, c.parallel.dp) == (0.5, 2, 1.0, 1)
    with pytest.raises(ConfigError, match=r"^train.lr = -1: must be >= 0.0$"):
        c.replace({"train.lr": -1})
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.lr2'"):
        c.replace({"train.lr2": 1})
    with pytest.raises(ConfigError, match=r"^model.kind = 'rnn': must be one of"):
        cfg.ModelConfig(kind="rnn")
    plain = c.to_dict()
    assert type(plain) is dict and type(plain["model"]) is dict and plain == c
    assert json.loads(json.dumps(plain)) == c and cfg.from_dict(plain) == c
    plain["model"]["hidden"].append(1)        # a copy: the config is unchanged
    assert c.model.hidden == [8, 4] and cfg.from_dict(c) is c


def test_schema_is_derived_from_the_sections():
    assert list(cfg.SCHEMA) == [f.name for f in dataclasses.fields(cfg.Config)]
    for name, section in cfg.SECTIONS.items():
        fields = dataclasses.fields(section)
        assert list(cfg.SCHEMA[name]) == [f.name for f in fields] and section.NAME == name
        default = section()
        assert all(cfg.SCHEMA[name][f.name].default == getattr(default, f.name) for f in fields)
    assert cfg.SCHEMA["train"]["lr"] == cfg.Key(0.1, float, min=0.0)
    hidden = cfg.SCHEMA["model"]["hidden"]
    assert (hidden.type, hidden.item, hidden.min) == (list, int, 1)
    balance = cfg.SCHEMA["parallel"]["balance"]
    assert (balance.type, balance.item, balance.choices) == ((str, list), str, ("cost", "profile"))
    with pytest.raises(TypeError):           # a key is added in its section class, not here
        cfg.SCHEMA["train"]["warmup"] = cfg.Key(0, int)
