"""Exactness rules of issue 7 on every backend: squares in the accumulation
dtype, an exact first step (a second statistics pass when the one-pass merge
lost precision), non-finite batches that do not poison the layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn import functional
from arraysyncbn.testing import (
    assert_close_to_reference,
    backward_bounds,
    channel_bound,
    flushes_subnormals,
    forward_bounds,
    reference_backward,
    reference_forward,
    to_numpy,
)

from comms import CountingComm, ReplicatedComm


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


# -- an exact first step: the second statistics pass --------------------------------------
def _counting_layers(comms, channels: int, dtype: str = "float64"):
    counting = [CountingComm(c) for c in comms]
    layers = [sbn.SyncBatchNorm(channels, comm=c, dtype=dtype) for c in counting]
    return counting, layers


def _stat_calls(comm) -> int:
    """Statistics and backward allreduces (op sum) so far; the check uses max."""
    return sum(1 for op, _ in comm.calls if op == "sum")


def test_first_step_far_from_zero_is_exact_with_one_more_allreduce(backend) -> None:
    """float64 at mean 1e8, std 1 (and a channel near zero): the first merge
    (center 0) cancels, so every rank merges again around the reduced mean;
    y and the running statistics are within the bounds of a second pass, with
    no warning. The next step (center: the last mean) takes one allreduce."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    rng = np.random.default_rng(11)
    full = np.stack([1e8 + rng.normal(0, 1, 24), rng.normal(0, 1, 24)], 1)
    shards = [backend.asarray(full[:10], "float64"), backend.asarray(full[10:], "float64")]
    comms = sbn.thread_group(2, timeout=30)
    counting, layers = _counting_layers(comms, 2)

    def step(comm):
        bn = layers[comm.rank]
        y = bn(shards[comm.rank])
        return y, bn.running_mean, bn.running_var, _stat_calls(counting[comm.rank])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = sbn.run_ranks(step, comms)
        second = sbn.run_ranks(step, comms)
    xs = [to_numpy(s) for s in shards]
    ref = reference_forward(xs, None, None, np.zeros(2), np.ones(2))
    fb = forward_bounds(ref, "float64", param_dtype="float64")
    # A one-pass merge around 0 errs by ~1e-16·1e16 in the variance: the
    # bound must be far below that, or this test could not fail.
    one_pass = forward_bounds(ref, "float64", param_dtype="float64", second_pass=False)
    assert fb.y[0] < 1e-6 < one_pass.y[0]
    for r, (y, rm, rv, calls) in enumerate(first):
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name="y")
        assert_close_to_reference(rm, ref.running_mean, fb.running_mean, name="running_mean")
        assert_close_to_reference(rv, ref.running_var, fb.running_var, name="running_var")
        assert calls == 2, "statistics, then the second pass around the reduced mean"
    ref2 = reference_forward(
        xs, None, None, to_numpy(first[0][1]), to_numpy(first[0][2])
    )  # the second step starts from the first's running statistics
    fb2 = forward_bounds(ref2, "float64", param_dtype="float64", center=ref.mean)
    for r, (y, _, rv, calls) in enumerate(second):
        assert calls == 3, "the steady state is one statistics allreduce per forward"
        assert_close_to_reference(y, ref2.ys[r], fb2.y, axis=1, name="y, step 2")
        assert_close_to_reference(rv, ref2.running_var, fb2.running_var, name="rv, step 2")


def test_a_batch_after_an_outlier_batch_is_exact(backend) -> None:
    """An outlier batch (mean 1e9) moves the layer's merge center; the next
    ordinary batch sits 1e9 standard deviations from it and must still be
    exact (before: y off by hundreds, with only a PrecisionWarning)."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    rng = np.random.default_rng(12)
    normal = rng.normal(0.5, 1.0, (16, 3))
    outlier = normal + 1e9
    comms = sbn.thread_group(2, timeout=30)
    counting, layers = _counting_layers(comms, 3)
    batches = [normal, outlier, normal, normal]

    def steps(comm):
        out = []
        for full in batches:
            shard = backend.asarray(full[:5] if comm.rank == 0 else full[5:], "float64")
            before = _stat_calls(counting[comm.rank])
            out.append((layers[comm.rank](shard), _stat_calls(counting[comm.rank]) - before))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = sbn.run_ranks(steps, comms)
    passes = [[calls for _, calls in rank] for rank in results]
    assert passes == [[1, 2, 2, 1]] * 2, passes  # near zero, far from 0, far from 1e9, steady
    xs = [normal[:5], normal[5:]]
    ref = reference_forward(xs)
    fb = forward_bounds(ref, "float64", center=np.full(3, 1e9))
    for r, rank in enumerate(results):
        assert_close_to_reference(rank[2][0], ref.ys[r], fb.y, axis=1, name="after the outlier")
        assert float(np.max(fb.y)) < 1e-10


def test_planted_missing_second_pass_fails_the_first_step_test(backend, monkeypatch) -> None:
    """Without the second pass, the first-step test above must fail."""
    if backend.name not in ("numpy", "numpy-portable"):
        pytest.skip("one host and one portable backend suffice")

    monkeypatch.setattr(functional, "_tolerances", lambda *a: (np.inf, np.inf))
    with pytest.raises(AssertionError, match="exceed the bound"):
        test_first_step_far_from_zero_is_exact_with_one_more_allreduce(backend)


# -- the batch after an outlier, a center far away, a mean near float64's edge ------------
def _split_steps(backend, layers, counting, batches, sizes, dtype):
    """A rank's steps over ``batches`` (split by ``sizes``): per step its y, the
    running statistics before it, and its statistics allreduces."""
    cuts = np.cumsum(sizes)[:-1]

    def steps(comm):
        bn, out = layers[comm.rank], []
        for full in batches:
            shard = backend.asarray(np.split(full, cuts)[comm.rank], dtype)
            stats = [_copy(a) for a in (bn.running_mean, bn.running_var)]
            before = _stat_calls(counting[comm.rank])
            y = bn(shard)
            out.append((y, *stats, _stat_calls(counting[comm.rank]) - before))
        return out

    return steps


def _copy(a):
    return None if a is None else to_numpy(a).copy()


def _recorded(fn, comms):
    """``run_ranks(fn, comms)`` and the categories of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sbn.run_ranks(fn, comms)
    return results, [w.category for w in caught]


def test_a_float32_batch_after_a_diverged_batch_is_exact(backend) -> None:
    """float32 over 3 uneven ranks: a diverged but finite batch (mean 1e25,
    std 1e18) moves the layer's merge center to 1e25, and the next N(0, 1)
    batch sits 1e25 standard deviations from it. The merge around 1e25 gives
    a mean off by ~1e9 std, so one pass around that mean is not enough: every
    rank merges again while the reduced values show a loss (twice here), and
    y and the running statistics are within the bounds, with no warning
    (before: one more pass only, y off by ~1e3, with a PrecisionWarning)."""
    if "float32" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float32 data and a float64 merge")
    rng = np.random.default_rng(5)
    sizes, channels = [140, 164, 24], 4
    outlier = 1e25 + 1e18 * rng.standard_normal((sum(sizes), channels))
    normal = rng.standard_normal((sum(sizes), channels))
    comms = sbn.thread_group(3, timeout=60)
    counting, layers = _counting_layers(comms, channels, "float32")
    steps = _split_steps(backend, layers, counting, [outlier, normal, normal], sizes, "float32")
    results, categories = _recorded(steps, comms)
    f32 = [to_numpy(backend.asarray(s, "float32")) for s in np.split(normal, np.cumsum(sizes)[:-1])]
    first = reference_forward(
        [to_numpy(backend.asarray(s, "float32")) for s in np.split(outlier, np.cumsum(sizes)[:-1])]
    )
    _, rm, rv, _ = results[0][1]
    ref = reference_forward(f32, None, None, rm, rv)
    fb = forward_bounds(ref, "float32", param_dtype="float32", center=first.mean)
    assert float(np.max(fb.y)) < 1e-3, "the bound must be able to fail"
    for r, rank in enumerate(results):
        y = rank[1][0]
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name="y after the outlier")
        _, rm_next, rv_next, _ = rank[2]
        assert_close_to_reference(rm_next, ref.running_mean, fb.running_mean, name="running_mean")
        assert_close_to_reference(rv_next, ref.running_var, fb.running_var, name="running_var")
        assert [step[-1] for step in rank] == [2, 3, 1], "1e25 σ away: two passes more"
    assert categories == [], categories


@pytest.mark.parametrize("far", [1e16, 1e24, 1e30, 1e40])
def test_a_center_far_from_the_data_costs_passes_not_precision(backend, far: float) -> None:
    """The functional API on N(0, 1) float64 data over 3 uneven ranks with a
    center ``far`` away (the same bits on every rank): at most three passes
    more, exact, no warning (before: at 1e24, one more pass around a mean
    off by ~1e8, y off by ~750 with a PrecisionWarning)."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    rng = np.random.default_rng(0)
    full = rng.standard_normal((40, 2))
    shards = [full[:10], full[10:25], full[25:]]
    comms = sbn.thread_group(3, timeout=60)
    counting = [CountingComm(c) for c in comms]

    def step(comm):
        center = backend.asarray(np.full(2, far), "float64")
        x = backend.asarray(shards[comm.rank], "float64")
        y = sbn.sync_batch_norm_forward(
            x, None, None, None, None, comm=counting[comm.rank], center=center
        )[0]
        return y, _stat_calls(counting[comm.rank])

    results, categories = _recorded(step, comms)
    ref = reference_forward(shards)
    fb = forward_bounds(ref, "float64", center=np.full(2, far))
    assert float(np.max(fb.y)) < 1e-10
    for r, (y, calls) in enumerate(results):
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name=f"y, center {far:g}")
        assert 2 <= calls <= 4, calls
    assert categories == [], categories


@pytest.mark.parametrize(
    "mean, spread, shape",
    [(1e152, 1e149, (200_000, 1)), (-1e155, 1e150, (64, 2))],
)
def test_float64_far_from_zero_whose_merge_overflows_is_exact(
    backend, mean: float, spread: float, shape: tuple[int, ...]
) -> None:
    """float64 data with a huge mean and a modest spread (|x − mean| far below
    1e154): the merge around zero forms n·mean², which overflows, but the mean
    is finite, so every rank merges again around it; the step is exact, with
    its running statistics updated and no warning, and the next step (center:
    this mean) takes one allreduce (before: all 0 or NaN, a NonFiniteWarning,
    and every later step failing alike)."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    full = mean + spread * np.random.default_rng(0).standard_normal(shape)
    sizes = [shape[0] // 3, shape[0] - shape[0] // 3]
    comms = sbn.thread_group(2, timeout=60)
    counting, layers = _counting_layers(comms, shape[1])
    steps = _split_steps(backend, layers, counting, [full, full], sizes, "float64")
    results, categories = _recorded(steps, comms)
    xs = np.split(full, sizes[:1])
    ref = reference_forward(xs, None, None, np.zeros(shape[1]), np.ones(shape[1]))
    fb = forward_bounds(ref, "float64", param_dtype="float64")
    assert float(np.max(fb.y)) < 1e-6, "the bound must be able to fail"
    for r, rank in enumerate(results):
        (y, _, _, calls), (y2, rm, rv, calls2) = rank
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name="y")
        assert_close_to_reference(rm, ref.running_mean, fb.running_mean, name="running_mean")
        assert_close_to_reference(rv, ref.running_var, fb.running_var, name="running_var")
        assert 2 <= calls <= 4 and calls2 == 1, (calls, calls2)
        assert_close_to_reference(y2, ref.ys[r], fb.y, axis=1, name="y, step 2")
    assert categories == [], categories


def test_a_variance_beyond_float64_is_non_finite_after_bounded_passes(backend) -> None:
    """|x − mean| = 1e200 in channel 0: its square overflows float64 around any
    center, so after the passes the reduced values allow (at most three more), every
    rank judges that channel non-finite: a NonFiniteWarning naming it, its
    running statistics and merge center kept, no PrecisionWarning; channel 1
    is updated and normalized right."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    full = np.random.default_rng(3).normal(2.0, 1.0, (12, 2))
    full[:, 0] = 1e200 * np.array([1.0, -0.5] * 6)  # mean 2.5e199
    comms = sbn.thread_group(2, timeout=60)
    counting = [CountingComm(c) for c in comms]
    rm0, rv0 = np.array([0.5, 0.5]), np.array([2.0, 2.0])

    def step(comm):
        x = backend.asarray(full[:5] if comm.rank == 0 else full[5:], "float64")
        rm, rv = (backend.asarray(a, "float64") for a in (rm0, rv0))
        y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(
            x, None, None, rm, rv, comm=counting[comm.rank]
        )
        return y, to_numpy(new_rm), to_numpy(new_rv), to_numpy(saved.center), counting[comm.rank]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sbn.run_ranks(step, comms)
    ours = [
        w for w in caught if issubclass(w.category, (sbn.NonFiniteWarning, sbn.PrecisionWarning))
    ]
    assert [w.category for w in ours] == [sbn.NonFiniteWarning] * 2, [str(w.message) for w in ours]
    assert all("[0]" in str(w.message) for w in ours)
    ref = reference_forward([full[:5, 1:], full[5:, 1:]], None, None, rm0[1:], rv0[1:])
    fb = forward_bounds(ref, "float64", param_dtype="float64")
    for r, (y, rm, rv, center, comm) in enumerate(results):
        assert rm[0] == 0.5 and rv[0] == 2.0 and center[0] == 0.0
        assert_close_to_reference(rm[1:], ref.running_mean, fb.running_mean, name="rm")
        assert_close_to_reference(rv[1:], ref.running_var, fb.running_var, name="rv")
        assert_close_to_reference(to_numpy(y)[:, 1:], ref.ys[r], fb.y, axis=1, name="y")
        # The first pass and at most three more: fewer where the mean stops
        # moving (see test_passes_stop_once_the_mean_stops_moving).
        assert 2 <= _stat_calls(comm) <= 4, _stat_calls(comm)


def test_a_precision_loss_beside_a_variance_beyond_float64_is_warned_of(backend) -> None:
    """Channel 0's variance is beyond float64 around any center (±1e200);
    channel 1 is ordinary data merged over 2^30 ranks (alike: a replicated
    buffer), whose float64 merge alone loses ~1e-6 of its variance, past
    half of float64's precision, and no pass can repair that. Each channel
    gets its own warning: a NonFiniteWarning naming channel 0 and a
    PrecisionWarning (before: channel 0's infinite loss hid channel 1's,
    so only the NonFiniteWarning). Channel 1 alone gives only the
    PrecisionWarning, channel 0 alone only the NonFiniteWarning."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    rng = np.random.default_rng(3)
    full = np.stack([1e200 * np.array([1.0, -0.5] * 6), rng.normal(2.0, 1.0, 12)], 1)
    ranks = 2**30
    _, warn = functional._tolerances(np, ranks, np.float64, np.float64)
    assert 4.0 * (ranks + 2) * np.finfo(np.float64).eps > warn, "the merge must lose precision"

    def step(columns):
        x = backend.asarray(full[:, columns], "float64")
        y = sbn.sync_batch_norm_forward(x, None, None, None, None, comm=ReplicatedComm(ranks))[0]
        return to_numpy(y)

    got = {}
    for name, columns in (("both", [0, 1]), ("loss", [1]), ("overflow", [0])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got[name] = step(columns)
        got[name + " warnings"] = sorted(w.category.__name__ for w in caught)
        nonfinite = [str(w.message) for w in caught if w.category is sbn.NonFiniteWarning]
        assert all("[0]" in m for m in nonfinite), nonfinite
    assert got["both warnings"] == ["NonFiniteWarning", "PrecisionWarning"], got["both warnings"]
    assert got["loss warnings"] == ["PrecisionWarning"], got["loss warnings"]
    assert got["overflow warnings"] == ["NonFiniteWarning"], got["overflow warnings"]
    # The variance beyond float64 normalizes to the (absent) bias; channel 1
    # is the float64 reference's within the loss the warning reports.
    np.testing.assert_array_equal(got["both"][:, 0], 0.0)
    ref = reference_forward([full[:, 1:]])
    for y in (got["both"][:, 1:], got["loss"]):
        np.testing.assert_allclose(y, ref.ys[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels, passes", [(1, 1), (2, 2)])
def test_passes_stop_once_the_mean_stops_moving(backend, channels, passes) -> None:
    """Channel 0: a variance beyond float64 around a mean the first pass
    gets exactly (±2^660, as many of each on each of two uneven shards:
    every partial sum and per-rank mean is exact), so the next center would
    be this one (zero) and no rank reduces the same sums again: one pass
    (before: three more, for nothing). With a second, ordinary channel
    (integers: its mean is exact too), one more pass centers it, then the
    mean stops moving. A NonFiniteWarning on each rank, and no numpy
    RuntimeWarning on any route."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    full = np.arange(24, dtype=np.float64).reshape(12, 2)[:, :channels].copy()
    full[:, 0] = 2.0**660 * np.array([1.0, -1.0] * 6)
    comms = sbn.thread_group(2, timeout=60)
    counting = [CountingComm(c) for c in comms]

    def step(comm):
        x = backend.asarray(full[:4] if comm.rank == 0 else full[4:], "float64")
        zeros = [backend.asarray(np.zeros(channels), "float64") for _ in "mv"]
        _, rm, _, _ = sbn.sync_batch_norm_forward(x, None, None, *zeros, comm=counting[comm.rank])
        return to_numpy(rm), counting[comm.rank]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sbn.run_ranks(step, comms)
    assert [w.category for w in caught] == [sbn.NonFiniteWarning] * 2, [
        (w.category, str(w.message)) for w in caught
    ]
    for rm, comm in results:
        assert rm[0] == 0.0 and (channels == 1 or rm[1] == 0.1 * 12.0)
        assert _stat_calls(comm) == passes, _stat_calls(comm)


def test_a_variance_beyond_float64_normalizes_to_the_bias_on_every_route(backend) -> None:
    """Finite float64 data spread over ±1e306: around any center its variance
    is beyond float64. Its mean is finite, so the variance is +inf on every
    route (the host's inf − inf gave NaN: y all NaN there, the bias here):
    invstd 0, y = bias, dx = 0, dweight = 0, the running statistics kept,
    and every rank warns of the channels alike. PyTorch's float64 batch
    norm gives the same y."""
    if "float64" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float64")
    full = np.random.default_rng(0).standard_normal((9, 3)) * 2.5e306
    full[:, 2] = np.arange(9.0)  # an ordinary channel beside them
    bias = np.array([0.5, -2.0, 1.0])
    comms = sbn.thread_group(2, timeout=60)

    def step(comm):
        x = backend.asarray(full[:4] if comm.rank == 0 else full[4:], "float64")
        w, b = backend.asarray(np.ones(3), "float64"), backend.asarray(bias, "float64")
        rm, rv = backend.asarray(np.zeros(3), "float64"), backend.asarray(np.ones(3), "float64")
        y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(x, w, b, rm, rv, comm=comm)
        dy = backend.asarray(np.ones(x.shape), "float64")
        dx, dw, db = sbn.sync_batch_norm_backward(dy, saved)
        return [to_numpy(a) for a in (y, new_rm, new_rv, dx, dw, db)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sbn.run_ranks(step, comms)
    assert [w.category for w in caught] == [sbn.NonFiniteWarning] * 2
    assert all("[0, 1]" in str(w.message) for w in caught)
    ref = reference_forward([full[:4, 2:], full[4:, 2:]], None, None, np.zeros(1), np.ones(1))
    for r, (y, rm, rv, dx, dw, db) in enumerate(results):
        np.testing.assert_array_equal(y[:, :2], np.broadcast_to(bias[:2], y[:, :2].shape))
        np.testing.assert_array_equal(dx[:, :2], 0.0)
        np.testing.assert_array_equal(dw[:2], 0.0)
        np.testing.assert_array_equal(db, float(y.shape[0]))  # Σdy of this rank's ones
        np.testing.assert_array_equal(rm[:2], 0.0)
        np.testing.assert_array_equal(rv[:2], 1.0)
        np.testing.assert_allclose(y[:, 2] - bias[2], ref.ys[r][:, 0], rtol=1e-12, atol=1e-12)
    try:
        import torch
    except ImportError:
        return
    y_torch = torch.nn.functional.batch_norm(
        torch.from_numpy(full[:, :2].copy()), None, None, None, torch.from_numpy(bias[:2]), True
    )
    np.testing.assert_array_equal(y_torch.numpy(), np.concatenate([r[0][:, :2] for r in results]))


@pytest.mark.parametrize("fast", ["1", "0"])
def test_ranks_with_different_centers_still_pass_alike(fast, monkeypatch) -> None:
    """Misuse: centers that differ between ranks (rank 0's is its data, 1e300;
    rank 1's is 0) under a variance beyond float64. Rank 0's own next center
    rounds to its old one (1e300 + 1e189) while rank 1's moves: a stop rule
    read from a rank's own center sent rank 1 alone into another allreduce
    (a hang until the timeout). Read from the reduced buffer, every rank
    runs the same passes; the statistics are garbage, as documented."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    data = [np.full((4, 1), 1e300), np.array([[1e200], [-1e200], [1e190], [0.0]])]
    centers = [np.array([1e300]), np.array([0.0])]
    comms = sbn.thread_group(2, timeout=20)
    counting = [CountingComm(c) for c in comms]

    def step(comm):
        r = comm.rank
        sbn.sync_batch_norm_forward(
            data[r], None, None, None, None, comm=counting[r], center=centers[r]
        )
        return _stat_calls(counting[r])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = sbn.run_ranks(step, comms)
    assert calls[0] == calls[1], calls


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_bfloat16_center_does_not_stop_the_passes(fast, monkeypatch) -> None:
    """A caller's bfloat16 center 1.0 (bits 0x3F80 = 16256 in the host
    route's view) under data whose mean is 16256: the needed pass around the
    mean runs (the stop rule reads the reduced sums, not the center, whose
    bits once looked like the mean), and no PrecisionWarning."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    # A constant channel: |mean − center|/sqrt(eps) ≈ 5e6, a loss for one merge.
    x = torch.full((8, 1), 16256.0, dtype=torch.bfloat16)
    counting = CountingComm(sbn.SelfCommunicator())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _, _, saved = sbn.sync_batch_norm_forward(
            x, None, None, None, None, comm=counting,
            center=torch.tensor([1.0], dtype=torch.bfloat16),
        )  # fmt: skip
    assert saved.route == ("host" if fast == "1" else "portable")
    assert _stat_calls(counting) == 2  # the first pass, then one around the mean
    assert not bool(y.any())  # x − mean = 0 exactly, once centered on the mean


def test_planted_single_recentering_fails_the_outlier_tests(backend, monkeypatch) -> None:
    """With one pass around the reduced mean at most (as before), the batch
    after a diverged batch and the far center must fail their bounds."""
    if backend.name not in ("numpy", "numpy-portable"):
        pytest.skip("one host and one portable backend suffice")

    monkeypatch.setattr(functional, "_RECENTER_LIMIT", 1)
    with pytest.raises(AssertionError, match="exceed the bound"):
        test_a_float32_batch_after_a_diverged_batch_is_exact(backend)
    with pytest.raises(AssertionError, match="exceed the bound"):
        test_a_center_far_from_the_data_costs_passes_not_precision(backend, 1e24)


def test_planted_overflow_not_reported_fails_the_overflow_test(backend, monkeypatch) -> None:
    """A finalize that does not report an overflowed variance (as once, when
    the loss only counted channels with finite statistics) never merges
    again: the huge-mean test must fail."""
    if backend.name not in ("numpy", "numpy-portable"):
        pytest.skip("one host and one portable backend suffice")
    from arraysyncbn._fast import host

    for cls in (functional.PortableKernels, host.HostKernels):
        original = cls.finalize

        def finalize(self, *args, _original=original, **kwargs):
            st = _original(self, *args, **kwargs)
            return st._replace(overflowed=False)

        monkeypatch.setattr(cls, "finalize", finalize)
    with pytest.raises(AssertionError, match=r"exceed the bound|NaN never passes"):
        test_float64_far_from_zero_whose_merge_overflows_is_exact(backend, -1e155, 1e150, (64, 2))


# -- a non-finite batch does not poison the layer -----------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_batch_does_not_poison_the_layer(backend, bad: float) -> None:
    """One rank's batch holds NaN (or inf) in channels 1 and 2 on step 2:
    that step may give non-finite y there, every rank warns naming channels
    [1, 2], their running statistics keep their step-1 values (channel 0's
    are updated); step 3's finite batch is normalized right on every rank."""
    dtype = "float32" if "float32" in backend.dtypes else backend.dtypes[-1]
    rng = np.random.default_rng(13)
    batches = [rng.normal(3.0, 1.0, (12, 3, 2)) for _ in range(3)]
    batches[1][7, 1, 0] = bad  # rank 1's shard (rows 5..)
    batches[1][9, 2, 1] = -bad
    comms = sbn.thread_group(2, timeout=30)
    layers = [sbn.SyncBatchNorm(3, comm=c) for c in comms]

    def steps(comm):
        out = []
        for full in batches:
            shard = backend.asarray(full[:5] if comm.rank == 0 else full[5:], dtype)
            bn = layers[comm.rank]
            y = bn(shard)
            out.append((y, to_numpy(bn.running_mean).copy(), to_numpy(bn.running_var).copy()))
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sbn.run_ranks(steps, comms)
    messages = [str(w.message) for w in caught if issubclass(w.category, sbn.NonFiniteWarning)]
    assert len(messages) == 2 and all("[1, 2]" in m for m in messages), messages
    assert issubclass(sbn.NonFiniteWarning, RuntimeWarning)
    # (numpy may add its own "invalid value" RuntimeWarning for inf − inf)
    assert not [w for w in caught if issubclass(w.category, sbn.PrecisionWarning)]
    for rank in results:
        (_, rm1, rv1), (y2, rm2, rv2), (y3, rm3, rv3) = rank
        assert np.array_equal(rm2[1:], rm1[1:]) and np.array_equal(rv2[1:], rv1[1:])
        assert rm2[0] != rm1[0] and rv2[0] != rv1[0], "the finite channel is updated"
        assert np.all(np.isfinite(to_numpy(y2)[:, 0])), "the finite channel's y is right"
        for a in (rm3, rv3):
            assert np.all(np.isfinite(a))
    xs3 = [batches[2][:5], batches[2][5:]]
    xs3 = [to_numpy(backend.asarray(x, dtype)) for x in xs3]
    _, rm2, rv2 = results[0][1]
    ref = reference_forward(xs3, None, None, rm2, rv2)
    pdtype = backend.param_dtype(dtype)
    fb = forward_bounds(ref, dtype, param_dtype=pdtype)
    for r, rank in enumerate(results):
        y3, rm3, rv3 = rank[2]
        assert_close_to_reference(y3, ref.ys[r], fb.y, axis=1, name="y after the bad batch")
        assert_close_to_reference(rm3, ref.running_mean, fb.running_mean, name="running_mean")
        assert_close_to_reference(rv3, ref.running_var, fb.running_var, name="running_var")


def test_functional_keeps_running_statistics_of_non_finite_channels(backend) -> None:
    """The functional API alone: non-finite channels return their running
    statistics unchanged and say so; the finite ones are updated; a float64
    variance beyond float32 counts as non-finite for float32 buffers."""
    dtype = "float32" if "float32" in backend.dtypes else backend.dtypes[-1]
    x = np.random.default_rng(14).normal(0.0, 1.0, (6, 3))
    x[2, 1] = np.nan
    rm = backend.asarray(np.array([0.5, -0.5, 0.25]), backend.param_dtype(dtype))
    rv = backend.asarray(np.array([2.0, 3.0, 4.0]), backend.param_dtype(dtype))
    xs = backend.asarray(x, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(xs, None, None, rm, rv)
    assert [str(w.message) for w in caught if w.category is sbn.NonFiniteWarning]
    assert "[1]" in str(caught[0].message)
    got_m, got_v = to_numpy(new_rm), to_numpy(new_rv)
    assert got_m[1] == -0.5 and got_v[1] == 3.0
    assert got_m[0] != 0.5 and got_m[2] != 0.25 and np.all(np.isfinite(got_v))
    assert np.isfinite(to_numpy(saved.center)).all()
    # Variance 1e40: finite in float64, not once stored in float32 buffers.
    big = np.zeros((4, 2))
    big[:, 0] = [1e20, -1e20, 1e20, -1e20]
    big[:, 1] = [1.0, 2.0, 3.0, 4.0]
    rm32 = backend.asarray(np.zeros(2), "float32")
    rv32 = backend.asarray(np.ones(2), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(
            backend.asarray(big, "float32"), None, None, rm32, rv32
        )
    assert any(w.category is sbn.NonFiniteWarning and "[0]" in str(w.message) for w in caught)
    assert to_numpy(new_rv)[0] == 1.0 and to_numpy(new_rm)[0] == 0.0
    # The flagged channel keeps its previous merge center (zero: none was
    # given), on every route; the other one moves to its mean.
    center = to_numpy(saved.center)
    assert center[0] == 0.0 and center[1] == 2.5, center
    assert to_numpy(new_rv)[1] != 1.0
    assert np.all(np.isfinite(to_numpy(y)[:, 1]))


# -- non-finite running statistics in eval -----------------------------------------------
# Channels: +inf mean, -inf mean, finite, NaN mean, infinite variance.
_EVAL_MEAN = np.array([np.inf, -np.inf, 0.5, np.nan, 0.0])
_EVAL_VAR = np.array([1.0, 2.0, 2.0, 1.0, np.inf])
_EVAL_W = np.array([1.5, 0.5, -2.0, 1.0, 1.0])
_EVAL_B = np.array([0.25, -1.0, 0.5, 0.0, 2.0])
_NON_FINITE = [0, 1, 3, 4]


def _eval_with(backend, dtype: str, mean=_EVAL_MEAN, var=_EVAL_VAR, pdtype=None):
    """x, dy, parameters and (y, dx, dweight, dbias, batch_norm_inference's y)
    of one eval step with running statistics ``mean``, ``var``."""
    rng = np.random.default_rng(17)
    c = mean.shape[0]
    x = backend.asarray(rng.normal(1.0, 2.0, (4, c, 3)), dtype)
    dy = backend.asarray(rng.uniform(0.5, 1.5, (4, c, 3)), dtype)  # > 0: Σdy·(x − ±inf) = ∓inf
    pdt = pdtype or backend.param_dtype(dtype)
    params = [backend.asarray(v[:c], pdt) for v in (_EVAL_W, _EVAL_B, mean, var)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's own, for inf·0 in the tests
        y, _, _, saved = sbn.sync_batch_norm_forward(x, *params, training=False)
        dx, dw, db = sbn.sync_batch_norm_backward(dy, saved)
        yi = sbn.batch_norm_inference(x, *params)
    return x, dy, params, (y, dx, dw, db, yi)


def test_infinite_running_mean_gives_infinite_output_as_pytorch(backend) -> None:
    """Eval with running_mean = ±inf: y = ∓inf and dweight = ∓inf, as the
    float64 reference and torch.nn.BatchNorm give (before: NaN, from the
    mean's split ``lo = inf − inf`` in float32 work). An infinite variance
    (y = bias, zero dweight) and a NaN mean (NaN) are as they were; the finite
    channel, and dx (which in eval does not read the mean), are within the
    reference bounds."""
    for dtype in backend.dtypes:
        x, dy, params, (y, dx, dw, db, yi) = _eval_with(backend, dtype)
        xs, dys, ps = to_numpy(x), to_numpy(dy), [to_numpy(p) for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = reference_forward([xs], *ps, training=False)
            grads = reference_backward(ref, [dys], ps[0])
        for name, got, want in [("y", y, ref.ys[0]), ("inference y", yi, ref.ys[0])]:
            got = to_numpy(got).astype(np.float64)[:, _NON_FINITE]
            want = want[:, _NON_FINITE].astype(xs.dtype).astype(np.float64)
            assert np.array_equal(got, want, equal_nan=True), (dtype, name, got[0], want[0])
        got_dw = to_numpy(dw).astype(np.float64)[_NON_FINITE]
        assert np.array_equal(got_dw, grads.dweights[0][_NON_FINITE], equal_nan=True), got_dw
        # dx = weight·invstd·dy in eval, whatever the mean: bounded with a
        # finite mean in place of the infinite ones.
        finite = [0, 1, 2]
        sub = [p[finite] for p in ps]
        sub[2] = np.where(np.isfinite(sub[2]), sub[2], 0.0)
        ref3 = reference_forward([xs[:, finite]], *sub, training=False)
        grads3 = reference_backward(ref3, [dys[:, finite]], sub[0])
        pdt = backend.param_dtype(dtype)
        fb = forward_bounds(ref3, dtype, weight=sub[0], bias=sub[1], param_dtype=pdt)
        bb = backward_bounds(ref3, grads3, [dys[:, finite]], dtype, weight=sub[0], param_dtype=pdt)
        got_y, got_dx = to_numpy(y)[:, finite], to_numpy(dx)[:, finite]
        assert_close_to_reference(got_y[:, 2:], ref3.ys[0][:, 2:], fb.y[2:], axis=1, name="y")
        assert_close_to_reference(got_dx, grads3.dxs[0], bb.dx, axis=1, name="dx")
        assert_close_to_reference(to_numpy(db), grads.dbiases[0], bb.dbias[0], name="dbias")
        assert not np.any(to_numpy(dx)[:, 4]), "invstd = 0: dx = 0"
        if dtype == "float32":
            _same_as_torch(xs, dys, ps, y, dw)


def _same_as_torch(xs, dys, ps, y, dw) -> None:
    """torch.nn.functional.batch_norm in eval gives the same non-finite pattern."""
    try:
        import torch
    except ImportError:
        return
    x = torch.from_numpy(xs.astype(np.float32)).requires_grad_(True)
    w = torch.from_numpy(ps[0].astype(np.float32)).requires_grad_(True)
    rm, rv, b = (torch.from_numpy(p.astype(np.float32)) for p in (ps[2], ps[3], ps[1]))
    yt = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False)
    yt.backward(torch.from_numpy(dys.astype(np.float32)))
    want_y = yt.detach().numpy()[:, _NON_FINITE]
    got_y = to_numpy(y)[:, _NON_FINITE].astype(np.float32)
    assert np.array_equal(got_y, want_y, equal_nan=True), (got_y[0], want_y[0])
    want_dw = w.grad.numpy()[_NON_FINITE]
    assert np.array_equal(to_numpy(dw)[_NON_FINITE], want_dw, equal_nan=True), want_dw


def test_a_running_mean_beyond_float32_gives_infinite_float32_output(backend) -> None:
    """float64 running statistics with a mean of ±1e39 and float32 x: the
    mean's work-dtype ``hi`` is ±inf, ``x − 1e39`` rounds to -inf in float32
    as the reference does (before: ``lo = 1e39 − inf = −inf``, then NaN)."""
    if "float32" not in backend.dtypes or not backend.has_float64:
        pytest.skip("needs float32 input and float64 parameters")
    mean, var = np.array([1e39, -1e39, 1e30]), np.array([1.0, 1.0, 1e60])
    x, _, params, (y, _, _, _, yi) = _eval_with(backend, "float32", mean, var, "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = reference_forward([to_numpy(x)], *[to_numpy(p) for p in params], training=False)
        want = ref.ys[0].astype(np.float32)
    assert np.all(np.isinf(want[:, :2])) and np.all(np.isfinite(want[:, 2]))
    for got in (y, yi):
        assert np.array_equal(to_numpy(got)[:, :2], want[:, :2])
    fb = forward_bounds(ref, "float32", weight=params[0], bias=params[1], param_dtype="float64")
    assert_close_to_reference(to_numpy(y)[:, 2:], ref.ys[0][:, 2:], fb.y[2:], axis=1, name="y")


def test_planted_nan_low_part_fails_the_infinite_mean_test(backend, monkeypatch) -> None:
    """With the old split (``lo = mean − hi`` even where hi is infinite) the
    portable route's infinite-mean eval must fail the test above."""
    if backend.name != "numpy-portable":
        pytest.skip("the planted split is the portable route's")
    from arraysyncbn import kernels

    def old(mean, wdtype, *, xp):
        hi = xp.astype(mean, wdtype)
        if mean.dtype == wdtype:
            return hi, None
        return hi, xp.astype(mean - xp.astype(hi, mean.dtype), wdtype)

    monkeypatch.setattr(kernels, "split_mean", old)
    with pytest.raises(AssertionError):
        test_infinite_running_mean_gives_infinite_output_as_pytorch(backend)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_non_finite_eval_is_the_same_bits_on_both_routes(library: str, dtype: str) -> None:
    """The host kernels' split (host_jit.split_low) and the portable one
    (kernels.split_mean) treat a non-finite hi alike: the same bits of y,
    dx, dweight, dbias and batch_norm_inference's y on both routes (NaN
    compared as NaN: the routes round a bfloat16 NaN to different bits)."""
    from backends import BACKENDS, routed

    found = {b.name: b for b in BACKENDS}
    host, portable = found.get(library), found.get(f"{library}-portable")
    if host is None or portable is None:
        pytest.skip(f"{library} is not installed")
    if dtype not in host.dtypes:
        pytest.skip(f"{library} has no {dtype}")
    results = []
    for b in (host, portable):
        with routed(b):
            results.append([to_numpy(a) for a in _eval_with(b, dtype)[3]])
    for name, got, want in zip(("y", "dx", "dw", "db", "yi"), *results, strict=True):
        nan = np.isnan(want)
        assert got.dtype == want.dtype and np.array_equal(np.isnan(got), nan), (name, got, want)
        assert got[~nan].tobytes() == want[~nan].tobytes(), (name, got, want)


# -- subnormal inputs ----------------------------------------------------------------------
def _subnormal_dweights(backend, flush=None):
    """(dweight, reference, default bound, flush-to-zero bound) on float32 data of
    1e-44..1e-39, 40 draws; ``flush(on)`` toggles the CPU's FTZ/DAZ around
    the library's calls only (the reference is computed without it)."""
    rng = np.random.default_rng(0)
    w = np.array([1.5, -2.0])
    for _ in range(40):
        n = int(rng.integers(2, 9))
        x = rng.uniform(-4, 4, (n, 2)) * 10.0 ** rng.integers(-44, -38)
        xs = backend.asarray(x, "float32")
        dy = backend.asarray(rng.uniform(-4, 4, (n, 2)), "float32")
        weight = backend.asarray(w, "float32")
        if flush:
            flush(True)
        try:
            *_, saved = sbn.sync_batch_norm_forward(xs, weight, None, None, None)
            _, dweight, _ = sbn.sync_batch_norm_backward(dy, saved)
        finally:
            if flush:
                flush(False)
        ref = reference_forward([to_numpy(xs)], to_numpy(weight))
        grads = reference_backward(ref, [to_numpy(dy)], to_numpy(weight))
        bounds = [
            backward_bounds(
                ref, grads, [dy], "float32", weight=weight, param_dtype="float32",
                flush_to_zero=ftz,
            ).dweight
            for ftz in (False, True)
        ]  # fmt: skip
        yield dweight, grads.dweights[0], *bounds


def test_dweight_of_subnormal_float32_input_is_within_its_bound(backend) -> None:
    """float32 data of 1e-44..1e-39: each centered value is a float32 number,
    exact only to one subnormal spacing, which Σdy·x̂ scales by n·|dy|·invstd
    (~1e-42); the bound's floor must allow that (it once allowed 6e-45).
    A library that flushes float32 subnormals (CuPy) is held to the
    flush-to-zero bound instead (next test)."""
    if "float32" not in backend.dtypes:
        pytest.skip("needs float32")
    ftz = flushes_subnormals(backend.asarray(np.ones(1), "float32"))
    assert ftz == backend.name.startswith("cupy"), "only CuPy is expected to flush subnormals"
    for dweight, want, bound, ftz_bound in _subnormal_dweights(backend):
        assert_close_to_reference(dweight, want, ftz_bound if ftz else bound, name="dweight")


def test_flushed_subnormals_fail_the_default_bound_and_pass_the_flush_to_zero_one() -> None:
    """What CuPy does on a GPU (it compiles kernels with -ftz=true), reproduced on
    the CPU with the FTZ/DAZ flags of this thread (torch.set_flush_denormal):
    flushes_subnormals sees it, the flushed dweights (0 where the reference
    is ~1e-37) break the default bound, and the flush-to-zero bound holds."""
    torch = pytest.importorskip("torch")
    from backends import BACKENDS

    numpy = next(b for b in BACKENDS if b.name == "numpy")
    one = np.ones(1, np.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert flushes_subnormals(one)
    finally:
        torch.set_flush_denormal(False)
    assert not flushes_subnormals(one)
    failed = 0
    for dweight, want, bound, ftz_bound in _subnormal_dweights(numpy, torch.set_flush_denormal):
        try:
            assert_close_to_reference(dweight, want, bound, name="dweight")
        except AssertionError:
            failed += 1
        assert_close_to_reference(dweight, want, ftz_bound, name="dweight")
    assert failed >= 30, failed


def test_flushed_subnormal_input_in_eval_needs_the_flush_to_zero_forward_bound() -> None:
    """Eval-mode y of float32 subnormal x with the CPU's FTZ/DAZ flags: x reads
    as 0, so y misses (x − rm)·w/σ ≈ 3e-39 (1e5 × the default bound); the
    flush-to-zero bound allows it (the likely cause of the one eval-property
    failure seen on CuPy)."""
    torch = pytest.importorskip("torch")
    x = np.array([[1.2e-40, -3e-40], [2e-39, 0.5]], np.float32)
    w, b = np.array([1.5, -2.0], np.float32), np.zeros(2, np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        y = sbn.sync_batch_norm_forward(x, w, b, rm, rv, training=False)[0]
    finally:
        torch.set_flush_denormal(False)
    ref = reference_forward([x], w, b, rm, rv, training=False)
    bounds = [
        channel_bound(
            forward_bounds(
                ref, "float32", weight=w, bias=b, param_dtype="float32", flush_to_zero=ftz
            ).y,
            2,
            1,
        )
        for ftz in (False, True)
    ]
    with pytest.raises(AssertionError, match="exceed"):
        assert_close_to_reference(y, ref.ys[0], bounds[0], name="y")
    assert_close_to_reference(y, ref.ys[0], bounds[1], name="y")


# -- byte-swapped and wider numpy floats ---------------------------------------------------
_SWAPPED = {
    ">f8" if np.little_endian else "<f8": "float64",
    ">f4" if np.little_endian else "<f4": "float32",
    ">f2" if np.little_endian else "<f2": "float16",
    "longdouble": "float64",  # wider than float64: computed in float64, bounded as float64
}


@pytest.mark.parametrize("dtype", list(_SWAPPED))
def test_non_native_numpy_floats_keep_their_precision(backend, dtype: str) -> None:
    """numpy arrays of byte-swapped float64 (a FITS or .npy file from a
    big-endian machine) and long double compare unequal to np.float64, which
    once made them float32 work (y off by 3.5e7 × the float64 bound at
    mean 1e3, std 1). Two ranks, forward and backward, parameters and running
    statistics of the same dtype: every result keeps x's (or the parameters')
    dtype and lies within the bounds of the native dtype holding the same numbers."""
    if not backend.name.startswith("numpy"):
        pytest.skip("byte order and long double are numpy's")
    dt = np.dtype(np.longdouble if dtype == "longdouble" else dtype)
    bound_dtype = _SWAPPED[dtype] if dtype == "longdouble" else dt
    rng = np.random.default_rng(16)
    full = (1e3 + rng.standard_normal((8, 2))).astype(dt)
    dys_full = rng.standard_normal((8, 2)).astype(dt)
    w, b = np.array([1.5, -0.5], dt), np.array([0.25, 2.0], dt)
    rm, rv = np.array([3.0, -1.0], dt), np.array([2.0, 0.5], dt)
    shards, dys = [full[:3], full[3:]], [dys_full[:3], dys_full[3:]]

    def rank(comm):
        y, new_rm, new_rv, saved = sbn.sync_batch_norm_forward(
            shards[comm.rank], w, b, rm, rv, comm=comm
        )
        return (y, new_rm, new_rv, *sbn.sync_batch_norm_backward(dys[comm.rank], saved))

    results = _two_ranks(rank)
    ref = reference_forward(shards, w, b, rm, rv)
    grads = reference_backward(ref, dys, w)
    fb = forward_bounds(ref, bound_dtype, weight=w, bias=b, param_dtype=bound_dtype)
    bb = backward_bounds(ref, grads, dys, bound_dtype, weight=w, param_dtype=bound_dtype)
    for r, (y, new_rm, new_rv, dx, dw, db) in enumerate(results):
        assert y.dtype == dt and dx.dtype == dt and new_rm.dtype == dt and dw.dtype == dt
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name="y")
        assert_close_to_reference(dx, grads.dxs[r], bb.dx, axis=1, name="dx")
        assert_close_to_reference(new_rm, ref.running_mean, fb.running_mean, name="rm")
        assert_close_to_reference(new_rv, ref.running_var, fb.running_var, name="rv")
        assert_close_to_reference(dw, grads.dweights[r], bb.dweight, name="dweight")
        assert_close_to_reference(db, grads.dbiases[r], bb.dbias, name="dbias")
    # The eval path normalizes with the same work dtype.
    y_eval = sbn.sync_batch_norm_forward(full, w, b, rm, rv, training=False)[0]
    ref_eval = reference_forward([full], w, b, rm, rv, training=False)
    fb_eval = forward_bounds(ref_eval, bound_dtype, weight=w, bias=b, param_dtype=bound_dtype)
    assert y_eval.dtype == dt
    assert_close_to_reference(y_eval, ref_eval.ys[0], fb_eval.y, axis=1, name="eval y")


@pytest.mark.parametrize("dtype", [next(iter(_SWAPPED)), "longdouble"])
def test_a_layer_on_swapped_float64_keeps_float64_statistics(backend, dtype: str) -> None:
    """SyncBatchNorm's lazily created parameters and running statistics were
    float32 for byte-swapped float64 (and long double) input, as for half
    precision; they are float64, and the running statistics meet the float64
    bounds."""
    if not backend.name.startswith("numpy"):
        pytest.skip("byte order and long double are numpy's")
    dt = np.dtype(np.longdouble if dtype == "longdouble" else dtype)
    x = (1e3 + np.random.default_rng(18).standard_normal((8, 2))).astype(dt)
    bn = sbn.SyncBatchNorm(2)
    y = bn(x)
    assert y.dtype == dt
    assert bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == np.float64
    ref = reference_forward([x], None, None, np.zeros(2), np.ones(2))
    fb = forward_bounds(ref, "float64", param_dtype="float64")
    assert_close_to_reference(y, ref.ys[0], fb.y, axis=1, name="y")
    assert_close_to_reference(bn.running_mean, ref.running_mean, fb.running_mean, name="rm")
    assert_close_to_reference(bn.running_var, ref.running_var, fb.running_var, name="rv")


def test_planted_float32_work_for_swapped_float64_fails_the_test_above(
    backend, monkeypatch
) -> None:
    """With the old equality test (float32 work for anything not == float64),
    the byte-swapped float64 test must fail."""
    if backend.name not in ("numpy", "numpy-portable"):
        pytest.skip("one host and one portable backend suffice")
    from arraysyncbn import kernels

    def old(xp, dtype):
        return dtype if dtype == xp.float64 or dtype == xp.float32 else xp.float32

    monkeypatch.setattr(kernels, "work_dtype", old)
    with pytest.raises(AssertionError, match="exceed the bound"):
        test_non_native_numpy_floats_keep_their_precision(backend, next(iter(_SWAPPED)))
