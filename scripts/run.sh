#!/usr/bin/env bash
# Set up .venv (if missing) with the package and MPI (the mpich wheel brings
# mpiexec), then run the main job: SyncBN forward and backward on 4 MPI ranks
# with uneven shards, checked against the single-rank float64 reference, then
# a short benchmark. Extra arguments go to the job (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
pip_install ".[mpi]"
export PATH="$PWD/$venv/bin:$PATH"
exec mpiexec -n "${RANKS:-4}" python -m arraysyncbn "$@"
