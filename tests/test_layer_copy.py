"""Copies of the array layer: ``copy.copy``, ``copy.deepcopy`` and pickling.

A copy shares the communicator (a handle on a group of ranks) and owns the
rest; it is a new layer to the communicator (numbered at its own first
communicating call) and has no forward to differentiate.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import to_numpy


def _namespaces() -> list:
    params = [pytest.param(np, None, id="numpy")]
    try:
        import array_api_strict as strict
    except ImportError:
        return params
    return [
        *params,
        pytest.param(strict, None, id="strict"),
        pytest.param(strict, strict.Device("device1"), id="strict-device1"),
    ]


def _batch(xp, device, seed: int, loc: float = 3.0):
    x = np.random.default_rng(seed).normal(loc, 2.0, size=(6, 3, 4))
    return xp.asarray(x.astype(np.float32), device=device)


def _deepcopy(bn: sbn.SyncBatchNorm) -> sbn.SyncBatchNorm:
    return copy.deepcopy(bn)


def _pickled(bn: sbn.SyncBatchNorm) -> sbn.SyncBatchNorm:
    back: sbn.SyncBatchNorm = pickle.loads(pickle.dumps(bn))
    return back


def _same(a, b) -> bool:
    return (a is None and b is None) or np.array_equal(to_numpy(a), to_numpy(b))


def _assert_same_state(a: sbn.SyncBatchNorm, b: sbn.SyncBatchNorm, where: str) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert _same(getattr(a, key), getattr(b, key)), f"{key} {where}"
    assert a.num_batches_tracked == b.num_batches_tracked, where


@pytest.mark.parametrize(("xp", "device"), _namespaces())
@pytest.mark.parametrize("make", [_deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("forwards", [0, 2])
def test_a_copy_computes_like_the_original_and_owns_its_state(xp, device, make, forwards) -> None:
    bn = sbn.SyncBatchNorm(3, momentum=0.3)
    for i in range(forwards):
        bn(_batch(xp, device, i))
    twin = make(bn)
    assert twin is not bn and twin.training == bn.training
    _assert_same_state(twin, bn, "after the copy")
    for i in range(forwards, forwards + 2):
        x = _batch(xp, device, i)
        assert _same(twin(x), bn(x)), f"training output {i}"
        _assert_same_state(twin, bn, f"after training step {i}")
    twin.eval()
    bn.eval()
    x = _batch(xp, device, 9)
    assert _same(twin(x), bn(x)), "eval output"
    # Independent: training the copy moves its statistics only; writing into
    # its weight leaves the original's.
    before = to_numpy(bn.running_mean).copy()
    twin.train()(_batch(xp, device, 10, loc=-7.0))
    assert np.array_equal(to_numpy(bn.running_mean), before)
    assert not _same(twin.running_mean, bn.running_mean)
    twin.weight[0] = 5.0
    assert float(bn.weight[0]) != 5.0


@pytest.mark.parametrize("make", [_deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_copy_has_no_forward_to_differentiate(make) -> None:
    bn = sbn.SyncBatchNorm(3)
    x = _batch(np, None, 0)
    y = bn(x)
    twin = make(bn)
    with pytest.raises(sbn.NoForwardError, match="before any forward"):
        twin.backward(np.ones_like(y))
    bn.backward(np.ones_like(y))  # the original's last forward is still there
    assert twin.grad_bias is None and bn.grad_bias is not None


@pytest.mark.parametrize("kind", ["lazy", "xp=np"])
def test_pickling_a_layer_without_arrays_keeps_its_namespace(kind) -> None:
    """affine=False, track_running_stats=False: nothing to re-derive the
    namespace from, which is kept by name."""
    xp = np if kind == "xp=np" else None
    bn = sbn.SyncBatchNorm(3, affine=False, track_running_stats=False, xp=xp)
    x = _batch(np, None, 0)
    y = bn(x)
    back = _pickled(bn)
    assert back._xp is bn._xp and back.comm is sbn.SyncBatchNorm(1).comm
    assert np.array_equal(back(x), y)


def test_deepcopy_and_copy_share_the_communicator() -> None:
    comm = sbn.thread_group(2)[0]  # holds locks: cannot be copied itself
    bn = sbn.SyncBatchNorm(3, comm=comm, xp=np)
    deep = copy.deepcopy(bn)
    assert deep.comm is comm and deep.weight is not bn.weight
    assert np.array_equal(deep.weight, bn.weight)
    shallow = copy.copy(bn)
    assert shallow.comm is comm and shallow.weight is bn.weight
    models = copy.deepcopy([bn, bn])  # a layer met twice is copied once
    assert models[0] is models[1] and models[0].comm is comm


def test_pickling_refuses_a_communicator_of_other_ranks() -> None:
    bn = sbn.SyncBatchNorm(3, comm=sbn.thread_group(2)[0])
    with pytest.raises(TypeError, match=r"cannot be pickled.*save .*state_dict\(\)"):
        pickle.dumps(bn)


@pytest.mark.parametrize("make", [_deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_layer_taken_out_of_a_thread_group_copies_and_pickles(make) -> None:
    x = _batches(2)
    comms = sbn.thread_group(2, timeout=30)
    layers = [_layer(comm) for comm in comms]
    sbn.run_ranks(lambda comm: layers[comm.rank](_shard(x[0], comm.rank)), comms)
    bn = layers[0]
    bn.comm = None
    for step in range(2):
        # First with the merge center of the thread group (of no use now, and
        # not copied), then with one of its own.
        twin = make(bn)
        assert twin.comm is None and (twin._center is None) == (step == 0)
        assert np.array_equal(twin(x[1]), bn(x[1])), step
        assert np.array_equal(twin.running_var, bn.running_var), step


# -- copies inside a thread group ------------------------------------------------------
SIZES = (2, 4)  # the two ranks' shards of a batch of 6


def _shard(x: np.ndarray, rank: int) -> np.ndarray:
    return np.split(x, np.cumsum(SIZES)[:-1])[rank]


def _batches(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    return [rng.normal(40.0, 3.0, size=(6, 3, 4)) for _ in range(n)]


def _layer(comm=None) -> sbn.SyncBatchNorm:
    return sbn.SyncBatchNorm(3, momentum=0.2, comm=comm, xp=np, dtype="float64")


def test_a_deepcopy_made_on_every_rank_synchronizes_and_the_original_keeps_working() -> None:
    """Each rank trains its layer, copies it, then trains the original and the
    copy in turn; rank 0 alone also evaluates a copy of its own (which must
    not shift the layer numbers). Everything equals one world-of-one layer
    (and its copy) over the whole batch."""
    batches = _batches(6)
    comms = sbn.thread_group(2, timeout=30)

    def run(step_on, comm=None, rank=0):
        layer = _layer(comm)
        out = [step_on(layer, batches[0]), step_on(layer, batches[1])]
        twin = copy.deepcopy(layer)
        for i in (2, 3):
            out += [step_on(layer, batches[i]), step_on(twin, batches[i + 2])]
            if rank == 0:
                copy.deepcopy(layer).eval()(batches[i])  # never communicates
        twin.eval()
        out.append(step_on(twin, batches[0]))
        return out, [to_numpy(m.running_var) for m in (layer, twin)]

    whole, whole_var = run(lambda layer, x: to_numpy(layer(x)))
    got = sbn.run_ranks(
        lambda comm: run(lambda layer, x: to_numpy(layer(_shard(x, comm.rank))), comm, comm.rank),
        comms,
    )
    for step, want in enumerate(whole):
        y = np.concatenate([got[r][0][step] for r in range(2)])
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-9, err_msg=f"step {step}")
    for r in range(2):
        for got_var, want_var in zip(got[r][1], whole_var, strict=True):
            np.testing.assert_allclose(got_var, want_var, rtol=1e-12, err_msg=f"rank {r}")


def test_ranks_calling_the_copy_and_the_original_raise_on_every_rank() -> None:
    """The copy is another layer to the communicator: its collectives carry
    its own number, so ranks that mix it up with the original fail alike
    instead of merging two layers' statistics."""
    x = _batches(1)[0]
    comms = sbn.thread_group(2, timeout=30)

    def rank(comm):
        layer = _layer(comm)
        layer(_shard(x, comm.rank))
        twin = copy.deepcopy(layer)
        try:
            (twin if comm.rank == 0 else layer)(_shard(x, comm.rank))
        except sbn.CollectiveMismatchError as exc:
            return str(exc)
        return "no error"

    for msg in sbn.run_ranks(rank, comms):
        assert "different SyncBN calls" in msg, msg
