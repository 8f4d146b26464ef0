"""runtime/signals.c through runtime.world: the handler installed for every signal Python
handles says the rank's line itself, once, before Python's handler runs; a forked child
says nothing. One process (no MPI): the line goes to the fd the world holds."""

import subprocess
import sys

import pytest

from shardgrad.runtime import native

SCRIPT = """
import ctypes, os, signal, sys
from shardgrad.runtime import world
hold = ctypes.PyDLL(None).sleep            # holds the GIL: only the C handler can say it
got = []
for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda s, f: got.append(s))
world._JOB_STDERR[0] = 1                   # the launcher's stderr: here our stdout
world._say_from_handler(3, (signal.SIGTERM, signal.SIGHUP))
pid = os.fork()
if pid == 0:                               # a forked child of the rank says nothing
    os.kill(os.getpid(), signal.{sig})
    os._exit(0)
os.waitpid(pid, 0)
os.kill(os.getpid(), signal.{sig})
hold(0)
os.kill(os.getpid(), signal.{sig})         # once a process
print("python handler ran", got == [signal.{sig}] * 2, world._said_by_handler(), flush=True)
"""


@pytest.mark.hostcc       # .ci/run forbids it to skip: a CI machine without a compiler fails
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_the_handler_says_the_line_once_for_each_signal_python_handles(sig):
    if native.signals() is None:
        pytest.skip("no C compiler builds runtime/signals.c here")
    run = subprocess.run([sys.executable, "-c", SCRIPT.replace("{sig}", sig)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"rank 3 was terminated by {sig}",
                                       "python handler ran True True"], run.stdout
