"""Run a drawn sharded problem through arraysyncbn on K thread ranks and
compare every rank's results with the float64 reference."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

import arraysyncbn as sbn
from arraysyncbn.testing import (
    assert_close_to_reference,
    assert_like,
    backward_bounds,
    flushes_subnormals,
    forward_bounds,
    reference_backward,
    reference_forward,
    to_numpy,
)
from arraysyncbn.testing.strategies import ShardedBatch, sharded_batches

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)


@dataclass
class RankResult:
    y: Any
    running_mean: Any
    running_var: Any
    count: int
    dx: Any
    dweight: Any
    dbias: Any
    route: str = "portable"


@dataclass
class Converted:
    xs: list[Any]
    dys: list[Any]
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    pdtype: str


def convert(backend: Any, batch: ShardedBatch) -> Converted:
    pdtype = backend.param_dtype(batch.dtype)
    return Converted(
        [backend.asarray(s, batch.dtype) for s in batch.shards],
        [backend.asarray(d, batch.dtype) for d in batch.dys],
        backend.asarray(batch.weight, pdtype),
        backend.asarray(batch.bias, pdtype),
        backend.asarray(batch.running_mean, pdtype),
        backend.asarray(batch.running_var, pdtype),
        pdtype,
    )


def rank_step(batch: ShardedBatch, c: Converted, comm: Any, *, training: bool) -> RankResult:
    """One rank's functional forward and backward on its shard."""
    y, rm, rv, saved = sbn.sync_batch_norm_forward(
        c.xs[comm.rank],
        c.weight,
        c.bias,
        c.running_mean,
        c.running_var,
        training=training,
        momentum=batch.momentum,
        eps=batch.eps,
        axis=batch.axis,
        comm=comm,
        num_batches_tracked=batch.num_batches_tracked,
    )
    dx, dw, db = sbn.sync_batch_norm_backward(c.dys[comm.rank], saved)
    return RankResult(y, rm, rv, saved.count, dx, dw, db, saved.route)


def run_functional(batch: ShardedBatch, c: Converted, *, training: bool = True) -> list[RankResult]:
    """Every rank's results, ranks running as threads."""
    return sbn.run_ranks(
        lambda comm: rank_step(batch, c, comm, training=training),
        sbn.thread_group(len(c.xs), timeout=30),
    )


def check_functional(
    backend: Any, batch: ShardedBatch, *, training: bool = True, runner: Any = None
) -> None:
    """The whole property: forward, running statistics and backward vs float64.

    ``runner(batch, converted, training=...)`` returns every rank's
    :class:`RankResult`; the default runs the ranks as threads.
    """
    c = convert(backend, batch)
    with warnings.catch_warnings():
        # Drawn data may sit 1e8 standard deviations from zero: the second
        # statistics pass must make that exact, with no PrecisionWarning left;
        # and finite data never gives a NonFiniteWarning.
        warnings.simplefilter("error", sbn.PrecisionWarning)
        warnings.simplefilter("error", sbn.NonFiniteWarning)
        results = (runner or run_functional)(batch, c, training=training)
    ref = reference_forward(
        [to_numpy(x) for x in c.xs],
        to_numpy(c.weight),
        to_numpy(c.bias),
        to_numpy(c.running_mean),
        to_numpy(c.running_var),
        training=training,
        momentum=batch.momentum,
        eps=batch.eps,
        axis=batch.axis,
        num_batches_tracked=batch.num_batches_tracked,
    )
    acc_eps = F64_EPS if backend.has_float64 else F32_EPS
    # CuPy flushes float32 subnormals (drawn data reaches them: a spread of
    # 1e-2 times a tiny drawn value); its bounds allow for that.
    ftz = flushes_subnormals(c.xs[0])
    fb = forward_bounds(
        ref,
        batch.dtype,
        weight=c.weight,
        bias=c.bias,
        param_dtype=c.pdtype,
        momentum=batch.momentum,
        num_batches_tracked=batch.num_batches_tracked,
        accumulation_eps=acc_eps,
        flush_to_zero=ftz,
    )
    grads = reference_backward(ref, [to_numpy(d) for d in c.dys], to_numpy(c.weight))
    bb = backward_bounds(
        ref,
        grads,
        c.dys,
        batch.dtype,
        weight=c.weight,
        param_dtype=c.pdtype,
        accumulation_eps=acc_eps,
        flush_to_zero=ftz,
    )
    for r, res in enumerate(results):
        tag = f"rank {r}/{len(results)}"
        # The backend stands for a route: a silent fallback would test the
        # wrong kernels.
        assert res.route == backend.expected_route(batch.dtype), (
            f"{tag} ran the {res.route} route, expected {backend.expected_route(batch.dtype)}"
        )
        assert res.count == (ref.count if ref.batch_stats else None), tag
        assert_like(res.y, c.xs[r], name=f"{tag} y")
        assert_close_to_reference(res.y, ref.ys[r], fb.y, name=f"{tag} y", axis=batch.axis)
        assert_like(res.dx, c.xs[r], name=f"{tag} dx")
        assert_close_to_reference(res.dx, grads.dxs[r], bb.dx, name=f"{tag} dx", axis=batch.axis)
        for got, param, want, bound, what in (
            (res.dweight, c.weight, grads.dweights[r], bb.dweight, "dweight"),
            (res.dbias, c.bias, grads.dbiases[r], bb.dbias, "dbias"),
        ):
            if param is None:
                assert got is None, f"{tag} {what} should be None without the parameter"
            else:
                assert_like(got, param, name=f"{tag} {what}")
                assert_close_to_reference(got, want, bound, name=f"{tag} {what}")
        if c.running_mean is None:
            assert res.running_mean is None and res.running_var is None
            continue
        assert_like(res.running_mean, c.running_mean, name=f"{tag} running_mean")
        assert_like(res.running_var, c.running_var, name=f"{tag} running_var")
        assert_close_to_reference(
            res.running_mean, ref.running_mean, fb.running_mean, name=f"{tag} running_mean"
        )
        assert_close_to_reference(
            res.running_var, ref.running_var, fb.running_var, name=f"{tag} running_var"
        )
        first = results[0]
        assert np.array_equal(to_numpy(res.running_mean), to_numpy(first.running_mean)), (
            "running_mean differs between ranks"
        )
        assert np.array_equal(to_numpy(res.running_var), to_numpy(first.running_var)), (
            "running_var differs between ranks"
        )


# -- half precision on the host route --------------------------------------------------
HALF = ("float16", "bfloat16")


@st.composite
def half_batches(draw: st.DrawFn, dtypes: st.SearchStrategy[str]) -> ShardedBatch:
    """One rank's half-precision problem, scaled by a drawn power of two so that
    some draws sit in float16's subnormal range (below 2⁻¹⁴) or in
    bfloat16's (float32's, below 2⁻¹²⁶)."""
    batch = draw(sharded_batches(ranks=st.just(1), dtypes=dtypes))
    scale = draw(st.sampled_from([1.0, 2.0**-16, 2.0**-22, 2.0**-128]))
    return dataclasses.replace(batch, shards=[s * scale for s in batch.shards])


def _same_values(got: Any, want: Any, name: str) -> None:
    a, b = to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64)
    differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    assert not differ.any(), (
        f"{name}: {int(differ.sum())} of {a.size} elements differ, e.g. {a[differ][:4]} "
        f"instead of {b[differ][:4]}"
    )


def check_host_elementwise(
    backend: Any, batch: ShardedBatch, *, half_params: bool = False, training: bool = True
) -> None:
    """One rank on the host route: y and dx are, bit for bit, what the portable
    kernels compute from the host route's own per-channel factors and backward
    coefficients.

    Exact, no bound: both do the same work-dtype operations in the same order
    and round once to x's dtype, to nearest even. This is the property that a
    store which truncates, or a load that mishandles subnormals, breaks; the
    reference bounds allow a whole half-precision ulp and cannot tell.
    """
    from arraysyncbn import kernels

    from backends import routed

    pd = batch.dtype if half_params else backend.param_dtype(batch.dtype)
    x, dy = (backend.asarray(a[0], batch.dtype) for a in (batch.shards, batch.dys))
    w, b, rm, rv = (
        backend.asarray(a, pd)
        for a in (batch.weight, batch.bias, batch.running_mean, batch.running_var)
    )
    with routed(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", sbn.PrecisionWarning)
        y, _, _, saved = sbn.sync_batch_norm_forward(
            x, w, b, rm, rv, training=training, momentum=batch.momentum, eps=batch.eps,
            axis=batch.axis,
        )  # fmt: skip
        dx, _, _ = sbn.sync_batch_norm_backward(dy, saved)
        assert saved.route == "host", saved.route
        mean_dy = k = None
        if saved.batch_stats:
            kern = saved.kern
            packed = kern.pack_backward(
                saved.io.to_numpy(dy), saved.x, saved.factors, saved.invstd, ()
            )
            mean_dy, k = kern.backward_coefficients(
                packed, saved.count or 1, saved.invstd, np.float32
            )
    f = saved.factors
    xp = backend.xp

    def lib(a: Any) -> Any:
        return None if a is None else xp.asarray(a)

    hi, lo, scale = lib(f.hi), lib(f.lo), lib(f.scale)
    _same_values(y, kernels.normalize(x, hi, lo, scale, lib(f.offset), saved.axis, xp=xp), "y")
    if saved.count == 0:  # nothing to differentiate: dx is zeros
        _same_values(dx, xp.zeros_like(x), "dx")
        return
    want = kernels.backward_input(dy, x, hi, lo, scale, lib(mean_dy), lib(k), saved.axis, xp=xp)
    _same_values(dx, want, "dx")
