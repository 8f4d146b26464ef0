"""What a user gets from ``shardgrad train`` when something is wrong from outside: a diverged
run, a non-finite config value, a corrupt or foreign checkpoint, a run directory holding an
earlier run's checkpoints, a torn metrics line, a model that cannot take its batches."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from shardgrad.runtime import train as tr
from shardgrad.runtime.config import ConfigError, load_config
from shardgrad.runtime.monitor import TIMINGS

sys.path.insert(0, str(Path(__file__).parent))
from blobs import SMALL, blobs_config, toml  # noqa: E402
from blobs import cli_main as _main

CONFIG = toml({**SMALL, "train.epochs": 3, "train.lr": 0.1, "train.momentum": 0.9,
               "train.log_every": 5})


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("faults"), CONFIG)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SHARDGRAD_PROGRESS", "0")


def test_a_diverging_run_stops_naming_the_step_and_writes_no_garbage(config, tmp_path, capsys):
    out = tmp_path / "run"
    with np.errstate(all="ignore"):
        code, err = _main(capsys, "train", config, "--out", str(out), "--set", "train.lr=1e200")
    assert code == 1
    assert err[-1].startswith("shardgrad train: error: the training loss is nan at step "), err
    assert "(epoch 1, lr 1e+200): training diverged" in err[-1]
    assert os.listdir(out / "checkpoints") == []
    assert not (out / "final.safetensors").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("item", ["train.lr=nan", "train.lr=inf", "parallel.timeout_s=inf",
                                  "train.momentum=nan"])
def test_non_finite_numbers_are_config_errors(config, item):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(config, [item])


def _first_run(config, tmp_path, epochs=1):
    out = tmp_path / "run"
    tr.train(load_config(config, [f"train.epochs={epochs}"]), str(out))
    return out


def test_a_truncated_checkpoint_is_a_one_line_error_naming_it(config, tmp_path, capsys):
    out = _first_run(config, tmp_path)
    path = out / "checkpoints" / "epoch_1.safetensors"
    with open(path, "r+b") as f:
        f.truncate(100)
    code, err = _main(capsys, "train", config, "--resume", str(out))
    assert code == 2 and len(err) == 1, err
    assert f"{path} is not a readable safetensors file" in err[0]


def test_a_checkpoint_without_training_metadata_is_named(config, tmp_path, capsys):
    out = _first_run(config, tmp_path)
    (out / "final.safetensors").replace(out / "checkpoints" / "epoch_2.safetensors")
    code, err = _main(capsys, "train", config, "--resume", str(out))
    assert code == 2 and len(err) == 1, err
    assert "epoch_2.safetensors is not a shardgrad training checkpoint" in err[0]


@pytest.mark.parametrize("change", ["shape", "missing"])
def test_a_checkpoint_of_another_model_is_named(config, tmp_path, capsys, change):
    out = _first_run(config, tmp_path)
    path = str(out / "checkpoints" / "epoch_1.safetensors")
    tensors, meta = tr.load_checkpoint(path)
    if change == "shape":
        tensors["0.weight"] = np.ascontiguousarray(tensors["0.weight"][:, :5])
    else:
        del tensors["optim.0.momentum_buffer"]
    safetensors.numpy.save_file(tensors, path, meta)
    code, err = _main(capsys, "train", config, "--resume", str(out))
    assert code == 2 and len(err) == 1, err
    assert f"{path} does not fit this model" in err[0]


class _Stop(Exception):
    pass


def _stop_at_epoch_1(record):
    if record["kind"] == "epoch":
        raise _Stop


def test_a_fresh_run_in_a_used_directory_drops_the_old_run_files(config, tmp_path):
    whole = tr.train(load_config(config, ["train.epochs=2"]), str(tmp_path / "whole"))
    out = _first_run(config, tmp_path, epochs=3)
    (out / "checkpoints" / ".epoch_4.safetensors.tmp-1").write_bytes(b"killed mid-write")
    with pytest.raises(_Stop):                # the same directory, from scratch, killed
        tr.train(load_config(config, ["train.epochs=2"]), str(out), on_record=_stop_at_epoch_1)
    assert os.listdir(out / "checkpoints") == ["epoch_1.safetensors"]
    assert not (out / "summary.json").exists() and not (out / "final.safetensors").exists()
    resumed = tr.train(load_config(config, ["train.epochs=2"]), str(out), resume=str(out))
    assert resumed["resumed_from"].endswith("epoch_1.safetensors")
    assert resumed["params_sha256"] == whole["params_sha256"]


def test_resume_into_another_directory_keeps_none_of_its_old_checkpoints(config, tmp_path):
    src = _first_run(config, tmp_path)
    other = tmp_path / "other"
    tr.train(load_config(config, ["train.epochs=3", "train.lr=0.05"]), str(other))
    tr.train(load_config(config, ["train.epochs=2"]), str(other), resume=str(src))
    assert os.listdir(other / "checkpoints") == ["epoch_2.safetensors"]


def test_a_run_an_injected_fault_stopped_resumes_without_the_debug_keys(config, tmp_path):
    from shardgrad.runtime.dp import InjectedFault

    whole = tr.train(load_config(config), str(tmp_path / "whole"))
    out = str(tmp_path / "cut")
    with pytest.raises(InjectedFault):
        tr.train(load_config(config, ["debug.fail_at_step=10", "parallel.timeout_s=5",
                                      "cluster.max_restarts=2"]), out)
    assert tr.latest_checkpoint(out).endswith("epoch_1.safetensors")
    resumed = tr.train(load_config(config), out, resume=out)
    assert resumed["params_sha256"] == whole["params_sha256"]


@pytest.mark.parametrize("edit", ["older", "unknown"])
def test_a_checkpoint_from_another_schema_version(config, tmp_path, edit):
    """A key added since the checkpoint was written takes its default (it was refused as a
    change); a key this version lacks is named."""
    whole = tr.train(load_config(config, ["train.epochs=2"]), str(tmp_path / "whole"))
    out = _first_run(config, tmp_path)
    path = str(out / "checkpoints" / "epoch_1.safetensors")
    tensors, meta = tr.load_checkpoint(path)
    saved = json.loads(meta["config"])
    if edit == "older":
        del saved["model"]["dropout"], saved["parallel"]["sync_batchnorm"]
    else:
        saved["train"]["warmup"] = 5
    safetensors.numpy.save_file(tensors, path, {**meta, "config": json.dumps(saved)})
    resume = lambda: tr.train(load_config(config, ["train.epochs=2"]), str(out), resume=str(out))
    if edit == "older":
        assert resume()["params_sha256"] == whole["params_sha256"]
    else:
        with pytest.raises(tr.CheckpointError, match="holds a config this version cannot use: "
                                                     "unknown config key 'train.warmup'"):
            resume()


def test_resume_with_fewer_epochs_than_the_checkpoint_is_a_config_error(config, tmp_path):
    out = _first_run(config, tmp_path, epochs=2)
    with pytest.raises(ConfigError, match="train.epochs = 1 but .*epoch_2.safetensors is from "
                                          "epoch 2"):
        tr.train(load_config(config, ["train.epochs=1"]), str(out), resume=str(out))


def test_resume_drops_a_metrics_line_torn_by_a_kill(config, tmp_path):
    whole = tr.train(load_config(config, ["train.epochs=2"]), str(tmp_path / "whole"))
    out = _first_run(config, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "epoch": 2, "st')
    tr.train(load_config(config, ["train.epochs=2"]), str(out), resume=str(out))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    expected = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rs: [{k: v for k, v in json.loads(r).items() if k not in TIMINGS}
                        for r in rs]
    assert strip(lines) == strip(expected)
    assert whole["steps"] == json.loads(lines[-1])["step"]


def test_batch_norm_over_one_sample_is_a_config_error(config, tmp_path, capsys):
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "bn"), "--set",
                      "model.batchnorm=true", "--set", "train.batch_size=1")
    assert code == 2 and len(err) == 1, err
    assert "cannot train on its batches" in err[0] and "batch_norm" in err[0]


@pytest.mark.parametrize("command", ["plan", "graph"])
def test_plan_and_graph_of_a_model_that_cannot_take_its_batches_are_one_line(
        config, tmp_path, capsys, command):
    sets = ["--set", "model.batchnorm=true", "--set", "train.batch_size=64"]
    sets += (["--set", "parallel.pp=2", "--set", "parallel.microbatches=64"]
             if command == "plan" else ["--set", "train.batch_size=1", "--out",
                                        str(tmp_path / "g.dot")])
    code, err = _main(capsys, command, config, *sets)
    assert code == 2 and len(err) == 1, err
    assert "batch_norm" in err[0] and "more than one value per channel" in err[0]


def test_a_missing_data_file_names_its_key(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _main(capsys, "train", config, "--set", "data.train_labels=labels.idx")
    assert code == 2 and len(err) == 1, err
    assert f"data.train_labels = 'labels.idx': no such file (relative to {tmp_path})" in err[0]


def test_an_unusable_run_directory_is_named_before_any_work(config, tmp_path, capsys,
                                                            monkeypatch):
    (tmp_path / "file").write_text("")
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "file" / "run"))
    assert code == 2 and len(err) == 1, err
    assert f"cannot write the run directory '{tmp_path / 'file' / 'run'}' (--out): Not a " \
           f"directory" in err[0]
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # root may write anywhere
    code, err = _main(capsys, "train", config, "--out", str(tmp_path / "ro"))
    assert code == 2 and err == [f"shardgrad train: error: cannot write the run directory "
                                 f"'{tmp_path / 'ro'}' (--out): not writable"], err


def test_a_fault_aimed_at_a_rank_the_job_lacks_is_a_config_error(config, tmp_path):
    with pytest.raises(ConfigError, match=r"debug.fail_rank = 1 but this job has 1 process"):
        tr.train(load_config(config, ["debug.fail_at_step=2", "debug.fail_rank=1"]),
                 str(tmp_path))


def test_run_files_have_the_permissions_open_gives(config, tmp_path):
    out = _first_run(config, tmp_path)
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (out / "final.safetensors", out / "checkpoints" / "epoch_1.safetensors",
                 out / "summary.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path


def test_a_config_that_is_not_utf8_text_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"[train]\nepochs = 2 # \xff\xfe\n")
    code, err = _main(capsys, "train", str(path))
    assert code == 2 and len(err) == 1, err
    assert f"cannot read config '{path}': 'utf-8' codec can't decode" in err[0]


def test_launcher_ray_under_mpirun_is_refused(config, capsys, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    code, err = _main(capsys, "train", config, "--launcher", "ray")
    assert code == 2 and len(err) == 1, err
    assert "--launcher ray starts the ranks itself" in err[0]


def test_under_mpirun_without_mpi4py_the_error_says_what_to_install(config, capsys,
                                                                   monkeypatch):
    import sys

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)       # import mpi4py raises ImportError
    monkeypatch.delitem(sys.modules, "shardgrad.runtime.mpi", raising=False)
    code, err = _main(capsys, "train", config)
    assert code == 2 and len(err) == 1, err
    assert "an MPI launcher started this process but mpi4py cannot be imported" in err[0]
    assert "pip install -e '.[mpi]'" in err[0]
