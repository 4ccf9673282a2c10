"""Deterministic SyncBN cases on real MPI ranks: ``python -m mpi4py cases.py CASE [ARG]``.

Each case asserts on every rank and prints one ``OK`` line per rank
(:func:`mpitools.say_ok`); a failed assertion or any exception aborts the
job through ``python -m mpi4py``, so the pytest side sees a non-zero exit.

Cases
-----
shards              uneven, empty and differently sized shards vs the reference
pytorch             PyTorch's distributed running-statistics test, 100 steps
subgroups           SyncBN over ``COMM_WORLD.Split(rank // 2)``
mismatch WHAT       the last rank differs in ``channels`` or ``dtype``
mismatch_later      a later call differs in dtype under ARRAYSYNCBN_CHECK=1
raise               the last rank raises between forward and backward
raise_cli           the same, in a plain ``python`` run under ``cli.run_aborting``
skip PASS           the last rank skips step 3's ``forward`` (it is in eval mode)
                    or ``backward`` and stays away: the others must abort the job
                    when ARRAYSYNCBN_TIMEOUT expires
exact               a first step 1e8 standard deviations from zero is exact (a
                    second statistics allreduce on every rank, one in the steady
                    state); a NaN on the last rank warns on every rank, keeps the
                    running statistics of its channel, and the next batch is right
signature WHAT      ranks in different calls (``swapped`` layers, a ``skipped``
                    backward, one rank ``ahead`` by a forward) raise on every rank,
                    naming the call each was in; ``eval_alone``: one rank's eval
                    forwards and evaluation copy do not desynchronize the others
straggler           the last rank is 0.3 s late to every call: waits longer than a
                    spin, shorter than the timeout, must complete normally
transfer EXPECTED   ``cuda_aware`` is EXPECTED (0, 1 or auto: detected), CUDA
                    memory would take the matching path, and host and staged
                    arrays give the reference results either way
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from fake_arrays import FakeCudaArray
from mpitools import WORLD, check_on_mpi, say, say_ok

import arraysyncbn as sbn
from arraysyncbn.comm.mpi import cuda_aware_from_info, transfer_path
from arraysyncbn.testing import (
    assert_close_to_reference,
    forward_bounds,
    reference_forward,
    to_numpy,
)
from arraysyncbn.testing.strategies import ShardedBatch


def _batch(shapes: list[tuple[int, ...]], axis: int, seed: int, **kw) -> ShardedBatch:
    """A fixed problem with one shard per shape (all ranks build the same)."""
    rng = np.random.default_rng(seed)
    channels = shapes[0][axis]
    view = [1] * len(shapes[0])
    view[axis] = channels
    loc = rng.uniform(-50, 50, channels).reshape(view)
    shards = [loc + rng.standard_normal(s) for s in shapes]
    dys = [rng.standard_normal(s) for s in shapes]
    params = {
        "weight": rng.uniform(0.5, 2, channels),
        "bias": rng.uniform(-1, 1, channels),
        "running_mean": rng.uniform(-1, 1, channels),
        "running_var": rng.uniform(0.5, 2, channels),
        "momentum": 0.1,
        "eps": 1e-5,
        "dtype": "float32",
        **kw,
    }
    dtype = params.pop("dtype")
    shards = [s.astype(dtype) for s in shards]
    dys = [d.astype(dtype) for d in dys]
    return ShardedBatch(shards, dys, axis, dtype, **params)


def case_shards(comm: sbn.MPICommunicator) -> None:
    from backends import BACKENDS

    numpy_backend = next(b for b in BACKENDS if b.name == "numpy")
    k = comm.size
    # Split along the batch: uneven sizes, every odd rank empty.
    split = [(0 if r % 2 else 3 + r, 4, 5) for r in range(k)]
    # Every non-channel size differs per rank (channels-last), one rank empty.
    ragged = [(r + 1, 2 + r, 0 if r == 2 else 3, 3) for r in range(k)]
    # All shards empty: no statistics, running statistics untouched.
    empty = [(0, 4, 2) for _ in range(k)]
    for shapes, axis, dtype in (
        (split, 1, "float32"),
        (split, 1, "float64"),
        (ragged, -1, "float32"),
        (empty, 1, "float64"),
    ):
        for training in (True, False):
            batch = _batch(shapes, axis, seed=7, dtype=dtype)
            check_on_mpi(comm, numpy_backend, batch, training=training)
    say_ok("shards")


def case_pytorch(comm: sbn.MPICommunicator) -> None:
    """PyTorch's test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value."""
    k, rank = comm.size, comm.rank

    def shard(i: int) -> np.ndarray:
        x = np.ones((2, 2, 2 ** (i + 1)), dtype=np.float32)
        x[:, 0] *= np.float32(0.1 ** (i - 1))
        x[:, 1] *= np.float32(0.3 ** (i - 1))
        return x

    every = np.concatenate([shard(i).transpose(1, 0, 2).reshape(2, -1) for i in range(k)], axis=1)
    bn = sbn.SyncBatchNorm(2, momentum=0.99, comm=comm)
    x = shard(rank)
    for _ in range(100):
        y = bn(x)
        bn.backward(np.full_like(y, 1.0 / y.size))  # y.mean().backward()
    rm, rv = to_numpy(bn.running_mean), to_numpy(bn.running_var)
    # torch.testing.assert_close's float32 tolerances, as in PyTorch's test.
    np.testing.assert_allclose(rm, every.mean(axis=1), rtol=1.3e-6, atol=1e-5)
    np.testing.assert_allclose(rv, every.var(axis=1, ddof=1), rtol=1.3e-6, atol=1e-5)
    assert bn.num_batches_tracked == 100
    states = comm.comm.allgather((rm.tobytes(), rv.tobytes()))
    assert all(s == states[0] for s in states), "running statistics differ between ranks"
    say_ok("pytorch")


def case_subgroups(comm: sbn.MPICommunicator) -> None:
    world_rank = comm.rank
    color = world_rank // 2
    group = sbn.MPICommunicator(comm.comm.Split(color, key=world_rank))
    members = [r for r in range(comm.size) if r // 2 == color]
    assert group.size == len(members) and group.rank == members.index(world_rank)
    shards = [
        (3.0 * (r // 2) + np.random.default_rng(r).standard_normal((3 + r, 2, 4))).astype(
            np.float64
        )
        for r in range(comm.size)
    ]
    bn = sbn.SyncBatchNorm(2, comm=group)
    y = bn(shards[world_rank])
    ref = reference_forward([shards[r] for r in members], running_mean=np.zeros(2),
                            running_var=np.ones(2))  # fmt: skip
    bound = forward_bounds(ref, "float64", param_dtype="float64")
    assert_close_to_reference(y, ref.ys[members.index(world_rank)], bound.y, name="y", axis=1)
    assert_close_to_reference(bn.running_mean, ref.running_mean, bound.running_mean,
                              name="running_mean")  # fmt: skip
    if comm.size > 2:  # the groups really are independent of each other
        whole = reference_forward(shards, running_mean=np.zeros(2), running_var=np.ones(2))
        assert not np.allclose(to_numpy(bn.running_mean), whole.running_mean)
    group.comm.Free()
    say_ok("subgroups")


def _expect_mismatch(comm: sbn.MPICommunicator, bn: sbn.SyncBatchNorm, x, *names: str) -> None:
    try:
        bn(x)
    except sbn.CollectiveMismatchError as exc:
        message = str(exc)
        assert all(n in message for n in names), message
        say(f"mismatch seen: {message}")
    else:
        raise AssertionError(f"rank {comm.rank}: no CollectiveMismatchError")


def case_mismatch(comm: sbn.MPICommunicator, what: str) -> None:
    odd = comm.rank == comm.size - 1
    channels = 4 if odd and what == "channels" else 3
    dtype = np.float64 if odd and what == "dtype" else np.float32
    x = np.random.default_rng(comm.rank).standard_normal((5, channels, 2)).astype(dtype)
    names = ("channel count", "3", "4") if what == "channels" else ("dtype", "float32", "float64")
    _expect_mismatch(comm, sbn.SyncBatchNorm(channels, comm=comm), x, *names)
    say_ok(f"mismatch[{what}]")


def case_mismatch_later(comm: sbn.MPICommunicator) -> None:
    assert os.environ.get("ARRAYSYNCBN_CHECK") == "1"
    bn = sbn.SyncBatchNorm(3, comm=comm, dtype="float64")
    x = np.random.default_rng(comm.rank).standard_normal((5, 3, 2))
    bn(x)  # consistent first call
    odd = comm.rank == comm.size - 1
    _expect_mismatch(comm, bn, x.astype(np.float32) if odd else x, "dtype")
    say_ok("mismatch_later")


class _Counting:
    """The communicator, counting its allreduces."""

    def __init__(self, inner: sbn.MPICommunicator) -> None:
        self.inner, self.rank, self.size, self.calls = inner, inner.rank, inner.size, 0

    def allreduce(self, buf, op="sum"):
        self.calls += 1
        return self.inner.allreduce(buf, op)


def case_exact(comm: sbn.MPICommunicator) -> None:
    import warnings

    counting = _Counting(comm)
    rng = np.random.default_rng(comm.rank)
    x = np.stack([1e8 + rng.standard_normal(6), rng.standard_normal(6)], 1)
    bn = sbn.SyncBatchNorm(2, comm=counting, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y1 = bn(x)
        first = counting.calls
        bn(x)
    assert (first, counting.calls) == (3, 4), (first, counting.calls)  # check + 2, then 1
    shards = comm.comm.allgather(x)
    ref = reference_forward(shards)
    bound = forward_bounds(ref, "float64")
    assert_close_to_reference(y1, ref.ys[comm.rank], bound.y, axis=1, name="first step")
    bad = x.copy()
    if comm.rank == comm.size - 1:
        bad[2, 1] = np.nan
    before = to_numpy(bn.running_var).copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(bad)
    assert any(w.category is sbn.NonFiniteWarning and "[1]" in str(w.message) for w in caught)
    assert to_numpy(bn.running_var)[1] == before[1] and to_numpy(bn.running_var)[0] != before[0]
    y3 = bn(x)
    assert_close_to_reference(y3, ref.ys[comm.rank], bound.y, axis=1, name="after the NaN")
    states = comm.comm.allgather(to_numpy(bn.running_var).tobytes())
    assert all(s == states[0] for s in states), "running statistics differ between ranks"
    say_ok("exact")


def _signature_steps(comm: sbn.MPICommunicator, what: str) -> None:
    x = np.random.default_rng(comm.rank).standard_normal((4, 3, 2))
    odd = comm.rank == comm.size - 1
    a, b = sbn.SyncBatchNorm(3, comm=comm), sbn.SyncBatchNorm(3, comm=comm)
    if what == "swapped":
        a(x), b(x)  # step 1 numbers A = 1, B = 2 on every rank
        for layer in (b, a) if odd else (a, b):
            layer(x)
    elif what == "skipped":
        y = a(x)
        if not odd:
            a.backward(y)
        a(x)
    elif what == "ahead":
        if odd:
            a(x)
        a.backward(a(x))


def case_signature(comm: sbn.MPICommunicator, what: str) -> None:
    if what == "eval_alone":
        x = np.random.default_rng(comm.rank).standard_normal((4, 3, 2))
        if comm.rank == 0:
            sbn.SyncBatchNorm(3, comm=comm).eval()(x)  # an evaluation copy on rank 0 only
        bn = sbn.SyncBatchNorm(3, comm=comm, dtype="float64")
        for _ in range(3):
            bn.backward(bn(x))
            if comm.rank == 0:
                bn.eval()(x)
                bn.train()
        states = comm.comm.allgather(to_numpy(bn.running_var).tobytes())
        assert all(s == states[0] for s in states)
        say_ok("signature[eval_alone]")
        return
    expected = {
        "swapped": ("layer 2, call 2, forward", "layer 1, call 2, forward"),
        "skipped": ("layer 1, call 1, backward", "layer 1, call 2, forward"),
        "ahead": ("layer 1, call 1, backward", "layer 1, call 2, forward"),
    }[what]
    odd = comm.rank == comm.size - 1
    mine, theirs = expected if (odd == (what == "swapped")) else expected[::-1]
    try:
        _signature_steps(comm, what)
    except sbn.CollectiveMismatchError as exc:
        message = str(exc)
        assert f"rank {comm.rank} is in SyncBatchNorm {mine}" in message, message
        if comm.size == 2:
            assert f"the other rank is in SyncBatchNorm {theirs}" in message, message
        say(f"mismatch seen: {message}")
    else:
        raise AssertionError(f"rank {comm.rank}: no CollectiveMismatchError")
    say_ok(f"signature[{what}]")


def case_raise(comm: sbn.MPICommunicator) -> None:
    bn = sbn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(comm.rank).standard_normal((4, 3, 2))
    y = bn(x)
    if comm.rank == comm.size - 1:
        say(f"raising at {time.time()!r}")
        raise RuntimeError(f"planted failure on rank {comm.rank} between forward and backward")
    bn.backward(np.ones_like(y))  # the other ranks wait here for the raising rank
    bn(x)
    say(f"rank {comm.rank} went past the failure")


def case_skip(comm: sbn.MPICommunicator, skipped: str) -> None:
    bn = sbn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(comm.rank).standard_normal((4, 3, 2))
    last = comm.rank == comm.size - 1
    for step in (1, 2, 3):
        if last and step == 3 and skipped == "forward":
            bn.eval()  # this rank's forward no longer communicates
        y = bn(x)
        if last and step == 3:
            say(f"skipped at {time.time()!r}")
            time.sleep(120)  # away for longer than the test waits: only an abort ends the job
        elif bn.training:
            bn.backward(np.ones_like(y))
    say(f"rank {comm.rank} went past the skipped call")


def case_straggler(comm: sbn.MPICommunicator) -> None:
    bn = sbn.SyncBatchNorm(3, comm=comm, dtype="float64")
    x = np.random.default_rng(comm.rank).standard_normal((4, 3, 2))
    late = comm.rank == comm.size - 1
    for _ in range(2):
        if late:
            time.sleep(0.3)
        y = bn(x)
        if late:
            time.sleep(0.3)
        bn.backward(np.ones_like(y))
    rm, rv = to_numpy(bn.running_mean), to_numpy(bn.running_var)
    every = np.concatenate([s.transpose(1, 0, 2).reshape(3, -1) for s in comm.comm.allgather(x)],
                           axis=1)  # fmt: skip
    assert bn.num_batches_tracked == 2
    # Two steps on the same batch at momentum 0.1 from zero: (1 − 0.9²)·mean.
    np.testing.assert_allclose(rm, 0.19 * every.mean(axis=1), rtol=1e-12, atol=1e-15)
    states = comm.comm.allgather((rm.tobytes(), rv.tobytes()))
    assert all(s == states[0] for s in states), "running statistics differ between ranks"
    say_ok("straggler")


def case_transfer(comm: sbn.MPICommunicator, expected: str) -> None:
    import array_api_strict as xs

    try:
        import torch
    except ImportError:  # torch is optional: its arrays are skipped
        torch = None
    if expected == "auto":
        info = comm.comm.Get_info()
        assert comm.cuda_aware == cuda_aware_from_info(info.Get("mpi_memory_alloc_kinds"))
        info.Free()
    else:
        assert comm.cuda_aware is (expected == "1"), (comm.cuda_aware, expected)
    d1 = xs.Device("device1")
    host = [np.arange(3.0), xs.arange(3.0)]
    if torch is not None:
        host.append(torch.arange(3.0, dtype=torch.float64))
    for a in host:
        assert comm.transfer_path(a) == "direct" == transfer_path(a, comm.cuda_aware)
    assert comm.transfer_path(xs.arange(3.0, device=d1)) == "staged"
    cuda_path = comm.transfer_path(FakeCudaArray())
    assert cuda_path == ("direct" if comm.cuda_aware else "staged"), cuda_path
    rng = np.random.default_rng(comm.rank)
    x = (10 + rng.standard_normal((3 + comm.rank, 2, 3))).astype(np.float32)
    shards = comm.comm.allgather(x)
    ref = reference_forward(shards, running_mean=np.zeros(2), running_var=np.ones(2))
    bound = forward_bounds(ref, "float32", param_dtype="float32")
    arrays = {"numpy": x, "strict": xs.asarray(x), "strict-device1": xs.asarray(x, device=d1)}
    if torch is not None:
        arrays["torch"] = torch.from_numpy(x)
        # Tensors that require grad refuse buffer export; the communicator detaches.
        arrays["torch-requires-grad"] = torch.from_numpy(x.copy()).requires_grad_(True)
    for name, a in arrays.items():
        bn = sbn.SyncBatchNorm(2, comm=comm)
        y = bn(a)
        assert type(y) is type(a), name
        if name.startswith("strict"):
            assert y.device == a.device and bn.running_mean.device == a.device, name
        assert_close_to_reference(y, ref.ys[comm.rank], bound.y, name=f"{name} y", axis=1)
        assert_close_to_reference(bn.running_var, ref.running_var, bound.running_var,
                                  name=f"{name} running_var")  # fmt: skip
    say_ok(f"transfer[{expected}]")


def main() -> None:
    case, *args = sys.argv[1:]
    if case == "raise_cli":
        from arraysyncbn.cli import run_aborting

        sys.exit(run_aborting(lambda: case_raise(sbn.MPICommunicator()) or 0))
    cases = {
        "shards": case_shards,
        "pytorch": case_pytorch,
        "subgroups": case_subgroups,
        "mismatch": case_mismatch,
        "mismatch_later": case_mismatch_later,
        "raise": case_raise,
        "exact": case_exact,
        "signature": case_signature,
        "skip": case_skip,
        "straggler": case_straggler,
        "transfer": case_transfer,
    }
    cases[case](sbn.MPICommunicator(), *args)
    WORLD.Barrier()


if __name__ == "__main__":
    main()
