"""thread_group: bitwise-identical sums, mismatch detection, no hangs."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import assert_close_to_reference, forward_bounds, reference_forward


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


@pytest.mark.parametrize("dtypes", [(">f8", "<f8"), ("<f2", ">f2")])
def test_consistency_check_takes_byte_order_for_storage(dtypes) -> None:
    """A byte-swapped dtype on one rank and the native one on another hold the
    same numbers and are computed alike (kernels.work_dtype): the check
    passes, and each rank's y, in its own dtype, is the float64 reference's
    (before: "dtype differs (values seen include float64 and other)")."""
    full = np.random.default_rng(4).normal(3.0, 2.0, (10, 3))
    shards = [full[:4].astype(dtypes[0]), full[4:].astype(dtypes[1])]

    def rank(comm):
        x = shards[comm.rank]
        return sbn.sync_batch_norm_forward(x, None, None, None, None, comm=comm, check=True)[0]

    ys = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10))
    name = np.dtype(dtypes[0]).newbyteorder("=").name
    ref = reference_forward(shards)
    fb = forward_bounds(ref, name)
    for r, y in enumerate(ys):
        assert y.dtype == np.dtype(dtypes[r])
        assert_close_to_reference(y, ref.ys[r], fb.y, axis=1, name=f"y on rank {r}")


def test_consistency_check_tells_dtypes_without_a_code_apart() -> None:
    """Byte-swapped float32 on one rank, numpy's long double on the other:
    both were "other" (one code), so the check passed, and the ranks, whose
    work dtypes differ, could then take different numbers of statistics
    passes (a hang). Now a mismatch on every rank, naming both."""
    xs = [np.ones((4, 3), dtype=">f4"), np.ones((4, 3), dtype=np.longdouble)]

    def rank(comm):
        return sbn.sync_batch_norm_forward(
            xs[comm.rank], None, None, None, None, comm=comm, check=True
        )

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    long_double = np.dtype(np.longdouble).name
    for r, res in enumerate(results):
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert f"dtype differs (values seen include float32 and {long_double})" in str(res)
        assert ("dtype float32 (>f4)," if r == 0 else f"dtype {long_double},") in str(res)


def test_consistency_check_tells_unnamed_torch_dtypes_apart() -> None:
    """Two float8 formats (torch accepts them as real floating) had one code
    and passed the check; each rank now names its own and says it cannot
    name the other's."""
    torch = pytest.importorskip("torch")
    kinds = ("float8_e4m3fn", "float8_e5m2")
    if not all(hasattr(torch, k) for k in kinds):
        pytest.skip("this torch has no float8 dtypes")
    xs = [torch.ones(4, 3).to(getattr(torch, k)) for k in kinds]

    def rank(comm):
        return sbn.sync_batch_norm_forward(
            xs[comm.rank], None, None, None, None, comm=comm, check=True
        )

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for own, res in zip(kinds, results, strict=True):
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert "dtype differs" in str(res) and f"dtype {own}," in str(res)
        assert own in str(res).split("dtype differs")[1]
        assert "a dtype this rank cannot name" in str(res)


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


# -- the first-forward check also compares the layer's configuration (issue 7, item 9) --
@pytest.mark.parametrize(
    ("configs", "message"),
    [
        (
            [{"momentum": 0.1}, {"momentum": 0.2}],
            "momentum differs (values seen include 0.1 and 0.2)",
        ),
        (
            [{"momentum": None}, {"momentum": 0.1}],
            "momentum differs (values seen include None and 0.1)",
        ),
        ([{"eps": 1e-5}, {"eps": 1e-3}], "eps differs (values seen include 1e-05 and 0.001)"),
        ([{"eps": 1e-5}, {"eps": 1e-5 * (1 + 2**-50)}], "eps differs"),  # 4 ulps apart
        (
            [{"affine": True}, {"affine": False}],
            "affine differs (values seen include False and True)",
        ),
        (
            [{"track_running_stats": False}, {"track_running_stats": True}],
            "track_running_stats differs (values seen include False and True)",
        ),
    ],
)
def test_consistency_check_compares_the_layer_configuration(configs, message) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    k = 3  # the last rank differs

    def rank(comm):
        config = configs[1] if comm.rank == k - 1 else configs[0]
        return sbn.SyncBatchNorm(3, comm=comm, **config)(x)

    results = sbn.run_ranks(rank, sbn.thread_group(k, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert message in str(res), str(res)


def test_consistency_check_compares_eps_bit_for_bit_in_a_float32_buffer() -> None:
    """On a device without float64 the check buffer is float32, where 1e-5 and
    1e-5·(1 + 2⁻⁴⁰) round alike; the check compares the float64 bits."""
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("no_float64")
    x = strict.reshape(strict.arange(12, dtype=strict.float32, device=dev), (4, 3))
    eps = [1e-5, 1e-5 * (1 + 2**-40)]
    assert np.float32(eps[0]) == np.float32(eps[1])

    def rank(comm):
        return sbn.sync_batch_norm_forward(x, None, None, None, None, eps=eps[comm.rank],
                                           comm=comm, check=True)  # fmt: skip

    results = sbn.run_ranks(rank, sbn.thread_group(2, timeout=10), return_exceptions=True)
    for res in results:
        assert isinstance(res, sbn.CollectiveMismatchError), res
        assert "eps differs" in str(res)


def test_consistency_check_passes_when_the_configuration_agrees() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, eps=1e-3, momentum=None, affine=False, comm=comm)
        bn(x)
        return bn.num_batches_tracked

    assert sbn.run_ranks(rank, sbn.thread_group(3, timeout=10)) == [1, 1, 1]


def test_buffers_of_different_libraries_or_devices_are_a_mismatch_on_every_rank() -> None:
    """A rank on another array-api-strict device (or library) used to surface
    as array-api-strict's 'Arrays from two different devices can not be
    combined' ValueError, after a UserWarning comparing dtypes of two libraries."""
    xs = pytest.importorskip("array_api_strict")
    other = {
        "device": lambda: xs.asarray([1.0], device=xs.Device("device1")),
        "library": lambda: np.asarray([1.0]),
    }
    for what, make in other.items():
        comms = sbn.thread_group(2, timeout=30)

        def rank(comm, make=make):
            return comm.allreduce(xs.asarray([1.0]) if comm.rank == 0 else make())

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            errors = sbn.run_ranks(rank, comms, return_exceptions=True)
        for e in errors:
            assert isinstance(e, sbn.CollectiveMismatchError), (what, e)
            assert f"different {what}" in str(e)


def test_consistency_check_compares_merge_centers_among_the_ranks_that_pass_one() -> None:
    """Centers that differ between ranks merge the statistics in different
    frames (a silently wrong mean); the check names them. A rank passing no
    center is fine (the statistics pass merges around zero then), and so are
    centers that are the same bits."""
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    center = np.asarray([1.0, 2.0, 3.0], dtype=np.float32)
    nudged = np.nextafter(center, np.float32(np.inf))
    expected = sbn.sync_batch_norm_forward(x, None, None, None, None)[0]
    cases = {
        "differ": [center, nudged, center],
        "one without": [None, center, center],
        "same": [center, center.copy(), center],
        "none": [None, None, None],
    }
    for what, centers in cases.items():

        def rank(comm, centers=centers):
            shard = x[comm.rank * 3 : (comm.rank + 1) * 3]
            return sbn.sync_batch_norm_forward(
                shard, None, None, None, None, comm=comm, check=True, center=centers[comm.rank]
            )[0]

        results = sbn.run_ranks(rank, sbn.thread_group(3, timeout=10), return_exceptions=True)
        if what == "differ":
            for res in results:
                assert isinstance(res, sbn.CollectiveMismatchError), res
                assert "merge center (must be the same bits" in str(res), str(res)
        else:
            got = np.concatenate(results)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=what)
