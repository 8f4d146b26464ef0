"""How the Ray launcher starts each rank, so that a rank killed by a signal is named even when
a peer that lost it aborts the job first:

  python -S .../shardgrad/cluster/rank.py PROGRAM [ARGS]...

runs PROGRAM as a child (which dies with this process) and passes SIGTERM, SIGINT and SIGHUP
on to it; when a signal kills the child, it says so on stderr and leaves a note (rank, signal,
time) in the directory SHARDGRAD_RANK_NOTES names, where the rank's Host actor reads it (a
diverged run leaves one there too: cli.cmd_train).
Imports only the standard library and is run by path: importing shardgrad first (as ``-m``
would) took 1-1.6 s before each rank could start, on the Ray job's path to its first step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child, before it runs PROGRAM: SIGKILL when the wrapper (pid ``parent``) dies.
    A wrapper killed before the child asked is already gone: its child is re-parented, and
    ends itself here (else it ran on orphaned, its rank hanging the job on its pipes)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: the child may outlive a killed wrapper
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    program = sys.argv[1:] if argv is None else argv
    if not program:
        print("usage: python -S rank.py PROGRAM [ARGS]...", file=sys.stderr)
        return 2
    parent = os.getpid()
    child = subprocess.Popen(program, preexec_fn=lambda: _die_with_parent(parent))

    def forward(sig, frame):
        child.send_signal(sig)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    if code >= 0:
        return code
    # Read here, not through runtime.config: see leave_note.
    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    name = signal.Signals(-code).name
    print(f"rank {rank} was killed by {name} (pid {child.pid})", file=sys.stderr, flush=True)
    leave_note(f"rank-{rank}", f"{rank} {-code} {time.time()}\n")
    return 128 - code


def leave_note(name: str, text: str) -> None:
    """Write ``text`` to file ``name`` in the directory SHARDGRAD_RANK_NOTES names (set by the
    Ray launcher: its Host actor reads the notes there; unset: nothing is written)."""
    # Read here, not through runtime.config (config.ENV documents both): that would import
    # shardgrad (see the docstring).
    notes = os.environ.get("SHARDGRAD_RANK_NOTES")
    if notes:
        try:
            with open(os.path.join(notes, name), "w") as f:
                f.write(text)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
