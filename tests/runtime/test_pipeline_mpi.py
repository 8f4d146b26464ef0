"""Pipeline execution under real ``mpirun``: the pipelined steps end with the local run's
parameters (float64, 1e-9 relative) for the digits MLP and CNN on pp = 2, a 4-stage MLP,
and a dp = 2 x pp = 2 mesh, with GPipe and 1F1B, with and without gradient clipping (its
global norm allreduced over the stages). One mpirun per world size (start-up costs
seconds), each bounded by a timeout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_cases as cases  # noqa: E402
from blobs import MPIRUN, NEEDS_MPI  # noqa: E402

pytestmark = NEEDS_MPI

RUNS = {
    2: ["mlp:1:2:4:gpipe", "mlp:1:2:4:1f1b", "cnn:1:2:4:gpipe", "cnn:1:2:2:1f1b",
        "mlpclip:1:2:4:1f1b", "cnnclip:1:2:2:gpipe"],
    4: ["mlp4:1:4:2:gpipe", "mlp4:1:4:8:1f1b", "mlp:2:2:2:gpipe", "mlp:2:2:4:1f1b",
        "cnn:2:2:2:gpipe", "cnn:2:2:2:1f1b", "mlpclip:2:2:2:1f1b", "mlp4clip:1:4:4:gpipe"],
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ranks", sorted(RUNS))
def test_pipeline_under_mpirun_equals_the_local_run(ranks, tmp_path):
    data = tmp_path / "digits.npz"
    cases.save_digits(data)
    cmd = [*MPIRUN, "-n", str(ranks), sys.executable, cases.__file__, "--data", str(data),
           *RUNS[ranks]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(RUNS[ranks])
    assert max(errors.values()) < 1e-9, errors
