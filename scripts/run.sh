#!/usr/bin/env bash
# Set up .venv (if missing) and run the main job: SyncBN on 4 thread ranks,
# compared with the single-rank float64 reference. Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ARRAYSYNCBN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e .
exec "$venv/bin/python" scripts/thread_ranks.py "$@"
