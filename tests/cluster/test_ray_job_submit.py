"""README's `ray job submit` path against a local Ray head this test starts (`ray start
--head --block`, stopped by ending that process, so no other Ray on the machine is touched):
the `ray` extra brings Ray's job CLI (ray[default]), and the submitted job trains with
`--launcher ray` to the same params_sha256 as mpirun."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from blobs import SMALL, blobs_config, toml  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.mpi, pytest.mark.timeout(300)]

CONFIG = toml({**SMALL, "train.epochs": 2, "parallel.deterministic": True})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_trains_like_mpirun(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = blobs_config(work, CONFIG)
    env = dict(os.environ, SHARDGRAD_PROGRESS="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"sg-ray-{os.getpid()}"     # short: Ray's socket paths must fit
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:   # the job server answers once the dashboard is up
            assert head.poll() is None, head.communicate()[0][-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:   # it answers (token authentication refuses us)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head's job server never came up"
                time.sleep(1)
        out = tmp_path / "ray-run"
        while True:   # the head's job agent starts after its dashboard
            submit = subprocess.run(
                [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                 f"http://127.0.0.1:{dash}", "--working-dir", str(work), "--",
                 "python", "-m", "shardgrad", "train", os.path.basename(config),
                 "--launcher", "ray", "--set", "parallel.dp=2", "--out", str(out)],
                env=env, capture_output=True, text=True, timeout=200)
            if "No available agent to submit job" not in submit.stderr:
                break
            assert time.monotonic() < deadline, "the Ray head's job agent never came up"
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout, submit.stdout[-3000:]
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    mpi = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2",
                          sys.executable, "-m", "shardgrad", "train", config, "--set",
                          "parallel.dp=2", "--out", str(tmp_path / "mpi-run")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert mpi.returncode == 0, mpi.stderr
    ray_summary = json.loads((out / "summary.json").read_text())
    assert ray_summary["params_sha256"] == \
        json.loads(mpi.stdout.splitlines()[-1])["params_sha256"]
    assert ray_summary["world_size"] == 2
