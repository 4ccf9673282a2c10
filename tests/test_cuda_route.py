"""The experimental CUDA route (``arraysyncbn._fast.cuda``, numba.cuda kernels).

Without a GPU it runs in numba's CUDA simulator, in a fresh process
(``tests/cuda_sim_check.py``: properties against the float64 reference on
1–4 thread ranks, channels-last memory, several reduction blocks). On a GPU
the ``cupy-cuda`` backend of every backend-parametrized test runs it on
cupy arrays (``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn._fast import CUDA_ENV

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_match_the_reference_in_the_cuda_simulator() -> None:
    if importlib.util.find_spec("numba") is None:
        pytest.skip("needs numba")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cuda_sim_check.py"), "15"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0 and "OK cuda-sim" in done.stdout, (
        done.stdout[-4000:] + done.stderr[-4000:]
    )


def test_an_unknown_setting_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    xp = pytest.importorskip("array_api_strict")
    monkeypatch.setenv(CUDA_ENV, "yes please")
    x = xp.asarray(np.ones((4, 2)))
    with pytest.raises(ValueError, match=f"{CUDA_ENV} must be 0, 1 or sim"):
        sbn.sync_batch_norm_forward(x, None, None, None, None)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_only_cupy_arrays_take_it_when_enabled(monkeypatch: pytest.MonkeyPatch, fast) -> None:
    """``=1`` leaves numpy to the host route (or the portable one)."""
    monkeypatch.setenv(CUDA_ENV, "1")
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    saved = sbn.sync_batch_norm_forward(x, None, None, None, None)[3]
    assert saved.route == ("host" if fast == "1" else "portable")


def test_kernels_compile_to_ptx_for_hopper() -> None:
    """Each kernel through numba's real CUDA compiler (NVVM; no GPU needed), for
    float32 and float64 blocks: what the simulator cannot check (typing, what
    CUDA supports). Skipped where NVVM is not installed."""
    pytest.importorskip("numba")
    from numba import cuda
    from numba import types as t

    from arraysyncbn._fast import cuda_jit as cj

    def probe(a):  # the toolchain itself, on a kernel that cannot be wrong
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, (t.Array(t.float64, 1, "A"),), cc=(9, 0))
    except Exception as exc:  # a missing NVVM or libdevice: several exception types
        pytest.skip(f"numba's CUDA compiler is not usable here: {exc}")
    f64, i64 = t.float64, t.int64
    d1, part = t.Array(f64, 1, "A"), t.Array(f64, 3, "A")
    for dt in (t.float32, t.float64):
        x = t.Array(dt, 1, "A")
        signatures = {
            cj._sample: (x, i64, i64, d1),
            cj._stats_partials: (x, i64, i64, d1, part),
            cj._pack_statistics: (part, d1, d1, f64, d1, i64, d1),
            cj._normalize: (x, i64, i64, x, x, x, x, x),
            cj._bsums_partials: (x, x, i64, i64, x, x, part),
            cj._pack_backward: (part, d1, d1, i64, d1),
            cj._backward_input: (x, x, i64, i64, x, x, x, x, x, x),
        }
        for kernel, signature in signatures.items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
            assert ".entry" in ptx, kernel.__name__


def test_the_job_names_the_cuda_route() -> None:
    from types import SimpleNamespace

    from arraysyncbn.cli import route_description

    bn = SimpleNamespace(_saved=SimpleNamespace(route="cuda"))
    assert route_description(bn).startswith("cuda (numba.cuda kernels, experimental")


def test_small_grids_launch_without_numbas_occupancy_warning() -> None:
    """The per-channel kernels run one block for up to 256 channels; numba's
    low-occupancy warning would fail every test that turns warnings into
    errors (and bother every user). Configuring a launch needs no GPU."""
    pytest.importorskip("numba")
    import warnings

    from arraysyncbn._fast import cuda_jit as cj

    if cj.SIMULATED:
        pytest.skip("the simulator does not warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Warning, match="under-utilization"):
            cj._sample[1, cj.THREADS]  # configuring the launch is what warns
        cj._configured(cj._sample, 1, cj.THREADS, 0)
