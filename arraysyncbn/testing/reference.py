"""A float64, single-process reference for synchronized batch normalization.

Independent of :mod:`arraysyncbn.kernels`: plain numpy in float64, two-pass
statistics, textbook formulas. It takes the list of every rank's shard, so
the "global batch" is simply the union of the shards (no concatenation is
needed, and shards may differ in every non-channel size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ReferenceBackward",
    "ReferenceForward",
    "reference_backward",
    "reference_forward",
    "to_numpy",
]


def to_numpy(a: Any) -> np.ndarray:
    """Return a host numpy copy of an array of any array-API library (or None)."""
    if a is None:
        return None  # type: ignore[return-value]
    if isinstance(a, np.ndarray | np.generic):
        return np.array(a)
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        return a.get()
    if mod == "torch":
        return (
            a.detach().cpu().float().numpy()
            if str(a.dtype) == "torch.bfloat16"
            else (a.detach().cpu().numpy())
        )
    try:
        return np.array(np.from_dlpack(a))
    except (TypeError, RuntimeError, BufferError, AttributeError, ValueError):
        return np.asarray(a)


def _f64(a: Any) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


def _f64_or_none(a: Any) -> np.ndarray | None:
    return None if a is None else _f64(a)


def _checked_shards(shards: Sequence[Any], axis: int) -> tuple[list[np.ndarray], int, int]:
    """The shards in float64, the channel axis in ``[0, ndim)`` and the number
    of channels; ValueError naming the shard whose layout differs (numpy's
    own errors for these say nothing about shards or channels)."""
    xs = [_f64(s) for s in shards]
    if not xs:
        raise ValueError("reference_forward needs at least one shard (one per rank)")
    ndim = xs[0].ndim
    if not -ndim <= axis < ndim or ndim == 0:
        raise ValueError(f"axis {axis} is out of range for shards of {ndim} dimensions")
    ax = axis % ndim
    channels = xs[0].shape[ax]
    for i, x in enumerate(xs):
        if x.ndim != ndim or x.shape[ax] != channels:
            raise ValueError(
                f"shard {i} has shape {x.shape}, shard 0 {xs[0].shape}: every shard needs "
                f"{ndim} dimensions and the same number of channels on axis {axis}"
            )
    return xs, ax, channels


def _checked_vector(a: Any, channels: int, name: str) -> np.ndarray | None:
    v = _f64_or_none(a)
    if v is not None and v.shape != (channels,):
        raise ValueError(f"{name} has shape {v.shape}; expected ({channels},), one per channel")
    return v


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


@dataclass(frozen=True)
class ReferenceForward:
    """Float64 results of a forward over all shards.

    ``ys[i]`` and ``xhats[i]`` belong to shard i. ``count`` is the global N
    per channel. ``mean``/``var`` are the statistics used to normalize (the
    batch statistics, or the running ones in eval mode); ``var`` is biased.
    ``running_mean``/``running_var`` are the updated running statistics
    (None when not tracked). ``batch_stats`` says which statistics were used.
    """

    ys: list[np.ndarray]
    xhats: list[np.ndarray]
    mean: np.ndarray
    var: np.ndarray
    invstd: np.ndarray
    count: int
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    batch_stats: bool
    axis: int


@dataclass(frozen=True)
class ReferenceBackward:
    """Float64 gradients: per shard ``dxs`` and per-rank weight/bias gradients.

    ``dweights[i]``/``dbiases[i]`` are shard i's contributions (what each
    rank's SyncBN returns); ``dweight``/``dbias`` their sums (the gradients
    of the whole batch).
    """

    dxs: list[np.ndarray]
    dweights: list[np.ndarray]
    dbiases: list[np.ndarray]
    dweight: np.ndarray
    dbias: np.ndarray


_SCALED = 2.0**500
"""Deviations past this are scaled by a power of two before squaring."""


def _variance_and_invstd(
    xs: list[np.ndarray], mean: np.ndarray, count: int, eps: float, ax: int
) -> tuple[np.ndarray, np.ndarray]:
    """The biased variance and ``1/sqrt(var + eps)`` of a non-empty batch.

    A channel whose deviations reach past ~1e150 is scaled by a power of
    two ``s`` (exact) before squaring: its variance may then be +inf (it is
    beyond float64; no value is right), but
    ``invstd = 1/(s·sqrt(Σ(d/s)²/n + eps/s/s))`` and so x̂ and y stay right
    instead of 0. Other channels are computed as before, bit for bit."""
    ndim = xs[0].ndim
    axes = _axes(ndim, ax)
    devs = [x - _bcast(mean, ndim, ax) for x in xs]
    with np.errstate(invalid="ignore"):  # NaN/inf data: its NaN statistics stay
        biggest = np.max([np.max(np.abs(d), axis=axes, initial=0.0) for d in devs], axis=0)
    scaled = biggest > _SCALED  # False for NaN
    scale = np.where(scaled, np.exp2(np.frexp(np.where(scaled, biggest, 1.0))[1]), 1.0)
    norm = np.sum([((d / _bcast(scale, ndim, ax)) ** 2).sum(axis=axes) for d in devs], axis=0)
    norm = norm / count
    with np.errstate(over="ignore"):  # the variance itself beyond float64: +inf
        var = norm * scale * scale
    invstd = np.where(scaled, 1.0 / (scale * np.sqrt(norm + eps / scale / scale)), 0.0)
    plain = ~scaled
    invstd[plain] = 1.0 / np.sqrt(var[plain] + eps)
    return var, invstd


def reference_forward(
    shards: Sequence[Any],
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    num_batches_tracked: int = 0,
) -> ReferenceForward:
    """Batch norm of the union of ``shards`` in float64.

    Semantics are PyTorch's: biased variance for normalization, unbiased
    (N/(N−1)) for the running variance, ``momentum=None`` is the cumulative
    average with ``m = 1/(num_batches_tracked + 1)``; no bias is a bias of 0
    (added: y is +0 where x is the mean); global N = 0 leaves the
    running statistics unchanged; N = 1 with batch statistics raises
    ValueError.

    Deviations from the mean past ~1e150 are scaled by a power of two before
    squaring, so x̂, y and ``invstd`` stay right where the variance itself
    is beyond float64 (``var`` and the running variance are then +inf, with
    no overflow warning): the mathematical values, where PyTorch and
    arraysyncbn, whose variance overflows, normalize to the bias; the
    bounds there are +inf, so either passes. Data holding NaN or ±inf gives NaN statistics and
    outputs for its channels (with numpy's warnings): nothing passes
    against them.

    Raises ValueError, too, for inputs that do not describe one batch norm:
    no shards, shards with different numbers of dimensions or channels,
    parameters or running statistics not of shape ``(C,)``, or only one of
    ``running_mean`` and ``running_var`` (its update would silently be
    skipped).
    """
    xs, ax, channels = _checked_shards(shards, axis)
    ndim = xs[0].ndim
    w, b = _checked_vector(weight, channels, "weight"), _checked_vector(bias, channels, "bias")
    rm = _checked_vector(running_mean, channels, "running_mean")
    rv = _checked_vector(running_var, channels, "running_var")
    if (rm is None) != (rv is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    batch_stats = training or rm is None or rv is None
    count = sum(int(np.prod([s for i, s in enumerate(x.shape) if i != ax])) for x in xs)
    mean: np.ndarray
    var: np.ndarray
    if batch_stats or rm is None or rv is None:
        if count == 1:
            raise ValueError("a global batch of one element per channel has no variance")
        if count == 0:
            mean = np.zeros(channels)
            var = np.zeros(channels)
        else:
            axes = _axes(ndim, ax)
            mean = np.sum([x.sum(axis=axes) for x in xs], axis=0) / count
            # One refinement step: the sum's rounding (a few ulps of |mean|,
            # ~5e-13 at 1e3) would otherwise exceed the bounds of an
            # implementation that merges around a center near the mean.
            mean = (
                mean
                + np.sum([(x - _bcast(mean, ndim, ax)).sum(axis=axes) for x in xs], axis=0) / count
            )
            var, invstd = _variance_and_invstd(xs, mean, count, eps, ax)
    else:
        mean, var = rm, rv
    if not batch_stats or count == 0:
        invstd = 1.0 / np.sqrt(var + eps)
    xhats = [(x - _bcast(mean, ndim, ax)) * _bcast(invstd, ndim, ax) for x in xs]
    ys = []
    for xh in xhats:
        y = xh if w is None else xh * _bcast(w, ndim, ax)
        # No bias adds 0, as PyTorch does: y is +0, not −0, where x is the mean.
        ys.append(y + (0.0 if b is None else _bcast(b, ndim, ax)))
    new_rm, new_rv = rm, rv
    if training and rm is not None and rv is not None and count > 0:
        m = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
        new_rm = (1 - m) * rm + m * mean
        new_rv = (1 - m) * rv + m * var * count / (count - 1)
    return ReferenceForward(ys, xhats, mean, var, invstd, count, new_rm, new_rv, batch_stats, ax)


def reference_backward(
    fwd: ReferenceForward, dys: Sequence[Any], weight: Any = None
) -> ReferenceBackward:
    """Gradients of :func:`reference_forward` for upstream gradients ``dys``.

    ``dys[i]`` is shard i's upstream gradient, of the shard's shape; ValueError
    otherwise, or for a ``weight`` not of shape ``(C,)``.
    """
    dys64 = [_f64(d) for d in dys]
    if len(dys64) != len(fwd.xhats):
        raise ValueError(f"{len(dys64)} upstream gradients for {len(fwd.xhats)} shards")
    for i, (d, xh) in enumerate(zip(dys64, fwd.xhats, strict=True)):
        if d.shape != xh.shape:
            raise ValueError(f"dys[{i}] has shape {d.shape}, its shard {xh.shape}")
    ax = fwd.axis
    ndim = fwd.xhats[0].ndim
    channels = fwd.mean.shape[0]
    w = np.ones(channels) if weight is None else _checked_vector(weight, channels, "weight")
    axes = _axes(ndim, ax)
    dbiases = [d.sum(axis=axes) for d in dys64]
    dweights = [(d * xh).sum(axis=axes) for d, xh in zip(dys64, fwd.xhats, strict=True)]
    dbias = sum(dbiases, np.zeros(channels))
    dweight = sum(dweights, np.zeros(channels))
    scale = _bcast(w * fwd.invstd, ndim, ax)
    if not fwd.batch_stats:
        dxs = [d * scale for d in dys64]
    elif fwd.count == 0:
        dxs = [np.zeros_like(d) for d in dys64]
    else:
        mean_dy = _bcast(dbias / fwd.count, ndim, ax)
        mean_dy_xhat = _bcast(dweight / fwd.count, ndim, ax)
        dxs = [
            scale * (d - mean_dy - xh * mean_dy_xhat)
            for d, xh in zip(dys64, fwd.xhats, strict=True)
        ]
    return ReferenceBackward(dxs, dweights, dbiases, dweight, dbias)
