"""``shardgrad simulate``: predicted step time, peak memory, bytes communicated and pipeline
bubble of a config on N ranks: each rank's own training step measured here without its
communication (``measure_rank``, on a ``Loopback`` communicator, timed as the training loop
times it), the cores shared with the other jobs' ready threads (``Contention``), and an
alpha-beta model of the network (ring allreduce, point-to-point sends; a preset, or the
hand-over between ranks measured now, ``measure_link``). Imports graph, partition, runtime.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from shardgrad.graph.ir import Graph, ShapeError
from shardgrad.ops import collective
from shardgrad.partition.schedule import simulate as simulate_schedule
from shardgrad.runtime import compiled
from shardgrad.runtime import config as cfg
from shardgrad.runtime.comm import SingleProcess
from shardgrad.runtime.device import cores


@dataclass(frozen=True)
class Link:
    """Time to move n bytes once: ``alpha + n * beta`` (seconds; beta in s/byte)."""

    alpha: float
    beta: float
    source: str


# Where each figure comes from is part of the preset (docs/performance.md lists them).
LINKS = {
    "shm": Link(3.5e-6, 1 / 10.8e9,
                "two ranks on the 2-core dev machine, Open MPI shared memory, ping-pong of 8 B "
                "and 1 MiB: `python bench/bench_link.py` (2026-12-04; at load 13 one run gave "
                "alpha 1.7 ms: a busy machine's scheduler, not the link)"),
    "nvlink": Link(5e-6, 1 / 370e9,
                   "H100/H200 NVLink 4: 450 GB/s a direction (NVIDIA datasheet), about 370 GB/s "
                   "bus bandwidth in nccl-tests all_reduce; ~5 us NCCL launch latency"),
    "infiniband": Link(3e-6, 1 / 45e9,
                       "NDR InfiniBand 400 Gb/s (ConnectX-7: 50 GB/s), about 45 GB/s reached; "
                       "1-3 us MPI latency"),
    "ethernet": Link(30e-6, 1 / 2.8e9,
                     "25 GbE (3.1 GB/s), about 2.8 GB/s reached by TCP; ~30 us TCP latency"),
}


def _probe(gap_s: float, seconds: float, exchange: bool) -> None:
    """The ranks of ``measure_link``'s mpirun, in pairs (0, 1), (2, 3), ... for ``seconds``
    (an odd last rank only computes). Hand-over (pipeline stages): the even rank computes
    ``gap_s`` and sends 8 bytes to the odd one, which waits in its receive, computes
    ``gap_s`` and answers; one-way time = (round trip - 2 gaps) / 2. ``exchange``
    (data-parallel ranks meeting in a collective): both compute ``gap_s``, then swap 8 bytes;
    time = the swap less the gap. Rank 0 prints every pair's times as JSON."""
    from mpi4py import MPI

    comm, buf, other, times = MPI.COMM_WORLD, np.ones(2, np.float32), np.ones(2, np.float32), []
    rank, size = comm.Get_rank(), comm.Get_size()

    def compute(t: float) -> None:   # a rank's work between its messages keeps a core busy
        end = time.perf_counter() + t
        while time.perf_counter() < end:
            pass

    comm.Barrier()
    stop = time.perf_counter() + seconds
    peer = rank ^ 1
    if peer >= size:
        compute(seconds)
    while peer < size and buf[0] and other[0]:
        t = time.perf_counter()
        if exchange:
            compute(gap_s)
            buf[0] = time.perf_counter() < stop
            comm.Sendrecv(buf, peer, recvbuf=other, source=peer)
            times.append(time.perf_counter() - t - gap_s)
        elif rank % 2 == 0:
            compute(gap_s)
            buf[0] = time.perf_counter() < stop
            comm.Send(buf, peer)
            comm.Recv(buf, peer)
            times.append((time.perf_counter() - t - 2 * gap_s) / 2)
        else:
            comm.Recv(buf, peer)
            compute(gap_s)
            comm.Send(buf, peer)
    every = comm.gather(times, root=0)
    if rank == 0:
        print(json.dumps({"one_way_s": [t for ts in every for t in ts], "gap_s": gap_s,
                          "ranks": size}))


def measure_link(gap_s: float, ranks: int = 2, seconds: float = 1.0, base: str = "shm",
                 exchange: bool = False) -> Link:
    """The ``base`` link with alpha measured now between MPI ranks on this machine
    (shardgrad's MPI settings), ``ranks`` of them in pairs, as many as the job runs here.
    Alpha is the mean time of a message that a rank waiting in its receive gets after its
    peer computed ``gap_s``, as pipeline stages hand micro-batches on; with ``exchange``, of
    a swap after both computed ``gap_s``, as data-parallel ranks meet in a collective. On a
    machine whose cores the ranks and other jobs share, a waiting rank may have lost its
    core, or its peer be waiting for one: that is in alpha. Needs mpirun and mpi4py."""
    mpirun = shutil.which("mpirun")
    if mpirun is None or importlib.util.find_spec("mpi4py") is None:
        raise cfg.ConfigError("--measure-link needs mpirun and mpi4py: pip install "
                              "'shardgrad[mpi]'")
    root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    n = max(2, ranks)
    # launched as `shardgrad train -n` launches (mpirun binds each rank to a core unless the
    # ranks outnumber the cores): where a waiting rank may run decides the hand-over
    over = ["--oversubscribe"] if n > (os.cpu_count() or 1) else []
    r = subprocess.run([mpirun, *root, *over, "-n", str(n), sys.executable, "-m",
                        "shardgrad.runtime.simulate", "--probe", repr(gap_s), repr(seconds),
                        str(int(exchange))],
                       capture_output=True, text=True, timeout=60 + 2 * seconds,
                       env={**os.environ, **cfg.MPI_DEFAULTS})
    if r.returncode != 0:
        raise cfg.ConfigError(f"--measure-link: mpirun failed: {r.stderr.strip()[-300:]}")
    times = json.loads(r.stdout.strip().splitlines()[-1])["one_way_s"]
    alpha = max(statistics.fmean(times), 0.0)
    what = "swaps" if exchange else "one-way messages"
    return Link(alpha, LINKS[base].beta,
                f"alpha measured now: mean of {len(times)} {what} after {gap_s * 1e6:.0f} us "
                f"of compute, {n} ranks in pairs, this machine; beta of {base!r}")


def hop_name(link: Link) -> str:
    """The preset ``link`` is (a measured link: the preset it was measured against)."""
    return next((k for k, v in LINKS.items() if v is link), "shm")


def ring_allreduce_s(nbytes: float, p: int, link: Link) -> float:
    """Ring allreduce of ``nbytes`` over ``p`` ranks: 2(p-1) steps of nbytes/p each
    (reduce-scatter then allgather)."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (p - 1) * link.alpha + 2 * (p - 1) / p * nbytes * link.beta


def p2p_s(nbytes: float, link: Link) -> float:
    return link.alpha + nbytes * link.beta


def _feeds(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in graph.nodes:
        if n.inputs or n.op == "const":
            continue
        if np.dtype(n.dtype).kind == "f":
            # positive: variances and their square roots stay finite (NaN paths run slower)
            feeds[n.name] = rng.uniform(0.01, 0.1, n.shape).astype(n.dtype)
        else:   # labels and indices: zeros are valid
            feeds[n.name] = np.zeros(n.shape, n.dtype)
    return feeds


def time_graph(graph: Graph, repeats: int = 20) -> tuple[float, int]:
    """Median seconds of one run of ``graph`` compiled for this CPU (after a warm-up run),
    and its planned buffer bytes."""
    program = compiled.compile(graph)
    feeds = _feeds(graph)
    one = SingleProcess()
    # a stage's update may hold a collective (grad_clip's norm over the stages): here it
    # runs on one process, its traffic being the link model's business
    with collective.bind(one, pp=one, dp=one):
        program.run(feeds)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            program.run(feeds)
            times.append(time.perf_counter() - t)
    return statistics.median(times), program.stats()["planned_bytes"]


def _bytes(graph: Graph, prefix: str) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for k, v in graph.outputs.items() if k.startswith(prefix))


def _comm_nodes(graph: Graph) -> list[tuple[str, int]]:
    """(op, bytes) of each collective node of a data-parallel step graph: the whole buffer
    (a reduce_scatter's input, an allgather's output)."""
    out = []
    for n in graph.nodes:
        whole = n.inputs[0] if n.op == "reduce_scatter" else n
        if n.op in ("allreduce", "allreduce_start", "reduce_scatter", "allgather"):
            out.append((n.op, int(np.prod(whole.shape)) * np.dtype(whole.dtype).itemsize))
    return out


def _step_graph(config: cfg.Config, rows: int) -> Graph:
    from shardgrad.graph.nn import functional
    from shardgrad.graph.trace import trace_step
    from shardgrad.runtime.train import setup

    model, optimizer, _, data = setup(config)
    return trace_step(model, functional.cross_entropy, optimizer,
                      ((rows,) + data.input_shape, config.train.dtype),
                      ((rows,), str(data.y_train.dtype)))


class Loopback(SingleProcess):
    """Rank ``rank`` of a ``dp`` x ``pp`` job whose communication completes at once: a
    receive fills its buffer with a small constant, a send returns, a collective leaves its
    buffer as it is. The rank's whole training step then runs in one process, so its time
    without communication is measured on the program the rank really runs (the
    data-parallel rewrite or its pipeline stage, the Python around the kernels included).
    ``split`` answers runtime.pipeline.Mesh's two splits (the pipeline and the replica
    group), told apart by their (color, key): pick a rank whose stage and replica differ.
    Its allreduce and broadcasts are SingleProcess's identities."""

    def __init__(self, rank: int, dp: int, pp: int, size: int | None = None):
        self.rank, self.dp, self.pp = rank, dp, pp
        self.world_size = dp * pp if size is None else size

    def allgather_obj(self, obj):
        return [obj] * self.world_size

    def allgather_(self, x, out):
        for r in range(self.world_size):
            out[r * len(x):(r + 1) * len(x)] = x
        return out

    def reduce_scatter_(self, x, out, op="sum"):
        m = len(out)
        out[...] = x[self.rank * m:(self.rank + 1) * m]
        return out

    def send(self, buf, dest, tag=0):
        return None

    def recv_(self, buf, source, tag=0):
        buf[...] = 0.05 if np.dtype(buf.dtype).kind == "f" else 0
        return buf

    def split(self, color, key):
        stage, replica = self.rank % self.pp, self.rank // self.pp
        if (color, key) == (replica, stage) != (stage, replica):
            return Loopback(key, self.dp, self.pp, self.pp)
        if (color, key) == (stage, replica) != (replica, stage):
            return Loopback(key, self.dp, self.pp, self.dp)
        raise ValueError(f"Loopback rank {self.rank}: split({color}, {key}) is ambiguous")


def runnable_elsewhere() -> float:
    """Threads ready to run on this machine besides the caller, now (Linux: /proc/loadavg's
    count of runnable threads less this one; elsewhere the 1-minute load average less one)."""
    try:
        with open("/proc/loadavg") as f:
            return max(0.0, float(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, IndexError, ValueError):
        pass
    return max(0.0, os.getloadavg()[0] - 1) if hasattr(os, "getloadavg") else 0.0


@dataclass
class RankSteps:
    """One rank's training step measured by ``measure_rank``: each step's wall time as the
    training loop times it; for a pipeline stage each step's action phase (the schedule's
    forward / backward / send / receive actions, up to the flush) and its F and B spans; and
    the threads that were ready to run elsewhere on the machine meanwhile."""

    times: list[float]
    actions: list[float]
    forward: list[float]
    backward: list[float]
    elsewhere: list[float]

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def measure_rank(config: cfg.Config, rank: int, steps: int = 50, warmup: int = 10) -> RankSteps:
    """Run rank ``rank`` of ``config``'s dp x pp job for ``steps`` steps (after ``warmup``)
    in this process on a ``Loopback`` communicator, as the training loop runs it: the step
    ``shardgrad train`` builds for that rank (runtime.train.step_options), fed this rank's
    batches by the loader (with its prefetch thread), timed around each call as the loop
    times summary.json's step_time_s. The learning rate is 0 so the model stays where it is."""
    from shardgrad.runtime import train
    from shardgrad.runtime.data import DistributedSampler
    from shardgrad.runtime.prefetch import epoch_batches, prefetch

    comm = Loopback(rank, config.parallel.dp, config.parallel.pp)
    run = train.accumulated(config)
    options = train.step_options(run, comm)
    model, optimizer, step, data = train.setup(config, options)
    world = options.get("data_world_size", comm.world_size)
    sampler = DistributedSampler(len(data.y_train), world, options.get("data_rank", comm.rank),
                                 shuffle=True, seed=config.train.seed)
    batch = run.train.batch_size
    augment, to_device = train.loader_options(config, data)
    out = RankSteps([], [], [], [], [])
    prepared, epoch, runner = False, 0, None
    while len(out.times) < steps + warmup:
        batches = prefetch(epoch_batches(data.x_train, data.y_train, sampler, batch, epoch,
                                         augment, to_device), config.data.prefetch)
        for x, y in batches:
            if not prepared:
                if options.get("prepare") is not None:
                    options["prepare"](model, optimizer, step, x, y)
                optimizer.lr, prepared = 0.0, True
            t = time.perf_counter()
            step(x, y)
            out.times.append(time.perf_counter() - t)
            out.elsewhere.append(runnable_elsewhere())
            if runner is None and config.parallel.pp > 1:
                program = step.graph_for(x, y)[1]
                runner = getattr(getattr(program, "inner", program), "runner", False)
            if runner:
                st = runner.stats
                out.actions.append(st.wall_s)
                out.forward += [e - b for op, _, b, e in st.spans if op == "F"]
                out.backward += [e - b for op, _, b, e in st.spans if op == "B"]
            if len(out.times) >= steps + warmup:
                batches.close()
                break
        epoch += 1
    drop = lambda v, k: v[k:] if len(v) > k else v
    m = len(out.forward) // max(len(out.actions), 1)
    return RankSteps(drop(out.times, warmup), drop(out.actions, warmup),
                     drop(out.forward, warmup * m), drop(out.backward, warmup * m),
                     drop(out.elsewhere, warmup))


@dataclass(frozen=True)
class Contention:
    """How ``ranks`` ranks of ``threads`` BLAS threads each on ``cores`` CPUs, with
    ``elsewhere`` threads of other jobs ready to run, change a step measured alone: each
    ready thread gets an equal share of the cores (Linux's CFS), so compute stretches by
    ``stretch`` = share alone / share among the ranks; and ranks that synchronise every
    step wait for the slowest, whose median is the ``sync_quantile`` (0.5 ** (1 / ranks))
    of one rank's step times."""

    ranks: int
    threads: int
    cores: int
    elsewhere: float

    @property
    def stretch(self) -> float:
        alone = max(1.0, (self.elsewhere + self.threads) / self.cores)
        return max(1.0, (self.elsewhere + self.ranks * self.threads) / self.cores) / alone

    @property
    def sync_quantile(self) -> float:
        return 0.5 ** (1 / self.ranks)

    def slowest(self, times: list[float]) -> float:
        """The median over steps of the slowest of ``ranks`` ranks' step, each drawn from
        ``times`` (one rank's measured steps): their ``sync_quantile``."""
        return float(np.quantile(times, self.sync_quantile))


def _contention(config: cfg.Config, per_node: int, measured: list[RankSteps]) -> Contention:
    threads = config.device.threads or 1
    elsewhere = statistics.median([e for r in measured for e in r.elsewhere] or [0.0])
    if config.device.type != "cpu":   # each rank has its own GPU
        return Contention(1, 1, 1, 0.0)
    return Contention(per_node, threads, cores(), elsewhere)


def simulate(config: cfg.ConfigLike, ranks: int, pp: int | None = None,
             microbatches: int | None = None, gpus_per_node: int | None = None,
             link: str = "shm", repeats: int = 50, measured_link: bool = False
             ) -> dict[str, Any]:
    """The prediction for ``config`` on ``ranks`` ranks as dp = ranks / pp replicas of pp
    stages (default the config's parallel.pp and parallel.microbatches). With
    ``gpus_per_node`` (ranks a node), traffic between nodes crosses ``link`` and traffic
    inside one crosses shared memory (CPU) or NVLink (GPU); without it every rank is on one
    node linked by ``link``. Each stage's step is measured here (``measure_rank``,
    ``repeats`` steps); communication comes from the link model, contention for this
    machine's cores from ``Contention``. With ``measured_link`` a pipeline's sends cost the
    hand-over between ranks that ``measure_link`` measures now (this machine's load
    included) instead of the preset's alpha (data parallelism keeps the preset: the swap it
    measures overstated this machine's data-parallel steps 3x, docs/performance.md).
    Raises ConfigError for a shape the config cannot take."""
    config = cfg.from_dict(config)
    with threadpool_limits(config.device.threads or None, user_api="blas"):
        return _simulate(config, ranks, pp, microbatches, gpus_per_node, link, repeats,
                         measured_link)


def _simulate(config, ranks, pp, microbatches, gpus_per_node, link, repeats, measured_link):
    pp = pp or config.parallel.pp
    m = microbatches or (config.parallel.microbatches if pp > 1 else 1)
    if link not in LINKS:
        raise cfg.ConfigError(f"--link {link!r}: must be one of {', '.join(LINKS)}")
    if ranks < 1 or ranks % pp:
        raise cfg.ConfigError(f"--ranks {ranks} must be a positive multiple of --pp {pp}")
    if pp > 1 and config.parallel.zero:
        raise cfg.ConfigError(f"parallel.zero = 1 shards the optimizer over data-parallel "
                              f"ranks; it runs with pp = 1 (not --pp {pp})")
    dp = ranks // pp
    batch = config.train.batch_size
    if batch % (dp * m):
        raise cfg.ConfigError(f"train.batch_size = {batch} must be a multiple of dp x "
                              f"micro-batches = {dp} x {m}")
    config = config.replace({"parallel.dp": dp, "parallel.pp": pp, "parallel.microbatches": m})
    per_node = min(gpus_per_node or ranks, ranks)
    nodes = math.ceil(ranks / per_node)
    inner = LINKS["nvlink" if config.device.type != "cpu" else "shm"]
    # a ring over several nodes runs at its slowest hop
    ring = LINKS[link] if nodes > 1 or gpus_per_node is None else inner
    if pp == 1:
        return _data_parallel(config, dp, ring, repeats, link, per_node, nodes)
    return _pipeline(config, dp, pp, m, ring, LINKS[link] if gpus_per_node is None
                     or per_node < pp else inner, repeats, link, per_node, nodes, measured_link)


def _data_parallel(config, dp, ring, repeats, link, per_node, nodes) -> dict[str, Any]:
    from shardgrad.runtime.dp import Parallel, rewrite

    rows = config.train.batch_size // dp
    graph = _step_graph(config, rows)
    _, planned = time_graph(graph, 1)
    measured = measure_rank(config, 0, repeats)
    how = _contention(config, per_node, [measured])
    comm_s, sent, rewritten = 0.0, 0, graph
    # ranks meet every step: the median of the slowest of them
    compute = (how.slowest(measured.times) if dp > 1 else measured.step_s) * how.stretch
    if dp > 1:
        rewritten = rewrite(dp, Parallel.of(config.parallel))(graph)
        for op, nbytes in _comm_nodes(rewritten):
            # a ring reduce_scatter or allgather is half a ring allreduce (ZeRO-1 issues both)
            half = op in ("reduce_scatter", "allgather")
            comm_s += ring_allreduce_s(nbytes, dp, ring) / (2 if half else 1)
            sent += int((1 if half else 2) * (dp - 1) / dp * nbytes)
    # ZeRO-1's graph holds 1/dp of the optimizer state (states optim/zero/<key>)
    state = _bytes(rewritten, "param/") + _bytes(rewritten, "state/")
    step = compute + comm_s
    return {"ranks": dp, "dp": dp, "pp": 1, "microbatches": 1, "link": link,
            "ranks_per_node": per_node, "nodes": nodes,
            "step_time_s": step, "compute_s": compute, "comm_s": comm_s,
            "bubble": 0.0, "bytes_sent_per_rank": sent,
            "peak_memory_bytes": planned + state,
            "optimizer_state_bytes_per_rank": _bytes(rewritten, "state/optim/"),
            "measured_step_s": measured.step_s, "stretch": how.stretch,
            "elsewhere": how.elsewhere, "cores": how.cores, "alpha_s": ring.alpha,
            "samples_per_s": config.train.batch_size / step}


def _pipeline(config, dp, pp, m, ring, hop, repeats, link, per_node, nodes, measured_link
              ) -> dict[str, Any]:
    from shardgrad.partition.pipeline import pipeline as partition_pipeline
    from shardgrad.runtime import pipeline

    p = config.parallel
    rows = config.train.batch_size // (dp * m)
    graph = _step_graph(config, rows)
    times = pipeline.profile_times(graph) if p.balance == "profile" else None
    with pipeline.as_config_error():
        plan = partition_pipeline(graph, pp, p.balance, m, p.schedule, dp, times)
    # each stage measured as its rank runs it (a replica other than its stage number, so
    # the Loopback tells the two groups apart)
    measured = [measure_rank(config, (1 if s == 0 and dp > 1 else 0) * pp + s, repeats)
                for s in range(pp)]
    how = _contention(config, per_node, measured)
    f, b, u, tail, peak, grads = [], [], [], [], [], []
    for st, r in zip(plan.stages, measured, strict=True):
        fs, bs = statistics.median(r.forward), statistics.median(r.backward)
        actions = statistics.median(r.actions)
        # the receives, sends and sums between the computes, spread over them
        glue = max(actions - m * (fs + bs), 0.0) / (2 * m)
        f.append((fs + glue) * how.stretch)
        b.append((bs + glue) * how.stretch)
        # after the flush: reduce, update, the loss program, the TrainStep around it
        tail.append(max(r.step_s - actions, 0.0) * how.stretch)
        grads.append(_bytes(st.update, "param/"))
        _, bf = time_graph(st.forward, 1)
        _, bb = time_graph(st.backward, 1)
        tu, bu = time_graph(st.update, repeats)
        u.append(tu * how.stretch)   # its compute alone: the tail holds it
        peak.append(bf + bb + bu + _bytes(st.update, "param/") + _bytes(st.update, "state/"))
    if measured_link:   # stages hand over after about one action's compute
        hop = measure_link(statistics.median(f + b) / how.stretch, per_node,
                           base=hop_name(hop))
    sent = [0] * pp
    for t in plan.transfers:   # a send costs its stage the transfer, every micro-batch
        f[t.src] += p2p_s(t.nbytes, hop)
        sent[t.src] += t.nbytes * m
        if t.grad:
            b[t.dst] += p2p_s(t.nbytes, hop)
            sent[t.dst] += t.nbytes * m
    timing = simulate_schedule(plan.schedule, f, b)
    allreduce = [ring_allreduce_s(g, dp, ring) for g in grads]
    # the loss program's allreduce over the stages (one value: log2(pp) hops of recursive
    # doubling) and its allreduce over the replicas
    loss = p2p_s(4, hop) * math.ceil(math.log2(pp)) + ring_allreduce_s(4, dp, ring)
    compute = timing.makespan + max(tail)
    step = compute + loss + max(allreduce)
    sent = [s + int(2 * (dp - 1) / dp * g) for s, g in zip(sent, grads, strict=True)]
    return {"ranks": dp * pp, "dp": dp, "pp": pp, "microbatches": m, "link": link,
            "ranks_per_node": per_node, "nodes": nodes,
            "step_time_s": step, "compute_s": compute,
            "comm_s": max(allreduce), "bubble": timing.bubble(),
            "bytes_sent_per_rank": max(sent), "peak_memory_bytes": max(peak),
            "stretch": how.stretch, "elsewhere": how.elsewhere, "cores": how.cores,
            "p2p_alpha_s": hop.alpha, "alpha_s": ring.alpha,
            "per_stage": [{"stage": s, "forward_s": f[s], "backward_s": b[s],
                           "update_s": u[s], "after_flush_s": tail[s],
                           "measured_step_s": measured[s].step_s, "bytes_sent": sent[s],
                           "peak_memory_bytes": peak[s]}
                          for s in range(pp)],
            "samples_per_s": config.train.batch_size / step}


def recommend(config: cfg.ConfigLike, ranks: int, **kw: Any) -> list[dict[str, Any]]:
    """Every (dp, pp, micro-batches) shape of ``ranks`` ranks the config can take (pp up to 4,
    micro-batches 1, 2, 4, 8), fastest first."""
    config = cfg.from_dict(config)
    out = []
    for pp in (1, 2, 3, 4):
        if ranks % pp:
            continue
        for m in (1,) if pp == 1 else (1, 2, 4, 8):
            try:
                out.append(simulate(config, ranks, pp, m, **kw))
            except (cfg.ConfigError, ShapeError):   # e.g. batch norm over micro-batches of 1
                continue
    return sorted(out, key=lambda r: r["step_time_s"])


__all__ = ["LINKS", "Contention", "Link", "Loopback", "RankSteps", "cores", "measure_rank", "p2p_s",
           "recommend", "ring_allreduce_s", "runnable_elsewhere", "simulate", "time_graph"]


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:   # measure_link's ranks
    _probe(float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")
