"""Sweeps (``shardgrad tune``): Ray Tune runs N trainings of one config with values drawn
from a search space, each trial a whole ``shardgrad train`` in processes of its own (``mpirun
-n R`` for R ranks) writing an ordinary run directory, and reporting each epoch's test
accuracy so that ASHA stops the poor trials early. Ends with a ranked table, tune.png and the
best trial's config as TOML. Imports ray.tune, runtime (config, ray_launch) and cluster.commands.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shardgrad.cluster.commands import mpirun_argv, train_argv
from shardgrad.cluster.ray_launch import connect, process_tree, signal_all, to_toml, unniced
from shardgrad.runtime import config as cfg

METRIC = "test_accuracy"
# Ray Tune's distributions a --search may name, with how many numbers each takes.
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3}
_CALL = re.compile(r"(\w+)\((.*)\)")


def parse_search(item: str) -> tuple[str, tuple[str, list[Any]]]:
    """``KEY=SPEC`` (``train.lr=loguniform(1e-3,1e-1)``, ``model.hidden=[[128],[256]]``, a
    TOML list being a choice among its items) as ``(key, (kind, args))``; the key and every
    choice are checked against the config schema. ConfigError names what is wrong."""
    key, sep, spec = item.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise cfg.ConfigError(f"--search {item!r}: expected KEY=SPEC, e.g. "
                              f"train.lr=loguniform(1e-3,1e-1) or model.hidden=[[128],[256]]")
    section, name, schema_key = cfg.lookup_key(key, cfg.SCHEMA)
    m = _CALL.fullmatch(spec)
    if m:
        kind, count = m[1], DISTRIBUTIONS.get(m[1])
        if count is None:
            raise cfg.ConfigError(f"--search {item!r}: unknown distribution {kind!r} (one of "
                                  f"{', '.join(DISTRIBUTIONS)}, or a list of choices)")
        try:
            args = list(ast.literal_eval(f"({m[2]},)"))
        except (ValueError, SyntaxError):
            args = None
        if (args is None or len(args) != count
                or not all(isinstance(a, int | float) for a in args)):
            raise cfg.ConfigError(f"--search {item!r}: {kind} takes {count} numbers")
        if not args[0] < args[1] or (kind.endswith("loguniform") and args[0] <= 0):
            raise cfg.ConfigError(f"--search {item!r}: needs low < high"
                                  + (" and low > 0" if "log" in kind else ""))
        for bound in args[:2]:
            schema_key.check(key, int(bound) if kind == "randint" else float(bound))
        return key, (kind, args)
    try:
        choices = cfg.parse_set(f"{key}={spec}")[1]
    except cfg.ConfigError as e:
        raise cfg.ConfigError(f"--search {item!r}: {e}") from None
    if not isinstance(choices, list) or not choices:
        raise cfg.ConfigError(f"--search {item!r}: expected a distribution such as "
                              f"loguniform(1e-3,1e-1) or a non-empty TOML list of choices")
    return key, ("choice", [schema_key.check(key, c) for c in choices])


def _domain(kind: str, args: Sequence[Any]):
    from ray import tune

    return tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)


def trial_config(base: cfg.ConfigLike, params: Mapping[str, Any]) -> cfg.Config:
    """The checked config of one trial: ``base`` with its drawn ``params`` (``{key: value}``),
    the launcher's keys at their defaults."""
    return dataclasses.replace(cfg.from_dict(base).replace(params), cluster=cfg.ClusterConfig())


def _epochs(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("kind") == "epoch":
            records.append(r)
    return records


def _trial_preexec() -> Callable[[], None]:
    unnice = unniced()   # the trial's worker runs at Ray's worker niceness; its training not

    def preexec() -> None:
        unnice()
        # A trial that Tune stops (ASHA) is killed with its actor; its training must not
        # outlive it. SIGKILL: the training may be paused (SIGSTOP, see run_trial), and a
        # paused process acts on nothing else; mpirun's ranks end when their daemon dies.
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


def run_trial(params: Mapping[str, Any], base: cfg.Config, out: str, ranks: int,
              env: Mapping[str, str]) -> None:
    """One trial (Tune's function trainable): ``shardgrad train`` of the trial's config in
    ``out/trials/TRIAL_ID`` (continuing from its checkpoint when a resumed sweep runs it
    again), reporting each epoch's record to Tune as it is written."""
    from ray import tune

    run_dir = os.path.join(out, "trials", tune.get_context().get_trial_id())
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.toml")
    with open(config_path, "w") as f:
        f.write(to_toml(trial_config(base, params)))
    resume = run_dir if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(
        os.path.join(run_dir, "checkpoints")) else None
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        # finished before an interrupted sweep saved that it had: its epochs, not a new run
        for r in _epochs(metrics):
            tune.report({METRIC: r[METRIC], "epoch": r["epoch"], "train_loss": r["train_loss"]})
        return
    argv = train_argv(config_path, run_dir, resume)
    if ranks > 1:
        argv = mpirun_argv(argv, ranks, as_root=os.geteuid() == 0,
                           oversubscribe=ranks > (os.cpu_count() or 1))
    reported = 0
    with open(os.path.join(run_dir, "train.log"), "ab") as log:
        proc = subprocess.Popen(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_trial_preexec())
        try:
            while True:
                done = proc.poll() is not None
                records = _epochs(metrics)
                new = records[reported:]
                # Pause the training while Tune hears of its epochs: a report returns once the
                # scheduler lets the trial go on (ASHA stops it instead), and a training left
                # running would finish its epochs before any stop could take effect.
                paused = process_tree(proc.pid) if new and not done else []
                signal_all(paused, signal.SIGSTOP)
                try:
                    for r in new:
                        tune.report({METRIC: r[METRIC], "epoch": r["epoch"],
                                     "train_loss": r["train_loss"]})
                finally:
                    signal_all(paused, signal.SIGCONT)
                reported = max(reported, len(records))
                if done:
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                signal_all(process_tree(proc.pid), signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "train.log"), errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"shardgrad train exited with {proc.returncode} in {run_dir}:\n"
                           f"{tail}")


def _rows(results, searched: Sequence[str], out: str, epochs: int) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        trial = os.path.basename(r.path) if r.path else "?"
        trial_id = (r.metrics or {}).get("trial_id") or trial
        run_dir = os.path.join(out, "trials", trial_id)
        records = _epochs(os.path.join(run_dir, "metrics.jsonl"))
        last = records[-1] if records else {}
        status = ("error" if r.error else "finished" if last.get("epoch") == epochs
                  else "stopped early")
        rows.append({"trial": trial_id, **{k: r.config.get(k) for k in searched},
                     "epochs": last.get("epoch", 0), METRIC: last.get(METRIC, math.nan),
                     "status": status, "run_dir": run_dir,
                     "curve": [x[METRIC] for x in records]})
    rows.sort(key=lambda row: (-row[METRIC] if not math.isnan(row[METRIC]) else math.inf,
                               row["trial"]))
    return rows


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def table(rows: Sequence[Mapping[str, Any]], searched: Sequence[str]) -> str:
    """The trials ranked by test accuracy, one line each."""
    head = ["rank", "trial", *searched, "epochs", METRIC, "status"]
    body = [[str(i + 1), row["trial"], *(_value(row[k]) for k in searched), str(row["epochs"]),
             f"{row[METRIC]:.4f}", row["status"]] for i, row in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """tune.png: each trial's test accuracy by epoch (ASHA's stops show as short curves)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        curve = row["curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", lw=2.5 if i == 0 else 1,
                label=f"{i + 1}. {row['trial']} ({row['status']})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("shardgrad tune: trials ranked by test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(config_path: str, sets: Sequence[str], searches: Sequence[str], trials: int,
          out: str, ranks: int = 1, scheduler: str = "asha", seed: int | None = None) -> str:
    """Run (or resume, when ``out`` holds this sweep unfinished) ``trials`` trainings of
    ``config_path`` with ``sets`` applied and ``searches`` drawn; writes ``out/tune.txt``,
    ``out/tune.png`` and ``out/best.toml`` and returns the table with the best config's path."""
    base = cfg.load_config(config_path, sets)
    space = dict(parse_search(s) for s in searches)
    if not space:
        raise cfg.ConfigError("tune needs at least one --search KEY=SPEC")
    if trials < 1 or ranks < 1:
        raise cfg.ConfigError(f"--trials {trials} --ranks-per-trial {ranks}: both must be >= 1")
    par = base.parallel
    if par.dp * par.pp != 1 and par.dp * par.pp != ranks:
        raise cfg.ConfigError(f"parallel.dp x parallel.pp = {par.dp} x {par.pp} needs "
                              f"--ranks-per-trial {par.dp * par.pp}")
    if ranks > 1 and base.parallel.pp == 1:
        base = base.replace({"parallel.dp": ranks})
    if ranks > 1 and shutil.which("mpirun") is None:
        raise cfg.ConfigError("--ranks-per-trial > 1 runs mpirun, which is not installed: "
                              "pip install -e '.[mpi]'")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    sweep_args = {"config": base.to_dict(), "search": {k: list(v) for k, v in space.items()},
                  "trials": trials, "ranks": ranks, "scheduler": scheduler, "seed": seed}
    marker = os.path.join(out, "sweep.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) != json.loads(json.dumps(sweep_args)):
                raise cfg.ConfigError(f"{out} holds another sweep (its sweep.json differs): "
                                      f"give a new --out, or the same arguments to resume it")
    else:
        with open(marker, "w") as f:
            json.dump(sweep_args, f, indent=1)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    connect(ranks)
    env = {k: v for k, v in os.environ.items()}
    env.setdefault("SHARDGRAD_PROGRESS", "0")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, out=out, ranks=ranks, env=env),
        {"cpu": ranks})
    epochs = base.train.epochs
    sched = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)
             if scheduler == "asha" else FIFOScheduler())
    storage, name = os.path.join(out, "ray"), "tune"
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"shardgrad tune: resuming the sweep in {out}", file=sys.stderr, flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                   restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={k: _domain(*v) for k, v in space.items()},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=trials, scheduler=sched,
                search_alg=BasicVariantGenerator(random_state=seed)),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[_Progress()]))
    with contextlib.redirect_stdout(sys.stderr):   # Tune's banners; stdout is the table's
        results = tuner.fit()
    rows = _rows(results, list(space), out, epochs)
    text = table(rows, list(space))
    with open(os.path.join(out, "tune.txt"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(out, "tune.png"))
    best = next((row for row in rows if row["status"] != "error"), None)
    if best is None:
        raise RuntimeError(f"every trial failed; see {out}/trials/*/train.log")
    shutil.copyfile(os.path.join(best["run_dir"], "config.toml"), os.path.join(out, "best.toml"))
    ray.shutdown()
    return (f"{text}\nbest: trial {best['trial']}, {METRIC} {best[METRIC]:.4f}, run "
            f"{best['run_dir']}\nbest config: {os.path.join(out, 'best.toml')} "
            f"(shardgrad train {os.path.join(out, 'best.toml')})\n"
            f"plot: {os.path.join(out, 'tune.png')}")


def _progress_class():
    from ray import tune

    class Progress(tune.Callback):
        """One line per trial epoch and per finished trial on stderr (Tune's own reporter is
        off: its tables fill the terminal)."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"shardgrad tune: trial {trial.trial_id} epoch {result.get('epoch')}: "
                  f"{METRIC} {result.get(METRIC, math.nan):.4f}", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"shardgrad tune: trial {trial.trial_id} done", file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"shardgrad tune: trial {trial.trial_id} failed (see its train.log)",
                  file=sys.stderr, flush=True)

    return Progress


def _Progress():  # noqa: N802 (a class made on first use: ray.tune is imported late)
    return _progress_class()()


__all__ = ["DISTRIBUTIONS", "METRIC", "parse_search", "plot", "run_trial", "sweep", "table",
           "trial_config"]
