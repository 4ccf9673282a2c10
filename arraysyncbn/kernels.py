"""Per-rank batch-norm math, written once against the Python array API standard.

Every function takes the array namespace ``xp`` as a required keyword and
touches arrays only through it, so the same code runs on numpy, cupy, torch,
array-api-strict and any other array-API library. Nothing here communicates
or keeps state: :mod:`arraysyncbn.functional` packs what these functions
return into one buffer, reduces it across ranks and hands the reduced values
back.

Precisions (see ``docs/numerics.md``):

* *work dtype*: the dtype elementwise math runs in: the input dtype for
  float32/float64 (their native-byte-order twin for byte-swapped numpy
  arrays), float32 for float16/bfloat16.
* *accumulation dtype*: the dtype of every per-channel sum and of every
  statistic: float64 wherever the device has it, else float32.

Statistics are never formed as E[x²] − E[x]² in the input precision. Each rank
takes its own mean ``c`` as a shift, then sums ``d = x − c`` and ``d²``; only
then are the sums turned into float64 sums around a center shared by every
rank for the cross-rank merge (:func:`moment_sums`). Centering
during normalization subtracts the float64 mean as a hi/lo pair of work-dtype
numbers, so ``x − mean`` keeps nearly full precision even when |mean| ≫ std.
"""

from __future__ import annotations

from typing import Any

Array = Any
Namespace = Any

__all__ = [
    "accumulation_dtype",
    "backward_input",
    "backward_sums",
    "centered",
    "channel_view",
    "finalize_moments",
    "invstd_of",
    "local_moments",
    "moment_sums",
    "normalize",
    "reduction_axes",
    "scale_of",
    "split_mean",
    "work_dtype",
]


def work_dtype(xp: Namespace, dtype: Any) -> Any:
    """Return the dtype elementwise math runs in for inputs of ``dtype``.

    float64 for 64-bit (and wider) real floats, float32 for the rest (half
    precisions, and the 16-bit patterns through which the host route sees
    them), judged by ``finfo(dtype).bits``: a dtype that compares unequal to
    ``xp.float64`` while holding float64 numbers (numpy's byte-swapped
    ``>f8`` on a little-endian machine) must not be computed in float32. The
    result is always the namespace's own dtype, in native byte order.
    """
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    wide = xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits >= 64
    return xp.float64 if wide else xp.float32


def accumulation_dtype(xp: Namespace, device: Any) -> Any:
    """Return float64 when ``device`` supports it, else float32."""
    try:
        info = xp.__array_namespace_info__()
        kinds = info.dtypes(device=device, kind="real floating")
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return xp.float64
    return xp.float64 if "float64" in kinds else xp.float32


def reduction_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Return every axis of an ``ndim``-array except the channel ``axis``."""
    return tuple(i for i in range(ndim) if i != axis)


def channel_view(v: Array, ndim: int, axis: int, *, xp: Namespace) -> Array:
    """Return the per-channel vector ``v`` reshaped to broadcast along ``axis``."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def _count(x: Array, axis: int) -> int:
    n = 1
    for i, s in enumerate(x.shape):
        if i != axis:
            n *= int(s)
    return n


def local_moments(
    x: Array, axis: int, *, xp: Namespace, acc: Any
) -> tuple[int, Array, Array, Array]:
    """Return this rank's shifted moments ``(n, c, Σ(x − c), Σ(x − c)²)``.

    Parameters
    ----------
    x : array of shape ``(..., C, ...)``, channels on ``axis``; any real
        floating dtype. May be empty.
    axis : non-negative channel axis.
    acc : accumulation dtype of the returned sums.

    Returns
    -------
    n : int
        Number of elements per channel on this rank.
    c : array of shape ``(C,)`` in the work dtype
        The shift: this rank's mean, rounded (any value would be exact;
        the mean keeps the sums small so that no cancellation happens).
    a, b : arrays of shape ``(C,)`` and dtype ``acc``
        ``Σ(x − c)`` and ``Σ(x − c)²`` per channel, each ``x − c`` rounded
        to the work dtype and then squared in ``acc`` (so float32 input on a
        float64 device overflows only where float64 would). :func:`moment_sums`
        turns them into ``Σx`` and ``Σx²`` in float64 for the merge.
    """
    n = _count(x, axis)
    axes = reduction_axes(x.ndim, axis)
    xw = xp.astype(x, work_dtype(xp, x.dtype), copy=False)
    s1 = xp.sum(xw, axis=axes, dtype=acc)
    c = xp.astype(s1 / max(n, 1), xw.dtype)
    if n == 0:
        return n, c, s1, xp.zeros_like(s1)
    # Square in the accumulation dtype: float32 squares overflow from
    # |x − c| ≈ 1.8e19 on, long before float64 sums would.
    d = xp.astype(xw - channel_view(c, x.ndim, axis, xp=xp), acc, copy=False)
    return n, c, xp.sum(d, axis=axes, dtype=acc), xp.sum(d * d, axis=axes, dtype=acc)


def moment_sums(n: int, c: Array, a: Array, b: Array, *, xp: Namespace) -> tuple[Array, Array]:
    """Return ``(Σx, Σx²)`` from shifted moments, in ``a``'s dtype.

    ``Σx = n·c + Σd`` and ``Σx² = Σd² + 2c·Σd + n·c²`` with ``d = x − c``:
    exact algebra, evaluated in the (float64) dtype of ``a`` and ``b``.
    """
    c = xp.astype(c, a.dtype)
    return n * c + a, b + 2.0 * c * a + n * (c * c)


def finalize_moments(count: float, s1: Array, s2: Array, *, xp: Namespace) -> tuple[Array, Array]:
    """Return the global ``(mean, biased var)`` from merged sums.

    ``count`` must be positive. The variance is clamped at zero: rounding
    may otherwise leave it a hair below zero for constant channels.
    """
    mean = s1 / count
    var = s2 / count - mean * mean
    return mean, xp.clip(var, 0.0, None)


def invstd_of(var: Array, eps: float, *, xp: Namespace) -> Array:
    """Return ``1/sqrt(var + eps)``."""
    return 1.0 / xp.sqrt(var + eps)


def split_mean(mean: Array, wdtype: Any, *, xp: Namespace) -> tuple[Array, Array | None]:
    """Split a per-channel mean into work-dtype ``hi + lo`` (``lo`` None if exact).

    ``x − hi`` is exact whenever x lies within a factor of two of the mean
    (Sterbenz), which is where precision matters; ``lo`` then restores the
    part of the float64 mean that the work dtype cannot hold. Where ``hi`` is
    not finite (an infinite or NaN mean, or one beyond the work dtype's range)
    ``lo`` is 0: ``mean − hi`` would be ``inf − inf = NaN`` and turn the
    ``−inf``/``+inf`` that ``x − mean`` gives (as in PyTorch) into NaN.
    """
    hi = xp.astype(mean, wdtype)
    if mean.dtype == wdtype:
        return hi, None
    wide = xp.astype(hi, mean.dtype)
    finite = xp.isfinite(wide)
    # mean − 0 where hi is not finite: no inf − inf computed, so no warning.
    lo = xp.where(finite, mean - xp.where(finite, wide, 0.0), 0.0)
    return hi, xp.astype(lo, wdtype)


def scale_of(invstd: Array, weight: Array | None, *, xp: Namespace) -> Array:
    """Return ``weight·invstd`` per channel in invstd's dtype (``invstd`` without weight)."""
    return invstd if weight is None else invstd * xp.astype(weight, invstd.dtype)


def centered(x: Array, hi: Array, lo: Array | None, axis: int, *, xp: Namespace) -> Array:
    """Return ``x − (hi + lo)`` in the work dtype; ``hi``, ``lo`` per channel."""
    xw = xp.astype(x, work_dtype(xp, x.dtype), copy=False)
    xc = xw - channel_view(hi, x.ndim, axis, xp=xp)
    return xc if lo is None else xc - channel_view(lo, x.ndim, axis, xp=xp)


def normalize(
    x: Array,
    hi: Array,
    lo: Array | None,
    scale: Array,
    shift: Array | None,
    axis: int,
    *,
    xp: Namespace,
) -> Array:
    """Return ``(x − mean)·scale + shift`` in x's dtype.

    All per-channel vectors are in the work dtype on x's device: ``hi + lo``
    the mean (:func:`split_mean`), ``scale`` usually ``weight·invstd``,
    ``shift`` the bias or None (a shift of 0). Centering first, then
    scaling, keeps full precision when |mean| ≫ std (``x·scale + (bias −
    mean·scale)`` would lose it).
    """
    y = centered(x, hi, lo, axis, xp=xp) * channel_view(scale, x.ndim, axis, xp=xp)
    # No shift still adds 0: where x is the mean and scale negative, y is
    # then +0, not −0, as PyTorch (x̂·weight + 0) and the fused kernels give.
    y = y + (0.0 if shift is None else channel_view(shift, x.ndim, axis, xp=xp))
    return xp.astype(y, x.dtype, copy=False)


def backward_sums(
    dy: Array,
    x: Array,
    hi: Array,
    lo: Array | None,
    axis: int,
    *,
    xp: Namespace,
    acc: Any,
) -> tuple[Array, Array]:
    """Return this rank's ``(Σdy, Σdy·(x − mean))`` per channel in dtype ``acc``.

    Multiply the second by ``invstd`` (in float64, per channel) for Σdy·x̂.
    """
    axes = reduction_axes(x.ndim, axis)
    dyw = xp.astype(dy, work_dtype(xp, x.dtype), copy=False)
    sum_dy = xp.sum(dyw, axis=axes, dtype=acc)
    # The product in the accumulation dtype, as the host kernels form it:
    # in float32 it overflows where |dy|·|x − mean| passes 3.4e38.
    xc = xp.astype(centered(x, hi, lo, axis, xp=xp), acc, copy=False)
    sum_dy_xc = xp.sum(xp.astype(dyw, acc, copy=False) * xc, axis=axes, dtype=acc)
    return sum_dy, sum_dy_xc


def backward_input(
    dy: Array,
    x: Array,
    hi: Array,
    lo: Array | None,
    scale: Array,
    mean_dy: Array | None,
    k: Array | None,
    axis: int,
    *,
    xp: Namespace,
) -> Array:
    """Return ``dx = scale·(dy − mean_dy − (x − mean)·k)`` in x's dtype.

    ``mean_dy`` is the *global* mean of dy per channel and
    ``k = invstd·mean(dy·x̂)`` (global), both in the work dtype; with None
    for both (running statistics: constants) ``dx = scale·dy``.
    """
    dyw = xp.astype(dy, work_dtype(xp, x.dtype), copy=False)
    if mean_dy is None or k is None:
        g = dyw
    else:
        g = (dyw - channel_view(mean_dy, x.ndim, axis, xp=xp)) - (
            centered(x, hi, lo, axis, xp=xp) * channel_view(k, x.ndim, axis, xp=xp)
        )
    return xp.astype(g * channel_view(scale, x.ndim, axis, xp=xp), x.dtype, copy=False)
