#!/usr/bin/env bash
# Set up .venv (if missing) with the package and MPI (the mpich wheel brings
# mpiexec), then run the main job: SyncBN forward and backward on 4 MPI ranks
# with uneven shards, checked against the single-rank float64 reference, then
# a short benchmark. Extra arguments go to the job (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ARRAYSYNCBN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip_install() {
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install ".[mpi]"
export PATH="$PWD/$venv/bin:$PATH"
exec mpiexec -n "${RANKS:-4}" python -m arraysyncbn "$@"
