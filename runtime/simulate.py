"""``shardgrad simulate``: predicted step time, peak memory, bytes communicated and pipeline
bubble of a config on N ranks, from the compute time of its programs measured on this
machine (the compiled step, or each pipeline stage's forward / backward / update program, on
random data of the local batch's shape) and an alpha-beta model of the network (ring
allreduce, point-to-point sends). Imports graph, partition and runtime (train, compiled).
"""

from __future__ import annotations

import math
import os
import statistics
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


def time_step(config: cfg.ConfigLike, rows: int, repeats: int = 20) -> float:
    """Median seconds of one call of the compiled TrainStep (what the training loop times
    as step_time_s) on ``rows`` real samples, one process, after a warm-up call: kernels
    plus the per-step work around them (feeds, loss, writing the state back)."""
    config = cfg.from_dict(config)
    from shardgrad.runtime.train import setup

    _, optimizer, step, data = setup(config)
    x, y = data.x_train[:rows], data.y_train[:rows]
    optimizer.lr = 0.0      # the model stays where it is: no divergence, same kernels
    float(step(x, y))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        float(step(x, y))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _slowdown(ranks_per_node: int, config: cfg.Config) -> float:
    """CPU ranks beyond the cores share them (each BLAS thread a core): compute stretches."""
    if config.device.type != "cpu":
        return 1.0
    threads = config.device.threads or 1
    return max(1.0, ranks_per_node * threads / (os.cpu_count() or 1))


def simulate(config: cfg.ConfigLike, ranks: int, pp: int | None = None,
             microbatches: int | None = None, gpus_per_node: int | None = None,
             link: str = "shm", repeats: int = 20) -> dict[str, Any]:
    """The prediction for ``config`` on ``ranks`` ranks as dp = ranks / pp replicas of pp
    stages (default the config's parallel.pp and parallel.microbatches). With
    ``gpus_per_node`` (ranks a node), traffic between nodes crosses ``link`` and traffic
    inside one crosses shared memory (CPU) or NVLink (GPU); without it every rank is on one
    node linked by ``link``. Raises ConfigError for a shape the config cannot take."""
    config = cfg.from_dict(config)
    with threadpool_limits(config.device.threads or None, user_api="blas"):
        return _simulate(config, ranks, pp, microbatches, gpus_per_node, link, repeats)


def _simulate(config, ranks, pp, microbatches, gpus_per_node, link, repeats):
    pp = pp or config.parallel.pp
    m = microbatches or (config.parallel.microbatches if pp > 1 else 1)
    if link not in LINKS:
        raise cfg.ConfigError(f"--link {link!r}: must be one of {', '.join(LINKS)}")
    if ranks < 1 or ranks % pp:
        raise cfg.ConfigError(f"--ranks {ranks} must be a positive multiple of --pp {pp}")
    dp = ranks // pp
    batch = config.train.batch_size
    if batch % (dp * m):
        raise cfg.ConfigError(f"train.batch_size = {batch} must be a multiple of dp x "
                              f"micro-batches = {dp} x {m}")
    per_node = min(gpus_per_node or ranks, ranks)
    nodes = math.ceil(ranks / per_node)
    inner = LINKS["nvlink" if config.device.type != "cpu" else "shm"]
    # a ring over several nodes runs at its slowest hop
    ring = LINKS[link] if nodes > 1 or gpus_per_node is None else inner
    slow = _slowdown(per_node, config)
    if pp == 1:
        return _data_parallel(config, dp, ring, slow, repeats, link, per_node, nodes)
    return _pipeline(config, dp, pp, m, ring, LINKS[link] if gpus_per_node is None
                     or per_node < pp else inner, slow, repeats, link, per_node, nodes)


def _data_parallel(config, dp, ring, slow, repeats, link, per_node, nodes) -> dict[str, Any]:
    from shardgrad.runtime.dp import Parallel, rewrite

    p = config.parallel
    rows = config.train.batch_size // dp
    graph = _step_graph(config, rows)
    _, planned = time_graph(graph, 1)
    compute = time_step(config, rows, repeats)
    comm_s, sent, rewritten = 0.0, 0, graph
    if dp > 1:
        rewritten = rewrite(dp, Parallel.of(p))(graph)
        for op, nbytes in _comm_nodes(rewritten):
            # a ring reduce_scatter or allgather is half a ring allreduce (ZeRO-1 issues both)
            half = op in ("reduce_scatter", "allgather")
            comm_s += ring_allreduce_s(nbytes, dp, ring) / (2 if half else 1)
            sent += int((1 if half else 2) * (dp - 1) / dp * nbytes)
    # ZeRO-1's graph holds 1/dp of the optimizer state (states optim/zero/<key>)
    state = _bytes(rewritten, "param/") + _bytes(rewritten, "state/")
    step = compute * slow + comm_s
    return {"ranks": dp, "dp": dp, "pp": 1, "microbatches": 1, "link": link,
            "ranks_per_node": per_node, "nodes": nodes,
            "step_time_s": step, "compute_s": compute * slow, "comm_s": comm_s,
            "bubble": 0.0, "bytes_sent_per_rank": sent,
            "peak_memory_bytes": planned + state,
            "optimizer_state_bytes_per_rank": _bytes(rewritten, "state/optim/"),
            "samples_per_s": config.train.batch_size / step}


def _pipeline(config, dp, pp, m, ring, hop, slow, repeats, link, per_node, nodes
              ) -> dict[str, Any]:
    from shardgrad.partition.pipeline import pipeline as partition_pipeline
    from shardgrad.runtime import pipeline

    p = config.parallel
    rows = config.train.batch_size // (dp * m)
    graph = _step_graph(config, rows)
    times = pipeline.profile_times(graph) if p.balance == "profile" else None
    with pipeline.as_config_error():
        plan = partition_pipeline(graph, pp, p.balance, m, p.schedule, dp, times)
    # each program run costs what a step costs around its kernels (measured on the whole
    # step of a micro-batch: the TrainStep call less its program's run)
    whole, _ = time_graph(graph, repeats)
    extra = max(time_step(config, rows, repeats) - whole, 0.0)
    f, b, u, peak, grads = [], [], [], [], []
    for st in plan.stages:
        tf, bf = time_graph(st.forward, repeats)
        tb, bb = time_graph(st.backward, repeats)
        tu, bu = time_graph(st.update, repeats)
        tf, tb, tu = tf + extra, tb + extra, tu + extra
        f.append(tf * slow)
        b.append(tb * slow)
        u.append(tu * slow)
        grads.append(_bytes(st.update, "param/"))
        peak.append(bf + bb + bu + _bytes(st.update, "param/") + _bytes(st.update, "state/"))
    sent = [0] * pp
    for t in plan.transfers:   # a send costs its stage the transfer, every micro-batch
        f[t.src] += p2p_s(t.nbytes, hop)
        sent[t.src] += t.nbytes * m
        if t.grad:
            b[t.dst] += p2p_s(t.nbytes, hop)
            sent[t.dst] += t.nbytes * m
    timing = simulate_schedule(plan.schedule, f, b)
    allreduce = [ring_allreduce_s(g, dp, ring) for g in grads]
    step = timing.makespan + max(u) + max(allreduce)
    sent = [s + int(2 * (dp - 1) / dp * g) for s, g in zip(sent, grads, strict=True)]
    return {"ranks": dp * pp, "dp": dp, "pp": pp, "microbatches": m, "link": link,
            "ranks_per_node": per_node, "nodes": nodes,
            "step_time_s": step, "compute_s": sum(f) / pp * m + sum(b) / pp * m,
            "comm_s": max(allreduce), "bubble": timing.bubble(),
            "bytes_sent_per_rank": max(sent), "peak_memory_bytes": max(peak),
            "per_stage": [{"stage": s, "forward_s": f[s], "backward_s": b[s],
                           "update_s": u[s], "bytes_sent": sent[s],
                           "peak_memory_bytes": peak[s]} for s in range(pp)],
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


__all__ = ["LINKS", "Link", "p2p_s", "recommend", "ring_allreduce_s", "simulate", "time_graph"]
