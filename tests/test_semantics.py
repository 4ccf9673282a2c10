"""The seed scenarios and each semantic rule of SyncBatchNorm, on every backend."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import (
    assert_close_to_reference,
    assert_like,
    reference_backward,
    reference_forward,
    to_numpy,
)

from backends import routed
from comms import CountingComm, ForbiddenComm


def _data(shape: tuple[int, ...], seed: int = 0, loc: float = 0.5, scale: float = 2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape)


def _ref(shards, channels: int, **kw):
    """Reference for a fresh layer: running statistics start at zeros and ones."""
    return reference_forward(
        [to_numpy(s) for s in shards], None, None, np.zeros(channels), np.ones(channels), **kw
    )


def _tol(backend, dtype: str) -> float:
    return {"float16": 4e-3, "bfloat16": 3e-2, "float32": 2e-5, "float64": 1e-12}[dtype]


def test_world_of_one_equals_plain_batch_norm(backend) -> None:
    for dtype in backend.dtypes:
        x = backend.asarray(_data((5, 3, 4)), dtype)
        bn = sbn.SyncBatchNorm(3)
        y = bn(x)
        ref = _ref([x], 3)
        assert_like(y, x)
        assert_close_to_reference(y, ref.ys[0], _tol(backend, dtype), name=dtype)
        assert_close_to_reference(bn.running_mean, ref.running_mean, _tol(backend, dtype))
        assert_close_to_reference(bn.running_var, ref.running_var, _tol(backend, dtype))
        assert bn.num_batches_tracked == 1


@pytest.mark.parametrize("axis", [1, -1])
def test_two_ranks_equal_the_full_batch(backend, axis: int) -> None:
    dtype = "float32"
    full = _data((6, 3, 5) if axis == 1 else (6, 5, 3), seed=1)
    shards = [backend.asarray(full[:2], dtype), backend.asarray(full[2:], dtype)]

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, axis=axis, comm=comm, momentum=0.3)
        ys = [bn(shards[comm.rank]) for _ in range(3)]
        return ys[-1], bn.running_mean, bn.running_var, bn.num_batches_tracked

    results = sbn.run_ranks(rank, sbn.thread_group(2))
    one = sbn.SyncBatchNorm(3, axis=axis, momentum=0.3)
    for _ in range(3):
        y_full = one(backend.asarray(full, dtype))
    got = np.concatenate([to_numpy(r[0]) for r in results])
    assert_close_to_reference(got, to_numpy(y_full), 1e-5)
    for r in results:
        assert_close_to_reference(r[1], to_numpy(one.running_mean), 1e-6)
        assert_close_to_reference(r[2], to_numpy(one.running_var), 1e-6)
        assert r[3] == 3
    ref = reference_forward([to_numpy(s) for s in shards], axis=axis)
    assert_close_to_reference(got, np.concatenate(ref.ys), 2e-5)


def test_eval_uses_running_statistics_and_does_not_communicate(backend) -> None:
    x = backend.asarray(_data((4, 2, 3), seed=2), "float32")
    bn = sbn.SyncBatchNorm(2, comm=ForbiddenComm(), eps=1e-3)
    bn.load_state_dict(
        {
            "weight": np.array([2.0, -1.0]),
            "bias": np.array([0.5, 0.25]),
            "running_mean": np.array([0.3, -0.2]),
            "running_var": np.array([1.5, 0.5]),
            "num_batches_tracked": 7,
        }
    )
    bn.eval()
    y = bn(x)
    xn = to_numpy(x).astype(np.float64)
    want = (xn - np.array([0.3, -0.2])[:, None]) / np.sqrt(
        np.array([1.5, 0.5])[:, None] + 1e-3
    ) * np.array([2.0, -1.0])[:, None] + np.array([0.5, 0.25])[:, None]
    assert_close_to_reference(y, want, 1e-5)
    assert bn.num_batches_tracked == 7
    assert np.array_equal(to_numpy(bn.running_mean), np.array([0.3, -0.2], dtype=np.float32))
    with pytest.raises(sbn.NoForwardError, match="running statistics"):
        bn.backward(y)


def test_no_running_stats_uses_batch_statistics_in_eval(backend) -> None:
    comms = sbn.thread_group(2)
    counting = [CountingComm(c) for c in comms]
    shards = [backend.asarray(_data((3, 2, 2), seed=s), "float32") for s in (3, 4)]
    dys = [backend.asarray(_data((3, 2, 2), seed=s + 10), "float32") for s in (3, 4)]

    def rank(comm):
        bn = sbn.SyncBatchNorm(2, track_running_stats=False, comm=counting[comm.rank]).eval()
        y = bn(shards[comm.rank])
        dx = bn.backward(dys[comm.rank])
        return y, dx, bn.state_dict(), bn.running_mean, bn.running_var

    results = sbn.run_ranks(rank, comms)
    ref = reference_forward([to_numpy(s) for s in shards])
    grads = reference_backward(ref, [to_numpy(d) for d in dys])
    for r, res in enumerate(results):
        assert_close_to_reference(res[0], ref.ys[r], 2e-5)
        assert_close_to_reference(res[1], grads.dxs[r], 2e-5)
        assert res[3] is None and res[4] is None
        assert set(res[2]) == {"weight", "bias"}
        # synchronized batch statistics in eval: check, statistics, backward sums
        assert [op for op, _ in counting[r].calls] == ["max", "sum", "sum"]


def test_functional_mutates_none_of_its_inputs(backend) -> None:
    arrays = {
        "x": backend.asarray(_data((4, 3, 2), seed=12), "float32"),
        "weight": backend.asarray(np.array([1.5, -0.5, 2.0]), "float32"),
        "bias": backend.asarray(np.array([0.1, 0.2, 0.3]), "float32"),
        "running_mean": backend.asarray(np.array([0.3, 0.2, 0.1]), "float32"),
        "running_var": backend.asarray(np.array([1.0, 2.0, 3.0]), "float32"),
        "dy": backend.asarray(_data((4, 3, 2), seed=13), "float32"),
    }
    before = {k: to_numpy(v).copy() for k, v in arrays.items()}
    for training in (True, False):
        a = arrays
        _, rm, _, saved = sbn.sync_batch_norm_forward(
            a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
            training=training, momentum=0.5,
        )  # fmt: skip
        sbn.sync_batch_norm_backward(a["dy"], saved)
        if training:
            assert not np.array_equal(to_numpy(rm), before["running_mean"])
    for k, v in arrays.items():
        assert np.array_equal(to_numpy(v), before[k]), f"{k} was modified"


def test_batch_stats_passes_communicate_exactly_once_each(backend) -> None:
    comms = sbn.thread_group(2)
    counting = [CountingComm(c) for c in comms]
    shards = [backend.asarray(_data((3, 4, 2), seed=s), "float32") for s in (5, 6)]

    def rank(comm):
        bn = sbn.SyncBatchNorm(4, comm=counting[comm.rank])
        y = bn(shards[comm.rank])  # first forward: consistency check + statistics
        after_first = list(counting[comm.rank].calls)
        bn.backward(y)
        y = bn(shards[comm.rank])
        bn.backward(y)
        bn.eval()
        bn(shards[comm.rank])  # eval: nothing
        return after_first, counting[comm.rank].calls

    for first, calls in sbn.run_ranks(rank, comms):
        # check: 52 values (48, and the merge center's CRC digits and their
        # negations) and the signature's 2; statistics 9 and the center
        # flag, backward 8 (+2 padding to the same length), each with the same
        # signature
        sig = first[1][1] - 10
        assert sig in (2, 4), "one digit (v, v²) for float64 buffers, two for float32"
        assert first == [("max", 54), ("sum", 10 + sig)]
        assert calls == [("max", 54)] + [("sum", 10 + sig)] * 4


def test_affine_false_has_no_parameters_and_none_gradients(backend) -> None:
    bn = sbn.SyncBatchNorm(3, affine=False)
    x = backend.asarray(_data((4, 3)), "float32")
    y = bn(x)
    dx = bn.backward(y)
    assert bn.weight is None and bn.bias is None
    assert bn.grad_weight is None and bn.grad_bias is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}
    ref = reference_forward([to_numpy(x)])
    grads = reference_backward(ref, [to_numpy(y)])
    assert_close_to_reference(dx, grads.dxs[0], 1e-5)


def test_momentum_none_is_the_cumulative_average(backend) -> None:
    dtype = backend.dtypes[-1]
    bn = sbn.SyncBatchNorm(2, momentum=None)
    batches = [to_numpy(backend.asarray(_data((4, 2, 3), seed=s, loc=s), dtype)) for s in range(4)]
    for b in batches:
        bn(backend.asarray(b, dtype))
    means = [b.mean(axis=(0, 2)) for b in batches]
    uvars = [b.var(axis=(0, 2), ddof=1) for b in batches]
    assert bn.num_batches_tracked == 4
    tol = _tol(backend, dtype) * 10
    assert_close_to_reference(bn.running_mean, np.mean(means, axis=0), tol)
    # The cumulative average starts from the initial running_var of ones.
    want_var = 1.0
    for k, v in enumerate(uvars, start=1):
        want_var = (1 - 1 / k) * want_var + v / k
    assert_close_to_reference(bn.running_var, want_var, tol)


def test_empty_rank_contributes_nothing(backend) -> None:
    full = _data((5, 2, 3), seed=7)
    shards = [
        backend.asarray(full[:0], "float32"),
        backend.asarray(full, "float32"),
        backend.asarray(full[:0], "float32"),
    ]
    dys = [backend.asarray(np.ones(s.shape), "float32") * 0.5 for s in (full[:0], full, full[:0])]

    def rank(comm):
        bn = sbn.SyncBatchNorm(2, comm=comm)
        y = bn(shards[comm.rank])
        dx = bn.backward(dys[comm.rank])
        return y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.num_batches_tracked

    results = sbn.run_ranks(rank, sbn.thread_group(3))
    ref = _ref(shards, 2)
    grads = reference_backward(ref, [to_numpy(d) for d in dys], np.ones(2))
    for r, (y, dx, gw, gb, rm, nbt) in enumerate(results):
        assert_like(y, shards[r])
        assert_like(dx, shards[r])
        assert_close_to_reference(y, ref.ys[r], 2e-5)
        assert_close_to_reference(dx, grads.dxs[r], 2e-5)
        assert_close_to_reference(rm, ref.running_mean, 1e-6)
        assert nbt == 1
        if r != 1:
            assert tuple(y.shape) == (0, 2, 3)
            assert np.array_equal(to_numpy(gw), np.zeros(2))
            assert np.array_equal(to_numpy(gb), np.zeros(2))


def test_all_ranks_empty_changes_nothing(backend) -> None:
    empty = backend.asarray(np.zeros((0, 3, 2)), "float32")

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, comm=comm)
        y = bn(empty)
        dx = bn.backward(y)
        return y, dx, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.grad_weight

    for y, dx, rm, rv, nbt, gw in sbn.run_ranks(rank, sbn.thread_group(2)):
        assert tuple(y.shape) == (0, 3, 2) and tuple(dx.shape) == (0, 3, 2)
        assert np.array_equal(to_numpy(rm), np.zeros(3))
        assert np.array_equal(to_numpy(rv), np.ones(3))
        assert nbt == 0
        assert np.array_equal(to_numpy(gw), np.zeros(3))


@pytest.mark.parametrize("axis", [1, -1])
def test_zero_channels_run_alike_on_every_route(backend, axis: int) -> None:
    """x with C = 0 (shape (5, 0) once worked on the host route but raised
    numpy's "zero-size array to reduction operation maximum" on the portable
    one, so on array-api-strict, cupy and ARRAYSYNCBN_FAST=0: in a job of
    mixed routes one rank would raise after the allreduce while the others
    went on). Every backend and dtype, two ranks, the consistency check,
    training and eval, forward and backward: empty results like x, empty
    gradients in the parameters' dtype, running statistics returned as they
    were; a global batch of one still raises on every rank."""
    shapes = [(3, 0, 2), (4, 0, 1)] if axis == 1 else [(3, 2, 0), (4, 1, 0)]
    for dtype in backend.dtypes:
        pdt = backend.param_dtype(dtype)
        w, b, rm, rv = (backend.asarray(np.zeros(0), pdt) for _ in range(4))
        shards = [backend.asarray(np.zeros(s), dtype) for s in shapes]

        def rank(comm, shards=shards, w=w, b=b, rm=rm, rv=rv):
            x = shards[comm.rank]
            y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(
                x, w, b, rm, rv, axis=axis, comm=comm, check=True
            )
            grads = sbn.sync_batch_norm_backward(x, saved)
            ye, _, _, se = sbn.sync_batch_norm_forward(x, w, b, rm, rv, axis=axis, training=False)
            eval_grads = sbn.sync_batch_norm_backward(x, se)
            yi = sbn.batch_norm_inference(x, w, b, rm, rv, axis=axis)
            yn = sbn.sync_batch_norm_forward(x, None, None, None, None, axis=axis, comm=comm)[0]
            return y, new_rm is rm and new_rv is rv, saved.count, grads, ye, eval_grads, yi, yn

        for r, result in enumerate(sbn.run_ranks(rank, sbn.thread_group(2, timeout=30))):
            y, kept, count, (dx, dw, db), ye, (dxe, dwe, dbe), yi, yn = result
            for name, a in [("y", y), ("dx", dx), ("eval y", ye), ("eval dx", dxe)]:
                assert_like(a, shards[r], name=f"{dtype} {name}")
            assert_like(yi, shards[r], name="inference y")
            assert_like(yn, shards[r], name="y without parameters")
            for name, a in [("dw", dw), ("db", db), ("eval dw", dwe), ("eval db", dbe)]:
                assert_like(a, w, name=f"{dtype} {name}")
            assert kept and count == 10

    def one(comm):
        x = backend.asarray(np.zeros((1, 0) if comm.rank else (0, 0)), backend.dtypes[-1])
        return sbn.sync_batch_norm_forward(x, None, None, None, None, comm=comm)

    results = sbn.run_ranks(one, sbn.thread_group(2, timeout=10), return_exceptions=True)
    assert all("more than 1 value per channel" in str(res) for res in results), results


def test_global_batch_of_one_raises_on_every_rank(backend) -> None:
    shards = [
        backend.asarray(np.zeros((0, 2)), "float32"),
        backend.asarray(np.ones((1, 2)), "float32"),
    ]

    def rank(comm):
        return sbn.SyncBatchNorm(2, comm=comm)(shards[comm.rank])

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, ValueError), res
        assert "more than 1 value per channel" in str(res)


def test_half_precision_dtypes_keep_output_dtype_and_float32_parameters(backend) -> None:
    for dtype in backend.dtypes:
        x = backend.asarray(_data((4, 3, 2), seed=8), dtype)
        bn = sbn.SyncBatchNorm(3)
        y = bn(x)
        dx = bn.backward(y)
        assert_like(y, x, name=dtype)
        assert_like(dx, x, name=dtype)
        want = backend.xp.float32 if dtype in ("float16", "bfloat16", "float32") else x.dtype
        assert bn.weight.dtype == want and bn.running_var.dtype == want
        assert bn.grad_weight.dtype == want


def test_parameters_are_created_on_the_input_device(backend) -> None:
    x = backend.asarray(_data((4, 3, 2), seed=9), "float32")
    bn = sbn.SyncBatchNorm(3)
    bn(x)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert_like(getattr(bn, name), backend.xp.zeros(3, dtype=x.dtype, device=backend.device))


@pytest.mark.parametrize(("loc", "scale"), [(1e4, 1.0), (1e3, 1e-2), (-1e4, 1.0)])
def test_statistics_are_stable_far_from_zero(backend, loc: float, scale: float) -> None:
    """float32 data with |mean| ≫ std: within 1e-3 of float64, never NaN, var ≥ 0."""
    full = _data((64, 3, 8), seed=10, loc=loc, scale=scale)
    shards = [backend.asarray(full[:20], "float32"), backend.asarray(full[20:], "float32")]

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, comm=comm)
        y = bn(shards[comm.rank])
        return y, bn.backward(y), bn.running_var

    results = sbn.run_ranks(rank, sbn.thread_group(2))
    ref = _ref(shards, 3)
    grads = reference_backward(ref, [r[0] for r in results])
    for r, (y, dx, rv) in enumerate(results):
        assert np.all(np.isfinite(to_numpy(y)))
        assert np.all(to_numpy(rv) >= 0)
        assert_close_to_reference(y, ref.ys[r], 1e-3)
        assert_close_to_reference(dx, grads.dxs[r], 1e-3 * float(np.max(ref.invstd)))
        assert_close_to_reference(rv, ref.running_var, 1e-3 * float(np.max(ref.var)) + 1e-6)


def test_ranks_with_different_non_channel_sizes(backend) -> None:
    """Rank i holds length 2**(i+1): the count comes from the allreduce."""
    dtype = backend.dtypes[-1]
    shards = [backend.asarray(_data((2, 2, 2 ** (i + 1)), seed=i), dtype) for i in range(3)]

    def rank(comm):
        bn = sbn.SyncBatchNorm(2, comm=comm)
        y = bn(shards[comm.rank])
        return y, bn.backward(y), bn.running_var

    results = sbn.run_ranks(rank, sbn.thread_group(3))
    ref = _ref(shards, 2)
    grads = reference_backward(ref, [to_numpy(r[0]) for r in results])
    assert ref.count == 2 * (2 + 4 + 8)
    tol = _tol(backend, dtype)
    for r, (y, dx, rv) in enumerate(results):
        assert_close_to_reference(y, ref.ys[r], tol)
        assert_close_to_reference(dx, grads.dxs[r], tol)
        assert_close_to_reference(rv, ref.running_var, tol)


def test_float64_far_from_zero_is_exact_from_the_first_step(backend) -> None:
    """|mean|/std ≈ 1e8: the first merge (center 0) cancels, so every rank
    merges a second time around the reduced mean, with no warning; from the
    second step the layer's center (its last mean) makes one allreduce exact."""
    dtype = backend.dtypes[-1]
    if dtype != "float64":
        pytest.skip("needs float64")
    rng = np.random.default_rng(11)
    full = np.stack([rng.uniform(-4, 4, 24), 1e6 + 1e-2 * rng.uniform(-4, 4, 24)], 1)
    shards = [backend.asarray(full[:10], dtype), backend.asarray(full[10:], dtype)]
    comms = sbn.thread_group(2)
    counting = [CountingComm(c) for c in comms]
    layers = [sbn.SyncBatchNorm(2, comm=c) for c in counting]

    def step(comm):
        return layers[comm.rank](shards[comm.rank])

    with warnings.catch_warnings():
        warnings.simplefilter("error", sbn.PrecisionWarning)
        first = sbn.run_ranks(step, comms)
        calls_first = [len(c.calls) for c in counting]
        second = sbn.run_ranks(step, comms)
    ref = reference_forward([to_numpy(s) for s in shards])
    for r, c in enumerate(counting):
        # check + statistics + second pass on the first step, statistics alone on the second
        assert calls_first[r] == 3 and len(c.calls) == 4
        assert_close_to_reference(first[r], ref.ys[r], 1e-9)
        assert_close_to_reference(second[r], ref.ys[r], 1e-9)


@pytest.mark.parametrize("training", [True, False])
def test_a_released_input_is_needed_back_before_the_backward(backend, training) -> None:
    """SavedForBackward.release_input drops the record's x (a framework keeps
    it instead); the backward refuses until restore_input gives back an x
    like the forward's, and then gives the bits of an unreleased record."""
    rng = np.random.default_rng(5)
    x_np, dy_np = rng.standard_normal((2, 6, 4, 3)), rng.standard_normal((2, 6, 4, 3))
    p = [rng.random(6) + 0.5, rng.standard_normal(6), rng.standard_normal(6), rng.random(6) + 1]
    dtype = backend.dtypes[0]
    x, dy = backend.asarray(x_np, dtype), backend.asarray(dy_np, dtype)
    params = [backend.asarray(a, backend.param_dtype(dtype)) for a in p]
    with routed(backend):
        want = sbn.sync_batch_norm_backward(
            dy, sbn.sync_batch_norm_forward(x, *params, training=training)[3]
        )
        _, _, _, saved = sbn.sync_batch_norm_forward(x, *params, training=training)
        saved.release_input()
        assert saved.x is None
        with pytest.raises(ValueError, match="released"):
            sbn.sync_batch_norm_backward(dy, saved)
        with pytest.raises(ValueError, match="shape"):
            saved.restore_input(x[:1, ...])
        saved.restore_input(backend.asarray(x_np, dtype))  # the same values, another array
        got = sbn.sync_batch_norm_backward(dy, saved)
    for g, w in zip(got, want, strict=True):
        assert to_numpy(g).tobytes() == to_numpy(w).tobytes()
