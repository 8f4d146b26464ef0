"""Suite-wide settings. The python's own bin directory goes first on PATH, so the mpirun that
`pip install -e ".[mpi]"` put beside it is found (and the ranks run this python) even when the
venv was not activated. With SHARDGRAD_FORBID_SKIP naming markers (.ci/run sets "mpi,ray"),
a test carrying one of them that skips fails the run: a green CI then means they ran."""

import os
import sys

import pytest

_BIN = os.path.dirname(sys.executable)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# The compiled CPU step's generated C (runtime/native.py) computes exp, erf, tanh, ... within
# a few ulps of NumPy's, not bit for bit, and the suite's equivalence tests hold the compiled
# program to the interpreter bitwise: they run its NumPy kernels, and tests/runtime/
# test_native.py turns the C path on and checks it against the interpreter.
os.environ.setdefault("SHARDGRAD_NATIVE", "0")

FORBIDDEN = tuple(m for m in os.environ.get("SHARDGRAD_FORBID_SKIP", "").split(",") if m)
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if FORBIDDEN and report.skipped and any(m in report.keywords for m in FORBIDDEN):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    # a module skipped whole (a module-level skip) hides its markers: count it too
    if FORBIDDEN and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append(f"{report.nodeid} (the whole module): {reason}")


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(
            f"SHARDGRAD_FORBID_SKIP={','.join(FORBIDDEN)}: {len(_skipped)} such test(s) "
            f"skipped, which fails the run:", red=True)
        for line in _skipped:
            terminalreporter.write_line(f"  {line}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _skipped and session.exitstatus in (0, 5):   # 5: nothing ran but the skips
        session.exitstatus = 1
