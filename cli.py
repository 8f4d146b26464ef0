"""The ``shardgrad`` command: ``train`` a config, draw its training-step ``graph``, print its
pipeline ``plan``, ``tune`` it by a sweep, ``launch`` your own script as MPI ranks, or
``config show`` every key.

  shardgrad train [-n N] CONFIG [--out DIR] [--set KEY=VALUE]... [--resume DIR]
                  [--launcher local|mpi|ray]
  shardgrad graph CONFIG --out FILE.dot|.svg|.png [--set KEY=VALUE]...
  shardgrad plan CONFIG [--set KEY=VALUE]... [--launcher ray]
  shardgrad tune CONFIG [--set K=V]... --search KEY=SPEC... [--trials N] [--ranks-per-trial R]
                 [--scheduler asha|fifo] [--out DIR]
  shardgrad launch -n N [--launcher local|mpi|ray] [--set cluster.KEY=VALUE]... -- PROGRAM...
  shardgrad config show [CONFIG] [--set KEY=VALUE]...
  shardgrad report RUN_DIR
  shardgrad trace RUN_DIR [--out FILE.json]
  shardgrad simulate CONFIG --ranks N [--pp P] [--microbatches M] [--gpus-per-node G]
                     [--link shm|nvlink|infiniband|ethernet] [--recommend] [--json]
  shardgrad evaluate RUN_DIR [--set data.KEY=VALUE]... [--out DIR]
  shardgrad predict RUN_DIR INPUT...
  shardgrad export RUN_DIR --format onnx --out FILE
  shardgrad --version

A bad config, a missing file, unreadable data or checkpoint prints one line to stderr and exits
2; a diverged run (NaN or infinite loss) one line and exits 1.
Imports runtime and graph, and cluster's command builders (the top of the import order).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
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


# The launcher names `train` and `launch` both take. local: processes on this machine (train
# without -n: this process, or the rank mpirun started); mpi: N ranks through mpirun on this
# machine; ray: Ray places, starts and watches the ranks, which talk over MPI.
LAUNCHERS = ("local", "mpi", "ray")
INSTALL_RAY = "Ray is not installed: pip install 'shardgrad[ray]' (from a checkout: " \
              "pip install -e '.[ray]')"
# Formats `graph --out` renders with Graphviz's dot program (any other name gets DOT text).
RENDERED = (".svg", ".png", ".pdf")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("shardgrad")
    except PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgrad", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"shardgrad {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    sets = {"action": "append", "default": [], "metavar": "KEY=VALUE",
            "help": "override a config key (repeatable; dotted key, value parsed as TOML); "
                    "`shardgrad config show` lists every key with its default and help"}
    t = sub.add_parser("train", help="train the model a config describes",
                       epilog="Every config key, its default and its help: shardgrad config "
                              "show [CONFIG] [--set KEY=VALUE]...")
    t.add_argument("-n", type=int, metavar="N",
                   help="start N ranks (through mpirun, or Ray with --launcher ray) with "
                        "parallel.dp = N / parallel.pp")
    t.add_argument("config", help="TOML config file")
    t.add_argument("--out", help="run directory (default: runs/<config name>, or --resume's)")
    t.add_argument("--set", dest="sets", **sets)
    t.add_argument("--resume", metavar="DIR", help="continue from DIR's latest checkpoint")
    t.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: this process (or each rank mpirun started; with -n N, N ranks "
                        "through mpirun); mpi: -n N ranks (default parallel.dp x parallel.pp) "
                        "through mpirun; ray: Ray places, starts and watches the ranks, which "
                        "talk over MPI")
    g = sub.add_parser("graph", help="write the training-step graph as DOT (and SVG/PNG)")
    g.add_argument("config", help="TOML config file")
    g.add_argument("--out", required=True,
                   help="FILE.dot (DOT text; .svg and .png beside it when Graphviz is "
                        "installed) or FILE.svg / .png / .pdf (rendered; needs Graphviz)")
    g.add_argument("--set", dest="sets", **sets)
    pl = sub.add_parser("plan", help="print the pipeline partition (parallel.pp stages) and "
                                     "its schedule grid")
    pl.add_argument("config", help="TOML config file")
    pl.add_argument("--set", dest="sets", **sets)
    pl.add_argument("--launcher", choices=("local", "ray"), default="local",
                    help="ray: also show the node each rank's slot would be asked on")
    tu = sub.add_parser("tune", help="sweep: train a config many times with values drawn "
                                     "from --search, scheduled by Ray Tune (ASHA stops poor "
                                     "trials early)")
    tu.add_argument("config", help="TOML config file")
    tu.add_argument("--set", dest="sets", **sets)
    tu.add_argument("--search", action="append", default=[], metavar="KEY=SPEC",
                    help="a key to search: a distribution (uniform|loguniform|randint(LOW,HIGH),"
                         " q[log]uniform(LOW,HIGH,Q)) or a TOML list of choices (repeatable)")
    tu.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    tu.add_argument("--ranks-per-trial", type=int, default=1,
                    help="MPI ranks per trial (data parallel; mpirun when > 1)")
    tu.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                    help="asha: stop poor trials early on their test accuracy; fifo: run all")
    tu.add_argument("--seed", type=int, default=0, help="seed of the draws")
    tu.add_argument("--out", help="sweep directory (default: runs/tune-<config name>); "
                                  "the same --out resumes an interrupted sweep")
    la = sub.add_parser("launch", help="run your own program (e.g. a script calling "
                                       "sg.distributed.init()) as N MPI ranks")
    la.add_argument("-n", type=int, required=True, help="number of ranks")
    la.add_argument("--launcher", choices=LAUNCHERS, default="mpi",
                    help="local or mpi: mpirun on this machine; ray: Ray places, starts and "
                         "watches the ranks (cluster.* keys) on the cluster at RAY_ADDRESS")
    la.add_argument("--set", dest="sets", **sets)
    la.add_argument("program", nargs=argparse.REMAINDER,
                    help="the command each rank runs, after --")
    rp = sub.add_parser("report", help="draw a run's curves (report.png) and write its "
                                       "summary (report.md) into its directory")
    rp.add_argument("run_dir", help="a run directory (train --out)")
    tr = sub.add_parser("trace", help="merge a run's per-rank timelines (debug.trace = true) "
                                      "and print each rank's compute / communication / idle")
    tr.add_argument("run_dir", help="a run directory trained with --set debug.trace=true")
    tr.add_argument("--out", help="the merged Chrome trace (default RUN_DIR/trace/all.json; "
                                  "open it in ui.perfetto.dev or chrome://tracing)")
    si = sub.add_parser("simulate", help="predict step time, memory, traffic and bubble on N "
                                         "ranks (op times measured here + alpha-beta network)")
    si.add_argument("config", help="TOML config file")
    si.add_argument("--ranks", type=int, required=True, help="number of ranks N")
    si.add_argument("--pp", type=_positive,
                    help="pipeline stages (default parallel.pp); dp = N / pp")
    si.add_argument("--microbatches", type=_positive,
                    help="pipeline micro-batches (default parallel.microbatches)")
    si.add_argument("--gpus-per-node", type=_positive, metavar="G",
                    help="ranks a node: traffic between nodes crosses --link, inside a node "
                         "shared memory (CPU) or NVLink (GPU); default: one node")
    si.add_argument("--link", default="shm", choices=("shm", "nvlink", "infiniband", "ethernet"),
                    help="alpha-beta preset of the network (docs/performance.md)")
    si.add_argument("--measure-link", action="store_true",
                    help="pipelines: measure the hand-over between ranks on this machine "
                         "now (as many ranks as the job runs here, through mpirun, about 2 s; "
                         "its load included) for the sends' alpha instead of --link's")
    si.add_argument("--recommend", action="store_true",
                    help="simulate every (dp, pp, micro-batches) of N ranks, fastest first")
    si.add_argument("--json", action="store_true", help="print one JSON object")
    si.add_argument("--set", dest="sets", **sets)
    ev = sub.add_parser("evaluate", help="a trained run's top-1/top-5 and per-class accuracy "
                                         "and confusion matrix on its test split (JSON, text, "
                                         "PNG)")
    ev.add_argument("run_dir", help="a run directory (train --out)")
    ev.add_argument("--set", dest="sets", **{**sets, "help": "change a data.* key (another "
                                                          "data set or split)"})
    ev.add_argument("--out", help="where to write evaluation.json, confusion.txt/.png "
                                  "(default: RUN_DIR)")
    pr = sub.add_parser("predict", help="labels and probabilities of a trained run's model for "
                                        "an .npz (array x) or image files")
    pr.add_argument("run_dir", help="a run directory (train --out)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="one .npz, or PNG/JPEG files")
    ex = sub.add_parser("export", help="write a trained run's eval-mode forward graph as ONNX")
    ex.add_argument("run_dir", help="a run directory (train --out)")
    ex.add_argument("--format", choices=("onnx",), default="onnx")
    ex.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    co = sub.add_parser("config", help="show the resolved config: every key, its default and "
                                       "its help")
    co.add_argument("action", choices=("show",))
    co.add_argument("config", nargs="?", help="TOML config file (default: the defaults)")
    co.add_argument("--set", dest="sets", **sets)
    return p


def _positive(text: str) -> int:
    """An argument that must be a whole number >= 1 (0 was taken silently as the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _said(e: BaseException) -> str:
    """An error as its one line: an OSError as ``FILE: reason`` (not ``[Errno 30] ...``)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (releasing the run directory), then say so."""

    def __init__(self, sig: int):
        super().__init__(sig)
        self.sig = sig

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.sig).name}"


def _terminate(sig, frame):
    raise Terminated(sig)


def _exit_code(e: BaseException) -> int:
    return 2 if isinstance(e, USAGE_ERRORS) else 130 if isinstance(e, KeyboardInterrupt) else 1


def _ray_launch():
    """cluster.ray_launch, or a ConfigError saying how to install Ray."""
    try:
        import ray  # noqa: F401 - a launcher imported earlier would hide a missing Ray

        from shardgrad.cluster import ray_launch
    except ImportError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise ConfigError(INSTALL_RAY) from None
    return ray_launch


def _mpirun(program: list[str], n: int, mpi: bool = False) -> int:
    """``program`` as ``n`` ranks through mpirun on this machine; mpirun's exit code. ``mpi``:
    the program is this interpreter's ``shardgrad``, which needs mpi4py."""
    from shardgrad.cluster.commands import mpirun_argv

    if shutil.which("mpirun") is None:
        raise ConfigError("mpirun is not installed: pip install 'shardgrad[mpi]' (from a "
                          "checkout: pip install -e '.[mpi]')")
    if mpi and importlib.util.find_spec("mpi4py") is None:   # else each rank says it, then mpirun
        raise ConfigError("mpi4py is not installed: pip install 'shardgrad[mpi]' (from a "
                          "checkout: pip install -e '.[mpi]')")
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    argv = mpirun_argv(program, n, as_root=root, oversubscribe=n > (os.cpu_count() or 1))
    # Its own process group: a Ctrl-C reaches mpirun once, from here, not twice (a second
    # SIGINT makes prterun give up on stopping the ranks in order).
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, process_group=0)
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr,), daemon=True)
    relay.start()
    got: list[int] = []

    def forward(sig, frame):
        got.append(sig)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    caught = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in caught} if main_thread else {}
    try:
        code = proc.wait()
        relay.join(timeout=10)   # the ranks' last lines, written after mpirun exits
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        print(f"shardgrad: terminated by {signal.Signals(got[0]).name} (passed on to mpirun, "
              f"which stopped the {n} ranks)", file=sys.stderr, flush=True)
        return 128 + got[0]
    return code


def _relay_stderr(stream) -> None:
    """Copy mpirun's stderr to ours, leaving out Open MPI's blocks that repeat that a rank
    failed or aborted (the rank's own line already says what happened)."""
    from shardgrad.cluster.commands import without_mpi_trailers

    for chunk in without_mpi_trailers(iter(stream.readline, b"")):
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()


def _ranks(args, config) -> tuple[int | None, list[str]]:
    """The number of ranks ``train -n N`` (or ``--launcher mpi``) starts and the --set that
    gives them ``parallel.dp = N / parallel.pp``; (None, []) when this process trains."""
    n = args.n
    if n is None and args.launcher == "mpi":
        n = config.parallel.dp * config.parallel.pp
    if n is None:
        return None, []
    pp = config.parallel.pp
    if n < 1 or n % pp:
        raise ConfigError(f"-n {n}: the number of ranks must be a positive multiple of "
                          f"parallel.pp = {pp} (each data-parallel replica has pp stages)")
    if mpi_world_size() is not None:   # each rank would start a whole job of its own
        raise ConfigError(f"-n {n} starts the ranks itself: run it without mpirun/mpiexec")
    return n, [f"parallel.dp={n // pp}"]


def cmd_train(args) -> int:
    from shardgrad.runtime import world
    from shardgrad.runtime.train import Diverged, train

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)
    config = load_config(args.config, args.sets)
    out = args.out or args.resume or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config))[0])
    n, dp_set = _ranks(args, config)
    if dp_set:
        config = load_config(args.config, [*args.sets, *dp_set])
    if args.launcher == "ray":
        if mpi_world_size() is not None:   # each rank would start a whole Ray job of its own
            raise ConfigError("--launcher ray starts the ranks itself (parallel.dp x "
                              "parallel.pp of them): run it without mpirun/mpiexec")
        from shardgrad.cluster.commands import failed_rank, ray_job_argv

        return _ray_launch().launch(config, out, args.resume, ray_job_argv, failed_rank)
    if n is not None:
        from shardgrad.cluster.commands import train_argv

        program = train_argv(args.config, out, args.resume)
        for item in [*args.sets, *dp_set]:
            program += ["--set", item]
        return _mpirun(program, n, mpi=True)
    par = config.parallel
    comm = world.start(par.timeout_s, par.start_timeout_s, exit_code=_exit_code)
    try:
        import numpy as np

        # a diverging step overflows: NumPy's warnings (2 lines each, per rank) came before
        # the one line that names the step (Diverged)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            summary = train(config, out, comm=comm, resume=args.resume)
    except BaseException as e:  # an interrupted rank too: its peers would wait on it
        if isinstance(e, Diverged):
            # the Ray launcher learns from this note not to restart the run
            # (cluster.max_restarts): the same config from the same checkpoint diverges again
            from shardgrad.cluster.rank import leave_note

            leave_note(f"diverged-{comm.rank}", f"{e}\n")
        if isinstance(e, Terminated):
            if comm.world_size > 1:
                world.say_terminated(e.sig)   # unless the signal watcher said it already
                sys.stdout.flush()
                # Not MPI_Abort: when mpirun itself was signalled, its banner would be all
                # the other ranks' output; prterun ends the job on a non-zero exit.
                os._exit(128 + e.sig)
            print(f"shardgrad train: {e}", file=sys.stderr)
            return 128 + e.sig
        if comm.world_size > 1 and isinstance(e, (*USAGE_ERRORS, Diverged)):
            # every rank meets the same bad input, and the same (averaged) diverged loss
            if world.first_to_report():
                print(f"shardgrad train: error: {_said(e)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Not MPI_Abort: its banner and prterun's would bury the line; prterun ends the
            # job when a rank exits non-zero, and MPI_Finalize could wait on a busy peer.
            os._exit(_exit_code(e))
        world.fail(comm, e, _exit_code(e))
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


def executed_graph(config):
    """The training-step graph rank 0 of ``config``'s data-parallel job executes (after the
    data-parallel rewrite and the executor's passes): the graph whose node names
    (``%k``) a ``debug.trace`` timeline records."""
    from shardgrad.runtime.comm import SingleProcess
    from shardgrad.runtime.train import setup, step_options

    shape = SingleProcess()          # the job's shape: step_options reads only its size
    shape.world_size = config.parallel.dp
    options = step_options(config, shape)
    _, _, step, data = setup(config, options)
    b = min(config.train.batch_size, len(data.y_train)) // shape.world_size
    graph, runner = step.graph_for(data.x_train[:b], data.y_train[:b])
    return getattr(getattr(runner, "inner", runner), "graph", graph)


def write_graph(config, path: str) -> list[str]:
    """Trace one training step of ``config`` and write the graph rank 0 executes
    (``executed_graph``) to ``path`` as DOT, plus .svg and .png beside it when Graphviz's
    ``dot`` program is installed; returns the files written.
    With ``parallel.pp`` > 1 it draws the pipeline plan: nodes coloured by stage and named
    ``s<stage>:%k`` as a stage's timeline names them, a dashed edge from each send to its
    receive."""
    from shardgrad.graph.dot import to_dot

    if config.parallel.pp > 1:
        from shardgrad.runtime.pipeline import drawn_programs
        from shardgrad.runtime.train import make_executor, plan_for_config

        plan = plan_for_config(config)   # drawn as the stages' executors run it
        dot = plan.to_dot(drawn_programs(plan, make_executor(config.train.executor)))
    else:
        dot = to_dot(executed_graph(config))
    stem, ext = os.path.splitext(path)
    rendered = ext.lower() in RENDERED
    if not rendered and ext.lower() not in ("", ".dot", ".gv"):   # x.jpg would hold DOT text
        raise ConfigError(f"--out {path}: expected a .dot, .svg, .png or .pdf file")
    if rendered and not shutil.which("dot"):   # else x.svg would hold DOT text
        raise ConfigError(f"--out {path} needs Graphviz's `dot` program, which is not on PATH: "
                          f"install Graphviz (apt-get install graphviz, brew install graphviz "
                          f"or conda install graphviz), or write --out {stem}.dot")
    dot_path = f"{stem}.dot" if rendered else path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(dot_path, "w") as f:
        f.write(dot.source)
    written = [dot_path]
    if shutil.which("dot"):
        for fmt in [ext[1:].lower()] if rendered else ["svg", "png"]:
            done = subprocess.run(["dot", f"-T{fmt}", dot_path, "-o", f"{stem}.{fmt}"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode:   # e.g. a full disk: dot's own words, not a traceback
                said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                raise ConfigError(f"cannot write {stem}.{fmt}: Graphviz's dot said: {said}")
            written.append(f"{stem}.{fmt}")
    return written


def cmd_graph(args) -> int:
    config = load_config(args.config, args.sets)
    for path in write_graph(config, args.out):
        print(path)
    return 0


def cmd_plan(args) -> int:
    from shardgrad.runtime.train import plan_for_config

    config = load_config(args.config, args.sets)
    if config.parallel.pp > 1 or args.launcher == "local":
        print(plan_for_config(config))
    if args.launcher == "ray":
        print(_ray_launch().planned_placement(config))
    return 0


def cmd_tune(args) -> int:
    try:
        # a bare ray lacks Tune's dependencies (pandas, ...); import_module looks the module
        # up, where `from ray import tune` would take an attribute an earlier import left
        importlib.import_module("ray.tune")

        from shardgrad.cluster.tune import sweep
    except ImportError as e:
        if (e.name or "").startswith("shardgrad"):
            raise
        raise ConfigError("shardgrad tune needs Ray Tune: pip install 'shardgrad[ray]' (from "
                          "a checkout: pip install -e '.[ray]')") from None

    out = args.out or os.path.join(
        "runs", "tune-" + os.path.splitext(os.path.basename(args.config))[0])
    print(sweep(args.config, args.sets, args.search, args.trials, out, args.ranks_per_trial,
                args.scheduler, args.seed))
    return 0


def cmd_launch(args) -> int:
    """Each rank runs ``args.program`` in this directory; mpirun's (or Ray's) exit code."""
    from shardgrad.cluster.commands import failed_rank, ray_program_argv

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise ConfigError("launch needs the program to run after --, e.g. "
                          "shardgrad launch -n 2 -- python train.py")
    if args.n < 1:
        raise ConfigError(f"-n {args.n}: the number of ranks must be at least 1")
    # else mpirun's 9 lines (under Ray, after a cluster was started or joined, and once per
    # restart); Ray's ranks start in this directory, with this node's layout
    if shutil.which(program[0]) is None:
        raise ConfigError(f"{program[0]}: " + ("not executable" if os.path.isfile(program[0])
                                               else "no such program (not a file, nor on PATH)"))
    config = load_config(None, args.sets)
    if args.launcher == "ray":
        command = functools.partial(ray_program_argv, wdir=os.getcwd())
        return _ray_launch().launch_program(program, args.n, config.cluster, command,
                                            failed_rank)
    return _mpirun(program, args.n)


def _toml(value) -> str:
    return json.dumps(value)   # JSON's strings, numbers, booleans and lists are TOML's


def show_config(config, schema=None) -> str:
    """``config`` as TOML, every key of the schema with its default and help as a comment:
    what ``shardgrad config show`` prints (save it and train from it)."""
    from shardgrad.runtime.config import SCHEMA

    lines = []
    for section, keys in (schema or SCHEMA).items():
        lines.append(f"[{section}]")
        for name, key in keys.items():
            notes = [f"default {_toml(key.default)}"]
            if key.choices:
                notes.append(f"one of {', '.join(map(_toml, key.choices))}")
            if key.min is not None:
                notes.append(f">= {key.min:g}")
            if key.max is not None:
                notes.append(f"<= {key.max:g}")
            if key.help:
                notes.append(key.help)
            lines.append(f"{name} = {_toml(config[section][name])}  # {'; '.join(notes)}")
        lines.append("")
    return "\n".join(lines)


def cmd_report(args) -> int:
    from shardgrad.runtime.report import report

    for path in report(args.run_dir):
        print(path)
    return 0


def cmd_trace(args) -> int:
    from shardgrad.runtime import trace

    files = trace.rank_files(args.run_dir)
    if not files:
        raise ConfigError(f"{args.run_dir} holds no trace/rank<R>.json: train with --out "
                          f"{args.run_dir} --set debug.trace=true first")
    out = args.out or os.path.join(args.run_dir, "trace", "all.json")
    events = trace.merge([p for _, p in files], out)
    stats = trace.summarize(events)
    print(f"merged {len(files)} rank(s) into {out}")
    if importlib.util.find_spec("matplotlib") is not None:
        png = os.path.join(os.path.dirname(out), "timeline.png")
        print(f"step {trace.plot(events, png)} drawn in {png}")
    print(trace.table(stats))
    config = _run_config(args.run_dir)
    if config is not None and config.parallel.pp > 1:
        from shardgrad.partition.schedule import simulate
        from shardgrad.runtime.train import plan_for_config

        plan = plan_for_config(config)
        predicted = simulate(plan.schedule, [s.forward_time for s in plan.stages],
                             [s.backward_time for s in plan.stages]).bubble()
        measured = [s["bubble"] for s in stats.values() if s["bubble"] is not None]
        if measured:
            print(f"pipeline bubble: measured {sum(measured) / len(measured):.0%} (mean over "
                  f"{len(measured)} stage rank(s): "
                  f"{', '.join(f'{b:.0%}' for b in measured)}), plan predicts "
                  f"{predicted:.0%} ({config.parallel.schedule}, "
                  f"{plan.pp} stages x {plan.micro_batches} micro-batches, op cost estimates)")
    return 0


def _run_config(run_dir: str):
    """The config summary.json echoes, or None."""
    from shardgrad.runtime.config import from_dict

    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return from_dict(json.load(f)["config"])


def cmd_simulate(args) -> int:
    from shardgrad.runtime import simulate as sim

    config = load_config(args.config, args.sets)
    kw = {"gpus_per_node": args.gpus_per_node, "link": args.link,
          "measured_link": args.measure_link}
    if args.recommend:
        ranked = sim.recommend(config, args.ranks, **kw)
        if not ranked:
            raise ConfigError(f"no (dp, pp, micro-batches) of {args.ranks} ranks fits "
                              f"train.batch_size = {config.train.batch_size}")
        if args.json:
            print(json.dumps({**ranked[0], "recommended": ranked[0], "candidates": ranked}))
            return 0
        for r in ranked:
            print(_sim_line(r))
        best = ranked[0]
        print(f"recommended: dp={best['dp']} pp={best['pp']} microbatches="
              f"{best['microbatches']} ({best['step_time_s'] * 1e3:.3f} ms a step)")
        return 0
    r = sim.simulate(config, args.ranks, args.pp, args.microbatches, **kw)
    print(json.dumps(r) if args.json else _sim_line(r))
    return 0


def _sim_line(r) -> str:
    return (f"dp={r['dp']} pp={r['pp']} microbatches={r['microbatches']} link={r['link']}: "
            f"step {r['step_time_s'] * 1e3:.3f} ms (compute {r['compute_s'] * 1e3:.3f}, "
            f"allreduce {r['comm_s'] * 1e3:.3f}), bubble {r['bubble']:.0%}, "
            f"{r['bytes_sent_per_rank'] / 1024:.1f} KiB sent/rank, peak "
            f"{r['peak_memory_bytes'] / 2**20:.2f} MiB, {r['samples_per_s']:.0f} samples/s")
def cmd_evaluate(args) -> int:
    from shardgrad.runtime.inference import confusion_text, evaluate

    result = evaluate(args.run_dir, args.sets, args.out)
    print(confusion_text(result["confusion_matrix"]), end="")
    shown = {k: v for k, v in result.items() if k != "confusion_matrix"}
    print(json.dumps(shown))
    return 0


def cmd_predict(args) -> int:
    from shardgrad.runtime.inference import predict

    for row in predict(args.run_dir, args.inputs):
        print(json.dumps(row))
    return 0


def cmd_export(args) -> int:
    from shardgrad.runtime.onnx_export import export_run

    print(export_run(args.run_dir, args.out))
    return 0


def cmd_config(args) -> int:
    print(show_config(load_config(args.config, args.sets)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "graph": cmd_graph, "plan": cmd_plan,
                "launch": cmd_launch, "config": cmd_config,
                "report": cmd_report, "tune": cmd_tune, "evaluate": cmd_evaluate,
                "predict": cmd_predict, "export": cmd_export, "trace": cmd_trace,
                "simulate": cmd_simulate}[args.command](args)
    except BrokenPipeError:
        # the output's reader went away (`shardgrad plan ... | head`): stop quietly with
        # SIGPIPE's status, as `yes | head` does; devnull keeps the exit-time flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except USAGE_ERRORS as e:
        if mpi_world_size() is not None:   # every rank met the same bad input: one line says it
            from shardgrad.runtime.world import first_to_report

            if not first_to_report():
                return 2
        print(f"shardgrad {args.command}: error: {_said(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        sig = getattr(e, "sig", None)   # the Ray launcher's SIGTERM (cluster/ray_launch.py)
        print(f"shardgrad {args.command}: {e if sig else 'interrupted'}", file=sys.stderr)
        return 128 + sig if sig else 130


if __name__ == "__main__":
    sys.exit(main())
