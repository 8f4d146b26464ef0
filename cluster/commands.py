"""Command builders for launching jobs: pure functions from hosts and options to argv lists,
and the parsers for what the launchers hand back (an ssh-style agent's arguments, the rank
that failed first in mpirun's output). No processes, no Ray, no MPI; imports only the Ray
agent's argument parser (cluster/ray_agent.py, standard library only).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

from shardgrad.cluster.ray_agent import ssh_target

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_agent.py")
RANK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank.py")
# Open MPI (PRRTE) settings that make one fake host per Ray actor work:
# - plm_ssh_agent: start each host's daemon with our agent instead of ssh;
# - map-by node: rank i on host i. The default (by slot) put both ranks under the first daemon
#   once the daemons reported the same real hostname, so rank 1 did not run under its actor;
# - coll ^han: with two daemons on one machine the ranks disagreed on their topology, one
#   entered HAN's hierarchical barrier and the other tuned's, and the first barrier hung.
# - bind-to none: Ray owns the slots. Each daemon bound its one rank to its "node"'s first
#   core, so two ranks of one machine shared core 0 and a digits step took 19 ms, not 2 ms.
RAY_MPIRUN_OPTIONS = ("--map-by", "node", "--bind-to", "none", "--mca", "coll", "^han")


def mpirun_argv(program: Sequence[str], n: int, *, hosts: Sequence[str] = (), slots: int = 1,
                agent: str | None = None, as_root: bool = False, oversubscribe: bool = False,
                export: Sequence[str] = (), options: Sequence[str] = (),
                mpirun: str = "mpirun") -> list[str]:
    """Open MPI's ``mpirun`` starting ``n`` copies of ``program``.

    ``hosts`` get ``slots`` slots each, in order; ``agent`` replaces ssh for starting the daemon on
    each host (called as ``AGENT HOST COMMAND...``); ``export`` names environment variables
    passed on to the ranks (``-x``); ``options`` go before the program.
    """
    if n < 1:
        raise ValueError(f"mpirun needs at least one process, got n = {n}")
    if hosts and len(hosts) * slots < n:
        raise ValueError(f"{n} ranks need {n} hosts with one slot each, got {len(hosts)}"
                         if slots == 1 else
                         f"{n} ranks need {n} slots, got {len(hosts)} hosts of {slots}")
    argv = [mpirun, "-n", str(n)]
    if as_root:
        argv.append("--allow-run-as-root")
    if oversubscribe:
        argv.append("--oversubscribe")
    if hosts:
        argv += ["--host", ",".join(f"{h}:{slots}" for h in hosts)]
    if agent:
        argv += ["--prtemca", "plm_ssh_agent", agent]
    for name in export:
        argv += ["-x", name]
    return argv + list(options) + list(program)


def train_argv(config_path: str, out_dir: str, resume: str | None = None,
               python: str = sys.executable) -> list[str]:
    """``shardgrad train`` as one rank runs it (``python -m shardgrad``, so the ranks use the
    same interpreter as the launcher rather than whichever ``shardgrad`` is first on PATH)."""
    argv = [python, "-m", "shardgrad", "train", config_path, "--out", out_dir]
    return argv + (["--resume", resume] if resume else [])


def agent_command(python: str = sys.executable) -> str:
    """The ssh replacement mpirun calls to start a daemon on a Ray host (one string: PRRTE
    splits it on spaces). Run by path, without site: it needs the standard library only, and
    ``-m shardgrad...`` would import the whole package first."""
    return f"{python} -S {AGENT}"


def ray_program_argv(hosts: Sequence[str], program: Sequence[str], *, as_root: bool = False,
                     export: Sequence[str] = (), wdir: str | None = None, ranks: int | None = None,
                     python: str = sys.executable) -> list[str]:
    """The mpirun command the Ray launcher runs: ``program`` as one rank per host, rank i on
    ``hosts[i]``, each host's daemon started by the Ray agent inside that host's actor; or,
    given ``ranks`` and one host, all ranks under that host's daemon (ranks under one daemon
    talk through shared memory; ranks under two daemons of one machine took TCP, and a
    digits step twice as long). With no hosts, mpirun starts the ``ranks`` on this machine
    itself (the launcher's slots are all here). The ranks start in ``wdir`` when given."""
    n = len(hosts) if ranks is None else ranks
    if not hosts:
        # Ray reserved the slots, so Open MPI's count of cores does not limit them. Bound as
        # plain mpirun binds (one mpirun for all of them: ranks on cores of their own); with
        # --bind-to none a digits step took 14 ms here instead of 1-2 ms at load 12-16.
        return mpirun_argv(program, n, as_root=as_root, oversubscribe=True, export=export,
                           options=("--wdir", wdir) if wdir else ())
    options = RAY_MPIRUN_OPTIONS + (("--wdir", wdir) if wdir else ())
    if n > len(hosts) == 1:
        options = ("--map-by", "slot") + options[2:]
    return mpirun_argv(program, n, hosts=hosts, slots=n // len(hosts), agent=agent_command(python),
                       as_root=as_root, export=export, options=options)


def ray_job_argv(hosts: Sequence[str], config_path: str, out_dir: str,
                 resume: str | None = None, *, as_root: bool = False,
                 export: Sequence[str] = (), ranks: int | None = None,
                 python: str = sys.executable) -> list[str]:
    """``shardgrad train`` of ``config_path`` as the Ray launcher runs it (see
    ``ray_program_argv``), each rank under cluster/rank.py (by path, without site: standard
    library only), which names a rank a signal killed."""
    rank = [python, "-S", RANK]
    return ray_program_argv(hosts, rank + train_argv(config_path, out_dir, resume, python),
                            as_root=as_root, export=export, ranks=ranks, python=python)


# What names the failed rank in a job's output, most authoritative first: a rank that a peer
# found hung, or that the Ray launcher saw killed; then mpirun's report of the first process
# that died or exited non-zero, then the ranks' own words (a rank that saw its peer die may
# report a failure of its own before mpirun does).
_FAILED_RANK = [
    re.compile(r"\brank (\d+) hangs:"),                      # a peer's watchdog (runtime/mpi.py)
    # cluster/rank.py (Ray launcher); SIGTERM is what prterun sends the others when it ends
    # a job, so that note comes after prterun's report
    re.compile(r"\brank (\d+) was killed by (?!SIGTERM)"),
    re.compile(r"process rank (\d+) with PID \d+ on node"),  # prterun: a signal or an abort
    re.compile(r"Process name: \[[^,\]]+,(\d+)\]"),          # prterun: a non-zero exit code
    re.compile(r"MPI_ABORT was invoked on rank (\d+)"),      # Open MPI and MPICH
    # a signal to a rank (cli.py); after prterun's report, since prterun ending a job after
    # a rank failed signals the others, which say so too
    re.compile(r"\brank (\d+) was terminated by"),
    re.compile(r"\brank (\d+) was killed by SIGTERM"),
    re.compile(r"\brank (\d+) failed:"),                     # shardgrad's own line (cli.py)
]


# Open MPI's banners after a rank failed: the rank's own line already says what happened.
_MPI_TRAILERS = ("MPI_ABORT was invoked", "exited with non-zero status", '"abort"')


def without_mpi_trailers(lines: Iterable[bytes]) -> Iterator[bytes]:
    """mpirun's output ``lines`` less the blocks (between lines of dashes) in which Open MPI
    repeats that a rank failed or aborted; each other line or block as it completes."""
    block: list[bytes] | None = None
    for line in lines:
        if block is not None:
            block.append(line)
        if not (line.strip() and not line.strip().strip(b"-")):   # not a line of dashes
            if block is None:
                yield line
            continue
        if block is None:
            block = [line]
            continue
        text = b"".join(block).decode(errors="replace")
        if not any(t in text for t in _MPI_TRAILERS):
            yield b"".join(block)
        block = None
    if block:
        yield b"".join(block)


def failed_rank(output: str) -> int | None:
    """The rank that an MPI job's ``output`` (stdout and stderr) names as failed, or None."""
    for pattern in _FAILED_RANK:
        m = pattern.search(output)
        if m:
            return int(m.group(1))
    return None


__all__ = ["AGENT", "RANK", "RAY_MPIRUN_OPTIONS", "agent_command", "failed_rank", "mpirun_argv",
           "ray_job_argv", "ray_program_argv", "ssh_target", "train_argv", "without_mpi_trailers"]
