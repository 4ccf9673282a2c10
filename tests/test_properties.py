"""Property tests: K = 1..4 thread ranks against the single-rank float64 reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from arraysyncbn.testing.strategies import sharded_batches

from harness import check_functional


@given(data=st.data())
def test_training_forward_backward_match_reference(backend, data) -> None:
    batch = data.draw(sharded_batches(dtypes=st.sampled_from(backend.dtypes)), label="batch")
    check_functional(backend, batch, training=True)


@given(data=st.data())
def test_eval_forward_backward_match_reference(backend, data) -> None:
    batch = data.draw(sharded_batches(dtypes=st.sampled_from(backend.dtypes)), label="batch")
    check_functional(backend, batch, training=False)
