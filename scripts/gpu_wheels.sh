#!/usr/bin/env bash
# Fetch, into .whl/, the wheels that the lent GPU machine's image lacks for
# scripts/gpu_check.sh (its Python is 3.12; nothing can be downloaded there):
# array-api-compat, array-api-strict, an MPI runtime (mpich) and the mpi4py
# that is tested with it here.
#
#   bash scripts/gpu_wheels.sh        # here, where PyPI is reachable
#
# Then, on the GPU machine (the device tool's run, carrying .whl):
#   WHEELS=.whl OUT=$OUT PYTHON=python3 bash scripts/gpu_check.sh
# .whl/ is ignored by git (.gitignore), so it never lands in a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-python3}
platforms=()
for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    "array-api-compat==1.16.0" "array-api-strict==2.6.1" "mpich==5.0.2" "mpi4py==4.1.2"
ls -l .whl
