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
