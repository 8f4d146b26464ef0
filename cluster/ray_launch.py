"""The Ray launcher (``shardgrad train CONFIG --launcher ray``): Ray places, starts, watches
and restarts the ranks; gradients travel over MPI. One placement-group bundle per rank (CPUs,
GPUs; pipelines on the nodes cluster/placement.py picks) holds a ``Host`` actor, inside which
mpirun's agent (cluster/ray_agent.py) starts the host's MPI daemon and so its ranks.
Imports ray and runtime (config, train); runtime never imports it.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardgrad.cluster import ray_agent
from shardgrad.cluster.commands import without_mpi_trailers
from shardgrad.cluster.placement import Node, describe, place
from shardgrad.runtime import config as cfg

NAMESPACE = "shardgrad"
# How long mpirun gets to wind the job down after a host's actor died before it is killed; it
# took 1-3 s here, and the job must stop within 30 s.
STOP_GRACE_S = 10.0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree[ppid].append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the MPI daemon puts each rank in its own session, so a
    process group or session would miss them)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    return found


def signal_all(pids: Sequence[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``, passing over those gone or not ours."""
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def unniced() -> Callable[[], None]:
    """A ``preexec_fn`` giving a command started from a Ray worker the priority of the worker's
    raylet: Ray runs its workers at ``worker_niceness`` 15, and ranks that inherited it took
    18 ms a digits step on a busy machine where mpirun's took 2 ms. Lowering niceness needs
    CAP_SYS_NICE (or RLIMIT_NICE); without it the command keeps the worker's."""
    target = os.getpriority(os.PRIO_PROCESS, os.getppid())

    def preexec() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, target)
        except OSError:
            pass

    return preexec


class _Command:
    """A shell command with its stdout and stderr collected by two threads into one queue."""

    def __init__(self, command: str, env: Mapping[str, str]):
        self.proc = subprocess.Popen(command, shell=True, env=dict(env), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=unniced())
        self.chunks: queue.Queue = queue.Queue()
        self.readers = [threading.Thread(target=self._pump, args=(f, fd), daemon=True)
                        for f, fd in ((self.proc.stdout, 1), (self.proc.stderr, 2))]
        for t in self.readers:
            t.start()

    def _pump(self, f, fd: int) -> None:
        for chunk in iter(lambda: os.read(f.fileno(), 65536), b""):
            self.chunks.put((fd, chunk))

    def read(self, timeout: float) -> tuple[list[tuple[int, bytes]], int | None]:
        out = []
        try:
            out.append(self.chunks.get(timeout=timeout))
            while True:
                out.append(self.chunks.get_nowait())
        except queue.Empty:
            pass
        done = self.proc.poll() is not None and not any(t.is_alive() for t in self.readers)
        return out, (self.proc.returncode if done and self.chunks.empty() else None)

    def kill(self, grace_s: float = 2.0) -> None:
        tree = process_tree(self.proc.pid)
        signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_all(tree, signal.SIGKILL)
        self.proc.poll()


# The format of ray_agent.FRAME, as a str: Host is pickled by value (below), and a Struct
# cannot be pickled.
_FRAME = ray_agent.FRAME.format


def _write_here(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove_written(paths: Sequence[str]) -> None:
    """Remove the files ``write`` wrote and their directories, when empty."""
    for path in paths:
        for remove, target in ((os.remove, path), (os.rmdir, os.path.dirname(path))):
            try:
                remove(target)
            except OSError:
                pass


def read_notes(directory: str) -> list[tuple[int, int, float]]:
    """(rank, signal, time) of each rank that cluster/rank.py noted in ``directory`` as killed
    by a signal."""
    found = []
    for name in os.listdir(directory):
        if not name.startswith("rank-"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                rank, sig, when = f.read().split()
            found.append((int(rank), int(sig), float(when)))
        except (OSError, ValueError):
            continue
    return found


def read_diverged(directory: str) -> list[int]:
    """The ranks whose run diverged (a ``diverged-RANK`` note in ``directory``, left by
    cli.cmd_train)."""
    return [int(name[len("diverged-"):]) for name in os.listdir(directory)
            if name.startswith("diverged-") and name[len("diverged-"):].isdigit()]


@ray.remote
class Host:
    """One rank's slot on a Ray node: it runs the commands that mpirun's agent sends to its
    host name (Open MPI's daemon, which then starts the rank as its child), streams their
    output back, and kills them when asked or stopped. Methods run on threads, so reads,
    kills and the watch (``until_stopped``) do not wait for one another."""

    def __init__(self, token: str):
        self.commands: dict[int, _Command] = {}
        # The GPUs Ray assigned to this slot: its commands, and so its rank, see those only.
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        self.written: list[str] = []
        self.stopped = threading.Event()
        self.notes_dir = tempfile.mkdtemp(prefix="shardgrad-notes-")
        # mpirun's agent (cluster/ray_agent.py) connects here, proving itself by the job's
        # token: a plain socket spares it importing ray and joining the cluster.
        self.token = token
        self.server = socket.create_server(("", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def info(self) -> dict[str, Any]:
        return {"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpus": self.gpus, "port": self.server.getsockname()[1]}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:   # closed by stop()
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        """One agent's connection: a JSON line with the token and the command, then the
        command's output and exit code as frames (ray_agent.FRAME). An agent that goes away
        (mpirun stopped it) takes its command with it."""
        with conn:
            try:
                request = json.loads(conn.makefile("rb").readline())
                if not hmac.compare_digest(str(request["token"]), self.token):
                    return
                pid = self.start(str(request["command"]))
            except (OSError, ValueError, KeyError, TypeError):
                return
            threading.Thread(target=self._hangup, args=(conn, pid), daemon=True).start()
            code = None
            try:
                while code is None:
                    chunks, code = self.read(pid, 1.0)
                    frames = b"".join(struct.pack(_FRAME, fd, len(data)) + data
                                      for fd, data in chunks)
                    conn.sendall(frames + (struct.pack(_FRAME, 0, code) if code is not None
                                           else b""))
            except OSError:
                self.kill(pid)

    def _hangup(self, conn: socket.socket, pid: int) -> None:
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        if self.commands[pid].proc.poll() is None:
            self.kill(pid)

    def write(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` on this node, atomically (actors sharing a node write
        the same file)."""
        _write_here(path, text)
        self.written.append(path)

    def start(self, command: str) -> int:
        env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
                   SHARDGRAD_RANK_NOTES=self.notes_dir)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        c = _Command(command, env)
        self.commands[c.proc.pid] = c
        return c.proc.pid

    def read(self, pid: int, timeout: float = 1.0):
        """Output chunks ``[(1 or 2, bytes), ...]`` of command ``pid`` (waiting up to
        ``timeout`` s for the first), and its exit code once it has exited and all its output
        was read (else None)."""
        return self.commands[pid].read(timeout)

    def kill(self, pid: int) -> None:
        self.commands[pid].kill()

    def notes(self) -> list[tuple[int, int, float]]:
        """(rank, signal, time) of each rank here that a signal killed (cluster/rank.py)."""
        return read_notes(self.notes_dir)

    def diverged(self) -> list[int]:
        """The ranks here whose run diverged (read_diverged)."""
        return read_diverged(self.notes_dir)

    def until_stopped(self) -> None:
        """Returns when ``stop`` is called; a caller holding this call learns of the actor's
        death from the error it raises instead."""
        self.stopped.wait()

    def stop(self) -> None:
        self.server.close()
        for c in self.commands.values():
            c.kill()
        _remove_written(self.written)
        shutil.rmtree(self.notes_dir, ignore_errors=True)
        self.stopped.set()


# Ship Host, and what it calls from this module, to the workers by value: by reference, each
# actor's worker imported this module and so all of shardgrad (numpy, the ops, ...) before it
# could start a rank; now it needs only ray and the standard library.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _gcs_running() -> bool:
    """Whether a Ray GCS server runs on this machine. ``ray.init(address="auto")`` alone is
    not enough: after a head was killed (not ``ray stop``-ped) it kept retrying the dead
    address it found in /tmp/ray for minutes."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if os.path.basename(f.read().split(b"\0")[0]) == b"gcs_server":
                    return True
        except OSError:
            continue
    return False


def connect(num_cpus: int) -> str:
    """Join the Ray cluster at RAY_ADDRESS, else one running on this machine, else start a
    local one with at least ``num_cpus`` CPUs; returns the cluster's GCS address."""
    if not ray.is_initialized():
        address = cfg.env("RAY_ADDRESS") or ("auto" if _gcs_running() else None)
        # The actors print nothing of use: what their commands print comes back through the
        # agents, and their errors through the calls that failed.
        quiet = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus),
                     include_dashboard=False, **quiet)
    return ray.get_runtime_context().gcs_address


def to_toml(config: cfg.ConfigLike) -> str:
    """A checked config as TOML (its values are strings, numbers, booleans and lists of them,
    which JSON writes in TOML's syntax)."""
    return "".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                   for section, t in cfg.from_dict(config).to_dict().items())


def _say(message: str) -> None:
    print(f"shardgrad ray: {message}", file=sys.stderr, flush=True)


def _cause(error: BaseException) -> str:
    m = re.search(r"The actor (?:is dead|died) because (.*)", str(error))
    return f"its Ray actor died: {m.group(1).rstrip('.')}" if m else f"its Ray actor died ({error})"


def gpus_per_rank(config: cfg.ConfigLike) -> float:
    """``cluster.gpus_per_rank``, its -1 (the default) resolved: 1 when ``device.type`` is a
    GPU, else 0."""
    config = cfg.from_dict(config)
    gpus = config.cluster.gpus_per_rank
    if gpus == -1:
        return 1.0 if config.device.type.startswith("cuda") else 0.0
    if gpus < 0:
        raise cfg.ConfigError(f"cluster.gpus_per_rank = {gpus:g}: must be >= 0, or -1 for 1 "
                              f"when device.type is cuda, else 0")
    return gpus


def nodes() -> list[Node]:
    """The cluster's live nodes as the placement policy sees them."""
    return [Node(n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0),
                 n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]


def stage_placement(dp: int, pp: int, cpus: float, gpus: float) -> list[str] | None:
    """The node id of each rank's slot under the stage-aware policy (cluster.placement), or
    None when the cluster's nodes cannot hold the job now (then Ray's strategy decides, as
    nodes join)."""
    live = nodes()
    try:
        where = place(dp, pp, live, cpus, gpus, first=ray.get_runtime_context().get_node_id())
    except ValueError:
        return None
    return [live[i].id for i in where]


def planned_placement(config: cfg.ConfigLike) -> str:
    """What ``shardgrad train CONFIG --launcher ray`` would ask the cluster for, as lines: its
    slots and, for pp > 1, the node of each rank. Joins the cluster at RAY_ADDRESS or one
    running here; with none, plans for this machine as a one-node cluster (starts nothing)."""
    config = cfg.from_dict(config)
    pp, dp = config.parallel.pp, config.parallel.dp
    cpus, gpus = config.cluster.cpus_per_rank, gpus_per_rank(config)
    if cfg.env("RAY_ADDRESS") or _gcs_running():
        connect(1)
        live, first, where_from = nodes(), ray.get_runtime_context().get_node_id(), "the cluster"
    else:
        # as connect() would start it
        local_cpus = max(os.cpu_count() or 1, int(dp * pp * cpus + 0.999))
        live = [Node("local", socket.gethostname(), float(local_cpus), 0.0)]
        first, where_from = "local", "a local Ray cluster (none is running here)"
    if pp == 1:
        slot = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus > 0 else "")
        return (f"Ray placement: {dp} slot(s) of {slot}, one per rank, placed by Ray's "
                f"{config.cluster.placement} strategy (cluster.placement) on {where_from}")
    try:
        where = place(dp, pp, live, cpus, gpus, first=first)
    except ValueError as e:
        return f"Ray placement on {where_from}: {e}; Ray's {config.cluster.placement} strategy " \
               f"decides once nodes join (within cluster.start_timeout_s)"
    return describe(where, live, pp, cpus, gpus) + f"\n  (nodes of {where_from})"


def _amount(resource: str) -> str:
    return (f"{ray.cluster_resources().get(resource, 0):g} {resource}s, "
            f"{ray.available_resources().get(resource, 0):g} free")


class Job:
    """The ranks' slots on the cluster: a placement group with one bundle per rank (its CPUs
    and GPUs, on node ``on[rank]`` when given) and one ``Host`` actor per bundle, named after
    its host. Without ``on``, bundle 0 is on this node when it has the resources (then rank 0
    writes its run directory here, and a restart finds its checkpoints). ``start_hosts``
    (re)creates the actors; ``close`` releases all.

    When every slot is on this node and holds no GPU, the job is ``direct``: mpirun starts
    the ranks here itself, as plain mpirun would, while the actors (which then only hold the
    slots and die with them) start alongside: a fresh Ray worker per actor took 1.3-4 s here,
    all of it before the first rank could start."""

    def __init__(self, n: int, cpus: float, strategy: str, timeout_s: float, gpus: float = 0.0,
                 on: Sequence[str] | None = None):
        self.id = uuid.uuid4().hex[:8]
        self.n, self.cpus, self.gpus, self.timeout_s = n, cpus, gpus, timeout_s
        self.hosts = [f"sg-{self.id}-{i}" for i in range(n)]
        self.token = secrets.token_hex(16)
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})} for _ in range(n)]
        here = ray.get_runtime_context().get_node_id()
        if on is not None:
            self.pinned = on[0] == here
            how = "stage-aware"
            labels = [{"ray.io/node-id": node} for node in on]
        else:
            self.pinned = any(node.id == here and node.slots(cpus, gpus) for node in nodes())
            how = strategy + (", rank 0 on this node" if self.pinned else "")
            labels = None
            if self.pinned:
                bundles[0][f"node:{ray.util.get_node_ip_address()}"] = 0.001
        self.pg = placement_group(bundles, strategy=strategy, name=f"shardgrad-{self.id}",
                                  bundle_label_selector=labels)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.startup: dict[str, float] = {}   # seconds per start-up phase, for the log
        self.direct, self.notes_dir, self.written = False, "", []
        # The actors' workers (a process each, 1-2.5 s to start here) start while the group
        # is being reserved: they are scheduled into its bundles as these become ready.
        self.spawn_hosts()
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            for a in self.actors:   # never started: nothing to stop
                ray.kill(a)
            remove_placement_group(self.pg)
            slot = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus > 0 else "")
            raise cfg.ConfigError(
                f"could not reserve {n} slots of {slot} ({how}) within "
                f"cluster.start_timeout_s = {timeout_s:g} s; the cluster has {_amount('CPU')}"
                + (f"; {_amount('GPU')}" if gpus > 0 else "")) from None
        table = placement_group_table(self.pg)["bundles_to_node_id"]
        self.nodes_of = [table[i] for i in range(n)]
        if gpus == 0 and set(self.nodes_of) == {here}:
            self.direct = True
            self.notes_dir = tempfile.mkdtemp(prefix="shardgrad-notes-")
            self.infos = [{"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                           "node_id": here, "gpus": []}] * n

    def spawn_hosts(self) -> None:
        """Create fresh host actors, one per bundle, without waiting for them."""
        self.stop_hosts()
        self.actors = [
            Host.options(name=host, namespace=NAMESPACE, num_cpus=self.cpus,
                         num_gpus=self.gpus, max_concurrency=8,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(
                             self.pg, placement_group_bundle_index=i)).remote(self.token)
            for i, host in enumerate(self.hosts)]
        self.fresh = True

    def start_hosts(self) -> None:
        """Wait for the host actors (unless ``direct``): those ``spawn_hosts`` just created,
        else fresh ones."""
        if not self.fresh:
            self.spawn_hosts()
        self.fresh = False
        if self.direct:
            for name in os.listdir(self.notes_dir):   # an earlier attempt's
                os.remove(os.path.join(self.notes_dir, name))
            return
        t0 = time.monotonic()
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors], timeout=self.timeout_s)
        except GetTimeoutError:
            raise cfg.ConfigError(f"the {self.n} host actors did not start within "
                                  f"cluster.start_timeout_s = {self.timeout_s:g} s") from None
        # the wait here, after the placement group's (the actors started with it)
        self.startup["host actors"] = time.monotonic() - t0

    def agent_env(self) -> dict[str, str]:
        """What mpirun's agents need to reach the host actors (ray_agent.HOSTS_VARIABLE), or
        for a direct job, where its ranks leave their notes."""
        if self.direct:
            return {"SHARDGRAD_RANK_NOTES": self.notes_dir}
        hosts = {h: [i["ip"], i["port"]] for h, i in zip(self.hosts, self.infos, strict=True)}
        return {ray_agent.HOSTS_VARIABLE: json.dumps({"token": self.token, "hosts": hosts})}

    def mpi_hosts(self) -> list[str]:
        """The hosts mpirun starts daemons on: none for a direct job (mpirun starts the ranks
        here); the first alone when every slot is on one node and holds no GPU (all ranks
        under one daemon then share memory, not TCP), else one per slot (each rank under its
        own actor, seeing only its own GPUs)."""
        if self.direct:
            return []
        one_node = len({i["node_id"] for i in self.infos}) == 1
        return self.hosts[:1] if one_node and self.gpus == 0 else self.hosts

    def write(self, path: str, text: str) -> None:
        """Write ``path`` on every slot's node (here only, for a direct job: waiting for the
        actors would undo what starting the ranks without them saves)."""
        if self.direct:
            _write_here(path, text)
            self.written.append(path)
        else:
            ray.get([a.write.remote(path, text) for a in self.actors])

    def where(self, rank: int) -> str:
        info = self.infos[rank] if rank < len(self.infos) else {}
        return f"rank {rank} (host {self.hosts[rank]} on {info.get('hostname', '?')} " \
               f"{info.get('ip', '?')})"

    def stop_hosts(self) -> None:
        stops = [a.stop.remote() for a in self.actors]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=5)
        finally:
            for a in self.actors:
                ray.kill(a)
            self.actors, self.fresh = [], False

    def close(self) -> None:
        if self.pg is None:
            return
        try:
            self.stop_hosts()
        finally:
            remove_placement_group(self.pg)
            self.pg = None
            if self.notes_dir:
                shutil.rmtree(self.notes_dir, ignore_errors=True)
            _remove_written(self.written)


# prterun prints "plm:ssh: Warning: setpgid(PID,PID) failed in parent with errno=Permission
# denied(13)" for each agent that had already called exec, which POSIX allows to refuse; the
# agents run, and are stopped, all the same.
_NOISE = re.compile(rb"plm:ssh: Warning: setpgid\(\d+,\d+\) failed in parent")


def _forward(stream, sink, tail: collections.deque) -> None:
    """mpirun's output to ``sink`` less Open MPI's failure blocks (a rank's line says it),
    all of it to ``tail``, where ``failed_rank`` reads those blocks."""
    def lines():
        for line in iter(stream.readline, b""):
            if not _NOISE.search(line):
                tail.append(line.decode(errors="replace"))
                yield line

    for chunk in without_mpi_trailers(lines()):
        sink.buffer.write(chunk)
        sink.flush()


def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def supervise(job: Job, argv: Sequence[str], env: Mapping[str, str],
              failed_rank: Callable[[str], int | None]) -> tuple[int, str | None]:
    """Run mpirun (``argv``) while watching every host's actor: mpirun's output goes to ours,
    and a dead actor stops the job. Returns mpirun's exit code and, on failure, what failed
    (naming the rank: the dead actor's, else the one ``failed_rank`` finds in the output)."""
    tail: collections.deque = collections.deque(maxlen=500)
    proc = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    readers = [threading.Thread(target=_forward, args=(s, sink, tail), daemon=True)
               for s, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in readers:
        t.start()
    watches = {a.until_stopped.remote(): rank for rank, a in enumerate(job.actors)}
    dead: tuple[int, str] | None = None
    try:
        while proc.poll() is None and dead is None:
            done, _ = ray.wait(list(watches), timeout=0.5)
            for ref in done:
                try:
                    ray.get(ref)
                    dead = (watches[ref], "its Ray actor was stopped")
                except RayActorError as e:
                    dead = (watches[ref], _cause(e))
        if dead is not None:
            _say(f"{job.where(dead[0])} failed: {dead[1]}; stopping the job")
    finally:
        _terminate(proc, STOP_GRACE_S)
        for t in readers:
            t.join(5)
    if proc.returncode == 0 and dead is None:
        return 0, None
    if dead is None:
        # mpirun may finish first when an actor died: its agent exits and mpirun aborts.
        done, _ = ray.wait(list(watches), timeout=1.0)
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as e:
                dead = (watches[ref], _cause(e))
    code = proc.returncode
    if dead is not None:
        return max(code, 1), f"{job.where(dead[0])} failed: {dead[1]}"
    killed = _killed(job)
    rank = failed_rank("".join(tail))
    # prterun ending a job SIGTERMs the ranks still running: a SIGTERM note names the rank
    # that failed only when nothing else does (its wrapper may have died with it, unnoted)
    if killed is not None and (killed[1] != signal.SIGTERM or rank is None):
        return max(code, 1), f"{job.where(killed[0])} failed: killed by " \
                             f"{signal.Signals(killed[1]).name}"
    how = (f"killed by signal {-code}" if code < 0 else f"exit code {code}"
           + (f" (signal {code - 128})" if code > 128 else ""))
    who = job.where(rank) if rank is not None and rank < job.n else "a rank"
    return max(code, 1), f"{who} failed; mpirun {how}"


def _from_hosts(job: Job, read: Callable[[str], list], method: str) -> list:
    """What ``read`` finds in the notes of every host of the job: read here for a direct job,
    else by each host actor's ``method``; [] when a host cannot be asked."""
    try:
        return read(job.notes_dir) if job.direct else [
            x for found in ray.get([getattr(a, method).remote() for a in job.actors], timeout=5)
            for x in found]
    except (RayActorError, GetTimeoutError, OSError):
        return []


def _killed(job: Job) -> tuple[int, int] | None:
    """(rank, signal) of the first rank a signal killed, from the hosts' notes: a peer that
    lost it may abort the job first, and mpirun then names that peer."""
    notes = _from_hosts(job, read_notes, "notes")
    # the first rank killed by anything but SIGTERM (a teardown's signal), else the first
    first = min(notes, key=lambda n: (n[1] == signal.SIGTERM, n[2]), default=None)
    return None if first is None else (first[0], first[1])


def _diverged(job: Job) -> bool:
    """Whether a rank's run diverged (its training loss or parameters became NaN or
    infinite), from the hosts' notes."""
    return bool(_from_hosts(job, read_diverged, "diverged"))


class Terminated(KeyboardInterrupt):
    """SIGTERM asked the launcher to stop (``ray job stop``); ``sig`` gives the exit status
    128 + sig (a plain interrupt's is 130)."""

    def __init__(self, sig: int):
        super().__init__(sig)
        self.sig = sig

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.sig).name}"


_STOPPED_BY: list[int] = []


def _interrupted(sig, frame):
    # a KeyboardInterrupt: the one exception Ray's blocking calls unwind for (they raise a
    # fresh one; another came out as a SystemError), so the signal is noted here
    _STOPPED_BY.append(sig)
    raise KeyboardInterrupt


def shrunk_dp(parallel: cfg.ParallelConfig, batch: int, slots: int) -> int:
    """The largest data-parallel size, at most ``parallel.dp``, whose ``dp x pp`` ranks fit in
    ``slots`` and that the global batch (``train.batch_size``) still divides as the run
    requires (over dp, times ``parallel.microbatches`` for a pipeline; ``parallel.chunks``
    over dp in deterministic mode); 0 when none does."""
    pp = parallel.pp
    for dp in range(min(parallel.dp, slots // pp), 0, -1):
        if pp > 1:
            fits = batch % (dp * parallel.microbatches) == 0
        else:
            fits = batch % dp == 0 and not (parallel.deterministic and parallel.chunks % dp)
        if fits:
            return dp
    return 0


def surviving_slots(job: Job, settle_s: float) -> tuple[int, int]:
    """(slots of the job's size, nodes) on the cluster's live nodes after a failure. An old
    host actor that answers neither way within ``settle_s`` counts its node as lost: Ray
    declares a node that vanished without notice dead only once its health checks fail."""
    pings = {a.info.remote(): i for i, a in enumerate(job.actors)}
    _, silent = ray.wait(list(pings), num_returns=len(pings), timeout=settle_s)
    lost = {job.nodes_of[pings[r]] for r in silent}
    live = [node for node in nodes() if node.id not in lost]
    return sum(node.slots(job.cpus, job.gpus) for node in live), len(live)


class _Stop(Exception):
    """No restart is possible; the message says why."""


def _attempts(job: Job, max_restarts: int, env: Mapping[str, str],
              argv_for: Callable[[int, Job], list[str]],
              failed_rank: Callable[[str], int | None],
              resize: Callable[[Job], tuple[Job, str]] | None = None) -> int:
    """Run the job with fresh host actors up to ``1 + max_restarts`` times (``argv_for(k,
    job)`` is attempt k's mpirun argv), until one succeeds; returns the exit code. Before a
    restart, ``resize(job)`` may replace the job by a smaller one (returning it and what to
    say), or raise _Stop. Closes the job."""
    code = 1
    try:
        for attempt in range(max_restarts + 1):
            job.start_hosts()
            code, failure = supervise(job, argv_for(attempt, job), {**env, **job.agent_env()},
                                      failed_rank)
            if failure is None:
                return 0
            if attempt == max_restarts:
                _say(f"{failure}; the job stopped")
                break
            if code == 2:   # a rank's bad-input error (one line above): a restart meets it again
                _say(f"{failure}; not restarted: a bad-input error (exit 2) would recur")
                break
            if _diverged(job):   # the same config from the same checkpoint diverges again
                _say(f"{failure}; not restarted: the training diverged, and a restart would "
                     f"diverge again")
                break
            how = ""
            if resize is not None:
                try:
                    job, how = resize(job)
                except _Stop as e:
                    _say(f"{failure}; {e}; the job stopped")
                    break
            _say(f"{failure}; restart {attempt + 1} of {max_restarts}{how}")
    except KeyboardInterrupt:
        if _STOPPED_BY:
            raise Terminated(_STOPPED_BY[0]) from None
        raise
    finally:
        job.close()
    return max(code, 1)


def _start(n: int, c: cfg.ClusterConfig, gpus: float,
           pp: int = 1) -> tuple[Job, dict[str, str]]:
    """Connect to the cluster, reserve ``n`` slots of ``gpus`` GPUs each as ``cluster``
    settings ``c`` say (stage-aware when the ``n`` ranks are ``n / pp`` pipelines of ``pp``
    stages, pp > 1); returns the job and the environment mpirun runs in."""
    t0 = time.monotonic()
    gcs = connect(int(n * c.cpus_per_rank + 0.999))
    t1 = time.monotonic()
    if threading.current_thread() is threading.main_thread():
        # `ray job stop` sends SIGTERM: unwind, so that mpirun (in a session of its own) and
        # the actors stop with us. Set after ray.init, whose handler would only dump a stack.
        signal.signal(signal.SIGTERM, _interrupted)
    job = _reserve(n, c, gpus, pp)
    job.startup = {"connect": t1 - t0, "placement group": time.monotonic() - t1}
    return job, dict(os.environ, RAY_ADDRESS=gcs)


def _reserve(n: int, c: cfg.ClusterConfig, gpus: float, pp: int) -> Job:
    """A job of ``n`` slots as ``cluster`` settings ``c`` say (stage-aware for pp > 1)."""
    on = stage_placement(n // pp, pp, c.cpus_per_rank, gpus) if pp > 1 else None
    return Job(n, c.cpus_per_rank, c.placement, c.start_timeout_s, gpus, on)


def _say_startup(job: Job) -> None:
    _say("start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in job.startup.items())
         + "; then mpirun starts the ranks"
         + (" here (every slot is on this node), the host actors alongside" if job.direct
            else ""))


def _say_slots(job: Job) -> None:
    """One line per rank: the node and GPUs its slot got (when the job asked for GPUs or
    pinned its slots to nodes)."""
    for rank, info in enumerate(job.infos):
        _say(f"rank {rank}: node {info['ip']} (id {info['node_id'][:8]})"
             + (f", GPU {','.join(info['gpus'])}" if job.gpus > 0 else ""))


def _exported() -> list[str]:
    """The SHARDGRAD_* variables set here, which mpirun passes on to the ranks (``-x``)."""
    return [name for name in cfg.ENV if name.startswith("SHARDGRAD_") and cfg.env(name)]


def launch(config: cfg.Config, out_dir: str, resume: str | None,
           command: Callable[..., list[str]], failed_rank: Callable[[str], int | None]) -> int:
    """Train ``config`` on ``parallel.dp`` x ``parallel.pp`` ranks placed by Ray; returns the
    exit code.

    ``command(hosts, config_path, out_dir, resume, as_root=, export=, ranks=)`` builds the mpirun
    argv (cluster.commands.ray_job_argv). On a failure with ``cluster.max_restarts`` left,
    fresh actors start the job again from the latest checkpoint in ``out_dir``; with
    ``cluster.min_ranks``, with fewer ranks when the live nodes no longer hold them all.
    """
    c, pp = config.cluster, config.parallel.pp
    n = config.parallel.dp * pp
    if c.min_ranks > n:
        raise cfg.ConfigError(f"cluster.min_ranks = {c.min_ranks} is more than the job's {n} "
                              f"ranks (parallel.dp x parallel.pp = {config.parallel.dp} x {pp})")
    out_dir = os.path.abspath(out_dir)
    gpus = gpus_per_rank(config)
    job, env = _start(n, c, gpus, pp)
    # Here, after the host actors started: train imports much that launching needs none of.
    from shardgrad.runtime.train import latest_checkpoint

    # The ranks get the resolved config with the launcher's own keys at their defaults, so
    # their checkpoints and summary match an mpirun run of the same config.
    ranks_config = dataclasses.replace(config, cluster=cfg.ClusterConfig())
    config_path = os.path.join(tempfile.gettempdir(), f"shardgrad-{job.id}", "config.toml")
    export = _exported()

    def argv_for(attempt: int, job: Job) -> list[str]:
        nonlocal resume
        job.write(config_path, to_toml(ranks_config))
        if attempt:
            resume = out_dir if latest_checkpoint(out_dir) else resume
        _say(f"attempt {attempt + 1}: {job.n} ranks on "
             f"{', '.join(sorted({i['ip'] for i in job.infos}))}"
             + (f", resuming from {latest_checkpoint(resume)}" if resume else ""))
        _say_startup(job)
        if job.gpus > 0 or pp > 1 or c.min_ranks:
            _say_slots(job)
        if not job.pinned:
            _say(f"this node has no {job.cpus:g} CPU for rank 0: {job.where(0)} writes "
                 f"{out_dir} there (restarts resume from it only on a shared filesystem)")
        return command(job.mpi_hosts(), config_path, out_dir, resume, as_root=os.geteuid() == 0,
                       export=export, ranks=job.n)

    def resize(job: Job) -> tuple[Job, str]:
        """The job to restart: this one while the live nodes hold all its ranks, else one
        of the largest data-parallel size they hold (a checkpoint resumes at any size; the
        global batch stays), down to cluster.min_ranks."""
        nonlocal ranks_config
        slots, live = surviving_slots(job, min(c.start_timeout_s, 30.0))
        batch = config.train.batch_size
        dp = shrunk_dp(ranks_config.parallel, batch, slots)
        if dp * pp >= job.n:
            return job, ""
        slot = f"{job.cpus:g} CPU" + (f" + {job.gpus:g} GPU" if job.gpus > 0 else "")
        held = f"the live nodes ({live}) hold {slots} slot(s) of {slot}"
        if dp * pp < c.min_ranks:
            raise _Stop(f"cannot restart with fewer ranks: cluster.min_ranks = {c.min_ranks} "
                        f"but {held}"
                        + (f", of which parallel.dp = {dp} (the largest that divides the "
                           f"global batch) uses {dp * pp}" if dp * pp < min(slots, n) else ""))
        was = ranks_config.parallel.dp
        job.close()
        job = _reserve(dp * pp, c, gpus, pp)
        ranks_config = dataclasses.replace(
            ranks_config, parallel=dataclasses.replace(ranks_config.parallel, dp=dp))
        return job, (f" with {dp * pp} ranks (parallel.dp {was} -> {dp}; cluster.min_ranks = "
                     f"{c.min_ranks}): {held}; train.batch_size = {batch} stays the global "
                     f"batch")

    return _attempts(job, c.max_restarts, env, argv_for, failed_rank,
                     resize if c.min_ranks else None)


def launch_program(program: Sequence[str], n: int, cluster: cfg.ClusterConfig,
                   command: Callable[..., list[str]],
                   failed_rank: Callable[[str], int | None]) -> int:
    """Run ``program`` (e.g. ``python train.py``, which calls ``sg.distributed.init()``) as
    ``n`` MPI ranks placed by Ray, with ``cluster`` settings (the config's ``cluster``
    section); returns the exit code. A restart runs the program again from its start.

    ``command(hosts, program, as_root=, export=, ranks=)`` builds the mpirun argv
    (cluster.commands.ray_program_argv).
    """
    job, env = _start(n, cluster, gpus_per_rank(cfg.Config(cluster=cluster)))

    def argv_for(attempt: int, job: Job) -> list[str]:
        _say(f"attempt {attempt + 1}: {n} ranks on "
             f"{', '.join(sorted({i['ip'] for i in job.infos}))}")
        if job.gpus > 0:
            _say_slots(job)
        return command(job.mpi_hosts(), program, as_root=os.geteuid() == 0, export=_exported(),
                       ranks=n)

    return _attempts(job, cluster.max_restarts, env, argv_for, failed_rank)


__all__ = ["Host", "Job", "NAMESPACE", "connect", "gpus_per_rank", "launch", "launch_program",
           "nodes", "planned_placement", "process_tree", "shrunk_dp", "signal_all",
           "stage_placement", "supervise", "surviving_slots", "to_toml", "unniced"]
