"""``python -m arraysyncbn``: the check-and-benchmark job of :mod:`arraysyncbn.cli`.

Runs with ``python -m mpi4py`` semantics (an uncaught exception on any rank
aborts the whole MPI job), so ``mpiexec -n 4 python -m arraysyncbn`` never
hangs on a failing rank.
"""

from __future__ import annotations

import sys

from .cli import main, run_aborting

if __name__ == "__main__":
    sys.exit(run_aborting(main))
