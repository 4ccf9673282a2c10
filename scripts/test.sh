#!/usr/bin/env bash
# Set up .venv (if missing) with the package and its test extras, lint with
# ruff, then run the whole test suite with the `ci` hypothesis profile (200
# examples per property).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k properties -x
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh
install_checkout ".[test,mpi,lint,bench]"

# PyTorch is an optional, independent oracle. Only its CPU build is wanted;
# where no CPU wheel is at hand (plain PyPI serves a multi-GB CUDA build) the
# torch tests skip. ARRAYSYNCBN_TORCH=0 skips the attempt.
if [ "${ARRAYSYNCBN_TORCH:-auto}" != 0 ] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0+cpu" 2>/dev/null \
        || echo "note: no CPU build of torch available; the torch tests will be skipped"
fi

export PATH="$PWD/$venv/bin:$PATH"
"$venv/bin/ruff" check --quiet .
"$venv/bin/ruff" format --check --quiet .

export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
