"""``python -m arraysyncbn``: the check-and-benchmark job of :mod:`arraysyncbn.cli`.

Runs with ``python -m mpi4py`` semantics (an uncaught exception on any rank
aborts the whole MPI job), so ``mpiexec -n 4 python -m arraysyncbn`` never
hangs on a failing rank. ``python -m arraysyncbn bench`` runs the speed
benchmark of :mod:`arraysyncbn.bench` instead.
"""

from __future__ import annotations

import sys

from .cli import main, run_aborting

if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        from .bench import main as bench_main

        sys.exit(run_aborting(lambda: bench_main(sys.argv[2:])))
    sys.exit(run_aborting(main))
