"""arraysyncbn.testing itself: the documented example runs, and the reference
agrees with an independent formulation."""

from __future__ import annotations

import dataclasses
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import arraysyncbn.testing as T
from arraysyncbn import PrecisionWarning
from arraysyncbn.testing.strategies import ShardedBatch, sharded_batches


def test_documented_example_runs_and_passes() -> None:
    doc = T.__doc__
    start = doc.index("Example, testing arraysyncbn itself")
    code = textwrap.dedent(doc[doc.index("::", start) + 2 :])
    namespace: dict = {}
    exec(compile(code, "arraysyncbn.testing example", "exec"), namespace)
    with warnings.catch_warnings():
        # Drawn data sits up to 1e8 standard deviations from zero: the first
        # step must be exact (a second pass), not merely warn.
        warnings.simplefilter("error", PrecisionWarning)
        namespace["test_forward"]()


def test_reference_equals_numpy_on_the_concatenated_batch() -> None:
    rng = np.random.default_rng(3)
    shards = [rng.normal(5, 2, (n, 3, 4)) for n in (2, 0, 5)]
    ref = T.reference_forward(shards, eps=1e-5)
    full = np.concatenate(shards)
    want = (full - full.mean(axis=(0, 2), keepdims=True)) / np.sqrt(
        full.var(axis=(0, 2), keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(np.concatenate(ref.ys), want, rtol=0, atol=1e-12)
    assert ref.count == 28


def test_assertions_never_pass_nan_and_check_metadata() -> None:
    with pytest.raises(AssertionError, match="exceed the bound"):
        T.assert_close_to_reference(np.array([np.nan]), np.array([0.0]), 1e300)
    with pytest.raises(AssertionError, match="shape"):
        T.assert_close_to_reference(np.zeros(2), np.zeros(3), 1.0)
    with pytest.raises(AssertionError, match="dtype"):
        T.assert_like(np.zeros(2, np.float32), np.zeros(2, np.float64))
    assert T.assert_close_to_reference(np.array([1.0, np.inf]), np.array([1.0, np.inf]), 0.0) == 0


def test_a_result_that_is_not_a_real_float_never_passes() -> None:
    """``actual = expected + 5j`` passed with error 0.0 (the cast to float64
    dropped the imaginary part, with only a ComplexWarning). Complex, integer
    and bool results fail with a message naming the dtype, whatever the bound;
    real floats of every width and byte order still pass."""
    import arraysyncbn as sbn

    x = np.random.default_rng(4).normal(2.0, 3.0, (6, 2))
    y = sbn.sync_batch_norm_forward(x, None, None, None, None)[0]
    ref = T.reference_forward([x])
    bound = T.forward_bounds(ref, "float64").y
    assert T.assert_close_to_reference(y, ref.ys[0], bound, axis=1) < 1e-12
    wrong = [y + 5j, y.astype(np.complex128), y.astype(np.complex64), np.rint(y).astype(int)]
    for got in wrong:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ComplexWarning on the way to failing
            with pytest.raises(AssertionError, match=f"dtype {got.dtype} is not a real floating"):
                T.assert_close_to_reference(got, ref.ys[0], np.inf, axis=1, name="y")
    with pytest.raises(AssertionError, match="dtype bool is not a real floating"):
        T.assert_close_to_reference(np.ones(2, bool), np.ones(2), 1.0)
    with pytest.raises(ValueError, match="expected values are complex"):
        T.assert_close_to_reference(y, ref.ys[0] + 0j, bound, axis=1)
    for dt in ("float16", "float32", ">f8", np.longdouble):
        T.assert_close_to_reference(y.astype(dt), ref.ys[0].astype(dt), np.inf, axis=1)
    torch = pytest.importorskip("torch")
    with pytest.raises(AssertionError, match=r"torch\.complex64 is not a real floating"):
        T.assert_close_to_reference(torch.zeros(2, dtype=torch.complex64), np.zeros(2), 1.0)
    T.assert_close_to_reference(torch.zeros(2, dtype=torch.bfloat16), np.zeros(2), 0.0)


def test_per_channel_bound_needs_the_channel_axis() -> None:
    a = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="axis="):
        T.assert_close_to_reference(a, a, np.ones(3))
    assert T.assert_close_to_reference(a, a, np.ones(3), axis=1) == 0.0
    off = a.copy()
    off[:, 2, :] = 2.0  # channel 2 errs by 2; its bound is 1, the others' 5
    with pytest.raises(AssertionError, match="exceed the bound"):
        T.assert_close_to_reference(off, a, np.array([5.0, 5.0, 1.0]), axis=1)
    T.assert_close_to_reference(off, a, np.array([1.0, 1.0, 5.0]), axis=1)


# -- review: the harness as a user of their own SyncBN sees it ---------------------------
def test_nan_and_unmatched_inf_fail_even_an_infinite_bound() -> None:
    """``inf <= inf`` is True: a NaN turned into an infinite error used to pass
    a bound of inf (a constant channel with eps=0 gives one)."""
    for got, want in [(np.nan, 0.0), (np.nan, np.nan), (np.inf, 1.0), (-np.inf, np.inf)]:
        with pytest.raises(AssertionError, match="exceed the bound"):
            T.assert_close_to_reference(np.array([got]), np.array([want]), np.inf)
    with pytest.raises(AssertionError, match="NaN never passes"):
        T.assert_close_to_reference(np.full((2, 2), np.nan), np.zeros((2, 2)), np.inf, axis=1)
    assert T.assert_close_to_reference(np.array([-np.inf]), np.array([-np.inf]), 0.0) == 0.0


def test_failure_names_the_channels_and_how_far_over_the_bound() -> None:
    want = np.zeros((2, 3, 4))
    got = want.copy()
    got[1, 2, 3] = 3e-3
    got[0, 0, 0] = 1e-6
    with pytest.raises(AssertionError) as info:
        T.assert_close_to_reference(got, want, np.array([1e-7, 1.0, 1e-4]), axis=1, name="y")
    text = str(info.value)
    assert "2 of 24 elements" in text and "channel(s) [0, 2]" in text
    assert "worst in channel 2, at index (1, 2, 3)" in text
    assert "error 3.000e-03 > bound 1.000e-04 (30 × the bound)" in text
    with pytest.raises(AssertionError, match="the bound is NaN"):
        T.assert_close_to_reference(np.zeros(2), np.zeros(2), np.array([0.0, np.nan]))


@pytest.mark.parametrize("native", ["float16", "float32", "float64"])
def test_byte_swapped_numpy_dtypes_have_their_native_twins_bounds(native: str) -> None:
    """``dtype_eps(">f8")`` raised "not a supported floating dtype" (``str`` of
    a byte-swapped dtype is ``'>f8'``, not ``'float64'``), so a big-endian
    array's bounds could not even be computed."""
    swapped = np.dtype(native).newbyteorder()
    assert swapped != np.dtype(native)
    for spelled in (swapped, swapped.str, np.dtype(native).str):
        assert T.dtype_eps(spelled) == T.dtype_eps(native)
    x = np.random.default_rng(3).normal(5.0, 2.0, (6, 2))
    ref = T.reference_forward([x.astype(swapped)])
    assert np.array_equal(
        T.forward_bounds(ref, swapped, param_dtype=swapped).y,
        T.forward_bounds(ref, native, param_dtype=native).y,
    )
    for other in (np.dtype(">i8"), "complex128", np.longdouble):
        with pytest.raises(TypeError, match="not a supported floating dtype"):
            T.dtype_eps(other)


def test_a_bound_that_does_not_fit_the_array_is_a_clear_value_error() -> None:
    """These were numpy's 'operands could not be broadcast together'."""
    a = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="bound for 4 channels, but the array has 3"):
        T.assert_close_to_reference(a, a, np.ones(4), axis=1)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        T.assert_close_to_reference(a, a, np.ones(3), axis=3)
    with pytest.raises(ValueError, match="bound of shape"):
        T.assert_close_to_reference(np.zeros(3), np.zeros(3), np.ones(4), name="running_var")
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        T.channel_bound(np.ones((3, 1)), 3, 1)
    assert T.assert_close_to_reference(a, a, np.ones(4), axis=-1) == 0.0
    assert T.assert_close_to_reference(a, a, np.ones((1, 3, 1))) == 0.0  # broadcasts as is


def test_reference_rejects_inputs_that_are_not_one_batch_norm() -> None:
    x = np.ones((2, 3))
    cases = [
        (lambda: T.reference_forward([]), "at least one shard"),
        (lambda: T.reference_forward([x, np.ones((2, 4))]), "shard 1 has shape"),
        (lambda: T.reference_forward([x, np.ones((2, 3, 1))]), "shard 1 has shape"),
        (lambda: T.reference_forward([x], axis=2), "out of range"),
        (lambda: T.reference_forward([x], weight=np.ones(4)), r"weight has shape \(4,\)"),
        (lambda: T.reference_forward([x], running_mean=np.zeros(3)), "both running_mean"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    ref = T.reference_forward([x, 2 * x])
    with pytest.raises(ValueError, match="1 upstream gradients for 2 shards"):
        T.reference_backward(ref, [x])
    with pytest.raises(ValueError, match=r"dys\[1\] has shape"):
        T.reference_backward(ref, [x, np.ones((2, 2))])


@pytest.mark.parametrize("min_count", [2, 50])
def test_same_shapes_shards_concatenate_whatever_min_count(min_count: int) -> None:
    """A global batch below min_count used to grow shard 0 in every side, so
    same_shapes=True shards no longer concatenated along the batch axis."""

    @settings(max_examples=150, database=None, derandomize=True, deadline=None)
    @given(batch=sharded_batches(same_shapes=True, min_count=min_count))
    def prop(batch) -> None:
        ndim = batch.shards[0].ndim
        batch_axis = 0 if batch.axis % ndim != 0 else 1
        whole = np.concatenate(batch.shards, axis=batch_axis)
        assert whole.size // batch.channels == batch.count >= min_count

    prop()


def test_a_world_without_ranks_is_a_clear_value_error() -> None:
    """``ranks=st.just(0)`` used to fail inside hypothesis' list strategy."""
    from arraysyncbn.testing.strategies import splits

    for strategy, match in (
        (sharded_batches(ranks=st.just(0)), "1 or more ranks"),
        (splits(5, 0), "parts >= 1"),
    ):

        @settings(max_examples=1, database=None, deadline=None)
        @given(drawn=strategy)
        def prop(drawn) -> None:
            pass

        with pytest.raises(ValueError, match=match):
            prop()


# A user's own SyncBN over a list of shards, in numpy, correct or with one of
# the classic mistakes planted; the documented harness must tell them apart.
def _user_center(x, mean, work, view):
    """x − mean in the work dtype, the float64 mean split in two (``hi + lo``)."""
    hi = mean.astype(work)
    lo = (mean - hi).astype(work)
    return (x.astype(work) - hi.reshape(view)) - lo.reshape(view)


def _user_syncbn(batch, bug=None):
    """Forward and backward of every rank's shard; each ``sum`` over shards
    stands for an allreduce. Returns (ys, running_mean, running_var, dxs,
    dweights, dbiases)."""
    shards = batch.shards
    nd = shards[0].ndim
    ax = batch.axis % nd
    axes = tuple(i for i in range(nd) if i != ax)
    view = [-1 if i == ax else 1 for i in range(nd)]
    work = np.float32 if shards[0].dtype == np.float16 else shards[0].dtype
    f64 = np.float64
    counts = [x.size // x.shape[ax] for x in shards]
    used = shards[:-1] if bug == "dropped shard" and len(shards) > 1 else shards
    n = sum(counts[: len(used)])
    n = {"count off by one": n + 1, "count in float16": float(np.float16(n))}.get(bug, n)
    mean = sum(x.sum(axis=axes, dtype=f64) for x in used) / n
    var = sum((_user_center(x, mean, work, view).astype(f64) ** 2).sum(axis=axes) for x in used)
    var = var / n
    invstd = 1 / np.sqrt(var + batch.eps)
    w = np.ones_like(mean) if batch.weight is None else batch.weight
    b = np.zeros_like(mean) if batch.bias is None else batch.bias
    xhats = [_user_center(x, mean, work, view) * invstd.astype(work).reshape(view) for x in shards]
    ys = [
        (xh * w.astype(work).reshape(view) + b.astype(work).reshape(view)).astype(x.dtype)
        for x, xh in zip(shards, xhats, strict=True)
    ]
    rm = rv = None
    if batch.running_mean is not None:
        steps = 0 if bug == "ignores num_batches_tracked" else batch.num_batches_tracked
        m = 1 / (steps + 1) if batch.momentum is None else batch.momentum
        bessel_n = counts[0] if bug == "Bessel with the local count" else n
        bessel = 1.0 if bug == "no Bessel" else bessel_n / max(bessel_n - 1, 1)
        rm = (1 - m) * batch.running_mean + m * mean
        rv = (1 - m) * batch.running_var + m * var * bessel
    dys = [d.astype(x.dtype) for d, x in zip(batch.dys, shards, strict=True)]
    dbs = [d.sum(axis=axes, dtype=f64) for d in dys]
    dws = [(d.astype(f64) * xh).sum(axis=axes) for d, xh in zip(dys, xhats, strict=True)]
    sum_db, sum_dw = (dbs[0], dws[0]) if bug == "dx from local sums" else (sum(dbs), sum(dws))
    dxs = []
    for d, xh in zip(dys, xhats, strict=True):
        t = d.astype(work) - (sum_db / n).astype(work).reshape(view)
        if bug != "dx without the x̂ term":
            t = t - xh * (sum_dw / n).astype(work).reshape(view)
        dxs.append((t * (w * invstd).astype(work).reshape(view)).astype(d.dtype))
    return ys, rm, rv, dxs, dws, dbs


def _check_user_syncbn(batch, bug=None) -> None:
    """The README's recipe, forward and backward, for an implementation that
    merges once around zero (``second_pass=False``)."""
    dtype = getattr(np, batch.dtype)
    batch = dataclasses.replace(batch, shards=[s.astype(dtype) for s in batch.shards])
    if batch.count < 2:
        return
    ys, rm, rv, dxs, dws, dbs = _user_syncbn(batch, bug)
    steps = batch.num_batches_tracked
    ref = T.reference_forward(
        batch.shards, batch.weight, batch.bias, batch.running_mean, batch.running_var,
        momentum=batch.momentum, eps=batch.eps, axis=batch.axis, num_batches_tracked=steps,
    )  # fmt: skip
    fb = T.forward_bounds(
        ref, batch.dtype, weight=batch.weight, bias=batch.bias, param_dtype="float64",
        momentum=batch.momentum, num_batches_tracked=steps, second_pass=False,
    )  # fmt: skip
    for y, want in zip(ys, ref.ys, strict=True):
        T.assert_close_to_reference(y, want, fb.y, axis=batch.axis, name="y")
    if rm is not None:
        T.assert_close_to_reference(rm, ref.running_mean, fb.running_mean, name="running_mean")
        T.assert_close_to_reference(rv, ref.running_var, fb.running_var, name="running_var")
    dys = [d.astype(dtype) for d in batch.dys]
    grads = T.reference_backward(ref, dys, batch.weight)
    bb = T.backward_bounds(
        ref, grads, dys, batch.dtype, weight=batch.weight, param_dtype="float64",
        second_pass=False,
    )  # fmt: skip
    for dx, want in zip(dxs, grads.dxs, strict=True):
        T.assert_close_to_reference(dx, want, bb.dx, axis=batch.axis, name="dx")
    for dw, db, want_w, want_b in zip(dws, dbs, grads.dweights, grads.dbiases, strict=True):
        T.assert_close_to_reference(dw, want_w, bb.dweight, name="dweight")
        T.assert_close_to_reference(db, want_b, bb.dbias, name="dbias")


_USER_HUNT = settings(
    max_examples=150,
    database=None,
    derandomize=True,
    deadline=None,
    phases=[Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_correct_user_syncbn_passes_the_bounds(dtype: str) -> None:
    @_USER_HUNT
    @given(batch=sharded_batches(dtypes=st.just(dtype), max_ndim=5))
    def prop(batch) -> None:
        _check_user_syncbn(batch)

    prop()


_USER_BUGS = [
    "count off by one",
    "dropped shard",
    "Bessel with the local count",
    "no Bessel",
    "dx from local sums",
    "dx without the x̂ term",
    "count in float16",
    "ignores num_batches_tracked",
]


@pytest.mark.parametrize("bug", _USER_BUGS)
def test_the_bounds_catch_a_planted_bug_in_a_user_syncbn(bug: str) -> None:
    # float16 holds integers exactly up to 2048: only larger counts show it.
    min_count = 2049 if bug == "count in float16" else 2
    strategy = sharded_batches(
        dtypes=st.sampled_from(["float32", "float64"]), min_count=min_count, max_ndim=3
    )

    @_USER_HUNT
    @given(batch=strategy)
    def prop(batch) -> None:
        _check_user_syncbn(batch, bug)

    with pytest.raises(AssertionError, match="exceed the bound"):
        prop()


def _check_torch_batch_norm(batch, **bounds) -> None:
    """torch.nn.functional.batch_norm (a world of one) against the reference,
    forward and backward, in float32 as PyTorch computes it."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(batch.shards[0].astype(np.float32)).requires_grad_(True)
    dy = torch.from_numpy(batch.dys[0].astype(np.float32))
    ax = batch.axis % x.ndim
    y = torch.movedim(
        torch.nn.functional.batch_norm(torch.movedim(x, ax, 1), None, None, eps=batch.eps,
                                       training=True), 1, ax,
    )  # fmt: skip
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = T.reference_forward([x.detach()], eps=batch.eps, axis=batch.axis)
    fb = T.forward_bounds(ref, "float32", second_pass=False, **bounds)
    T.assert_close_to_reference(y, ref.ys[0], fb.y, axis=batch.axis, name="y")
    grads = T.reference_backward(ref, [dy])
    bb = T.backward_bounds(ref, grads, [dy], "float32", second_pass=False, **bounds)
    T.assert_close_to_reference(dx, grads.dxs[0], bb.dx, axis=batch.axis, name="dx")


def test_centering_eps_bounds_pytorchs_float32_batch_norm_in_both_directions() -> None:
    """PyTorch centers float32 x with a float32 mean summed in float32: at
    |mean|/std = 1e5 that moves x̂ by ~1e-3, far past the default bounds
    (arraysyncbn's hi + lo centering). centering_eps = (n + 1)·eps32 bounds
    it, and still catches a planted count off by one."""

    def hunt(check):
        @_USER_HUNT
        @given(batch=sharded_batches(ranks=st.just(1), dtypes=st.just("float32")))
        def prop(batch) -> None:
            if batch.count >= 2:
                check(batch)

        return prop

    def torch_style(batch, fails=False):
        e32 = T.dtype_eps("float32")
        loose = {"centering_eps": (batch.count + 1) * e32, "accumulation_eps": e32}
        _check_torch_batch_norm(batch, **({} if fails else loose))

    hunt(torch_style)()  # passes with centering_eps
    with pytest.raises(AssertionError, match="exceed the bound"):
        hunt(lambda b: torch_style(b, fails=True))()

    def off_by_one(batch):
        e32 = T.dtype_eps("float32")
        bug = dataclasses.replace(batch, shards=[s.astype(np.float32) for s in batch.shards])
        ys = _user_syncbn(bug, "count off by one")[0]
        ref = T.reference_forward(bug.shards, bug.weight, bug.bias, eps=bug.eps, axis=bug.axis)
        fb = T.forward_bounds(
            ref, "float32", weight=bug.weight, bias=bug.bias, second_pass=False,
            centering_eps=(ref.count + 1) * e32, accumulation_eps=e32,
        )  # fmt: skip
        T.assert_close_to_reference(ys[0], ref.ys[0], fb.y, axis=bug.axis)

    with pytest.raises(AssertionError, match="exceed the bound"):
        hunt(off_by_one)()


@pytest.mark.parametrize("magnitude", [1e200, 1e300])
def test_bounds_of_huge_data_are_infinite_without_numpy_warnings(magnitude) -> None:
    """A channel beyond ~1e154: its budget is +inf (the bound promises nothing
    there), quietly, so that a user's test under ``-W error`` fails in the
    implementation, not in the bound; an ordinary channel beside it keeps a
    small, finite bound."""
    full = np.full((6, 2), magnitude)
    full[:, 1] = np.arange(6.0)
    shards = [full[:2], full[2:]]
    ones, zeros = np.ones(2), np.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = T.reference_forward(shards, ones, zeros, zeros, ones)
        fb = T.forward_bounds(ref, "float64", param_dtype="float64")
        dys = [np.ones_like(s) for s in shards]
        grads = T.reference_backward(ref, dys, ones)
        bb = T.backward_bounds(ref, grads, dys, "float64", weight=ones)
    assert np.isinf(fb.running_var[0]) and 0 < fb.running_var[1] < 1e-10
    assert 0 < float(np.asarray(fb.y).reshape(-1, 2)[0, 1]) < 1e-10
    assert np.isinf(bb.dx[0]) and 0 < bb.dx[1] < 1e-10


def test_partial_sums_enter_the_bounds_as_documented() -> None:
    """``partial_sums=(dtype, L)`` adds ``e_b·min(L, n)`` to every ``e_acc·n``
    (the same bounds as that larger accumulation_eps, up to the underflow
    term, negligible here); arraysyncbn's default is HALF_PARTIAL_SUMS for
    16-bit input and none otherwise; a malformed value is a clear error."""
    rng = np.random.default_rng(3)
    shards = [rng.standard_normal((5, 3, 40)) * 2 + 7, rng.standard_normal((2, 3, 40))]
    ref = T.reference_forward(shards, None, None, np.zeros(3), np.ones(3), axis=1)
    dys = [rng.standard_normal(s.shape) for s in shards]
    grads = T.reference_backward(ref, dys)
    n, e32, e64 = ref.count, float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    for length in (1, 64, 512, 10**6):
        widened = e64 + e32 * min(length, n) / n
        for dtype in ("float16", "bfloat16"):
            got = T.forward_bounds(ref, dtype, partial_sums=("float32", length))
            want = T.forward_bounds(ref, dtype, accumulation_eps=widened, partial_sums=None)
            np.testing.assert_allclose(got.y, want.y, rtol=1e-9)
            np.testing.assert_allclose(got.running_var, want.running_var, rtol=1e-9)
            gb = T.backward_bounds(ref, grads, dys, dtype, partial_sums=("float32", length))
            wb = T.backward_bounds(
                ref, grads, dys, dtype, accumulation_eps=widened, partial_sums=None
            )
            for a, b in zip(
                (gb.dx, gb.dweight, gb.dbias), (wb.dx, wb.dweight, wb.dbias), strict=True
            ):
                np.testing.assert_allclose(a, b, rtol=1e-9)
    for dtype in ("float16", "bfloat16"):
        default = T.forward_bounds(ref, dtype).y
        np.testing.assert_array_equal(
            default, T.forward_bounds(ref, dtype, partial_sums=T.HALF_PARTIAL_SUMS).y
        )
        assert (T.forward_bounds(ref, dtype, partial_sums=None).y < default).all()
    for dtype in ("float32", "float64"):
        np.testing.assert_array_equal(
            T.forward_bounds(ref, dtype).y, T.forward_bounds(ref, dtype, partial_sums=None).y
        )
    for bad, match in ((("float32", 0), "at least 1"), ("float32", "expected")):
        with pytest.raises(ValueError, match=match):
            T.forward_bounds(ref, "float16", partial_sums=bad)


def _naive32_backward(x: np.ndarray, dy: np.ndarray, eps: float, bug=None) -> np.ndarray:
    """dx of one (N, C) shard whose backward sums Σdy and Σdy·x̂ are naive
    float32 sums, left to right (what ``accumulation_eps=dtype_eps("float32")``
    promises to bound); everything else in float64, rounded to float32."""
    f32 = np.float32
    mean = x.mean(axis=0, dtype=np.float64)
    invstd = 1 / np.sqrt(x.var(axis=0, dtype=np.float64) + eps)
    xhat = ((x - mean) * invstd).astype(f32)
    n = x.shape[0]
    mean_dy = np.cumsum(dy, axis=0, dtype=f32)[-1] / f32(n)
    mean_dy_xhat = np.cumsum(dy * xhat, axis=0, dtype=f32)[-1] / f32(n)
    if bug == "dx without the x̂ term":
        mean_dy_xhat = 0 * mean_dy_xhat
    return ((dy - mean_dy - xhat * mean_dy_xhat) * invstd).astype(f32)


def test_dx_bound_carries_the_backward_sums_accumulation_error() -> None:
    """The dx bound ignored the rounding of the backward's own sums Σdy and
    Σdy·x̂ (``e_acc·n`` terms, which dbias' bound carries): a constant channel
    with constant dy has dx = 0, and a naive float32 Σdy off by a few hundred
    ulps gave dx ~11× the bound with ``accumulation_eps`` of float32. A
    planted bug still fails under those settings."""
    e32 = T.dtype_eps("float32")
    rng = np.random.default_rng(5)
    cases = [
        (np.zeros((4000, 1), np.float32), np.full((4000, 1), 0.5150754, np.float32)),
        (np.zeros((1296, 1), np.float32), np.full((1296, 1), 1.6952121, np.float32)),
        (
            rng.normal(3.0, 2.0, (300, 2)).astype(np.float32),
            rng.normal(1.0, 1.0, (300, 2)).astype(np.float32),
        ),
    ]
    for x, dy in cases:
        ref = T.reference_forward([x])
        grads = T.reference_backward(ref, [dy])
        bb = T.backward_bounds(ref, grads, [dy], "float32", accumulation_eps=e32)
        T.assert_close_to_reference(
            _naive32_backward(x, dy, 1e-5), grads.dxs[0], bb.dx, axis=1, name="dx"
        )
    x, dy = cases[2]
    dy = dy + 2 * (x - 3)  # dy correlated with x̂: the x̂ term matters
    ref = T.reference_forward([x])
    grads = T.reference_backward(ref, [dy])
    bb = T.backward_bounds(ref, grads, [dy], "float32", accumulation_eps=e32)
    with pytest.raises(AssertionError, match="exceed the bound"):
        T.assert_close_to_reference(
            _naive32_backward(x, dy, 1e-5, bug="dx without the x̂ term"), grads.dxs[0], bb.dx,
            axis=1, name="dx",
        )  # fmt: skip


def test_pytorchs_float32_backward_of_a_constant_channel_passes_the_torch_recipe() -> None:
    """The user trial's repro: F.batch_norm over 1296 zeros with constant dy
    gave dx = 3.2e-3 (true: 0), 1.15× the dx bound with the README's torch
    settings, from torch's float32 Σdy."""
    torch = pytest.importorskip("torch")
    n = 1296
    x = torch.zeros(n, 1, requires_grad=True)
    dy = torch.full((n, 1), 1.6952121)
    y = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = T.reference_forward([x.detach()])
    grads = T.reference_backward(ref, [dy])
    e32 = T.dtype_eps("float32")
    bb = T.backward_bounds(
        ref, grads, [dy], "float32", second_pass=False,
        centering_eps=(ref.count + 1) * e32, accumulation_eps=e32,
    )  # fmt: skip
    T.assert_close_to_reference(dx, grads.dxs[0], bb.dx, axis=1, name="dx")


def _float32_running_update(batch, bug=None):
    """A user's SyncBN whose running statistics are updated in float32
    arithmetic, as PyTorch's float32 buffers are: ``(1 − m)·old + m·new``
    with old, m and the statistics all float32."""
    f32 = np.float32
    nd = batch.shards[0].ndim
    ax = batch.axis % nd
    rows = [np.moveaxis(s.astype(np.float64), ax, -1) for s in batch.shards]
    flat = np.concatenate([r.reshape(-1, batch.channels) for r in rows])
    n = flat.shape[0]
    bessel = 1.0 if bug == "no Bessel" else n / (n - 1)
    m = f32(1 / (batch.num_batches_tracked + 1) if batch.momentum is None else batch.momentum)
    rm, rv = batch.running_mean.astype(f32), batch.running_var.astype(f32)
    new_rm = (f32(1) - m) * rm + m * flat.mean(axis=0).astype(f32)
    new_rv = (f32(1) - m) * rv + m * (flat.var(axis=0) * bessel).astype(f32)
    return new_rm, new_rv


def _check_running_update(batch, bug=None, **bounds) -> None:
    if batch.count < 2 or batch.running_mean is None:
        return
    shards = [s.astype(np.float32) for s in batch.shards]
    rm, rv = (a.astype(np.float32) for a in (batch.running_mean, batch.running_var))
    batch = dataclasses.replace(batch, shards=shards, running_mean=rm, running_var=rv)
    got_rm, got_rv = _float32_running_update(batch, bug)
    ref = T.reference_forward(
        shards, None, None, rm, rv, momentum=batch.momentum, eps=batch.eps, axis=batch.axis,
        num_batches_tracked=batch.num_batches_tracked,
    )  # fmt: skip
    fb = T.forward_bounds(
        ref, "float32", param_dtype="float32", momentum=batch.momentum, second_pass=False,
        num_batches_tracked=batch.num_batches_tracked, **bounds,
    )  # fmt: skip
    T.assert_close_to_reference(got_rm, ref.running_mean, fb.running_mean, name="running_mean")
    T.assert_close_to_reference(got_rv, ref.running_var, fb.running_var, name="running_var")


def test_update_dtype_bounds_a_float32_running_average_in_both_directions() -> None:
    """The running-statistics bounds assume arraysyncbn's update, in float64
    and rounded once: a float32 update (PyTorch's) cancels, e.g. 0.9·(1/3) +
    0.1·(−3) gives 0.0 against 8.9e-9, ~1e6× the default bound.
    ``update_dtype="float32"`` bounds it; a missing Bessel correction still
    fails under it; the default stays as tight as before."""
    x = [np.full((4, 1), -3.0, np.float32), np.full((2, 1), -3.0, np.float32)]
    rm, rv = np.array([0.33333334], np.float32), np.array([1.0], np.float32)
    ref = T.reference_forward(x, running_mean=rm, running_var=rv, momentum=0.1)
    got = rm * np.float32(0.9) + np.float32(0.1) * np.float32(-3.0)
    assert got[0] == 0.0 and ref.running_mean[0] > 8e-9
    default = T.forward_bounds(ref, "float32", momentum=0.1, second_pass=False)
    with pytest.raises(AssertionError, match="exceed the bound"):
        T.assert_close_to_reference(got, ref.running_mean, default.running_mean)
    loose = T.forward_bounds(
        ref, "float32", momentum=0.1, second_pass=False, update_dtype="float32"
    )
    T.assert_close_to_reference(got, ref.running_mean, loose.running_mean)
    np.testing.assert_array_equal(loose.y, default.y)

    def hunt(check):
        @_USER_HUNT
        @given(batch=sharded_batches(dtypes=st.just("float32")))
        def prop(batch) -> None:
            check(batch)

        return prop

    hunt(lambda b: _check_running_update(b, update_dtype="float32"))()
    with pytest.raises(AssertionError, match="exceed the bound"):
        hunt(lambda b: _check_running_update(b, "no Bessel", update_dtype="float32"))()


def test_pytorchs_running_statistics_pass_with_update_dtype() -> None:
    """torch's own float32 update, through F.batch_norm, on the trial's case."""
    torch = pytest.importorskip("torch")
    t = torch.full((6, 1), -3.0)
    trm, trv = torch.tensor([0.33333334]), torch.tensor([1.0])
    ref = T.reference_forward([t], running_mean=trm, running_var=trv, momentum=0.1)
    torch.nn.functional.batch_norm(t, trm, trv, training=True, momentum=0.1)
    fb = T.forward_bounds(
        ref, "float32", param_dtype="float32", momentum=0.1, second_pass=False,
        update_dtype="float32",
    )  # fmt: skip
    T.assert_close_to_reference(trm, ref.running_mean, fb.running_mean, name="running_mean")
    T.assert_close_to_reference(trv, ref.running_var, fb.running_var, name="running_var")


def _torch_half_recipe(dtype: str, count: int) -> dict:
    """The README's settings for PyTorch's CPU batch norm on float16/bfloat16."""
    e32 = T.dtype_eps("float32")
    return {
        "second_pass": False,
        "accumulation_eps": e32,
        "centering_eps": (count + 1) * e32 + T.dtype_eps(dtype),
        "partial_sums": (dtype, 1),
        "flush_to_zero": dtype == "bfloat16",
    }


def _check_torch_half_batch_norm(batch, params: str, bug: bool = False, **recipe) -> None:
    """F.batch_norm on one rank's float16/bfloat16 shard, forward and
    backward, without affine parameters (``params="none"``), with them in the
    input's dtype (``"half"``) or in float32 (``"float32"``). ``bug`` plants
    one: the statistics count the first sample twice."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, batch.dtype)
    x = torch.from_numpy(batch.shards[0].astype(np.float32)).to(dt).requires_grad_(True)
    dy = torch.from_numpy(batch.dys[0].astype(np.float32)).to(dt)
    ax = batch.axis % x.ndim
    w = b = None
    pdtype = None
    if params != "none":
        pt = dt if params == "half" else torch.float32
        ones, zeros = np.ones(batch.channels), np.zeros(batch.channels)
        w, b = (
            torch.from_numpy(np.asarray(a, np.float32)).to(pt).requires_grad_(True)
            for a in (ones if batch.weight is None else batch.weight,
                      zeros if batch.bias is None else batch.bias)
        )  # fmt: skip
        # bfloat16 x with float32 parameters: torch rounds their gradients to bfloat16.
        pdtype = batch.dtype if batch.dtype == "bfloat16" else str(pt).split(".")[1]
    moved = torch.movedim(x, ax, 1)
    rows = moved.shape[0]
    if bug:
        moved = torch.cat([moved, moved[:1]])
    y = torch.nn.functional.batch_norm(moved, None, None, w, b, eps=batch.eps, training=True)
    y = torch.movedim(y[:rows], 1, ax)
    wd = None if w is None else w.detach()
    bd = None if b is None else b.detach()
    ref = T.reference_forward([x.detach()], wd, bd, eps=batch.eps, axis=batch.axis)
    bounds = recipe or _torch_half_recipe(batch.dtype, ref.count)
    fb = T.forward_bounds(ref, batch.dtype, weight=wd, bias=bd, param_dtype=pdtype, **bounds)
    T.assert_close_to_reference(y, ref.ys[0], fb.y, axis=batch.axis, name="y")
    grads_of = [x] if w is None else [x, w, b]
    got = torch.autograd.grad(y, grads_of, dy)
    grads = T.reference_backward(ref, [dy], wd)
    bb = T.backward_bounds(ref, grads, [dy], batch.dtype, weight=wd, param_dtype=pdtype, **bounds)
    T.assert_close_to_reference(got[0], grads.dxs[0], bb.dx, axis=batch.axis, name="dx")
    if w is not None:
        T.assert_close_to_reference(got[1], grads.dweight, bb.dweight, name="dweight")
        T.assert_close_to_reference(got[2], grads.dbias, bb.dbias, name="dbias")


@pytest.mark.parametrize("params", ["none", "half", "float32"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pytorchs_half_batch_norm_passes_the_documented_settings(dtype: str, params: str) -> None:
    """PyTorch's CPU batch norm on float16/bfloat16 rounds the mean to the
    input's dtype before centering, forms the backward's products dy·(x − mean)
    in it (a float16 product below 6e-8 is 0), and on CPUs with AVX512-BF16
    its conversions to bfloat16 flush subnormals: the README's settings
    (:func:`_torch_half_recipe`) describe each, and it passes them."""
    pytest.importorskip("torch")

    @_USER_HUNT
    @given(batch=sharded_batches(ranks=st.just(1), dtypes=st.just(dtype)))
    def prop(batch) -> None:
        if batch.count >= 2:
            _check_torch_half_batch_norm(batch, params)

    prop()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pytorchs_half_mean_needs_the_half_centering_term(dtype: str) -> None:
    """Without ``dtype_eps(<half dtype>)`` in centering_eps (the float32
    recipe alone), torch's half mean, rounded before centering, fails: x =
    [1, 1.01] in bfloat16 gives y = [0, 1.55] against [−0.78, 0.78]; the
    recipe still catches a sample counted twice."""
    pytest.importorskip("torch")
    x = np.array([[1.0], [1.01]])
    if dtype == "float16":
        x = np.array([[1.0], [1.0 + 2**-10]])  # mean 1 + 2**-11: a tie, rounded to 1
    batch = ShardedBatch(
        [x], [np.array([[1.0], [-0.5]])], 1, dtype, None, None, None, None, 0.1, 1e-5
    )
    _check_torch_half_batch_norm(batch, "none")
    e32 = T.dtype_eps("float32")
    float32_recipe = dict(_torch_half_recipe(dtype, 2), centering_eps=3 * e32)
    with pytest.raises(AssertionError, match="exceed the bound"):
        _check_torch_half_batch_norm(batch, "none", **float32_recipe)

    @_USER_HUNT
    @given(batch=sharded_batches(ranks=st.just(1), dtypes=st.just(dtype)))
    def planted(batch) -> None:
        if batch.count >= 2 and batch.shards[0].size:
            _check_torch_half_batch_norm(batch, "half", bug=True)

    with pytest.raises(AssertionError, match="exceed the bound"):
        planted()


@pytest.mark.parametrize("magnitude", [1e160, 1e200, 1e300])
def test_a_variance_beyond_float64_gives_a_right_reference_and_infinite_bounds(magnitude) -> None:
    """Shards ±1e200 have a variance of 1e400, beyond float64: the reference
    squared in place (overflow warning, invstd 0, y = 0 instead of ±1) and
    the bounds were NaN, with "divide by zero" and "invalid value" warnings
    that fail a user's test run under ``-W error``. The reference now scales
    before squaring (var is +inf, honestly; invstd and y are right) and the
    bounds are +inf there, quietly; the ordinary channel keeps its own."""
    x = np.array([[magnitude, 1.0], [-magnitude, 2.0], [magnitude, 4.0], [-magnitude, 3.0]])
    shards = [x[:1], x[1:]]
    dys = [np.ones_like(s) for s in shards]
    ones, zeros = np.ones(2), np.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = T.reference_forward(shards, ones, zeros, zeros, ones, momentum=0.5)
        fb = T.forward_bounds(ref, "float64", param_dtype="float64", momentum=0.5)
        grads = T.reference_backward(ref, dys, ones)
        bb = T.backward_bounds(ref, grads, dys, "float64", weight=ones)
    np.testing.assert_allclose(np.concatenate(ref.ys)[:, 0], [1.0, -1.0, 1.0, -1.0], rtol=1e-15)
    np.testing.assert_allclose(ref.invstd[0], 1 / magnitude, rtol=1e-15)
    assert ref.var[0] == np.inf and ref.running_var[0] == np.inf
    for bound in (fb.y, fb.running_mean, fb.running_var, bb.dx, bb.dweight, bb.dbias):
        assert not np.isnan(bound).any()
    for bound in (fb.y, fb.running_var, bb.dx):
        assert bound[0] == np.inf and 0 < bound[1] < 1e-10


def _draw_one(strategy):
    drawn = []

    @settings(max_examples=1, database=None, deadline=None)
    @given(value=strategy)
    def prop(value) -> None:
        drawn.append(value)

    prop()
    return drawn[0]


def test_sharded_batches_takes_the_obvious_spellings_and_names_what_it_cannot() -> None:
    """``dtypes=st.just(np.float32)``, ``st.just("half")`` or a torch dtype
    raised a bare KeyError, ``ranks=3`` an AttributeError about ``validate``."""
    spellings = [np.float32, np.dtype("float32"), "float32", "f4", "half", np.float16]
    names = ["float32"] * 4 + ["float16"] * 2
    for spelled, name in zip(spellings, names, strict=True):
        assert _draw_one(sharded_batches(dtypes=st.just(spelled))).dtype == name
    assert _draw_one(sharded_batches(dtypes="float64")).dtype == "float64"
    assert len(_draw_one(sharded_batches(ranks=3)).shards) == 3
    with pytest.raises(ValueError, match=r"dtypes strategy drew .*int32.*bfloat16, float16"):
        _draw_one(sharded_batches(dtypes=st.just(np.int32)))
    with pytest.raises(TypeError, match="ranks: expected an int or a hypothesis strategy"):
        _draw_one(sharded_batches(ranks=[1, 2]))
    torch = pytest.importorskip("torch")
    for dt, name in ((torch.float32, "float32"), (torch.half, "float16"),
                     (torch.bfloat16, "bfloat16")):  # fmt: skip
        assert _draw_one(sharded_batches(dtypes=st.just(dt))).dtype == name


def test_sharded_batches_names_a_size_limit_that_draws_nothing() -> None:
    """max_ndim=1 or max_channels=0 raised hypothesis' InvalidArgument about
    ``max_value=1 < min_value=2``, naming neither argument; max_side=0 did
    so only on the draws that split one batch."""
    cases = [
        ({"max_ndim": 1}, ValueError, r"max_ndim must be at least 2 \(inputs are \(N, C, "),
        ({"max_channels": 0}, ValueError, "max_channels must be at least 1, got 0"),
        ({"max_side": 0}, ValueError, "max_side must be at least 1"),
        ({"min_count": -1}, ValueError, "min_count must be 0 or more, got -1"),
        ({"max_side": 2.5}, TypeError, "max_side must be an int, got 2.5"),
        ({"max_channels": True}, TypeError, "max_channels must be an int"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            _draw_one(sharded_batches(**kwargs))
    batch = _draw_one(sharded_batches(max_ndim=2, max_channels=1, max_side=1, min_count=0))
    assert batch.channels == 1 and batch.shards[0].ndim == 2


def test_min_count_zero_draws_empty_batches_and_single_elements_as_documented() -> None:
    """The docstring said min_count=0 allows all shards empty; it also draws
    a global count of 1 (the N = 1 error case), and min_count=1 never 0."""
    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    quick = settings(database=None, max_examples=2000)
    for count in (0, 1):
        assert find(sharded_batches(min_count=0), lambda b, c=count: b.count == c, settings=quick)
    assert find(sharded_batches(min_count=1), lambda b: b.count == 1, settings=quick)
    with pytest.raises(NoSuchExample):
        find(sharded_batches(min_count=1), lambda b: b.count == 0, settings=quick)
