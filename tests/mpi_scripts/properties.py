"""Hypothesis properties on real MPI ranks: ``python -m mpi4py properties.py N [NAME...]``.

Every rank runs the same derandomized hypothesis search (no example
database, no timing-based health checks, so nothing differs between ranks),
checks that all ranks drew the same example, and runs it over MPI for each
array backend present (numpy, array-api-strict on its default device and on
``Device("device1")``, which MPI reaches by staging, torch CPU; cupy with a
GPU). The pass/fail of each example is agreed by all ranks (see
:func:`mpitools.check_on_mpi`). ``N`` is the number of examples per backend
and mode; the optional names keep only those backends (``cupy``: the GPU
check's run, which has no time for the CPU backends' JIT compilation on a
fresh machine).
"""

from __future__ import annotations

import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpitools import WORLD, check_on_mpi, say_ok

import arraysyncbn as sbn
from arraysyncbn.testing.strategies import sharded_batches

from backends import BACKENDS, cupy_usable, routed


def run_backend(comm: sbn.MPICommunicator, backend, examples: int) -> None:
    batches = sharded_batches(ranks=st.just(comm.size), dtypes=st.sampled_from(backend.dtypes))

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(batch=batches, training=st.booleans())
    def prop(batch, training: bool) -> None:
        check_on_mpi(comm, backend, batch, training=training)

    prop()


def main() -> None:
    examples, names = int(sys.argv[1]), set(sys.argv[2:])
    unknown = names - {b.name for b in BACKENDS}
    if unknown:
        sys.exit(f"unknown backends {sorted(unknown)}; known: {[b.name for b in BACKENDS]}")
    comm = sbn.MPICommunicator()
    for backend in BACKENDS:
        if backend.xp is None or (backend.name.startswith("cupy") and not cupy_usable()):
            continue
        if names and backend.name not in names:
            continue
        with routed(backend):
            run_backend(comm, backend, examples)
        say_ok(f"properties[{backend.name}]")
    WORLD.Barrier()


if __name__ == "__main__":
    main()
