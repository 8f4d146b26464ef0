"""Resume at another world size under real ``mpirun``: checkpoints hold the whole model, so a
run checkpointed at dp = 2 (or pp = 2) continues at dp = 1, dp = 4 or pp = 2, and in
deterministic float64 mode ends with the parameters of an uninterrupted run at the new size
(the same params_sha256). Each run bounded by a timeout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from blobs import MPIRUN, NEEDS_MPI, SMALL, toml  # noqa: E402

pytestmark = NEEDS_MPI

CONFIG = toml({**SMALL, "model.hidden": [32], "train.epochs": 2, "train.lr": 0.1,
               "parallel.deterministic": True, "parallel.chunks": 4,
               "parallel.microbatches": 2})


def _train(config, out, n, *sets, resume=None):
    cmd = [sys.executable, "-m", "shardgrad", "train", str(config), "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if n > 1:
        cmd = [*MPIRUN, "-n", str(n), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.timeout(600)
def test_a_checkpoint_resumes_at_another_world_size(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    dp2 = _train(config, tmp_path / "dp2", 2, "parallel.dp=2", "train.epochs=1")
    assert dp2["steps"] > 0 and (tmp_path / "dp2" / "checkpoints" / "epoch_1.safetensors").exists()
    whole = _train(config, tmp_path / "dp1", 1)          # uninterrupted, 2 epochs
    one = _train(config, tmp_path / "r1", 1, resume=tmp_path / "dp2")
    four = _train(config, tmp_path / "r4", 4, "parallel.dp=4", resume=tmp_path / "dp2")
    assert one["resumed_from"].endswith("epoch_1.safetensors")
    assert one["steps"] == four["steps"] == whole["steps"] == 2 * dp2["steps"]
    assert one["params_sha256"] == whole["params_sha256"]
    assert four["params_sha256"] == whole["params_sha256"]

    # a pipeline's checkpoint is whole too: it resumes at dp = 1 and dp = 2 alike, and a
    # dp = 2 checkpoint resumes as a pipeline (pp = 2)
    pp2 = _train(config, tmp_path / "pp2", 2, "parallel.pp=2", "train.epochs=1")
    back = _train(config, tmp_path / "b1", 1, resume=tmp_path / "pp2")
    back2 = _train(config, tmp_path / "b2", 2, "parallel.dp=2", resume=tmp_path / "pp2")
    assert back["params_sha256"] == back2["params_sha256"] != pp2["params_sha256"]
    piped = _train(config, tmp_path / "p2", 2, "parallel.pp=2", resume=tmp_path / "dp2")
    assert piped["steps"] == whole["steps"] and piped["world_size"] == 2
    assert abs(piped["train_loss"] - whole["train_loss"]) <= 1e-9 * abs(whole["train_loss"])
