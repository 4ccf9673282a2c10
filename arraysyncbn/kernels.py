"""Per-rank batch-norm math, written once against the Python array API standard.

Every function takes the array namespace ``xp`` as a required keyword and
touches arrays only through it, so the same code runs on numpy, cupy, torch,
array-api-strict and any other array-API library. Nothing here communicates
or keeps state: :mod:`arraysyncbn.functional` packs what these functions
return into one buffer, reduces it across ranks and hands the reduced values
back.

Precisions (see ``docs/numerics.md``):

* *work dtype*: the dtype elementwise math runs in: the input dtype for
  float32/float64, float32 for float16/bfloat16.
* *accumulation dtype*: the dtype of every per-channel sum and of every
  statistic: float64 wherever the device has it, else float32.

Statistics are never formed as E[x²] − E[x]² in the input precision. Each rank
takes its own mean ``c`` (a float64 sum of x), then sums ``d = x − c`` and
``d²``; only then are the sums turned into float64 ``Σx`` and ``Σx²`` for the
exact cross-rank merge. Centering during normalization subtracts the float64
mean as a hi/lo pair of work-dtype numbers, so ``x − mean`` keeps nearly full
precision even when |mean| ≫ std.
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
    "normalize",
    "reduction_axes",
    "work_dtype",
]


def work_dtype(xp: Namespace, dtype: Any) -> Any:
    """Return the dtype elementwise math runs in for inputs of ``dtype``."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


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


def local_moments(x: Array, axis: int, *, xp: Namespace, acc: Any) -> tuple[int, Array, Array]:
    """Return this rank's ``(n, Σx, Σx²)`` per channel, stably computed.

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
    s1, s2 : arrays of shape ``(C,)`` and dtype ``acc``
        ``Σx`` and ``Σx²`` per channel, with ``Σx²`` assembled from sums
        around this rank's mean so that no cancellation happens in the
        input precision.
    """
    n = _count(x, axis)
    axes = reduction_axes(x.ndim, axis)
    xw = xp.astype(x, work_dtype(xp, x.dtype), copy=False)
    s1 = xp.sum(xw, axis=axes, dtype=acc)
    if n == 0:
        return n, s1, xp.zeros_like(s1)
    c = xp.astype(s1 / n, xw.dtype)
    d = xw - channel_view(c, x.ndim, axis, xp=xp)
    a = xp.sum(d, axis=axes, dtype=acc)
    b = xp.sum(d * d, axis=axes, dtype=acc)
    c_acc = xp.astype(c, acc)
    # Σx² = Σd² + 2cΣd + n c², exact algebra; Σd is tiny since c is the mean.
    s2 = b + 2.0 * c_acc * a + n * (c_acc * c_acc)
    return n, s1, s2


def finalize_moments(count: float, s1: Array, s2: Array, *, xp: Namespace) -> tuple[Array, Array]:
    """Return the global ``(mean, biased var)`` from merged sums.

    ``count`` must be positive. The variance is clamped at zero: rounding
    may otherwise leave it a hair below zero for constant channels.
    """
    mean = s1 / count
    var = s2 / count - mean * mean
    return mean, xp.clip(var, 0.0, None)


def _mean_pair(
    mean: Array, ndim: int, axis: int, wdtype: Any, *, xp: Namespace
) -> tuple[Array, Array | None]:
    """Split an accumulation-dtype mean into work-dtype ``hi + lo``."""
    hi = xp.astype(mean, wdtype)
    if mean.dtype == wdtype:
        return channel_view(hi, ndim, axis, xp=xp), None
    lo = xp.astype(mean - xp.astype(hi, mean.dtype), wdtype)
    return channel_view(hi, ndim, axis, xp=xp), channel_view(lo, ndim, axis, xp=xp)


def centered(x: Array, mean: Array, axis: int, *, xp: Namespace) -> Array:
    """Return ``x − mean`` in the work dtype, ``mean`` given per channel.

    ``x − hi`` is exact whenever x lies within a factor of two of the mean
    (Sterbenz), which is where precision matters; ``lo`` then restores the
    part of the float64 mean that the work dtype cannot hold.
    """
    wdtype = work_dtype(xp, x.dtype)
    xw = xp.astype(x, wdtype, copy=False)
    hi, lo = _mean_pair(mean, x.ndim, axis, wdtype, xp=xp)
    xc = xw - hi
    return xc if lo is None else xc - lo


def normalize(
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None,
    bias: Array | None,
    axis: int,
    *,
    xp: Namespace,
) -> Array:
    """Return ``(x − mean)·(weight·invstd) + bias`` in x's dtype.

    ``mean`` and ``invstd`` are per-channel accumulation-dtype vectors;
    ``weight`` and ``bias`` per-channel vectors of any floating dtype, or None.
    """
    wdtype = work_dtype(xp, x.dtype)
    scale = invstd if weight is None else invstd * xp.astype(weight, invstd.dtype)
    y = centered(x, mean, axis, xp=xp) * channel_view(xp.astype(scale, wdtype), x.ndim, axis, xp=xp)
    if bias is not None:
        y = y + channel_view(xp.astype(bias, wdtype), x.ndim, axis, xp=xp)
    return xp.astype(y, x.dtype, copy=False)


def invstd_of(var: Array, eps: float, *, xp: Namespace) -> Array:
    """Return ``1/sqrt(var + eps)``."""
    return 1.0 / xp.sqrt(var + eps)


def backward_sums(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    axis: int,
    *,
    xp: Namespace,
    acc: Any,
) -> tuple[Array, Array]:
    """Return this rank's ``(Σdy, Σdy·x̂)`` per channel in dtype ``acc``."""
    axes = reduction_axes(x.ndim, axis)
    wdtype = work_dtype(xp, x.dtype)
    dyw = xp.astype(dy, wdtype, copy=False)
    sum_dy = xp.sum(dyw, axis=axes, dtype=acc)
    # Σdy·(x − mean) first, then one multiply by invstd per channel.
    sum_dy_xc = xp.sum(dyw * centered(x, mean, axis, xp=xp), axis=axes, dtype=acc)
    return sum_dy, sum_dy_xc * invstd


def backward_input(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None,
    mean_dy: Array | None,
    mean_dy_xhat: Array | None,
    axis: int,
    *,
    xp: Namespace,
) -> Array:
    """Return dx for ``y = x̂·weight + bias``, in x's dtype.

    ``mean_dy`` and ``mean_dy_xhat`` are the *global* means of dy and dy·x̂
    per channel (sums over all ranks divided by the global count). Pass None
    for both when the statistics were constants (running statistics in eval
    mode): then ``dx = dy·weight·invstd``.
    """
    wdtype = work_dtype(xp, x.dtype)
    scale = invstd if weight is None else invstd * xp.astype(weight, invstd.dtype)
    dyw = xp.astype(dy, wdtype, copy=False)
    if mean_dy is None or mean_dy_xhat is None:
        g = dyw
    else:
        # x̂·mean(dy·x̂) = (x − mean)·(invstd·mean(dy·x̂)): one per-channel factor.
        k = xp.astype(invstd * mean_dy_xhat, wdtype)
        g = (dyw - channel_view(xp.astype(mean_dy, wdtype), x.ndim, axis, xp=xp)) - (
            centered(x, mean, axis, xp=xp) * channel_view(k, x.ndim, axis, xp=xp)
        )
    dx = g * channel_view(xp.astype(scale, wdtype), x.ndim, axis, xp=xp)
    return xp.astype(dx, x.dtype, copy=False)
