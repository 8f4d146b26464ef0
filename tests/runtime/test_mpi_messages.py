"""What a user sees when a real ``mpirun`` job ends early: SIGTERM or SIGINT to mpirun (or to
``shardgrad train -n N``) makes each rank say it was terminated and by what; a bad-input
error (exit 2) under mpirun is one line of shardgrad's, with no Open MPI abort banner."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, SMALL, blobs_config, mpi_env, toml  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

TWO = [*MPIRUN, "-n", "2"]
TRAIN = [sys.executable, "-m", "shardgrad", "train"]
CONFIG = toml({**SMALL, "train.epochs": 400})
ENV = mpi_env()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("mpi_messages"), CONFIG)


def _signalled(argv, out: Path, sig) -> tuple[int, str]:
    """Run ``argv`` until its first checkpoint, send ``sig`` to it; exit code and stderr."""
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoints" / "epoch_1.safetensors").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
            time.sleep(0.05)
        job.send_signal(sig)
        _, err = job.communicate(timeout=30)   # until every rank closed its stderr
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return job.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_mpirun_each_rank_says_so(config, tmp_path, sig):
    out = tmp_path / "run"
    code, err = _signalled(TWO + TRAIN + [config, "--set", "parallel.dp=2", "--out",
                                             str(out)], out, sig)
    assert code != 0, err
    # prterun passes SIGTERM to the ranks whatever it received itself
    for rank in (0, 1):
        assert f"rank {rank} was terminated by SIGTERM" in err, err
    assert "MPI_ABORT" not in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_train_n_names_it(config, tmp_path, sig):
    out = tmp_path / "run"
    code, err = _signalled(TRAIN + ["-n", "2", config, "--out", str(out)], out, sig)
    name = signal.Signals(sig).name
    assert code == 128 + sig, err
    assert f"shardgrad: terminated by {name} (passed on to mpirun, which stopped the 2 ranks)" \
        in err.splitlines(), err
    for rank in (0, 1):
        assert f"rank {rank} was terminated by SIGTERM" in err, err
    assert "MPI_ABORT" not in err and "----" not in err, err


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_bad_config_key_under_mpirun_is_one_line(config):
    r = subprocess.run(TWO + TRAIN + [config, "--set", "train.bogus=1", "--set",
                                         "parallel.dp=2"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2, r.stderr
    said = [line for line in _lines(r.stderr) if line.startswith("shardgrad train: error:")]
    assert said == [said[0]] and "unknown config key 'train.bogus'" in said[0], r.stderr
    assert "MPI_ABORT" not in r.stderr, r.stderr


def test_bad_data_under_mpirun_is_one_line(tmp_path):
    argv = [*TRAIN, "--set", "data.dataset=npz", "--set", f"data.path={tmp_path}/none.npz"]
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    argv.insert(4, str(config))
    plain = subprocess.run(TWO + argv + ["--set", "parallel.dp=2", "--out",
                                            str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=60, env=ENV)
    assert plain.returncode == 2, plain.stderr
    said = [line for line in _lines(plain.stderr) if "none.npz" in line]
    assert said == [f"shardgrad train: error: data.path = '{tmp_path}/none.npz': no such file"], \
        plain.stderr
    assert "MPI_ABORT" not in plain.stderr, plain.stderr
    ours = subprocess.run(argv[:4] + ["-n", "2"] + argv[4:] + ["--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert ours.returncode == 2, ours.stderr
    assert _lines(ours.stderr) == said, ours.stderr


def test_error_on_rank_0_alone_is_one_line(config, tmp_path):
    """Rank 0 alone meets the error (it clears --out, where a directory is named like an
    earlier checkpoint) while rank 1 waits for it: prterun's SIGTERM to rank 1 used to add
    `rank 1 was terminated by SIGTERM`, and the error was a bare `[Errno 21] Is a directory`."""
    said = None
    for launcher, argv in [("plain", TWO + TRAIN + [config, "--set", "parallel.dp=2"]),
                           ("ours", TRAIN + ["-n", "2", config])]:
        out = tmp_path / launcher
        (out / "checkpoints" / "epoch_2.safetensors").mkdir(parents=True)
        r = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True,
                           timeout=60, env=ENV)
        assert r.returncode == 2, r.stderr
        said = (f"shardgrad train: error: cannot remove {out}/checkpoints/epoch_2.safetensors, "
                f"an earlier run's file in the run directory (--out {out}): Is a directory")
        lines = _lines(r.stderr)
        assert "was terminated by" not in r.stderr and lines.count(said) == 1, r.stderr
        if launcher == "ours":
            assert lines == [said], r.stderr


HOLDS_GIL = """
import ctypes, signal
from shardgrad.runtime import world
hold = ctypes.PyDLL(None).sleep    # libc's sleep, holding the GIL: no Python thread can run
signal.signal(signal.SIGTERM, lambda s, f: hold(60))   # a handler that never gets far
comm = world.start()
print("ready", comm.rank, flush=True)
hold(60)
"""


@pytest.mark.hostcc       # .ci/run forbids it to skip: a CI machine without a compiler fails
def test_a_rank_holding_the_gil_still_says_it_was_terminated(tmp_path):
    """The line comes from the signal handler itself (runtime/signals.c): a rank whose main
    thread holds the GIL (a long C call that keeps it, before and after the signal) when
    prterun passes SIGTERM on has no Python thread that could write it before prterun kills
    it. With the watcher thread alone this test fails."""
    from shardgrad.runtime import native
    if native.signals() is None:
        pytest.skip("no C compiler builds runtime/signals.c here")
    script = tmp_path / "holds_gil.py"
    script.write_text(HOLDS_GIL)
    job = subprocess.Popen([*TWO, sys.executable, str(script)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        ready = set()
        deadline = time.monotonic() + 60
        while len(ready) < 2:
            line = job.stdout.readline()
            assert line and time.monotonic() < deadline, job.stderr.read()
            if line.startswith("ready"):
                ready.add(line.split()[1])
        time.sleep(0.5)                     # both inside the GIL-holding sleep
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    for rank in (0, 1):
        assert f"rank {rank} was terminated by SIGTERM" in err, err
    assert err.count("was terminated by") == 2, err          # once a rank
