"""arraysyncbn.testing itself: the documented example runs, and the reference
agrees with an independent formulation."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest

import arraysyncbn.testing as T
from arraysyncbn import PrecisionWarning


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
