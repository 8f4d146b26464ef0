"""The suite's guard against a green run that did not test (tests/conftest.py): with
SHARDGRAD_FORBID_SKIP=mpi,ray,... as .ci/run sets it, a skipped `mpi` test fails the run, and the
python's bin directory is on PATH so mpirun is found without an activated venv."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
TESTS = """
import pytest

@pytest.mark.mpi
def test_distributed():
    pytest.skip("needs mpirun")

def test_plain():
    pytest.skip("optional")

def test_runs():
    assert True
"""


def _pytest(tmp_path, env, body=TESTS):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, **env))


@pytest.mark.timeout(150)
def test_a_skipped_mpi_test_fails_the_run_when_skips_are_forbidden(tmp_path):
    run = _pytest(tmp_path, {"SHARDGRAD_FORBID_SKIP": "mpi,ray"})
    assert run.returncode == 1, run.stdout
    assert "1 such test(s) skipped, which fails the run" in run.stdout
    assert "test_x.py::test_distributed: Skipped: needs mpirun" in run.stdout
    assert "test_plain" not in run.stdout.split("which fails the run")[1]


@pytest.mark.timeout(150)
def test_skips_pass_without_the_setting(tmp_path):
    run = _pytest(tmp_path, {"SHARDGRAD_FORBID_SKIP": ""})
    assert run.returncode == 0, run.stdout


@pytest.mark.timeout(150)
def test_a_module_skipped_whole_fails_the_run(tmp_path):
    run = _pytest(tmp_path, {"SHARDGRAD_FORBID_SKIP": "mpi"},
                  "import pytest\npytest.importorskip('no_such_module_here')\n"
                  "def test_a():\n    pass\n")
    assert run.returncode == 1, run.stdout
    assert "(the whole module)" in run.stdout


def test_the_pythons_bin_directory_is_on_path():
    assert os.path.dirname(sys.executable) in os.environ["PATH"].split(os.pathsep)
    assert shutil.which("mpirun") is not None


def test_ci_forbids_skips_for_every_marker_but_gpu():
    # a new marker for a tool CI installs (mpirun, Ray, g++, dot) must be forbidden to skip
    # there, or its tests could skip unnoticed; only the GPU may be absent in CI
    root = Path(__file__).resolve().parents[2]
    markers = {m.split(":")[0] for m in tomllib.loads(
        (root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    forbidden = set(re.search(r"SHARDGRAD_FORBID_SKIP=([\w,]+)",
                              (root / ".ci" / "run").read_text()).group(1).split(","))
    assert markers - {"gpu", "faults"} == forbidden
