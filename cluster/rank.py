"""How the Ray launcher starts each rank, so that a rank killed by a signal is named even when
a peer that lost it aborts the job first:

  python -m shardgrad.cluster.rank PROGRAM [ARGS]...

runs PROGRAM as a child (which dies with this process) and passes SIGTERM, SIGINT and SIGHUP
on to it; when a signal kills the child, it says so on stderr and leaves a note (rank, signal,
time) in the directory SHARDGRAD_RANK_NOTES names, where the rank's Host actor reads it.
Imports runtime.config.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from shardgrad.runtime import config as cfg

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: the child may outlive a killed wrapper
        pass


def main(argv: list[str] | None = None) -> int:
    program = sys.argv[1:] if argv is None else argv
    if not program:
        print("usage: python -m shardgrad.cluster.rank PROGRAM [ARGS]...", file=sys.stderr)
        return 2
    child = subprocess.Popen(program, preexec_fn=_die_with_parent)

    def forward(sig, frame):
        child.send_signal(sig)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    if code >= 0:
        return code
    rank = cfg.env("OMPI_COMM_WORLD_RANK") or "?"
    name = signal.Signals(-code).name
    print(f"rank {rank} was killed by {name} (pid {child.pid})", file=sys.stderr, flush=True)
    notes = cfg.env("SHARDGRAD_RANK_NOTES")
    if notes:
        try:
            with open(os.path.join(notes, f"rank-{rank}"), "w") as f:
                f.write(f"{rank} {-code} {time.time()}\n")
        except OSError:
            pass
    return 128 - code


if __name__ == "__main__":
    sys.exit(main())
