"""Property tests: K = 1..4 thread ranks against the single-rank float64 reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import arraysyncbn as sbn
from arraysyncbn.testing import assert_like, to_numpy
from arraysyncbn.testing.strategies import sharded_batches

from harness import check_functional, convert


@given(data=st.data())
def test_training_forward_backward_match_reference(backend, data) -> None:
    batch = data.draw(sharded_batches(dtypes=st.sampled_from(backend.dtypes)), label="batch")
    check_functional(backend, batch, training=True)


@given(data=st.data())
def test_eval_forward_backward_match_reference(backend, data) -> None:
    batch = data.draw(sharded_batches(dtypes=st.sampled_from(backend.dtypes)), label="batch")
    check_functional(backend, batch, training=False)


@given(data=st.data())
def test_inference_is_the_eval_forward_bit_for_bit(backend, data) -> None:
    """batch_norm_inference gives the eval forward's y, whose closeness to the
    float64 reference the property above checks: the same bits, whatever
    the route (numpy's lean host path, the delegated ones)."""
    batch = data.draw(
        sharded_batches(ranks=st.just(1), dtypes=st.sampled_from(backend.dtypes)), label="batch"
    )
    c = convert(backend, batch)
    args = (c.xs[0], c.weight, c.bias, c.running_mean, c.running_var)
    if c.running_mean is None:
        with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
            sbn.batch_norm_inference(*args, eps=batch.eps, axis=batch.axis)
        return
    want = sbn.sync_batch_norm_forward(
        *args, training=False, eps=batch.eps, axis=batch.axis, momentum=batch.momentum
    )[0]
    got = sbn.batch_norm_inference(*args, eps=batch.eps, axis=batch.axis)
    assert_like(got, c.xs[0], name="y")
    assert to_numpy(got).tobytes() == to_numpy(want).tobytes()
