#!/usr/bin/env bash
# GPU check of arraysyncbn on one CUDA machine, prepared to run as one step.
#
#   OUT=/some/dir scripts/gpu_check.sh
#
# Run from the repository root with the Python environment that has
# arraysyncbn's dependencies, mpi4py, an mpiexec and cupy (this script installs
# nothing; set WHEELS=dir to pip-install the wheels found there, offline, first).
# It records, under $OUT (a temporary folder when unset):
#   env.txt             GPU, Python, torch, cupy, MPI library, mpi_memory_alloc_kinds
#   pytest_gpu.txt      the GPU subset of the test suite (pytest -m gpu; the torch
#                       CUDA tests first, in a step of their own): cupy arrays
#                       on the portable route and on the experimental CUDA route
#                       (backend cupy-cuda), arraysyncbn.torch on CUDA tensors, and DDP
#                       under torchrun over NCCL, cpu:gloo,cuda:nccl and gloo
#   mpi.txt             hypothesis properties over MPI with cupy (both routes) and
#                       mpiexec -n 2 python -m arraysyncbn --backend cupy --json, per
#                       MPI path (staged / direct)
#   bench.txt           benchmark tables, (32,64,56,56): 1 rank and 2 ranks, cupy on
#                       both routes, numpy for comparison
#   pip.txt             the wheels' installation
#   summary.txt         one line per step with its exit status (at most 6 files:
#                       the device tool returns 8)
# "direct" runs only when the MPI library reports CUDA-awareness; otherwise the
# summary says so. Without cupy (or without MPI) only pytest -m gpu runs. Exit
# status: 0 when every step that ran passed, 2 when no GPU is visible to torch
# or cupy, 1 otherwise.
#
# The whole script stays within BUDGET seconds (default 480, so that a device
# session's 10-minute command limit leaves room for start-up and a rerun):
# each step gets at most its own limit and at most what is left; a step that
# would start with under 20 s left is skipped and the summary says so.
# The device image lacks array-api-compat, array-api-strict and an MPI
# runtime: carry their wheels (mpich included) and pass WHEELS=.whl.
set -u
BUDGET=${BUDGET:-480}

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
# Derandomized, so a failure seen on the device reproduces in the next session.
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
unset ARRAYSYNCBN_CUDA_AWARE ARRAYSYNCBN_CHECK
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

step() { # step NAME OUTFILE TIMEOUT CMD...: run, append output, record status
    local name=$1 out=$2 limit=$3
    shift 3
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        note "$name: skipped, the ${BUDGET} s budget is spent"
        FAILED=1
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS
    echo "=== $name" >>"$out"
    timeout "$limit" "$@" >>"$out" 2>&1
    local rc=$?
    note "$name: exit $rc after $((SECONDS - start)) s (output: $(basename "$out"))"
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl >"$OUT/pip.txt" 2>&1 ||
        note "pip install from $WHEELS failed (see pip.txt)"
fi
# The mpiexec of the MPI library mpi4py loads (the mpich wheel puts it beside
# the interpreter's prefix); the device image's /usr/bin/mpiexec is Open MPI's,
# which refuses to run as root and does not match.
if [ -z "${MPIEXEC:-}" ]; then
    MPIEXEC=$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin", "mpiexec"))')
    [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)
fi

{
    echo "date: $(date -u +%FT%TZ)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not available"
    fi
    "$PY" --version 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
    "$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())" 2>&1
    "$PY" -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" 2>&1
    # The CUDA route needs numba's CUDA target to compile and launch here.
    "$PY" -c "
import numba
from numba import cuda
@cuda.jit
def k(a):
    a[0] += 1.0
d = cuda.to_device([1.0]); k[1, 1](d)
print('numba', numba.__version__, 'CUDA launch', 'ok' if d.copy_to_host()[0] == 2.0 else 'WRONG')" 2>&1 | tail -3
    echo "mpiexec: ${MPIEXEC:-not found}"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

HAS_CUPY=0
"$PY" -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" >/dev/null 2>&1 &&
    HAS_CUPY=1
HAS_TORCH_CUDA=0
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 &&
    HAS_TORCH_CUDA=1
if [ $HAS_CUPY = 0 ] && [ $HAS_TORCH_CUDA = 0 ]; then
    note "no CUDA GPU visible to cupy or torch here: nothing to check (see env.txt)"
    exit 2
fi

# A hung test dumps every thread's stack after 60 s, and pytest-timeout (when
# installed) fails it after 120 s, so the report and its tracebacks survive.
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_ARGS=(-p timeout --timeout 120)
PYTEST=("$PY" -m pytest -v -m gpu -p no:cacheprovider -rfEs --tb=short -o faulthandler_timeout=60
    "${TIMEOUT_ARGS[@]}")
# The torch module's CUDA tests first, in a step of their own: they are what an
# open issue waits for, and a slow or hung test elsewhere must not crowd them out.
TORCH_CUDA=(tests/test_torch_module.py tests/test_gradcheck.py tests/test_torch_distributed.py)
IGNORE=()
if [ $HAS_TORCH_CUDA = 1 ]; then
    step "pytest -m gpu, torch CUDA tensors" "$OUT/pytest_gpu.txt" 150 "${PYTEST[@]}" "${TORCH_CUDA[@]}"
    for f in "${TORCH_CUDA[@]}"; do IGNORE+=(--ignore "$f"); done
fi
step "pytest -m gpu, the rest" "$OUT/pytest_gpu.txt" 300 "${PYTEST[@]}" "${IGNORE[@]}"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/pytest_gpu.txt" | tee -a "$SUMMARY"

if [ $HAS_CUPY = 0 ]; then
    note "cupy with a CUDA GPU is not available: the cupy MPI steps do not run"
    exit 1
fi
if [ -z "$MPIEXEC" ] || ! "$PY" -c "import mpi4py" >/dev/null 2>&1; then
    note "mpi4py or mpiexec is missing (pip install '.[mpi]', or carry the mpich wheel): the MPI steps do not run"
    exit 1
fi

DETECT='from arraysyncbn import MPICommunicator as M; c = M()
print(f"detected={int(c.cuda_aware_detected)}"); info = c.comm.Get_info()
print("mpi_memory_alloc_kinds =", info.Get("mpi_memory_alloc_kinds")); info.Free()'
"$MPIEXEC" -n 1 "$PY" -c "$DETECT" >>"$OUT/env.txt" 2>&1
AWARE=$(sed -n 's/^detected=//p' "$OUT/env.txt")
note "MPI library CUDA-aware (mpi_memory_alloc_kinds lists cuda): ${AWARE:-unknown}"

PATHS="0"
if [ "${AWARE:-0}" = "1" ]; then
    PATHS="0 1"
else
    note "direct (CUDA-aware) path not run: this MPI library does not report CUDA memory"
fi
# One rank first: two ranks on one GPU time-slice between two CUDA contexts,
# which hides what the kernels cost.
BENCH=(-m arraysyncbn --shape 32,64,56,56 --steps 30 --progress off)
step "benchmark, 1 rank, cupy, portable route" "$OUT/bench.txt" 45 \
    "$MPIEXEC" -n 1 "$PY" "${BENCH[@]}" --backend cupy
ARRAYSYNCBN_CUDA_KERNELS=1 step "benchmark, 1 rank, cupy, CUDA route" "$OUT/bench.txt" 45 \
    "$MPIEXEC" -n 1 "$PY" "${BENCH[@]}" --backend cupy
for mode in $PATHS; do
    label=$([ "$mode" = 1 ] && echo direct || echo staged)
    export ARRAYSYNCBN_CUDA_AWARE=$mode
    step "MPI properties with cupy (portable and CUDA routes), $label" "$OUT/mpi.txt" 120 \
        "$MPIEXEC" -n 2 "$PY" -m mpi4py tests/mpi_scripts/properties.py 10 cupy cupy-cuda
    step "check --backend cupy, $label" "$OUT/mpi.txt" 45 \
        "$MPIEXEC" -n 2 "$PY" -m arraysyncbn --backend cupy --json --progress off
    step "benchmark, 2 ranks, cupy, portable route, $label" "$OUT/bench.txt" 45 \
        "$MPIEXEC" -n 2 "$PY" "${BENCH[@]}" --backend cupy
    ARRAYSYNCBN_CUDA_KERNELS=1 step "benchmark, 2 ranks, cupy, CUDA route, $label" \
        "$OUT/bench.txt" 45 "$MPIEXEC" -n 2 "$PY" "${BENCH[@]}" --backend cupy
    unset ARRAYSYNCBN_CUDA_AWARE
done
step "benchmark, 2 ranks, numpy (same machine, for comparison)" "$OUT/bench.txt" 45 \
    "$MPIEXEC" -n 2 "$PY" "${BENCH[@]}"

echo "outputs in $OUT"
exit $FAILED
