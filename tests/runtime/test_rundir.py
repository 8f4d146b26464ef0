"""Two runs never share a run directory: a second ``shardgrad train`` into a directory a live
run holds exits 2 naming the holder's host and pid, touching none of its files; a lock left
by a process that is gone is taken over; the lock goes with the run."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardgrad.runtime import rundir
from shardgrad.runtime import train as tr
from shardgrad.runtime.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent))
from blobs import SMALL, blobs_config, mpi_env, toml  # noqa: E402

CONFIG = toml({**SMALL, "train.dtype": None, "train.epochs": 2, "train.lr": 0.1})
ENV = mpi_env()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("rundir"), CONFIG)


def _train(config, out, *sets, **kw):
    argv = [sys.executable, "-m", "shardgrad", "train", config, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


@pytest.mark.timeout(120)
def test_a_second_run_into_a_held_directory_exits_2_naming_the_holder(config, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_train(config, out, "train.epochs=100000", "train.seed=0"),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while tr.latest_checkpoint(str(out)) is None:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        before = {n for n in os.listdir(out / "checkpoints") if tr.CHECKPOINT.match(n)}
        second = subprocess.run(_train(config, out, "train.epochs=1", "train.seed=1"),
                                env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [
            f"shardgrad train: error: the run directory {str(out)!r} (--out) is in use by "
            f"another run: pid {first.pid} on host {socket.gethostname()} since "
            f"{lines[0].split(' since ')[1].split(' holds ')[0]} holds "
            f"{out / rundir.LOCK}; give this run another --out, or stop that one"], lines
        assert first.poll() is None                        # the first run goes on, untouched
        assert before <= set(os.listdir(out / "checkpoints"))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["kind"] in ("step", "epoch") for r in records) and records
    finally:
        first.kill()
        first.communicate()


def test_a_lock_whose_process_is_gone_is_taken_over(config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / rundir.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                               "since": 1.0}))
    summary = tr.train(load_config(config, ["train.epochs=1"]), str(out))
    assert summary["steps"] > 0
    assert not (out / rundir.LOCK).exists()                   # released with the run


def test_the_lock_names_this_process_while_held_and_refuses_a_second_holder(tmp_path):
    with rundir.hold(str(tmp_path)):
        info = rundir.holder(str(tmp_path))
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from shardgrad.runtime import rundir\n"
             "try:\n    rundir.hold(sys.argv[1]).__enter__()\n"
             "except Exception as e:\n    print(type(e).__name__, e)", str(tmp_path)],
            capture_output=True, text=True, timeout=60)
        assert other.stdout.startswith(f"ConfigError the run directory {str(tmp_path)!r} "
                                       f"(--out) is in use by another run: pid {os.getpid()} "
                                       f"on host {socket.gethostname()}"), other
    assert rundir.holder(str(tmp_path)) is None
    with rundir.hold(str(tmp_path)):                          # free again
        pass


def test_an_unwritable_lock_names_its_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the run directory .*file/run' "
                                          r"\(--out\): Not a directory"):
        with rundir.hold(str(tmp_path / "file" / "run")):
            pass
    with pytest.raises(ConfigError) as e:            # --out naming a file: it says so
        with rundir.hold(str(tmp_path / "file")):
            pass
    assert str(e.value) == f"the run directory '{tmp_path}/file' (--out) is a file, not a directory"
