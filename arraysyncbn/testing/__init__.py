"""Tools to test any SyncBN implementation against a float64 reference.

* :func:`reference_forward`, :func:`reference_backward`: independent float64
  numpy code over the list of every rank's shard.
* :func:`forward_bounds`, :func:`backward_bounds`: documented per-channel
  error bounds (formulas of dtype epsilon, max|x̂|, mean/std and reduction
  length; see :mod:`arraysyncbn.testing.assertions`); :func:`channel_bound`
  shapes one to broadcast along the channel axis; :data:`HALF_PARTIAL_SUMS`
  describes arraysyncbn's float32 partial sums on float16 and bfloat16 input
  (the bounds' default ``partial_sums`` for those dtypes).
* :func:`assert_close_to_reference`, :func:`assert_like`: assertions that
  check values (NaN never passes, not even against NaN), namespace, device,
  shape and dtype.
* :mod:`arraysyncbn.testing.strategies`: hypothesis strategies
  (:func:`~arraysyncbn.testing.strategies.sharded_batches`, ``splits``); needs
  hypothesis installed (the ``test`` extra).

Example, testing arraysyncbn itself with two thread ranks::

    from hypothesis import given, settings
    from arraysyncbn import SyncBatchNorm, thread_group, run_ranks
    from arraysyncbn.testing import (reference_forward, forward_bounds,
                                     assert_close_to_reference)
    from arraysyncbn.testing.strategies import sharded_batches

    # No deadline: a process's first call loads the compiled kernels
    # (~0.3 s), past hypothesis's default 200 ms.
    @settings(deadline=None)
    @given(sharded_batches())
    def test_forward(batch):
        comms = thread_group(len(batch.shards))
        def rank(comm):
            bn = SyncBatchNorm(batch.channels, axis=batch.axis, comm=comm)
            return bn(batch.shards[comm.rank])
        ys = run_ranks(rank, comms)
        ref = reference_forward(batch.shards, axis=batch.axis)
        bound = forward_bounds(ref, batch.dtype)
        for y, want in zip(ys, ref.ys):
            assert_close_to_reference(y, want, bound.y, axis=batch.axis)
"""

from .assertions import (
    HALF_PARTIAL_SUMS,
    BackwardBounds,
    ForwardBounds,
    assert_close_to_reference,
    assert_like,
    backward_bounds,
    channel_bound,
    dtype_eps,
    flushes_subnormals,
    forward_bounds,
    second_pass_tolerance,
)
from .reference import (
    ReferenceBackward,
    ReferenceForward,
    reference_backward,
    reference_forward,
    to_numpy,
)

__all__ = [
    "HALF_PARTIAL_SUMS",
    "BackwardBounds",
    "ForwardBounds",
    "ReferenceBackward",
    "ReferenceForward",
    "assert_close_to_reference",
    "assert_like",
    "backward_bounds",
    "channel_bound",
    "dtype_eps",
    "flushes_subnormals",
    "forward_bounds",
    "reference_backward",
    "reference_forward",
    "second_pass_tolerance",
    "to_numpy",
]
