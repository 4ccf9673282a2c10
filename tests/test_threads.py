"""thread_group: bitwise-identical sums, mismatch detection, no hangs."""

from __future__ import annotations

import time

import numpy as np
import pytest

import arraysyncbn as sbn


def test_sum_and_max_are_bitwise_identical_on_every_rank() -> None:
    rng = np.random.default_rng(0)
    data = [rng.normal(size=17) * 10.0**r for r in range(4)]
    comms = sbn.thread_group(4)

    def rank(comm):
        return comm.allreduce(data[comm.rank]), comm.allreduce(data[comm.rank], "max")

    results = sbn.run_ranks(rank, comms)
    want = ((data[0] + data[1]) + data[2]) + data[3]
    for s, m in results:
        assert np.array_equal(s, want)
        assert np.array_equal(m, np.max(np.stack(data), axis=0))


def test_reduction_does_not_modify_inputs() -> None:
    bufs = [np.ones(3), np.full(3, 2.0)]
    sbn.run_ranks(lambda c: c.allreduce(bufs[c.rank]), sbn.thread_group(2))
    assert np.array_equal(bufs[0], np.ones(3)) and np.array_equal(bufs[1], np.full(3, 2.0))


def test_mismatched_buffers_raise_on_every_rank() -> None:
    bufs = [np.ones(3), np.ones(4)]
    results = sbn.run_ranks(
        lambda c: c.allreduce(bufs[c.rank]), sbn.thread_group(2), return_exceptions=True
    )
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError)
        assert "different buffers" in str(res)


def test_a_missing_rank_times_out_instead_of_hanging() -> None:
    comms = sbn.thread_group(2, timeout=0.5)

    def rank(comm):
        if comm.rank == 1:
            return "skipped the collective"
        return comm.allreduce(np.ones(2))

    start = time.monotonic()
    results = sbn.run_ranks(rank, comms, return_exceptions=True)
    assert time.monotonic() - start < 5
    assert isinstance(results[0], sbn.CommunicatorAbortedError)
    assert "timed out" in str(results[0])


def test_a_raising_rank_aborts_the_others_quickly_and_is_reported() -> None:
    comms = sbn.thread_group(3, timeout=60)

    def rank(comm):
        if comm.rank == 2:
            raise KeyError("boom on rank 2")
        return comm.allreduce(np.ones(2))

    start = time.monotonic()
    with pytest.raises(KeyError, match="boom on rank 2") as info:
        sbn.run_ranks(rank, comms)
    assert time.monotonic() - start < 5
    if hasattr(info.value, "add_note"):  # Python >= 3.11
        assert any("rank 2 of 3" in note for note in info.value.__notes__)


def test_consistency_check_names_the_disagreement_on_every_rank() -> None:
    xs = [np.ones((2, 3), dtype=np.float32), np.ones((2, 4), dtype=np.float32)]

    def rank(comm):
        bn = sbn.SyncBatchNorm(xs[comm.rank].shape[1], comm=comm)
        return bn(xs[comm.rank])

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert "channel count differs (values seen include 3 and 4)" in str(res)


def test_consistency_check_catches_dtype_disagreement() -> None:
    xs = [np.ones((2, 3), dtype=np.float32), np.ones((2, 3), dtype=np.float64)]

    def rank(comm):
        return sbn.SyncBatchNorm(3, comm=comm)(xs[comm.rank])

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert "dtype differs (values seen include float32 and float64)" in str(res)


def test_thread_group_validates_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        sbn.thread_group(0)
    with pytest.raises(ValueError, match="timeout"):
        sbn.thread_group(2, timeout=-1)
    with pytest.raises(ValueError, match="unknown reduction op"):
        sbn.thread_group(1)[0].allreduce(np.ones(1), "min")


def test_consistency_check_catches_axis_disagreement() -> None:
    """Same shape, same channel count, but one rank normalizes axis 1, the other -1."""
    x = np.ones((2, 3, 3), dtype=np.float32) * np.arange(3, dtype=np.float32)

    def rank(comm):
        return sbn.SyncBatchNorm(3, axis=1 if comm.rank == 0 else -1, comm=comm)(x)

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert "channel axis differs (values seen include 1 and 2)" in str(res)
