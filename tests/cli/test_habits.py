"""The command-line habits torchrun and Lightning users bring: ``--version``, ``config show``,
``train -n N`` starting its own ranks, one set of launcher names, and one line saying what to
install when Ray or Graphviz's ``dot`` is missing."""

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from shardgrad import cli
from shardgrad.runtime.config import SCHEMA, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "digits_mlp.toml")


def _cli(*args, timeout=120, env=None):
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shardgrad", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_version_prints_the_installed_version():
    r = _cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"shardgrad {cli.version()}"
    assert cli.version()[0].isdigit()


def test_config_show_lists_every_key_with_default_and_help_as_loadable_toml(tmp_path, capsys):
    assert cli.main(["config", "show", MLP, "--set", "train.lr=0.05"]) == 0
    text = capsys.readouterr().out
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.strip().split("\n\n")}
    for section, keys in SCHEMA.items():
        assert len(blocks[f"[{section}]"]) == len(keys)
        for name, key in keys.items():
            line = next(ln for ln in blocks[f"[{section}]"] if ln.startswith(f"{name} = "))
            assert f"default {json.dumps(key.default)}" in line
            assert key.help in line
    shown = tmp_path / "shown.toml"
    shown.write_text(text)
    assert tomllib.loads(text)["train"]["lr"] == 0.05
    assert load_config(shown) == load_config(MLP, ["train.lr=0.05"])   # the resolved config


def test_config_show_without_a_config_is_the_defaults(capsys):
    assert cli.main(["config", "show"]) == 0
    assert load_config(None) == tomllib.loads(capsys.readouterr().out)


def test_train_help_points_at_config_show(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "shardgrad config show" in capsys.readouterr().out


def test_train_and_launch_take_the_same_launcher_names():
    parser = cli._parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    names = {cmd: next(a for a in subs[cmd]._actions if a.dest == "launcher").choices
             for cmd in ("train", "launch")}
    assert tuple(names["train"]) == tuple(names["launch"]) == cli.LAUNCHERS


@pytest.mark.parametrize("argv", [
    ["train", MLP, "--launcher", "ray"],
    ["launch", "-n", "2", "--launcher", "ray", "--", "python", "x.py"],
])
def test_launcher_ray_without_ray_says_what_to_install(argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)    # import ray raises ImportError
    monkeypatch.delitem(sys.modules, "shardgrad.cluster.ray_launch", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Ray is not installed: pip install" in err


@pytest.mark.parametrize("missing", ["ray", "ray.tune"])
def test_tune_without_ray_tune_says_what_to_install(missing, monkeypatch, capsys):
    """A bare Ray (no ``[tune]``) or none at all: one line, exit 2, no traceback."""
    monkeypatch.setitem(sys.modules, missing, None)
    for name in ("shardgrad.cluster.tune", "shardgrad.cluster.ray_launch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert cli.main(["tune", MLP, "--out", "/nonexistent/tune"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Ray Tune: pip install" in err


def test_train_n_without_mpi4py_says_what_to_install(monkeypatch, capsys):
    """Checked before mpirun starts: else every rank prints it, then mpirun's own box."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # find_spec("mpi4py") is None
    real = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda n, *a, **k: "/usr/bin/mpirun" if n == "mpirun" else real(n))
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("mpirun started"))
    assert cli.main(["train", "-n", "2", MLP]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mpi4py is not installed: pip install" in err


def test_bf16_without_ml_dtypes_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # find_spec("ml_dtypes") is None
    assert cli.main(["train", MLP, "--out", str(tmp_path / "r"), "--set",
                     "train.precision='bf16'", "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs ml_dtypes: pip install" in err


def test_graph_svg_without_graphviz_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n, *a, **k: None if n == "dot" else real(n))
    out = tmp_path / "x.svg"
    assert cli.main(["graph", MLP, "--out", str(out), "--set", "model.hidden=[8]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "install Graphviz" in err and "x.dot" in err
    assert not out.exists()      # no DOT text under an .svg name
    assert cli.main(["graph", MLP, "--out", str(tmp_path / "x.dot"), "--set",
                     "model.hidden=[8]"]) == 0
    assert (tmp_path / "x.dot").read_text().startswith("digraph")


@pytest.mark.graphviz
@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
def test_graph_svg_with_graphviz_renders_it(tmp_path):
    assert cli.main(["graph", MLP, "--out", str(tmp_path / "x.svg"), "--set",
                     "model.hidden=[8]"]) == 0
    assert "<svg" in (tmp_path / "x.svg").read_text()


@pytest.mark.graphviz
@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
def test_graph_that_dot_cannot_write_is_one_line(tmp_path, capsys):
    """dot failing (here: the .svg is a directory; a full disk did it) is one line naming the
    file (it was a CalledProcessError traceback)."""
    (tmp_path / "x.svg").mkdir()
    assert cli.main(["graph", MLP, "--out", str(tmp_path / "x.svg"), "--set",
                     "model.hidden=[8]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shardgrad graph: error: cannot write {tmp_path}/x.svg: Graphviz's "
                          f"dot said: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["train", "-n", "3", MLP, "--set", "parallel.pp=2"], "multiple of parallel.pp = 2"),
    (["train", "-n", "0", MLP], "-n 0"),
])
def test_train_n_bad_counts_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.mpi
@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_train_n_starts_the_ranks_and_sets_dp(tmp_path):
    """``shardgrad train -n 2`` = ``mpirun -n 2 shardgrad train --set parallel.dp=2``."""
    small = ["--set", "train.epochs=1", "--set", "model.hidden=[16]", "--set", "device.threads=1"]
    r = _cli("train", "-n", "2", MLP, "--out", str(tmp_path / "n2"), *small, timeout=140)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "n2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["parallel"]["dp"] == 2
    assert json.loads(r.stdout.strip().splitlines()[-1])["world_size"] == 2


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `shardgrad config show ... | head -1`: the pipe's reader is gone before the output is
    # written, which must not print an error line or a traceback
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    p = subprocess.Popen([sys.executable, "-m", "shardgrad", "config", "show", MLP],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    p.stdout.close()
    try:
        err = p.communicate(timeout=120)[1].decode()
    finally:
        p.kill()
    assert err == "" and p.returncode == 141, (p.returncode, err)


def test_launch_under_ray_of_a_missing_program_is_one_line_before_ray(tmp_path, capsys,
                                                                      monkeypatch):
    """`launch --launcher ray` used to start (or join) a Ray cluster and then print mpirun's
    9-line block, once per `cluster.max_restarts`, exit 183."""
    monkeypatch.setattr(cli, "_ray_launch", lambda: pytest.fail("the Ray launcher was reached"))
    (tmp_path / "notes.txt").write_text("")
    for program, said in ((tmp_path / "none", "no such program (not a file, nor on PATH)"),
                          (tmp_path / "notes.txt", "not executable")):
        argv = ["launch", "-n", "2", "--launcher", "ray", "--set", "cluster.max_restarts=1",
                "--", str(program), "x"]
        assert cli.main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.err == f"shardgrad launch: error: {program}: {said}\n" and out.out == "", argv


def test_bad_arguments_of_graph_simulate_and_launch_are_one_line(tmp_path, capsys):
    """Each used to go through: graph --out x.jpg wrote DOT text into x.jpg; --microbatches 0
    and --gpus-per-node 0 were taken as the default; launch of a missing program printed
    mpirun's 9-line block (exit 183); an OSError read `[Errno 30] Read-only ...`."""
    (tmp_path / "notes.txt").write_text("")
    cases = [(["graph", MLP, "--out", str(tmp_path / "x.jpg")],
              f"--out {tmp_path}/x.jpg: expected a .dot, .svg, .png or .pdf file"),
             (["graph", MLP, "--out", str(tmp_path / "notes.txt" / "x.dot")],
              f"{tmp_path}/notes.txt: File exists"),
             (["launch", "-n", "2", "--", str(tmp_path / "none")],
              f"{tmp_path}/none: no such program (not a file, nor on PATH)"),
             (["launch", "-n", "2", "--", str(tmp_path / "notes.txt")],
              f"{tmp_path}/notes.txt: not executable")]
    for argv, said in cases:
        assert cli.main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.err == f"shardgrad {argv[0]}: error: {said}\n" and out.out == "", argv
    assert not (tmp_path / "x.jpg").exists()
    for flag in ("--pp", "--microbatches", "--gpus-per-node"):
        with pytest.raises(SystemExit) as e:
            cli.main(["simulate", MLP, "--ranks", "2", flag, "0"])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == \
            f"shardgrad simulate: error: argument {flag}: must be >= 1, got 0"
