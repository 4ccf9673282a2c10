"""Call signatures: every SyncBN collective carries which layer, which of its
batch-statistics calls and which pass it belongs to, in its own buffer, so
ranks in different calls raise ``CollectiveMismatchError`` on every rank,
naming the calls, instead of mixing statistics (under MPI: ``test_mpi.py``)."""

from __future__ import annotations

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn import functional
from arraysyncbn.comm.calls import (
    CODE_BITS,
    CallLabel,
    signature_mismatch,
    signature_values,
)
from arraysyncbn.testing import assert_close_to_reference, reference_forward, to_numpy

from comms import CountingComm


def _shards(backend, seed: int, channels: int = 3):
    rng = np.random.default_rng(seed)
    dtype = "float32" if "float32" in backend.dtypes else backend.dtypes[-1]
    return [backend.asarray(rng.normal(1.0, 2.0, (4, channels)), dtype) for _ in range(2)]


def _mismatch_on_every_rank(fn, *expected: tuple[str, ...]) -> list[str]:
    """Run ``fn`` on 2 thread ranks; every rank must raise CollectiveMismatchError
    whose message holds each string of ``expected[rank]``."""
    results = sbn.run_ranks(fn, sbn.thread_group(2, timeout=30), return_exceptions=True)
    messages = []
    for rank, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert isinstance(result, sbn.CollectiveMismatchError), (rank, result)
        message = str(result)
        for text in want:
            assert text in message, (rank, text, message)
        messages.append(message)
    return messages


def test_swapped_layers_raise_on_every_rank_naming_the_calls(backend) -> None:
    """Step 2: rank 1 calls layer B before layer A (same shapes: without the
    signature their statistics would silently be mixed)."""
    xs = _shards(backend, 1)

    def rank(comm):
        a, b = sbn.SyncBatchNorm(3, comm=comm), sbn.SyncBatchNorm(3, comm=comm)
        a(xs[comm.rank]), b(xs[comm.rank])  # step 1: numbers A = 1, B = 2 on both
        order = (a, b) if comm.rank == 0 else (b, a)
        for layer in order:
            layer(xs[comm.rank])
        return "finished"

    _mismatch_on_every_rank(
        rank,
        ("rank 0 is in SyncBatchNorm layer 1, call 2, forward",
         "the other rank is in SyncBatchNorm layer 2, call 2, forward"),
        ("rank 1 is in SyncBatchNorm layer 2, call 2, forward",
         "the other rank is in SyncBatchNorm layer 1, call 2, forward"),
    )  # fmt: skip


def test_a_skipped_backward_raises_on_every_rank(backend) -> None:
    xs = _shards(backend, 2)

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, comm=comm)
        y = bn(xs[comm.rank])
        if comm.rank == 0:
            bn.backward(y)  # rank 1 skips it and goes on to the next forward
        bn(xs[comm.rank])
        return "finished"

    _mismatch_on_every_rank(
        rank,
        ("rank 0 is in SyncBatchNorm layer 1, call 1, backward",
         "the other rank is in SyncBatchNorm layer 1, call 2, forward"),
        ("rank 1 is in SyncBatchNorm layer 1, call 2, forward",
         "the other rank is in SyncBatchNorm layer 1, call 1, backward"),
    )  # fmt: skip


def test_a_rank_one_step_behind_raises_on_every_rank(backend) -> None:
    """Rank 1 differentiates the previous step's forward (functional API:
    it kept the wrong ``saved``): same pass, call numbers one apart."""
    xs = _shards(backend, 3)

    def rank(comm):
        saved = []
        for _ in range(2):
            *_, s = sbn.sync_batch_norm_forward(xs[comm.rank], None, None, None, None, comm=comm)
            saved.append(s)
        sbn.sync_batch_norm_backward(xs[comm.rank], saved[-1 - comm.rank])
        return "finished"

    _mismatch_on_every_rank(
        rank,
        ("rank 0 is in SyncBN call 2, backward", "the other rank is in SyncBN call 1, backward"),
        ("rank 1 is in SyncBN call 1, backward", "the other rank is in SyncBN call 2, backward"),
    )


def test_a_rank_one_step_ahead_in_its_forwards_raises(backend) -> None:
    """Rank 1 runs one training forward more (no backward) before the step."""
    xs = _shards(backend, 4)

    def rank(comm):
        bn = sbn.SyncBatchNorm(3, comm=comm)
        if comm.rank == 1:
            bn(xs[1])  # meets rank 0's first forward: same call number 1
        bn.backward(bn(xs[comm.rank]))
        return "finished"

    _mismatch_on_every_rank(
        rank,
        ("rank 0 is in SyncBatchNorm layer 1, call 1, backward",),
        ("rank 1 is in SyncBatchNorm layer 1, call 2, forward",),
    )


def test_the_check_collective_carries_the_signature(backend, monkeypatch) -> None:
    """With ARRAYSYNCBN_CHECK=1 every call checks first: swapped layers meet
    in the check (op max), which must name the calls too."""
    monkeypatch.setenv("ARRAYSYNCBN_CHECK", "1")
    xs = _shards(backend, 5)

    def rank(comm):
        a, b = sbn.SyncBatchNorm(3, comm=comm), sbn.SyncBatchNorm(3, comm=comm)
        a(xs[comm.rank]), b(xs[comm.rank])
        for layer in (a, b) if comm.rank == 0 else (b, a):
            layer(xs[comm.rank])
        return "finished"

    _mismatch_on_every_rank(
        rank,
        ("rank 0 is in SyncBatchNorm layer 1, call 2, check",
         "another rank is in SyncBatchNorm layer 2, call 2, check"),
        ("rank 1 is in SyncBatchNorm layer 2, call 2, check",
         "another rank is in SyncBatchNorm layer 1, call 2, check"),
    )  # fmt: skip


def test_eval_on_one_rank_and_an_eval_copy_keep_the_ranks_in_step(backend) -> None:
    """Rank 0 alone builds an evaluation copy and runs it, and runs the real
    layer in eval mode between steps: neither communicates, so neither
    shifts a layer or call number; the steps still match the reference."""
    xs = _shards(backend, 6)
    counting = [CountingComm(c) for c in sbn.thread_group(2, timeout=30)]

    def rank(comm):
        comm = counting[comm.rank]
        if comm.rank == 0:
            copy = sbn.SyncBatchNorm(3, comm=comm).eval()  # built on rank 0 only
            copy(xs[0])
        bn = sbn.SyncBatchNorm(3, comm=comm)
        ys = []
        for _ in range(3):
            y = bn(xs[comm.rank])
            bn.backward(y)
            if comm.rank == 0:
                bn.eval()
                bn(xs[0])
                bn.train()
            ys.append(y)
        return ys

    results = sbn.run_ranks(rank, [c.inner for c in counting])
    assert len(counting[0].calls) == len(counting[1].calls)
    ref = reference_forward([to_numpy(x) for x in xs], axis=1)
    for r, ys in enumerate(results):
        for y in ys:
            tol = 1e-5 if to_numpy(y).dtype == np.float32 else 1e-3
            assert_close_to_reference(y, ref.ys[r], tol)


def test_without_the_signature_check_swapped_layers_pass_silently(monkeypatch) -> None:
    """The planted bug: with the verdict disabled, the swapped layers run to
    the end with mixed statistics, so the tests above can fail."""
    monkeypatch.setattr(functional, "signature_mismatch", lambda *a, **k: None)
    xs = [np.random.default_rng(7).normal(size=(4, 3)) for _ in range(2)]

    def rank(comm):
        a, b = sbn.SyncBatchNorm(3, comm=comm), sbn.SyncBatchNorm(3, comm=comm)
        a(xs[comm.rank]), b(xs[comm.rank])
        for layer in (a, b) if comm.rank == 0 else (b, a):
            layer(xs[comm.rank])
        return "finished"

    assert sbn.run_ranks(rank, sbn.thread_group(2, timeout=30)) == ["finished"] * 2


@pytest.mark.parametrize("exact_bits", [53, 24])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_the_verdict_is_exact_for_float64_and_float32_buffers(exact_bits, size) -> None:
    """Sums of every rank's values, as float64 or float32 would hold them:
    agreement iff all codes are equal, codes up to 2**20 − 1."""
    dtype = np.float64 if exact_bits == 53 else np.float32
    rng = np.random.default_rng(size)
    labels = [CallLabel("forward", int(c), layer=int(v)) for c, v in rng.integers(1, 5000, (4, 2))]
    labels.append(CallLabel("recenter", 4096, layer=63))  # the largest code
    assert max(lab.code for lab in labels) == (1 << CODE_BITS) - 1
    for label in labels:
        for odd in [None, *labels]:
            mine = [label] * size
            if odd is not None and size > 1:
                mine[-1] = odd
            parts = [
                np.asarray(signature_values(lab, "sum", exact_bits, size), dtype) for lab in mine
            ]
            total = np.sum(parts, axis=0, dtype=dtype)
            assert np.array_equal(total, np.sum(np.asarray(parts, np.float64), axis=0)), "inexact"
            verdicts = [
                signature_mismatch(lab, "sum", total.tolist(), exact_bits, size, r)
                for r, lab in enumerate(mine)
            ]
            same = all(lab.code == label.code for lab in mine)
            assert all((v is None) == same for v in verdicts), (label, odd, verdicts)
