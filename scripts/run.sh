#!/usr/bin/env bash
# Set up .venv (if missing) with the package, installed editable as test.sh
# installs it, and MPI (the mpich wheel brings mpiexec), then run the main
# job: SyncBN forward and backward on 4 MPI ranks (RANKS=k for k) with uneven
# shards, checked against the single-rank float64 reference, then a short
# benchmark. Extra arguments go to the job (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# mpiexec -n takes junk or 0 quietly and runs one rank: refuse it here, first.
ranks="${RANKS:-4}"
if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
    echo "run.sh: RANKS must be a positive integer (the number of MPI ranks), got '$ranks'" >&2
    exit 2
fi
. scripts/venv.sh
install_checkout ".[mpi]"
export PATH="$PWD/$venv/bin:$PATH"
exec mpiexec -n "$ranks" python -m arraysyncbn "$@"
