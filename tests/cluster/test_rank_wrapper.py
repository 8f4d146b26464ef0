"""cluster/rank.py, the wrapper the Ray launcher starts each rank under: its child dies with
it, also when the wrapper is killed before the child could ask to (the child, re-parented,
ends itself instead of running on orphaned and holding the job's pipes open)."""

import os
import signal
import subprocess
import sys
import time

from shardgrad.cluster import commands

PROBE = ("import importlib.util, os, sys, time; "
         "spec = importlib.util.spec_from_file_location('rank', sys.argv[1]); "
         "rank = importlib.util.module_from_spec(spec); spec.loader.exec_module(rank); "
         "rank._die_with_parent(int(sys.argv[2])); print('alive', flush=True)")


def test_a_child_whose_wrapper_is_already_gone_ends_itself():
    # the parent it was forked by (a pid that is not its parent now) is gone
    gone = subprocess.run([sys.executable, "-c", PROBE, commands.RANK, "1"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == -signal.SIGKILL and "alive" not in gone.stdout
    kept = subprocess.run([sys.executable, "-c", PROBE, commands.RANK, str(os.getpid())],
                          capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0 and "alive" in kept.stdout, kept.stderr


def test_a_killed_wrapper_takes_its_child_with_it(tmp_path):
    pidfile = tmp_path / "child"
    wrapper = subprocess.Popen(
        [sys.executable, "-S", commands.RANK, sys.executable, "-c",
         f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
         "time.sleep(120)"])
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    wrapper.kill()
    wrapper.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:        # a zombie waiting for init counts
            if f.read().split(") ")[-1].startswith("Z"):
                break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed wrapper")
