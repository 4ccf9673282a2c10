"""What every MPI rank script shares: the world, and running the thread-rank
harness (``tests/harness.py``) on real MPI ranks.

:func:`check_on_mpi` runs ``harness.check_functional`` with its rank runner
swapped for one that runs *this* rank's shard over MPI and allgathers host
copies of every rank's results, so each rank checks all of them against the
float64 reference (its own results are the real arrays, checked for
namespace, device and dtype too). The verdict is collective: every rank
raises the same AssertionError when any rank failed, which is what lets
hypothesis shrink in lockstep on every rank.

Rank scripts need the repository root and ``tests/`` on ``PYTHONPATH``
(``tests/test_mpi.py`` sets it), e.g. by hand::

    PYTHONPATH=.:tests mpiexec -n 4 python -m mpi4py tests/mpi_scripts/cases.py shards

The allgathers here use mpi4py's pickling collectives: they belong to the
test, not to the SyncBN path under test.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import numpy as np
from mpi4py import MPI

import arraysyncbn as sbn
from arraysyncbn.testing import to_numpy
from arraysyncbn.testing.strategies import ShardedBatch

import harness

WORLD = MPI.COMM_WORLD


def say_ok(what: str) -> None:
    """The line the pytest side counts: one per rank that finished ``what``."""
    say(f"OK {what} rank {WORLD.rank}/{WORLD.size}")


def say(line: str) -> None:
    """Print one line in a single write, so mpiexec does not interleave ranks' lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _host(a: Any) -> np.ndarray | None:
    return None if a is None else to_numpy(a)


def _mpi_runner(comm: sbn.MPICommunicator, backend: Any):
    """A drop-in for ``harness.run_functional`` over MPI ranks."""

    def run(batch: ShardedBatch, c: harness.Converted, *, training: bool = True):
        rank = comm.rank
        mine = harness.rank_step(batch, c, comm, training=training)
        fields = ("y", "running_mean", "running_var", "dx", "dweight", "dbias")
        hosts = comm.comm.allgather(
            {**{f: _host(getattr(mine, f)) for f in fields}, "route": mine.route}
        )
        return [
            mine if r == rank else _rebuild(h, c, batch, mine.count, backend)
            for r, h in enumerate(hosts)
        ]

    return run


def _rebuild(
    h: dict[str, Any], c: harness.Converted, batch: ShardedBatch, count: Any, backend: Any
) -> harness.RankResult:
    """Another rank's host results, converted back into ``backend``."""

    def back(name: str, dtype: str) -> Any:
        return None if h[name] is None else backend.asarray(h[name], dtype)

    return harness.RankResult(
        back("y", batch.dtype),
        back("running_mean", c.pdtype),
        back("running_var", c.pdtype),
        count,
        back("dx", batch.dtype),
        back("dweight", c.pdtype),
        back("dbias", c.pdtype),
        h["route"],
    )


def digest(batch: ShardedBatch) -> str:
    """A hash of everything drawn, to prove every rank drew the same example."""
    h = hashlib.sha256()
    for a in (*batch.shards, *batch.dys, batch.weight, batch.bias,
              batch.running_mean, batch.running_var):  # fmt: skip
        h.update(b"none" if a is None else repr(a.shape).encode() + a.tobytes())
    h.update(repr((batch.axis, batch.dtype, batch.momentum, batch.eps)).encode())
    return h.hexdigest()


def check_on_mpi(
    comm: sbn.MPICommunicator, backend: Any, batch: ShardedBatch, *, training: bool = True
) -> None:
    """``harness.check_functional`` on MPI ranks, with a collective verdict."""
    digests = comm.comm.allgather(digest(batch))
    if len(set(digests)) != 1:
        raise AssertionError(f"ranks drew different examples: {digests}")
    failure = ""
    try:
        harness.check_functional(
            backend, batch, training=training, runner=_mpi_runner(comm, backend)
        )
    except AssertionError as exc:  # a failed comparison becomes the shared verdict
        failure = f"rank {comm.rank}: {exc}"
    # Any other exception propagates: under `python -m mpi4py` it aborts the
    # job with its traceback instead of leaving the other ranks in a collective.
    failures = [f for f in comm.comm.allgather(failure) if f]
    if failures:
        raise AssertionError("; ".join(failures))
