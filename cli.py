"""The ``shardgrad`` command: ``train`` a config, draw its training-step ``graph``, print its
pipeline ``plan``, or ``launch`` your own script as MPI ranks.

  shardgrad train CONFIG [--out DIR] [--set KEY=VALUE]... [--resume DIR] [--launcher ray]
  shardgrad graph CONFIG --out FILE.dot [--set KEY=VALUE]...
  shardgrad plan CONFIG [--set KEY=VALUE]...
  shardgrad launch -n N [--launcher mpi|ray] [--set cluster.KEY=VALUE]... -- PROGRAM [ARGS]...

A bad config, a missing file, unreadable data or checkpoint prints one line to stderr and exits
2; a diverged run (NaN or infinite loss) one line and exits 1.
Imports runtime and graph, and cluster's command builders (the top of the import order).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

from shardgrad.graph.ir import ShapeError
from shardgrad.runtime.config import ConfigError, load_config, mpi_world_size
from shardgrad.runtime.data import DataError

# ShapeError: the config's model cannot be traced for its batches (batch norm over one row).
USAGE_ERRORS = (ConfigError, DataError, OSError, ShapeError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgrad", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sets = {"action": "append", "default": [], "metavar": "KEY=VALUE",
            "help": "override a config key (repeatable; dotted key, value parsed as TOML)"}
    t = sub.add_parser("train", help="train the model a config describes")
    t.add_argument("config", help="TOML config file")
    t.add_argument("--out", help="run directory (default: runs/<config name>, or --resume's)")
    t.add_argument("--set", dest="sets", **sets)
    t.add_argument("--resume", metavar="DIR", help="continue from DIR's latest checkpoint")
    t.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: this process (or each rank mpirun started); ray: Ray places, "
                        "starts and watches parallel.dp x parallel.pp ranks that talk over "
                        "MPI")
    g = sub.add_parser("graph", help="write the training-step graph as DOT (and SVG/PNG)")
    g.add_argument("config", help="TOML config file")
    g.add_argument("--out", required=True, help="the .dot file to write")
    g.add_argument("--set", dest="sets", **sets)
    pl = sub.add_parser("plan", help="print the pipeline partition (parallel.pp stages) and "
                                     "its schedule grid")
    pl.add_argument("config", help="TOML config file")
    pl.add_argument("--set", dest="sets", **sets)
    la = sub.add_parser("launch", help="run your own program (e.g. a script calling "
                                       "sg.distributed.init()) as N MPI ranks")
    la.add_argument("-n", type=int, required=True, help="number of ranks")
    la.add_argument("--launcher", choices=("mpi", "ray"), default="mpi",
                    help="mpi: mpirun on this machine; ray: Ray places, starts and watches "
                         "the ranks (cluster.* keys) on the cluster at RAY_ADDRESS")
    la.add_argument("--set", dest="sets", **sets)
    la.add_argument("program", nargs=argparse.REMAINDER,
                    help="the command each rank runs, after --")
    return p


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (releasing the run directory), then say so."""

    def __init__(self, sig: int):
        super().__init__(sig)
        self.sig = sig

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.sig).name}"


def _terminate(sig, frame):
    raise Terminated(sig)


def cmd_train(args) -> int:
    from shardgrad.runtime.dp import communicator
    from shardgrad.runtime.train import Diverged, train

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)
    config = load_config(args.config, args.sets)
    out = args.out or args.resume or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.launcher == "ray":
        if mpi_world_size() is not None:   # each rank would start a whole Ray job of its own
            raise ConfigError("--launcher ray starts the ranks itself (parallel.dp x "
                              "parallel.pp of them): run it without mpirun/mpiexec")
        from shardgrad.cluster.commands import failed_rank, ray_job_argv
        from shardgrad.runtime.ray_launch import launch

        return launch(config, out, args.resume, ray_job_argv, failed_rank)
    comm = communicator(config)
    try:
        summary = train(config, out, comm=comm, resume=args.resume)
    except BaseException as e:  # an interrupted rank too: its peers would wait on it
        if comm.world_size > 1:
            if isinstance(e, Terminated):
                print(f"rank {comm.rank} was {e}", file=sys.stderr, flush=True)
                comm.abort(128 + e.sig)
            cause = ("interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt)
                     else f"{type(e).__name__}: {e}")
            print(f"rank {comm.rank} failed: {cause}", file=sys.stderr, flush=True)
            comm.abort(2 if isinstance(e, USAGE_ERRORS) else
                       130 if isinstance(e, KeyboardInterrupt) else 1)
        if isinstance(e, Terminated):
            print(f"shardgrad train: {e}", file=sys.stderr)
            return 128 + e.sig
        if isinstance(e, Diverged):
            print(f"shardgrad train: error: {e}", file=sys.stderr)
            return 1
        raise
    if comm.rank != 0:
        return 0
    shown = {k: summary[k] for k in ("test_accuracy", "train_loss", "steps", "epochs", "wall_s",
                                     "world_size", "params_sha256")}
    print(json.dumps({**shown, "out": out}))
    return 0


def write_graph(config, path: str) -> list[str]:
    """Trace one training step of ``config`` and write it to ``path`` as DOT, plus .svg and
    .png beside it when Graphviz's ``dot`` program is installed; returns the files written.
    With ``parallel.pp`` > 1 it draws the pipeline plan: nodes coloured by stage, a dashed
    edge from each send to its receive."""
    from shardgrad.graph.dot import to_dot
    from shardgrad.runtime.train import setup

    if config["parallel"]["pp"] > 1:
        from shardgrad.runtime.pipeline import plan_for_config

        dot = plan_for_config(config).to_dot()
    else:
        _, _, step, data = setup(config)
        b = min(config["train"]["batch_size"], len(data.y_train))
        graph, _ = step.graph_for(data.x_train[:b], data.y_train[:b])
        dot = to_dot(graph)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(dot.source)
    written = [path]
    if shutil.which("dot"):
        stem = os.path.splitext(path)[0]
        for fmt in ("svg", "png"):
            subprocess.run(["dot", f"-T{fmt}", path, "-o", f"{stem}.{fmt}"], check=True,
                           timeout=300)
            written.append(f"{stem}.{fmt}")
    return written


def cmd_graph(args) -> int:
    config = load_config(args.config, args.sets)
    for path in write_graph(config, args.out):
        print(path)
    return 0


def cmd_plan(args) -> int:
    from shardgrad.runtime.pipeline import plan_for_config

    print(plan_for_config(load_config(args.config, args.sets)))
    return 0


def cmd_launch(args) -> int:
    """Each rank runs ``args.program`` in this directory; mpirun's (or Ray's) exit code."""
    from shardgrad.cluster.commands import failed_rank, mpirun_argv, ray_program_argv

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise ConfigError("launch needs the program to run after --, e.g. "
                          "shardgrad launch -n 2 -- python train.py")
    if args.n < 1:
        raise ConfigError(f"-n {args.n}: the number of ranks must be at least 1")
    config = load_config(None, args.sets)
    if args.launcher == "ray":
        from shardgrad.runtime.ray_launch import launch_program

        command = functools.partial(ray_program_argv, wdir=os.getcwd())
        return launch_program(program, args.n, config["cluster"], command, failed_rank)
    if shutil.which("mpirun") is None:
        raise ConfigError("mpirun is not installed: pip install -e '.[mpi]'")
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    argv = mpirun_argv(program, args.n, as_root=root,
                       oversubscribe=args.n > (os.cpu_count() or 1))
    return subprocess.call(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "graph": cmd_graph, "plan": cmd_plan,
                "launch": cmd_launch}[args.command](args)
    except USAGE_ERRORS as e:
        print(f"shardgrad {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shardgrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
