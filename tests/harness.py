"""Run a drawn sharded problem through arraysyncbn on K thread ranks and
compare every rank's results with the float64 reference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

import arraysyncbn as sbn
from arraysyncbn.testing import (
    assert_close_to_reference,
    assert_like,
    backward_bounds,
    forward_bounds,
    reference_backward,
    reference_forward,
    to_numpy,
)
from arraysyncbn.testing.strategies import ShardedBatch

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
        num_batches_tracked=3,
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
        num_batches_tracked=3,
    )
    acc_eps = F64_EPS if backend.has_float64 else F32_EPS
    fb = forward_bounds(
        ref,
        batch.dtype,
        weight=c.weight,
        bias=c.bias,
        param_dtype=c.pdtype,
        momentum=batch.momentum,
        num_batches_tracked=3,
        accumulation_eps=acc_eps,
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
