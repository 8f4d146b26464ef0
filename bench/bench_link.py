"""The alpha-beta figures of the link between two MPI ranks on this machine (the ``shm``
preset of ``shardgrad simulate``): one-way time of a ping-pong, median over repetitions, for
8 B (alpha) and 1 MiB (beta = (t - alpha) / bytes), with MPI's yield-when-idle as
shardgrad's runs set it. Prints one JSON object (rank 0).

    python bench/bench_link.py [--reps 200]       # starts mpirun -n 2 itself
    python bench/bench_link.py --gap-us 200 [--ranks 4]

A tight ping-pong's median misses what a busy machine does to a rank that waits between
messages (it yields its core; the message then waits for the scheduler). ``--gap-us G``
prints instead what ``shardgrad simulate --measure-link`` uses: the mean hand-over (the
peer computed G us first) and the mean swap (both computed G us), ``--ranks`` ranks in pairs
(runtime.simulate.measure_link), with the load.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def child(reps: int) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, out = comm.Get_rank(), {}
    for size in (8, 1 << 20):
        buf = np.zeros(size, np.uint8)
        times = []
        for _ in range(reps):
            comm.Barrier()
            t = time.perf_counter()
            if rank == 0:
                comm.Send(buf, 1)
                comm.Recv(buf, 1)
            else:
                comm.Recv(buf, 0)
                comm.Send(buf, 0)
            times.append((time.perf_counter() - t) / 2)
        out[size] = statistics.median(times)
    if rank == 0:
        alpha = out[8]
        beta = (out[1 << 20] - alpha) / (1 << 20)
        print(json.dumps({"alpha_s": alpha, "beta_s_per_byte": beta,
                          "bandwidth_GBps": 1 / beta / 1e9 if beta > 0 else None,
                          "one_way_1MiB_s": out[1 << 20], "reps": reps,
                          "load": os.getloadavg()}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--child", action="store_true")
    p.add_argument("--gap-us", type=float)
    p.add_argument("--ranks", type=int, default=2)
    a = p.parse_args()
    if a.child:
        child(a.reps)
        return
    if a.gap_us is not None:
        from shardgrad.runtime.simulate import measure_link

        out = {"gap_us": a.gap_us, "ranks": a.ranks, "load": os.getloadavg()}
        for key, exchange in (("handover_alpha_s", False), ("swap_alpha_s", True)):
            out[key] = measure_link(a.gap_us * 1e-6, a.ranks, exchange=exchange).alpha
        print(json.dumps(out))
        return
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = {**os.environ, "OMPI_MCA_mpi_yield_when_idle": "1"}
    subprocess.run([shutil.which("mpirun"), *root, "--oversubscribe", "-n", "2", sys.executable,
                    __file__, "--child", "--reps", str(a.reps)], check=True, env=env, timeout=600)


if __name__ == "__main__":
    main()
