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
from harness import check_functional, check_host_elementwise, half_batches, rank_step

NUMPY = next(b for b in BACKENDS if b.name == "numpy-portable")
NUMPY_HOST = next(b for b in BACKENDS if b.name == "numpy")
NUMPY_THREADS = next(b for b in BACKENDS if b.name == "numpy-threads")


def _real_normalize():
    from arraysyncbn._fast import host

    return host.hk.normalize_serial


REAL_NORMALIZE = _real_normalize()

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
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")  # the bugs sit in the portable kernels

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
        check_functional(NUMPY_HOST, batch, runner=runner)

    with pytest.raises(AssertionError, match="differs between ranks"):
        prop()


# -- the same hunt on the host route (numba kernels) ---------------------------------
# Each plant replaces one compiled kernel with plain numpy code that makes a
# plausible mistake; the property over the host backends must catch it.
def _host_naive_stats(x, center, n, buf, acc):
    """Σx and Σx² summed in the input dtype, re-expressed about the center:
    the classic E[x²]−E[x]² cancellation (packed as the real kernel packs)."""
    c = x.shape[1]
    center = np.zeros(c) if center.shape[0] == 0 else center.astype(np.float64)
    s1 = np.sum(x, axis=(0, 2), dtype=x.dtype).astype(np.float64)
    s2 = np.sum(x * x, axis=(0, 2), dtype=x.dtype).astype(np.float64)
    buf[0] = n
    buf[1 : 1 + c] = s1 - n * center
    buf[1 + c : 1 + 2 * c] = s2 - 2.0 * center * s1 + n * center * center


def _host_uncompensated_normalize(x, hi, lo, scale, shift, y):
    y[...] = (x - hi[None, :, None]) * scale[None, :, None] + shift[None, :, None]


def _host_no_projection(dy, x, hi, lo, scale, mdy, k, dx):
    dx[...] = (dy - mdy[None, :, None]) * scale[None, :, None]


def _host_first_partial_only(part):
    return part[:1]


HOST_PLANTED = {
    "host: E[x²]−E[x]² in float32": (NUMPY_HOST, "stats_packed_serial", _host_naive_stats),
    "host: mean rounded before centering": (
        NUMPY_HOST, "normalize_serial", _host_uncompensated_normalize,
    ),
    "host: dx without the projection term": (
        NUMPY_HOST, "backward_input_serial", _host_no_projection,
    ),
    "host threads: one thread's partial sums dropped": (
        NUMPY_THREADS, "_merged", _host_first_partial_only,
    ),
}  # fmt: skip


@pytest.mark.parametrize("bug", list(HOST_PLANTED))
def test_property_finds_planted_bug_in_host_route(bug: str, monkeypatch) -> None:
    from arraysyncbn._fast import host

    from backends import routed

    backend, name, replacement = HOST_PLANTED[bug]
    target = host if name == "_merged" else host.hk
    monkeypatch.setattr(target, name, replacement)

    @HUNT
    @given(batch=sharded_batches(dtypes=st.sampled_from(["float32", "float64"])))
    def prop(batch) -> None:
        check_functional(backend, batch)

    with routed(backend), pytest.raises(AssertionError):
        prop()


# -- half precision on the host route -----------------------------------------------------
# The real normalize kernel computes in float32; the plant decodes x or stores y
# (float16 bit patterns) with a plausible mistake. The reference bounds allow
# a whole float16 ulp and cannot see these: the exact elementwise property can.
def _normalize_f32(x, hi, lo, scale, shift) -> np.ndarray:
    y = np.empty(x.shape, np.float32)
    REAL_NORMALIZE(x, hi, lo, scale, shift, y)  # float32 out: stored() is the identity
    return y


def _truncating_store(x, hi, lo, scale, shift, y):
    """Rounds y toward zero instead of to nearest even."""
    v = _normalize_f32(x, hi, lo, scale, shift)
    nearest = v.astype(np.float16)
    away = np.abs(nearest.astype(np.float32)) > np.abs(v)  # rounded up in magnitude
    y[...] = nearest.view(np.uint16) - away.astype(np.uint16)


def _subnormals_flushed_on_load(x, hi, lo, scale, shift, y):
    """Reads float16 subnormals as zero (a decoder that relies on float arithmetic
    with denormals flushed)."""
    xs = x.view(np.float16).astype(np.float32)
    xs[np.abs(xs) < 2.0**-14] = 0.0
    y[...] = _normalize_f32(xs, hi, lo, scale, shift).astype(np.float16).view(np.uint16)


HALF_PLANTED = {
    "host float16: y truncated instead of rounded to nearest even": _truncating_store,
    "host float16: subnormal inputs read as zero": _subnormals_flushed_on_load,
}


@pytest.mark.parametrize("bug", list(HALF_PLANTED))
def test_exact_half_property_finds_planted_bug_in_host_route(bug: str, monkeypatch) -> None:
    from arraysyncbn._fast import host

    monkeypatch.setattr(host.hk, "normalize_serial", HALF_PLANTED[bug])

    @HUNT
    @given(batch=half_batches(st.just("float16")))
    def prop(batch) -> None:
        check_host_elementwise(NUMPY_HOST, batch)

    with pytest.raises(AssertionError, match="y: "):
        prop()


def test_property_finds_a_missing_second_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """One merge around zero, never a second pass and never a warning: the
    bounds (which assume arraysyncbn's second pass) must catch it."""
    from arraysyncbn import functional

    monkeypatch.setattr(functional, "_tolerances", lambda *a: (np.inf, np.inf))

    @HUNT
    @given(batch=sharded_batches(dtypes=st.just("float64")))
    def prop(batch) -> None:
        check_functional(NUMPY_HOST, batch)

    with pytest.raises(AssertionError, match="exceed the bound"):
        prop()
