"""ZeRO stage 1 (``parallel.zero = 1``) under real ``mpirun``: equal to plain data parallelism
within 1e-9 in float64 at dp = 2 and at dp = 3 (uneven blocks), the same params_sha256 in
deterministic mode, 1/dp of the optimizer state per rank in summary.json, and a zero = 1
checkpoint (whole-model file) resuming at dp = 1 and dp = 4 with zero = 0 as an uninterrupted
run. Each run bounded by a timeout."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, SMALL, blobs_config, mpi_env, toml  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")]

CONFIG = toml({**SMALL, "model.kind": "mlp", "model.hidden": [32], "train.epochs": 2,
               "train.batch_size": 48, "train.optimizer": "adam", "train.lr": 0.01,
               "train.log_every": 5})
ENV = mpi_env()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return blobs_config(tmp_path_factory.mktemp("zero"), CONFIG, n=480, name="zero.toml")


def train(config, out, ranks, *sets, resume=None):
    cmd = [sys.executable, "-m", "shardgrad", "train", config, "--out", str(out),
           "--set", f"parallel.dp={ranks}"]
    cmd += [a for s in sets for a in ("--set", s)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if ranks > 1:
        cmd = MPIRUN + ["-n", str(ranks)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return summary, safetensors.numpy.load_file(str(out / "final.safetensors"))


@pytest.mark.parametrize("ranks", [2, 3])
def test_zero1_equals_plain_dp_in_float64(config, tmp_path, ranks):
    plain, ref = train(config, tmp_path / "plain", ranks)
    zero, got = train(config, tmp_path / "zero", ranks, "parallel.zero=1")
    assert zero["steps"] == plain["steps"] > 0 and set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-9 * np.abs(ref[k]).max())
    whole = plain["optimizer_state_bytes_per_rank"]
    assert whole == 2 * 8 * plain["num_params"]                 # Adam's two float64 moments
    assert zero["optimizer_state_bytes_per_rank"] <= whole / ranks * 1.05


def test_deterministic_zero1_and_its_checkpoint_resumed_at_dp1_and_dp4(config, tmp_path):
    det = ("parallel.deterministic=true", "parallel.chunks=4")
    whole, _ = train(config, tmp_path / "dp1", 1, *det)                    # uninterrupted
    zero2, _ = train(config, tmp_path / "z2", 2, *det, "parallel.zero=1")
    assert zero2["params_sha256"] == whole["params_sha256"]
    assert zero2["optimizer_state_bytes_per_rank"] <= \
        whole["optimizer_state_bytes_per_rank"] / 2 * 1.05
    half, _ = train(config, tmp_path / "half", 2, *det, "parallel.zero=1", "train.epochs=1")
    assert (tmp_path / "half" / "checkpoints" / "epoch_1.safetensors").exists()
    one, _ = train(config, tmp_path / "r1", 1, *det, resume=tmp_path / "half")
    four, _ = train(config, tmp_path / "r4", 4, *det, resume=tmp_path / "half")
    assert one["resumed_from"].endswith("epoch_1.safetensors")
    assert one["steps"] == four["steps"] == whole["steps"] == 2 * half["steps"]
    assert one["params_sha256"] == four["params_sha256"] == whole["params_sha256"]
