"""Exactness rules of issue 7 on every backend: squares in the accumulation
dtype, an exact first step (a second statistics pass when the one-pass merge
lost precision), non-finite batches that do not poison the layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import (
    assert_close_to_reference,
    backward_bounds,
    forward_bounds,
    reference_backward,
    reference_forward,
    to_numpy,
)


def _two_ranks(fn):
    return sbn.run_ranks(fn, sbn.thread_group(2, timeout=30))


# -- squares in the accumulation dtype ----------------------------------------------------
def test_float32_squares_beyond_float32_range_stay_exact(backend) -> None:
    """|x − mean| = 2e19 in float32: its square (4e38) overflows float32 but
    not the float64 sums, so y, dx and running_var must match the reference
    (before: squares formed in float32 gave y = 0 and running_var = inf)."""
    if "float32" not in backend.dtypes:
        pytest.skip("needs float32")
    if not backend.has_float64:
        pytest.skip("accumulates in float32: float32 is the limit there (docs/numerics.md)")
    rng = np.random.default_rng(5)
    full = np.zeros((8, 2))
    full[:, 0] = [-2e19, 2e19, 0, 0, 1e19, -1e19, 0, 0]
    full[:, 1] = rng.normal(3.0, 2.0, 8)
    dys_full = rng.normal(0.0, 1.0, (8, 2))
    dys_full[:, 0] *= 1e20  # Σdy·(x − mean) ≈ 1e40: beyond float32 as well
    cut = 3
    shards = [backend.asarray(full[:cut], "float32"), backend.asarray(full[cut:], "float32")]
    dys = [backend.asarray(dys_full[:cut], "float32"), backend.asarray(dys_full[cut:], "float32")]

    def rank(comm):
        bn = sbn.SyncBatchNorm(2, axis=1, comm=comm)
        y = bn(shards[comm.rank])
        return y, bn.backward(dys[comm.rank]), bn.running_var, bn.grad_weight

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PrecisionWarning, no NonFiniteWarning
        results = _two_ranks(rank)
    xs = [to_numpy(s) for s in shards]
    ref = reference_forward(xs, None, None, np.zeros(2), np.ones(2))
    grads = reference_backward(ref, [to_numpy(d) for d in dys])
    fb = forward_bounds(ref, "float32", param_dtype="float32")
    bb = backward_bounds(ref, grads, dys, "float32", param_dtype="float32")
    for r, (y, dx, rv, dw) in enumerate(results):
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name="y")
        assert_close_to_reference(dx, grads.dxs[r], bb.dx, axis=1, name="dx")
        assert_close_to_reference(rv, ref.running_var, fb.running_var, name="running_var")
        assert_close_to_reference(dw, grads.dweights[r], bb.dweight, name="dweight")
