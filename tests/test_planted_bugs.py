"""The property tests can fail: plant a real bug, and hypothesis must find it.

Each case patches one piece of the implementation with a plausible mistake
and runs the same property as ``test_properties`` on numpy; the property has
to raise. A property that passed here would be checking nothing. The last
case plants a communicator whose sums are right but not bitwise identical
on every rank, which the check of running statistics across ranks catches.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import arraysyncbn as sbn
from arraysyncbn import kernels
from arraysyncbn.testing.strategies import sharded_batches

from backends import BACKENDS
from harness import check_functional, rank_step

NUMPY = next(b for b in BACKENDS if b.name == "numpy")

# A fixed, generate-only search: the planted bug must be found by it.
HUNT = settings(
    max_examples=300,
    database=None,
    derandomize=True,
    deadline=None,
    phases=[Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def _naive_moments(x, axis, *, xp, acc):
    """E[x²]−E[x]²: no shift, sums in the input precision."""
    axes = kernels.reduction_axes(x.ndim, axis)
    n = kernels._count(x, axis)
    zero = xp.zeros((x.shape[axis],), dtype=x.dtype)
    return n, zero, xp.sum(x, axis=axes, dtype=x.dtype), xp.sum(x * x, axis=axes, dtype=x.dtype)


def _unbiased_finalize(count, s1, s2, *, xp):
    mean, var = ORIGINAL["finalize_moments"](count, s1, s2, xp=xp)
    return mean, var * count / (count - 1)


def _no_projection(dy, x, hi, lo, scale, mean_dy, k, axis, *, xp):
    return ORIGINAL["backward_input"](dy, x, hi, lo, scale, mean_dy, k * 0.0, axis, xp=xp)


def _uncompensated_split(mean, wdtype, *, xp):
    return xp.astype(mean, wdtype), None


ORIGINAL = {
    name: getattr(kernels, name)
    for name in ("local_moments", "finalize_moments", "backward_input", "split_mean")
}

PLANTED = {
    "variance as E[x²]−E[x]² in float32": ("local_moments", _naive_moments),
    "unbiased variance used to normalize": ("finalize_moments", _unbiased_finalize),
    "dx without the x̂·mean(dy·x̂) term": ("backward_input", _no_projection),
    "mean rounded to float32 before centering": ("split_mean", _uncompensated_split),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_property_finds_planted_bug(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, replacement = PLANTED[bug]
    monkeypatch.setattr(kernels, name, replacement)

    @HUNT
    @given(batch=sharded_batches(dtypes=st.sampled_from(["float32", "float64"])))
    def prop(batch) -> None:
        check_functional(NUMPY, batch)

    with pytest.raises(AssertionError):
        prop()


class _RotatingSum:
    """A communicator that sums in an order that depends on the rank: the same
    value up to rounding, but not the same bits on every rank."""

    def __init__(self, inner) -> None:
        self.inner, self.rank, self.size = inner, inner.rank, inner.size

    def allreduce(self, buf, op="sum"):
        everyone = _gather(self.inner, buf)
        order = everyone[self.rank :] + everyone[: self.rank]
        out = order[0].copy()
        for part in order[1:]:
            out = out + part if op == "sum" else np.maximum(out, part)
        return out


def _gather(comm, buf):
    """Every rank's buffer, through one sum of zero-padded slots."""
    slots = np.zeros((comm.size, buf.shape[0]))
    slots[comm.rank] = buf
    return list(comm.allreduce(slots.reshape(-1), "sum").reshape(comm.size, -1))


def test_property_finds_a_communicator_without_identical_bits() -> None:
    def runner(batch, c, *, training=True):
        comms = [_RotatingSum(k) for k in sbn.thread_group(len(c.xs), timeout=30)]
        return sbn.run_ranks(
            lambda k: rank_step(batch, c, comms[k.rank], training=training),
            [k.inner for k in comms],
        )

    @HUNT
    @given(batch=sharded_batches(ranks=st.integers(3, 4), dtypes=st.just("float64")))
    def prop(batch) -> None:
        check_functional(NUMPY, batch, runner=runner)

    with pytest.raises(AssertionError, match="differs between ranks"):
        prop()
