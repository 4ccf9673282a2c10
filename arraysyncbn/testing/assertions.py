"""Error bounds against the float64 reference, and assertions that use them.

The bounds are formulas, not tuned tolerances. Per channel, with

* ``e_out``: machine epsilon of the output dtype (x's dtype for y and dx,
  the parameter dtype ``e_p`` for gradients and running statistics),
* ``e_w``: epsilon of the work dtype (``e_out`` for float32/float64, float32's
  for float16/bfloat16),
* ``e_acc``: epsilon of the accumulation dtype of the per-rank sums
  (float64's, or float32's on a device without float64),
* ``e_mrg``: epsilon of the merge (float64's unless the library has no
  float64 device at all),
* ``n``: the global reduction length (elements per channel),
* ``μ``, ``var``: the reference mean and biased variance, ``σ² = var + eps``,
* ``A = max|x − μ|`` (so ``r = A/σ = max|x̂|``), and
  ``D = 2A + (e_acc·n + e_w)·(|μ| + A)`` bounding ``|x − c|`` for a rank's
  shift ``c`` (its own mean, as computed),

the statistics carry at most

* ``Δμ = (e_w + e_acc·(n + 2))·D + e_mrg·(n + 2)·(|μ − K| + A) + e_mrg·|μ|``
  (rounding of ``x − c``, summation, adding the center K back),
* ``Δv = 2·e_mrg·(n + 4)·((μ − K)² + A²) + (2·e_acc·(n + 4) + 4·e_w)·D²``: the
  float64 merge around the center K shared by every rank cancels as
  ``(μ − K)²`` (the E[x²]−E[x]² hazard, one precision up: negligible until
  |μ − K|/σ nears 1e3–1e6 depending on the output dtype); the per-rank sums
  are shifted, so float32 accumulation costs only ``D²``.

Those are one merge's ``Δμ(|μ − K|)`` and ``Δv(|μ − K|)``. arraysyncbn merges
again, around the last merge's mean, whenever a merge lost more than
``τ = max(16·L0, e_w)`` with ``L0 = 4·(ranks + 2)·e_mrg``
(:func:`second_pass_tolerance`) or its variance overflowed, up to three
times after the first merge; a merge kept for its loss had its center within
``sqrt(2τ/L0)·σ`` of the mean, and each merge again is centered within the
previous one's ``Δμ``. Its statistics therefore carry at most
``max(Δ(min(|μ − K|, sqrt(2τ/L0)·σ)), Δ(K₄))`` for both Δμ and Δv, with
``K₁ = |μ − K|`` and ``Kᵢ₊₁ = Δμ(Kᵢ)`` (the last merge is kept whatever it
lost), however far the data sits from K (``second_pass=False`` keeps the
one-merge bound, for implementations that merge once). An implementation that
centers x with a mean of relative error ``e_c`` (``centering_eps``: a mean
rounded to, or summed in, float32) adds ``δ = e_c·|μ|`` to ``Δμ`` and
``δ²`` to ``Δv``; arraysyncbn's own mean has no such term (``e_c = 0``, the
default),

so the computed ``invstd`` lies in ``[1/sqrt(var + Δv + eps),
1/sqrt(max(var − Δv, 0) + eps)]`` (the variance is clamped at zero); let
``Δi`` be its largest distance from the true ``invstd = 1/σ`` (plus
``2·e_acc·invstd``) and ``i⁺`` the upper end. The normalized value then errs
by ``Δx̂ = (A + Δμ)·Δi + Δμ·i⁺`` and is at most ``X = r + Δx̂``. With
``W = max|weight|`` (1 without), ``B = max|bias|``, ``G = max|dy|`` and
``m`` the momentum used:

* ``|Δy| ≤ 2·[W·Δx̂ + (4·e_w + e_out)·(W·X + B)] + floor``,
* ``|Δdx| ≤ 2·W·[Δi·G·(2 + X²) + i⁺·G·(2·X·Δx̂ + (8·e_w + e_out)·(2 + X²))
  + i⁺·G·e_s·(n + 2)·(1 + X·(1 + Δx̂))] + floor``, the last term for the
  rounding of the backward's sums Σdy and Σdy·x̂ (``e_s = max(e_acc, e_mrg)``,
  naive summation, per rank and then merged: mean(dy) errs by
  ``e_s·(n + 2)·G`` and mean(dy·x̂) by ``e_s·(n + 2)·G·(1 + Δx̂)``, as
  ``Σ|x̂| ≤ n`` by Cauchy–Schwarz; it is zero without batch statistics),
* ``|Δdweight| ≤ 2·n·G·(Δx̂ + (4·e_w + e_acc·n)·X) + e_p·n·G·X + floor``,
  ``|Δdbias| ≤ 2·n·G·e_acc·n + e_p·n·G``,
* ``|Δrunning_mean| ≤ m·Δμ + 4·e_p·|ref|``,
  ``|Δrunning_var| ≤ m·Δv·n/(n−1) + 4·e_p·|ref|`` for an update computed in
  float64 and rounded once (arraysyncbn's); one computed in a dtype of
  epsilon ``e_u`` (``update_dtype``, PyTorch's float32) adds
  ``4·e_u·((1 − m)·|old| + m·|new|)``, ``new`` the batch mean or unbiased
  variance,

An implementation that forms each per-rank sum from partial sums of at most
``L`` terms in a dtype of epsilon ``e_b`` (``partial_sums``; arraysyncbn's
host route for float16 and bfloat16 planes: float32, ``L = 512``) has
``e_acc·n + e_b·min(L, n)`` in place of every ``e_acc·n`` (naive summation
of ``L`` terms in any order, then of the partial sums), and ``t_b``, the
error of a square or product that underflowed in that dtype, added to
``Δv``, ``2·n·i⁺·t_b`` to dweight's bound and ``2·W·X·i⁺²·t_b`` to dx's.

where ``floor`` is a few subnormal spacings of the output dtype, plus one of
the work dtype times ``1 + A + W·i⁺`` (y) or ``1 + G·(2 + X²) + W·i⁺²·G·X``
(dx) or ``n·G·i⁺`` (dweight): a per-channel factor such as
``weight·invstd``, or a centered value, that underflowed before being
scaled up (the centered value ``(x − hi) − lo`` is a work-dtype number, so
with subnormal data it errs by up to one subnormal spacing of the work
dtype: inherent in centering in the work dtype, not a kernel bug). The
factor 2 covers the constants this analysis drops; the ``n`` terms assume
no better than naive summation. Every bound is per channel, so one badly
conditioned channel does not loosen the others.

Each bound is far below what a wrong formula produces: a variance divided
by the local instead of the global count, E[x²]−E[x]² in float32 on float64
devices, or a missing Bessel correction all exceed it by orders of magnitude
(``tests/test_planted_bugs.py`` shows the property tests catching them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .reference import ReferenceBackward, ReferenceForward, to_numpy

__all__ = [
    "HALF_PARTIAL_SUMS",
    "BackwardBounds",
    "ForwardBounds",
    "assert_close_to_reference",
    "assert_like",
    "backward_bounds",
    "channel_bound",
    "dtype_eps",
    "flushes_subnormals",
    "forward_bounds",
    "second_pass_tolerance",
]

_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
}


def _dtype_text(dtype: Any) -> str:
    """A dtype's name, also for numpy type classes such as ``np.float32`` and
    for byte-swapped numpy dtypes (``>f8`` is float64 numbers: its ``str`` is
    ``'>f8'``, its name ``'float64'``)."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    if isinstance(dtype, np.dtype):
        return dtype.name
    if isinstance(dtype, str):
        try:  # a numpy type string such as ">f4" or "f8"
            return np.dtype(dtype).name
        except TypeError:  # "bfloat16" without ml_dtypes
            pass
    return str(dtype)


def _per_dtype(table: dict[str, float], dtype: Any) -> float:
    """``table``'s value for ``dtype``, of any array library (longest name first:
    ``bfloat16`` is not ``float16``); TypeError for a dtype it does not list."""
    text = _dtype_text(dtype)
    for name in sorted(table, key=len, reverse=True):
        if text.endswith(name):
            return table[name]
    raise TypeError(f"not a supported floating dtype: {dtype}")


def dtype_eps(dtype: Any) -> float:
    """Machine epsilon of a floating dtype of any array library (numpy's in
    either byte order)."""
    return _per_dtype(_EPS, dtype)


def _work_eps(e_out: float) -> float:
    return min(e_out, _EPS["float32"])


@dataclass(frozen=True)
class ForwardBounds:
    """Absolute bounds per channel, each of shape ``(C,)``."""

    y: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None


@dataclass(frozen=True)
class BackwardBounds:
    """Absolute bounds per channel for dx, dweight and dbias, each ``(C,)``."""

    dx: np.ndarray
    dweight: np.ndarray
    dbias: np.ndarray


_TINY = {
    "float16": 2.0**-24,
    "bfloat16": 2.0**-133,
    "float32": 2.0**-149,
    "float64": 2.0**-1074,
}


_FLUSHED = 2.0**-126  # float32's smallest normal: the error of a flushed value


def _tiny(dtype: Any, flush_to_zero: bool = False) -> float:
    """The largest error of a result that underflowed: one subnormal spacing,
    or the smallest normal where float32 subnormals are flushed to zero."""
    tiny = _per_dtype(_TINY, dtype)
    return _FLUSHED if flush_to_zero and tiny == _TINY["float32"] else tiny


def flushes_subnormals(x: Any) -> bool:
    """Whether float32 arithmetic on ``x``'s library and device flushes subnormal
    results or inputs to zero (FTZ/DAZ): CuPy compiles its kernels with
    ``-ftz=true``, and a CPU thread may run with the MXCSR flags set (as
    ``torch.set_flush_denormal(True)`` sets them). Pass the answer as
    ``flush_to_zero=`` to :func:`forward_bounds` and :func:`backward_bounds`.
    Probed on every call (the CPU flags belong to the calling thread)."""
    from array_api_compat import array_namespace, device

    xp = array_namespace(x)
    probe = xp.asarray([2.0**-126, 2.0**-140], dtype=xp.float32, device=device(x))
    scale = xp.asarray([0.5, 2.0**20], dtype=xp.float32, device=device(x))
    out = to_numpy(probe * scale)
    return bool(out[0] == 0.0 or out[1] == 0.0)


HALF_PARTIAL_SUMS: tuple[str, int] = ("float32", 512)
"""arraysyncbn's own ``partial_sums`` for float16 and bfloat16 input (the
bounds' default for those dtypes): its host route sums each plane (the
elements of one sample and channel) in float32 partial sums of at most 512
elements, then in float64. It bounds the portable route too, whose sums are
float64 throughout."""


_OWN = "arraysyncbn"
"""``partial_sums``' default: arraysyncbn's own (:data:`HALF_PARTIAL_SUMS` for
16-bit input, none otherwise)."""


def _partial_terms(
    partial_sums: tuple[Any, int] | str | None, dtype: Any, n: int, flush_to_zero: bool
) -> tuple[float, float]:
    """``(e_b·min(L, n)/n, t_b)`` for per-rank sums formed as partial sums of
    at most ``L`` terms in dtype ``b`` (``partial_sums = (b, L)``): the
    relative error they add to each sum, beyond ``e_acc·n``, as an addition to
    ``e_acc``; and the error of each term (a square, a product) that
    underflowed in ``b``. ``(0, 0)`` without partial sums."""
    if isinstance(partial_sums, str):
        if partial_sums != _OWN:
            raise ValueError(
                f"partial_sums: expected (dtype, length), None or {_OWN!r}, got {partial_sums!r}"
            )
        partial_sums = HALF_PARTIAL_SUMS if dtype_eps(dtype) > _EPS["float32"] else None
    if partial_sums is None:
        return 0.0, 0.0
    sums_dtype, length = partial_sums
    if int(length) < 1:
        raise ValueError(f"partial_sums: the length must be at least 1, got {length}")
    n = max(int(n), 1)
    return dtype_eps(sums_dtype) * min(int(length), n) / n, _tiny(sums_dtype, flush_to_zero)


@dataclass(frozen=True)
class _StatErrors:
    """Per-channel error budget of the statistics (module docstring)."""

    d_mean: np.ndarray
    d_var: np.ndarray
    d_invstd: np.ndarray
    invstd_hi: np.ndarray
    d_xhat: np.ndarray
    xhat_max: np.ndarray
    spread: np.ndarray


def _floor(dtype: Any, e_w: float, magnitude: Any, flush_to_zero: bool = False) -> Any:
    """Underflow allowance: output subnormals, and a per-channel factor that
    underflowed in the work dtype and was then multiplied by ``magnitude``."""
    work = "float32" if e_w == _EPS["float32"] else dtype
    return 4 * (_tiny(dtype, flush_to_zero) + _tiny(work, flush_to_zero) * (1 + magnitude))


def _per_channel_max(arrays: list[np.ndarray], axis: int, channels: int) -> np.ndarray:
    out = np.zeros(channels)
    for v in arrays:
        if v.size:
            axes = tuple(i for i in range(v.ndim) if i != axis)
            out = np.maximum(out, np.max(np.abs(v), axis=axes))
    return out


def _param_abs(a: Any, default: float, channels: int) -> np.ndarray:
    return np.full(channels, default) if a is None else np.abs(to_numpy(a).astype(np.float64))


_RECENTER_LIMIT = 3
"""How many merges arraysyncbn runs at most after the first, each around the
last one's mean (``docs/numerics.md``)."""


def second_pass_tolerance(ranks: int, merge_eps: float, work_eps: float) -> float:
    """The relative variance error past which arraysyncbn merges a second time.

    The one-pass merge around a center K loses about
    ``L0·(1 + ((μ − K)/σ)²)`` of the variance, ``L0 = 4·(ranks + 2)·e_mrg``;
    when that estimate (from the reduced values) exceeds
    ``max(16·L0, e_w)``, every rank runs another statistics pass centered
    on the reduced mean (up to three more; ``docs/numerics.md``).
    """
    return max(16.0 * 4.0 * (ranks + 2) * merge_eps, work_eps)


def _merge_budget(
    ref: ReferenceForward, e_w: float, e_acc: float, e_mrg: float, a: Any, off: Any
) -> tuple[Any, Any]:
    """``(Δμ, Δv)`` of one merge around a center ``off`` away from the mean."""
    mu = np.abs(ref.mean)
    n = ref.count
    d = 2 * a + (e_acc * n + e_w) * (mu + a)
    d_mean = (e_w + e_acc * (n + 2)) * d + e_mrg * (n + 2) * (off + a) + e_mrg * mu
    d_var = 2 * e_mrg * (n + 4) * (off * off + a * a) + (2 * e_acc * (n + 4) + 4 * e_w) * d * d
    return d_mean, d_var


def _stat_errors(
    ref: ReferenceForward,
    e_w: float,
    e_acc: float,
    e_mrg: float,
    center: Any,
    ranks: int | None = None,
    centering_eps: float = 0.0,
    underflow: float = 0.0,
) -> _StatErrors:
    """The statistics' error budget. ``ranks`` None: one merge around
    ``center``; else arraysyncbn's contract, another merge around the last
    one's mean whenever it lost more than :func:`second_pass_tolerance`, up
    to :data:`_RECENTER_LIMIT` times."""
    channels = ref.mean.shape[0]
    a = _per_channel_max(ref.xhats, ref.axis, channels) / ref.invstd
    off = np.abs(ref.mean - (0.0 if center is None else to_numpy(center).astype(np.float64)))
    sigma2 = 1.0 / ref.invstd**2
    if not ref.batch_stats:
        d_mean = d_var = np.zeros(channels)
    elif ranks is None:
        d_mean, d_var = _merge_budget(ref, e_w, e_acc, e_mrg, a, off)
    else:
        # A merge is kept for its loss only when L0·(var + (μ − K)²) ≤ τ·σ²,
        # so its center is then within sqrt(τ/L0)·σ of the mean (2 for
        # rounding).
        l0 = 4.0 * (ranks + 2) * e_mrg
        tau = second_pass_tolerance(ranks, e_mrg, e_w)
        kept = np.minimum(off, np.sqrt(2.0 * tau / l0 * sigma2))
        m1, v1 = _merge_budget(ref, e_w, e_acc, e_mrg, a, kept)
        # A merge that lost more is followed by one around its mean, off by
        # at most its Δμ, up to _RECENTER_LIMIT times; the last is kept whatever
        # it lost (and warned of past sqrt(e_w)).
        last = off
        with np.errstate(over="ignore"):  # a first merge whose square overflowed
            for _ in range(_RECENTER_LIMIT):
                last, _ = _merge_budget(ref, e_w, e_acc, e_mrg, a, last)
            m2, v2 = _merge_budget(ref, e_w, e_acc, e_mrg, a, last)
        d_mean, d_var = np.maximum(m1, m2), np.maximum(v1, v2)
    if ref.batch_stats and centering_eps:
        # A mean rounded to centering_eps before x − mean: off by δ = e_c·|μ|,
        # which shifts every x̂ by δ·invstd and adds δ² to a variance taken
        # around it (Σ(x − μ − δ)²/n = var + δ² exactly).
        delta = centering_eps * np.abs(ref.mean)
        d_mean, d_var = d_mean + delta, d_var + delta * delta
    if ref.batch_stats:
        # Squares that underflowed in the partial sums' dtype: each off by up
        # to ``underflow``, so their mean too.
        d_var = d_var + underflow
    eps = sigma2 - ref.var
    hi = 1.0 / np.sqrt(np.maximum(ref.var - d_var, 0.0) + eps)
    lo = 1.0 / np.sqrt(ref.var + d_var + eps)
    d_inv = np.maximum(hi - ref.invstd, ref.invstd - lo) + 2 * e_acc * ref.invstd
    hi = hi + 2 * e_acc * ref.invstd
    d_xhat = (a + d_mean) * d_inv + d_mean * hi
    return _StatErrors(d_mean, d_var, d_inv, hi, d_xhat, a * ref.invstd + d_xhat, a)


_F = TypeVar("_F", bound=Callable[..., Any])


def _overflow_is_infinite(fn: _F) -> _F:
    """Bounds computed without numpy's floating-point warnings: past ~1e154
    (the data's deviations squared beyond float64) a budget overflows, and
    ``inf − inf`` or ``0·inf`` in the formulas would make it NaN. Where the
    reference's mean is finite (the data is), a NaN budget is +inf, which
    bounds nothing there, honestly; a NaN bound never appears for finite
    data. A user's test run under ``-W error`` must fail in the
    implementation under test, not in the bound. Channels whose data holds
    NaN or inf keep their NaN bound (the assertion fails on it, naming it)."""

    @functools.wraps(fn)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            out = fn(*args, **kwargs)
        ref = args[0] if args else kwargs["ref"]
        finite = np.isfinite(ref.mean)
        bounds = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return dataclasses.replace(
            out,
            **{
                k: b if b is None else np.where(np.isnan(b) & finite, np.inf, b)
                for k, b in bounds.items()
            },
        )

    return quiet  # type: ignore[return-value]


@_overflow_is_infinite
def forward_bounds(
    ref: ReferenceForward,
    dtype: Any,
    *,
    weight: Any = None,
    bias: Any = None,
    param_dtype: Any = None,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    accumulation_eps: float = _EPS["float64"],
    merge_eps: float = _EPS["float64"],
    center: Any = None,
    second_pass: bool = True,
    centering_eps: float = 0.0,
    flush_to_zero: bool = False,
    partial_sums: tuple[Any, int] | str | None = _OWN,
    update_dtype: Any = None,
) -> ForwardBounds:
    """Per-channel bounds on the forward's error against ``ref`` (module docstring).

    ``dtype`` is the input dtype; ``param_dtype`` that of the parameters and
    running statistics (default: the work dtype); ``accumulation_eps`` is
    2**-23 for devices without float64, ``merge_eps`` 2**-23 for libraries
    without any float64 device; ``center`` the merge center the
    implementation used first (None: zero). ``second_pass`` (default)
    bounds arraysyncbn's contract: another merge around the last one's mean
    whenever it lost more than :func:`second_pass_tolerance` (the number of
    ranks is ``len(ref.ys)``), up to three after the first; False bounds a
    single merge around
    ``center``, for implementations that merge once. ``bound.y`` has shape
    ``(C,)``: pass ``axis=`` to :func:`assert_close_to_reference` (or use
    :func:`channel_bound`) to compare it with y.

    ``centering_eps`` (default 0) is the relative error ``e_c`` of the mean
    that an implementation subtracts in ``x − mean``, for implementations
    that center with a mean of the work precision, as PyTorch's float32
    kernels do: ``dtype_eps("float32")`` for a float64 mean rounded to
    float32, ``(n + 1)·dtype_eps("float32")`` for one summed naively in
    float32 (``n = ref.count``; pass ``accumulation_eps`` of float32 too).
    A mean rounded to the input's own dtype after that, as PyTorch's CPU
    kernels do on float16 and bfloat16 input (without float32 affine
    parameters), adds that dtype's epsilon: ``(n + 1)·dtype_eps("float32")
    + dtype_eps("bfloat16")`` (the README's torch recipe has the rest of
    the settings for half precision; the rounding errs by at most half
    that epsilon, the other half covering its product with the float32
    error). That mean is off by ``δ = e_c·|μ|``, so ``Δμ`` grows by δ and
    ``Δv`` by ``δ²`` (a variance taken around ``μ + δ`` is ``var + δ²``); every
    bound built on them follows. The default bounds arraysyncbn's
    contract, whose float64 mean is applied as ``hi + lo`` without that
    loss: at ``|μ|/σ = 1e5`` in float32 a rounded mean alone moves x̂ by
    about ``6e-3``, a million times the default bound.

    ``flush_to_zero`` (default False) is for libraries whose float32
    arithmetic flushes subnormals to zero (:func:`flushes_subnormals`; CuPy
    does): a value that underflowed then errs by up to float32's smallest
    normal (``2**-126``) instead of one subnormal spacing (``2**-149``), in
    every floor of float32 outputs, work and parameters. PyTorch's CPU
    kernels on bfloat16 need it too where the CPU converts to bfloat16 with
    AVX512-BF16, which flushes subnormals (the probe, of float32
    arithmetic, does not see that).

    ``partial_sums`` is ``(dtype, L)`` for implementations that form each
    per-rank sum from partial sums of at most ``L`` terms accumulated in
    ``dtype`` (its terms, ``x − c`` squared or ``dy·(x − c)``, rounded in it
    too), each then added in the accumulation dtype; None for none. Every
    ``e_acc·n`` above grows by ``e_b·min(L, n)`` (``e_b`` that dtype's
    epsilon), and ``Δv`` by ``t_b``, the error of a square that underflowed
    in it (one subnormal spacing; float32's smallest normal with
    ``flush_to_zero``). The default, ``"arraysyncbn"``, is arraysyncbn's
    contract: its host route sums float16 and bfloat16 planes so,
    :data:`HALF_PARTIAL_SUMS` (``("float32", 512)``), and other dtypes
    without partial sums. An implementation that accumulates half
    precision in float64 throughout passes None for the tighter bound.

    ``update_dtype`` (default None) is the dtype in which the running
    averages ``(1 − m)·old + m·new`` are computed. None is arraysyncbn's
    contract: computed in float64 and rounded once to the buffer's dtype,
    which ``4·e_p·|ref|`` bounds. An implementation that computes them in
    the buffer's own precision, as PyTorch does for float32 buffers, passes
    that dtype (``"float32"``): each of ``m``, ``1 − m``, the new statistic,
    both products and the sum is then rounded in it, and cancellation
    between the two terms (an old mean of 1/3, a new one of −3, m = 0.1)
    leaves an absolute error of up to ``2·e_u·((1 − m)·|old| + m·|new|)``
    however small the result; the running bounds gain twice that,
    ``4·e_u·((1 − m)·|old| + m·|new|)`` (``e_u`` its epsilon; ``new`` is
    the batch mean, or the unbiased batch variance; ``(1 − m)·|old|`` is
    taken from the reference as ``|ref.running_mean − m·mean|``).
    """
    e_out = dtype_eps(dtype)
    e_w = _work_eps(e_out)
    e_p = dtype_eps(param_dtype) if param_dtype is not None else e_w
    channels = ref.mean.shape[0]
    w, b = _param_abs(weight, 1.0, channels), _param_abs(bias, 0.0, channels)
    ranks = len(ref.ys) if second_pass else None
    ftz = flush_to_zero
    e_part, t_part = _partial_terms(partial_sums, dtype, ref.count, ftz)
    e_acc = accumulation_eps + e_part
    st = _stat_errors(ref, e_w, e_acc, merge_eps, center, ranks, centering_eps, t_part)
    floor = _floor(dtype, e_w, st.spread + st.d_mean + w * st.invstd_hi, ftz)
    y = 2 * (w * st.d_xhat + (4 * e_w + e_out) * (w * st.xhat_max + b)) + floor
    rm_b = rv_b = None
    if ref.running_mean is not None and ref.running_var is not None:
        if ref.batch_stats and ref.count > 1:
            m = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
            bessel = ref.count / (ref.count - 1)
        else:
            m, bessel = 0.0, 1.0
        tiny_p = 4 * _tiny(param_dtype if param_dtype is not None else "float32", ftz)
        rm_b = m * st.d_mean + 4 * e_p * np.abs(ref.running_mean) + tiny_p
        rv_b = m * st.d_var * bessel + 4 * e_p * np.abs(ref.running_var) + tiny_p
        if update_dtype is not None and m:
            e_u = dtype_eps(update_dtype)
            rm_b = rm_b + _update_term(e_u, m, ref.running_mean, ref.mean)
            rv_b = rv_b + _update_term(e_u, m, ref.running_var, ref.var * bessel)
    return ForwardBounds(y, rm_b, rv_b)


def _update_term(e_u: float, m: float, updated: np.ndarray, new: np.ndarray) -> Any:
    """``4·e_u·((1 − m)·|old| + m·|new|)``: the rounding of ``(1 − m)·old +
    m·new`` computed in a dtype of epsilon ``e_u`` (m, 1 − m, new, both
    products and the sum each rounded once: at most ``2·e_u`` relative on
    either term, doubled as every bound here is). ``(1 − m)·|old|`` is
    ``|updated − m·new|``, from the reference's own update (exact up to
    float64 rounding, and without dividing by ``1 − m``)."""
    return 4 * e_u * (np.abs(updated - m * new) + m * np.abs(new))


def _backward_sums_term(
    ref: ReferenceForward, w: np.ndarray, g: np.ndarray, st: _StatErrors, e_sum: float
) -> Any:
    """dx's share of the rounding of the backward's sums Σdy and Σdy·x̂
    (module docstring): naive sums of n terms, per rank and then merged,
    each off by ``e_sum·(n + 2)`` times the sum of its terms' magnitudes
    (``n − 1`` additions on any path, the ``+ 2`` for the division by n and
    the product with invstd). Σ|dy| ≤ n·G, and Σ|x̂| ≤ n by Cauchy–Schwarz
    (Σx̂² ≤ n), ``n·(1 + Δx̂)`` for the computed x̂; so mean(dy) errs by
    ``e_sum·(n + 2)·G``, mean(dy·x̂) by ``e_sum·(n + 2)·G·(1 + Δx̂)``, and dx,
    ``W·i⁺·(dy − mean(dy) − x̂·mean(dy·x̂))``, by ``W·i⁺`` times the first
    plus X times the second (times the module's factor 2). Zero without
    batch statistics: dx is then ``W·invstd·dy``, with no sums."""
    if not ref.batch_stats:
        return 0.0
    n = max(ref.count, 1)
    spread = 1 + st.xhat_max * (1 + st.d_xhat)
    return 2 * w * st.invstd_hi * g * e_sum * (n + 2) * spread


@_overflow_is_infinite
def backward_bounds(
    ref: ReferenceForward,
    grads: ReferenceBackward,
    dys: list[Any],
    dtype: Any,
    *,
    weight: Any = None,
    param_dtype: Any = None,
    accumulation_eps: float = _EPS["float64"],
    merge_eps: float = _EPS["float64"],
    center: Any = None,
    second_pass: bool = True,
    centering_eps: float = 0.0,
    flush_to_zero: bool = False,
    partial_sums: tuple[Any, int] | str | None = _OWN,
) -> BackwardBounds:
    """Per-channel bounds on the backward's error against ``grads`` (module
    docstring); ``center``, ``second_pass``, ``centering_eps``,
    ``flush_to_zero`` and ``partial_sums`` as for :func:`forward_bounds`
    (whose products ``dy·(x − c)`` that underflowed in the partial sums'
    dtype add ``2·n·i⁺·t_b`` to dweight's bound and ``2·W·X·i⁺²·t_b`` to dx's)."""
    e_out = dtype_eps(dtype)
    e_w = _work_eps(e_out)
    e_p = dtype_eps(param_dtype) if param_dtype is not None else e_w
    ftz = flush_to_zero
    e_part, t_part = _partial_terms(partial_sums, dtype, ref.count, ftz)
    e_acc = accumulation_eps + e_part
    channels = ref.mean.shape[0]
    w = _param_abs(weight, 1.0, channels)
    g = _per_channel_max([to_numpy(d).astype(np.float64) for d in dys], ref.axis, channels)
    ranks = len(ref.ys) if second_pass else None
    st = _stat_errors(ref, e_w, e_acc, merge_eps, center, ranks, centering_eps, t_part)
    x = st.xhat_max
    floor = _floor(dtype, e_w, g * (2 + x * x) + w * st.invstd_hi**2 * g * x, ftz)
    dx = (
        2
        * w
        * (
            st.d_invstd * g * (2 + x * x)
            + st.invstd_hi * g * (2 * x * st.d_xhat + (8 * e_w + e_out) * (2 + x * x))
        )
        + floor
        # Products dy·(x − mean) that underflowed in the partial sums: each off
        # by t_part moves invstd·mean(dy·x̂) by invstd²·t_part.
        + 2 * w * x * st.invstd_hi**2 * t_part
        + _backward_sums_term(ref, w, g, st, max(e_acc, merge_eps))
    )
    n = max(ref.count, 1)
    tiny_p = 4 * _tiny(param_dtype if param_dtype is not None else "float32", ftz)
    # Each centered value is a work-dtype number, so below the normal range
    # it carries up to one subnormal spacing of the work dtype; Σdy·x̂ scales
    # that by n·G·i⁺ (y and dx have the same term in their floors).
    dweight = (
        2 * n * g * (st.d_xhat + (4 * e_w + e_acc * n) * x)
        + e_p * n * g * x
        + tiny_p
        + _floor(dtype, e_w, n * g * st.invstd_hi, ftz)
        + 2 * n * st.invstd_hi * t_part
    )
    dbias = 2 * n * g * e_acc * n + e_p * n * g + tiny_p
    return BackwardBounds(dx, dweight, dbias)


def channel_bound(bound: Any, ndim: int, axis: int) -> Any:
    """Return a per-channel bound of shape ``(C,)`` reshaped to broadcast
    against an ``ndim``-array with channels on ``axis`` (scalars unchanged).

    Raises ValueError for a bound that is neither a scalar nor 1-D, or an
    ``axis`` outside ``ndim`` dimensions.
    """
    if np.ndim(bound) == 0:
        return bound
    if np.ndim(bound) != 1:
        raise ValueError(
            f"a bound is a scalar or per channel, of shape (C,); got shape {np.shape(bound)}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(bound, shape)


def assert_like(actual: Any, like: Any, *, dtype: Any = None, name: str = "array") -> None:
    """Assert ``actual`` has ``like``'s namespace, device and shape, and ``dtype``.

    ``dtype`` defaults to ``like.dtype``.
    """
    import array_api_compat

    xp_a = array_api_compat.array_namespace(actual)
    xp_l = array_api_compat.array_namespace(like)
    assert xp_a is xp_l, f"{name}: namespace {xp_a.__name__}, expected {xp_l.__name__}"
    dev_a, dev_l = array_api_compat.device(actual), array_api_compat.device(like)
    assert dev_a == dev_l, f"{name}: device {dev_a}, expected {dev_l}"
    assert tuple(actual.shape) == tuple(like.shape), (
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(like.shape)}"
    )
    want = like.dtype if dtype is None else dtype
    assert actual.dtype == want, f"{name}: dtype {actual.dtype}, expected {want}"


def _per_channel(bound: Any, shape: tuple[int, ...], axis: int | None, name: str) -> Any:
    """``bound`` as an array that broadcasts against ``shape``, or ValueError
    naming what does not match (instead of numpy's broadcasting error)."""
    b = np.asarray(to_numpy(bound), dtype=np.float64)
    if b.ndim == 0:
        return b
    if axis is not None:
        b = channel_bound(b, len(shape), axis)
        if b.size != shape[axis % len(shape)]:
            raise ValueError(
                f"{name}: a bound for {b.size} channels, but the array has "
                f"{shape[axis % len(shape)]} along its channel axis {axis} (shape {shape})"
            )
        return b
    if b.ndim == 1 and len(shape) != 1:
        raise ValueError(
            f"{name}: a per-channel bound needs axis= (the channel axis of the array), "
            "or it would broadcast along the wrong axis"
        )
    try:
        fits = np.broadcast_shapes(b.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name}: a bound of shape {b.shape} for an array of shape {shape}")
    return b


def assert_close_to_reference(
    actual: Any,
    expected: np.ndarray,
    bound: float | np.ndarray,
    *,
    name: str = "array",
    axis: int | None = None,
) -> float:
    """Assert ``|actual − expected| ≤ bound`` elementwise; return the max error.

    Parameters
    ----------
    actual : array of any library (numpy, torch, cupy, array-api-strict, ...)
        The result under test, of a real floating dtype; it is copied to
        host float64.
    expected : numpy array, float64
        The reference, of the same shape.
    bound : float or array of shape ``(C,)``
        An absolute bound: a scalar, or per channel along ``axis`` (as
        :func:`forward_bounds` and :func:`backward_bounds` return). A 1-D
        ``actual`` (running statistics, dweight) takes a ``(C,)`` bound
        without ``axis``.
    name : str
        Names the array in the failure message.
    axis : int, optional
        The channel axis of ``actual``; required for a per-channel bound on
        an array of more than one dimension.

    Returns
    -------
    float
        The largest elementwise error (0.0 for empty arrays).

    Raises
    ------
    AssertionError
        When ``actual`` is not of a real floating dtype (complex, integer or
        bool: no result of batch norm), on a shape mismatch, or where the
        error exceeds the bound. NaN in
        ``actual`` never passes, not even against NaN or an infinite bound;
        ±inf passes only where ``expected`` holds the same infinity. The
        message names the worst element (and its channel, given ``axis``),
        its error and how many times the bound that is, and every failing
        channel.
    ValueError
        When ``bound`` does not fit the array (a per-channel bound for
        another number of channels, or without ``axis``), or ``expected``
        is complex.
    """
    host = to_numpy(actual)
    if np.asarray(host).dtype.kind != "f":
        # A cast to float64 would drop an imaginary part with only a
        # ComplexWarning (actual = expected + 5j passed with error 0.0).
        raise AssertionError(
            f"{name}: dtype {getattr(actual, 'dtype', type(actual).__name__)} is not a real "
            "floating dtype; batch norm results are real floats"
        )
    a = np.asarray(host).astype(np.float64)
    if np.iscomplexobj(expected):
        raise ValueError(f"{name}: the expected values are complex; the reference is real")
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape}, expected {e.shape}"
    b = _per_channel(bound, a.shape, axis, name)
    if a.size == 0:
        return 0.0
    same_inf = np.isinf(e) & (a == e)
    with np.errstate(invalid="ignore"):
        err = np.where(same_inf, 0.0, np.abs(a - e))
    # A NaN or an unmatched infinity is an infinite error, and it fails even
    # against an infinite bound (``inf <= inf`` would let it pass).
    nonfinite = ~np.isfinite(err)
    err = np.where(nonfinite, np.inf, err)
    ok = (err <= b) & ~nonfinite
    if np.all(ok):
        return float(np.max(err))
    full_b = np.broadcast_to(b, a.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(ok, -np.inf, np.where(nonfinite, np.inf, err / full_b))
    excess = np.where(np.isnan(excess), np.inf, excess)  # a NaN bound fails outright
    idx = np.unravel_index(int(np.argmax(excess)), a.shape)
    where = tuple(int(i) for i in idx)
    bad = int(np.size(ok) - np.count_nonzero(ok))
    lines = [f"{name}: {bad} of {a.size} elements exceed the bound"]
    if axis is not None:
        ax = axis % a.ndim
        axes = tuple(i for i in range(a.ndim) if i != ax)
        channels = np.flatnonzero(~np.all(ok, axis=axes))
        lines[0] += f", in channel(s) {channels.tolist()}"
        lines.append(f"worst in channel {where[ax]}, at index {where}:")
    else:
        lines.append(f"worst at index {where}:")
    got, want, bnd = float(a[idx]), float(e[idx]), float(full_b[idx])
    if np.isnan(got):
        why = "NaN never passes"
    elif nonfinite[idx]:
        why = f"{got} where the reference is {want}"
    elif np.isnan(bnd):
        why = "the bound is NaN (from a NaN in the reference's statistics?)"
    else:
        why = f"error {err[idx]:.3e} > bound {bnd:.3e} ({err[idx] / bnd:.3g} × the bound)"
    lines.append(f"  got {got!r}, expected {want!r}: {why}")
    raise AssertionError("\n".join(lines))
