"""The fault suite (``pytest -m faults tests/faults``): kill -9, SIGSTOP, SIGTERM and an
injected exception at a seeded random moment on a seeded random rank, for dp=2, pp=2 and
dp=2 x pp=2 under mpirun and dp=2 under the Ray launcher. Each case asserts that the job ends
within 10 s of the fault (a stopped rank: parallel.timeout_s + 5 s), that the rank named as
failed is the faulty one, that every file left in the run directory is whole (checkpoints
verify against their checksums, JSON parses; a kill may cut write_atomic's hidden temporary
file, which nothing reads and the resume removes), and that ``--resume`` ends with the
uninterrupted run's params_sha256. SHARDGRAD_FAULT_SEED replays a failure (the seed of each
case is printed when it fails)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from shardgrad.cluster.commands import failed_rank
from shardgrad.runtime import train as tr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import MPIRUN, SMALL, blobs_config, mpi_env, toml  # noqa: E402

pytestmark = [pytest.mark.faults, pytest.mark.mpi]

SEED = int(os.environ.get("SHARDGRAD_FAULT_SEED", "20261204"))
EPOCHS = 60
TIMEOUT_S = 2     # parallel.timeout_s: how long a collective waits for a stopped rank
CONFIG = toml({**SMALL, "train.epochs": EPOCHS, "train.batch_size": 120, "train.lr": 0.05,
               "train.momentum": 0.9, "parallel.timeout_s": TIMEOUT_S})
LAYOUTS = {"dp2": ["parallel.dp=2"], "pp2": ["parallel.pp=2"],
           "dp2xpp2": ["parallel.dp=2", "parallel.pp=2"],
           # under Ray, resumed by mpirun: deterministic reduction gives both the same bits
           "ray-dp2": ["parallel.dp=2", "parallel.deterministic=true"]}
KINDS = ["kill9", "sigstop", "sigterm", "exception"]
ENV = mpi_env()


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def _ranks(layout):
    return 4 if layout == "dp2xpp2" else 2


def _train(config, layout, *args, launcher="mpi"):
    argv = [sys.executable, "-m", "shardgrad", "train", config, *args, *_sets(LAYOUTS[layout])]

    if launcher == "ray":
        return argv + ["--launcher", "ray"]
    return MPIRUN + ["-n", str(_ranks(layout))] + argv


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("faults"), CONFIG)


@pytest.fixture(scope="module")
def whole(config, tmp_path_factory):
    """params_sha256 of each layout's uninterrupted run."""
    found = {}
    for layout in LAYOUTS:
        out = tmp_path_factory.mktemp(f"whole-{layout}")
        run = subprocess.run(_train(config, layout, "--out", str(out)), capture_output=True,
                             text=True, timeout=120, env=ENV)
        assert run.returncode == 0, run.stderr
        found[layout] = json.loads(run.stdout.splitlines()[-1])["params_sha256"]
    return found


def _rank_pid(out, rank):
    """The training process of ``rank`` writing to ``out`` (not the Ray launcher's wrapper)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[1:4] != [b"-m", b"shardgrad", b"train"] or str(out).encode() not in argv:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"\0OMPI_COMM_WORLD_RANK={rank}\0".encode() in b"\0" + f.read():
                    return int(entry)
        except (OSError, IndexError):
            continue
    return None


def _whole_files(out):
    """Every file the run left is whole: checkpoints verify, JSON parses, no temporary file."""
    for where, _, names in os.walk(out):
        for name in names:
            path = os.path.join(where, name)
            if name.startswith(".") and ".tmp-" in name:
                continue   # write_atomic's temporary file, cut by a kill: never read as data
            if name.endswith(".safetensors"):
                tr.load_checkpoint(path)               # raises unless every checksum matches
            elif name.endswith(".json"):
                json.loads(Path(path).read_text())
            elif name == "metrics.jsonl":
                for line in Path(path).read_text().splitlines():
                    json.loads(line)


def _case(config, whole, tmp_path, layout, kind, launcher, seed):
    rng = random.Random(seed)
    ranks = _ranks(layout)
    rank = rng.randrange(ranks)
    after_epoch = rng.randint(1, 4)
    delay = rng.uniform(0, 0.05)
    out = tmp_path / "run"
    extra = []
    if kind == "exception":   # raised inside the step of a seeded random step
        # after the first checkpoint (4 steps an epoch), so there is one to resume from
        extra = _sets([f"debug.fail_at_step={rng.randint(5, 40)}", f"debug.fail_rank={rank}"])
    job = subprocess.Popen(_train(config, layout, "--out", str(out), *extra, launcher=launcher),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []   # (arrival time, stderr line): the injected exception's moment is its report

    def read():
        for line in job.stderr:
            lines.append((time.monotonic(), line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pid = None
    try:
        deadline = time.monotonic() + 90
        if kind != "exception":
            while (tr.latest_checkpoint(str(out)) is None
                   or len(os.listdir(out / "checkpoints")) < after_epoch
                   or (pid := _rank_pid(out, rank)) is None):
                assert job.poll() is None and time.monotonic() < deadline, lines
                time.sleep(0.01)
            time.sleep(delay)
            os.kill(pid, {"kill9": signal.SIGKILL, "sigstop": signal.SIGSTOP,
                          "sigterm": signal.SIGTERM}[kind])
            faulted = time.monotonic()
        job.wait(timeout=60)
        ended_at = time.monotonic()
        reader.join(10)
        err = "".join(line for _, line in lines)
        if kind == "exception":
            faulted = next(t for t, line in lines if "InjectedFault" in line)
        ended = ended_at - faulted
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode != 0, err[-3000:]
    limit = TIMEOUT_S + 5 if kind == "sigstop" else 10
    assert ended < limit, f"ended {ended:.1f} s after the fault: {err[-3000:]}"
    if launcher == "ray":   # the launcher's own verdict, its last word on the job
        named = re.findall(r"shardgrad ray: rank (\d+) \(host \S+ on .*\) failed", err)
        assert named == [str(rank)], err[-3000:]
    else:
        assert failed_rank(err) == rank, err[-3000:]
    _whole_files(out)
    resumed = subprocess.run(_train(config, layout, "--resume", str(out)), capture_output=True,
                             text=True, timeout=120, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    left = [n for _, _, names in os.walk(out) for n in names if ".tmp-" in n]
    assert not left, f"the resumed run left temporary files: {left}"
    assert json.loads(resumed.stdout.splitlines()[-1])["params_sha256"] == whole[layout]


def _replayable(layout, kind, launcher, *args):
    seed = zlib.crc32(f"{SEED}-{layout}-{kind}-{launcher}".encode())
    try:
        _case(*args, layout, kind, launcher, seed)
    except AssertionError as e:
        raise AssertionError(f"[replay: SHARDGRAD_FAULT_SEED={SEED}, case seed {seed}] {e}"
                             ) from None


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["dp2", "pp2", "dp2xpp2"])
def test_fault_under_mpirun(config, whole, tmp_path, layout, kind):
    _replayable(layout, kind, "mpi", config, whole, tmp_path)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", KINDS)
def test_fault_under_ray(config, whole, tmp_path, kind, ray_cluster, monkeypatch):
    for name, value in os.environ.items():   # what ray.init set (its auth token) too
        if ENV.get(name) != value and name not in ("SHARDGRAD_PROGRESS",):
            monkeypatch.setitem(ENV, name, value)
    monkeypatch.setitem(ENV, "RAY_ADDRESS", ray_cluster)
    _replayable("ray-dp2", kind, "ray", config, whole, tmp_path)
