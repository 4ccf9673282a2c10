"""Latency of a healthy SyncBN-sized allreduce, with and without the watchdog.

Run under MPI from the repository root::

    mpiexec -n 2 python -m mpi4py scripts/allreduce_latency.py [LENGTH] [ROUNDS]

Times :meth:`arraysyncbn.MPICommunicator.allreduce` of LENGTH float64 values
(default 129: the statistics buffer of a 64-channel layer) with the watchdog
(``Iallreduce`` polled under a deadline, the default) and without it
(``timeout=0``: the blocking ``Allreduce``), plus mpi4py's raw ``Allreduce``
for reference. The variants alternate within each of ROUNDS rounds (default
15) so that load from other processes hits them alike. Rank 0 prints the
median, over rounds, of the mean microseconds per call of the slowest rank.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from arraysyncbn import MPICommunicator

CALLS_PER_ROUND = 1000


def main() -> None:
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 129
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    world = MPI.COMM_WORLD
    buf = np.random.default_rng(world.rank).standard_normal(length)
    recv = np.empty_like(buf)
    watched, blocking = MPICommunicator(timeout=60), MPICommunicator(timeout=0)
    variants: dict[str, Callable[[], object]] = {
        "watchdog: Iallreduce + poll": lambda: watched.allreduce(buf),
        "timeout=0: blocking Allreduce": lambda: blocking.allreduce(buf),
        "raw mpi4py Allreduce": lambda: world.Allreduce(buf, recv, op=MPI.SUM),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for call in variants.values():  # warm up every path once
        for _ in range(CALLS_PER_ROUND):
            call()
    for _ in range(rounds):
        for name, call in variants.items():
            world.Barrier()
            start = time.perf_counter()
            for _ in range(CALLS_PER_ROUND):
                call()
            mean_us = (time.perf_counter() - start) / CALLS_PER_ROUND * 1e6
            times[name].append(world.allreduce(mean_us, op=MPI.MAX))
    if world.rank == 0:
        print(f"{world.size} ranks, {length} float64, {rounds} rounds of {CALLS_PER_ROUND} calls")
        for name, values in times.items():
            spread = f"{min(values):.2f}..{max(values):.2f}"
            print(f"{name:32s} median {statistics.median(values):6.2f} us  (range {spread})")


if __name__ == "__main__":
    main()
