"""One SyncBN step: validate, compute local moments, allreduce once, normalize.

This module owns the path of a training step (``DESIGN.md``, ``docs/numerics.md``)::

    x ─validate─> local moments ─pack─> allreduce ─unpack─> mean, var, N ─> y

and its backward. It calls :mod:`arraysyncbn.kernels` for the math and the
communicator exactly once per pass: one packed buffer for the statistics,
one for the backward sums (plus, when asked, the small consistency check).
Every decision that changes whether a rank communicates or raises after
communication (N = 0, N = 1) is taken from reduced values, which are
bitwise identical on every rank, so every rank takes the same branch.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from . import kernels
from .comm.base import Communicator, as_communicator
from .errors import CollectiveMismatchError

__all__ = [
    "PrecisionWarning",
    "SavedForBackward",
    "check_consistency",
    "check_input",
    "statistics_device",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
]

Array = Any


@dataclass(frozen=True)
class SavedForBackward:
    """What a forward keeps for its backward.

    Attributes
    ----------
    count : int or None
        The global number of elements per channel (the N of the statistics),
        the same on every rank; 0 when every rank's batch was empty; None
        when the forward used running statistics.
    batch_stats : bool
        Whether the forward normalized with batch statistics (and its
        backward therefore communicates).
    mean, invstd : per-channel float64 statistics (float32 where the
        namespace has no float64 device) on the statistics device.
    """

    x: Array
    hi: Array
    lo: Array | None
    scale: Array
    mean: Array
    invstd: Array
    weight: Array | None
    bias: Array | None
    axis: int
    count: int | None
    batch_stats: bool
    comm: Communicator
    xp: Any
    acc: Any


def _namespace(**arrays: Array | None) -> Any:
    """Return the one namespace of the given arrays, with a clear error."""
    present = {k: v for k, v in arrays.items() if v is not None}
    for name, a in present.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    try:
        return array_api_compat.array_namespace(*present.values())
    except TypeError:
        libs = {k: type(v).__module__.split(".")[0] for k, v in present.items()}
        raise TypeError(
            "arrays from different array libraries cannot be mixed: "
            + ", ".join(f"{k} is {m}" for k, m in libs.items())
        ) from None


def _check_devices(**arrays: Array | None) -> Any:
    present = {k: v for k, v in arrays.items() if v is not None}
    devices = {k: array_api_compat.device(v) for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"arrays on different devices cannot be mixed: {first_name} is on "
                f"{first}, {name} is on {dev}"
            )
    return first


def _check_floating(xp: Any, name: str, a: Array | None) -> None:
    if a is not None and not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")


def as_int(value: Any, name: str) -> int:
    """``value`` as an int if it is an integer (numpy integers too), else TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _normalize_axis(axis: Any, ndim: int) -> int:
    axis = as_int(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input of {ndim} dimensions")
    return axis % ndim


def check_input(x: Array, axis: Any) -> int:
    """Validate one input batch; return its non-negative channel axis.

    Raises TypeError for a non-array or a non-floating dtype, ValueError for
    fewer than 2 dimensions or an axis out of range.
    """
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (batch and channels), got shape {tuple(x.shape)}"
        )
    ax = _normalize_axis(axis, x.ndim)
    _check_floating(array_api_compat.array_namespace(x), "x", x)
    return ax


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (numpy scalars too), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_hyper(eps: Any, momentum: Any) -> None:
    """TypeError for an eps or momentum of the wrong type (bool, str, None
    for eps), ValueError for a wrong value."""
    e = _real(eps)
    if e is None:
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if momentum is not None:
        m = _real(momentum)
        if m is None:
            raise TypeError(
                f"momentum must be None or a real number, got {type(momentum).__name__}"
            )
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")


def _check_count(num_batches_tracked: Any) -> None:
    """TypeError unless an int (numpy integers too), ValueError if negative."""
    if as_int(num_batches_tracked, "num_batches_tracked") < 0:
        raise ValueError(
            f"num_batches_tracked must be a non-negative int, got {num_batches_tracked!r}"
        )


def _validate_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    axis: Any,
    eps: Any,
    momentum: Any,
    num_batches_tracked: Any,
) -> tuple[Any, int]:
    """Check every argument of a forward; return ``(xp, axis)``."""
    xp = _namespace(
        x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    ax = check_input(x, axis)
    params = {
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    for name, a in params.items():
        _check_floating(xp, name, a)
    _check_devices(x=x, **params)
    channels = x.shape[ax]
    for name, a in params.items():
        if a is not None and tuple(a.shape) != (channels,):
            raise ValueError(
                f"{name} must have shape ({channels},) to match the {channels} channels "
                f"on axis {axis} of x {tuple(x.shape)}, got {tuple(a.shape)}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    _check_hyper(eps, momentum)
    _check_count(num_batches_tracked)
    return xp, ax


def statistics_device(xp: Any, device: Any) -> tuple[Any, Any]:
    """Return ``(device, dtype)`` where per-channel statistics are merged.

    x's own device when it has float64; else another device of the same
    namespace that has float64 (the host, typically: Apple's MPS and other
    float32-only accelerators); else x's device in float32, with the larger
    merge error :mod:`arraysyncbn.testing` documents. Only per-channel
    vectors travel there, never x.
    """
    if kernels.accumulation_dtype(xp, device) == xp.float64:
        return device, xp.float64
    try:
        candidates = xp.__array_namespace_info__().devices()
    except (AttributeError, TypeError, NotImplementedError):
        candidates = ()
    for other in candidates:
        if kernels.accumulation_dtype(xp, other) == xp.float64:
            return other, xp.float64
    return device, xp.float32


def _to(v: Array, xp: Any, device: Any, dtype: Any) -> Array:
    """Return per-channel ``v`` on ``device`` in ``dtype`` (cast where both exist)."""
    if array_api_compat.device(v) == device:
        return xp.astype(v, dtype, copy=False)
    if dtype == xp.float64:
        return xp.astype(array_api_compat.to_device(v, device), dtype)
    return array_api_compat.to_device(xp.astype(v, dtype), device)


@dataclass(frozen=True)
class _Factors:
    """Per-channel normalization factors in the work dtype on x's device."""

    hi: Array
    lo: Array | None
    scale: Array
    offset: Array | None


def _factors(
    xp: Any,
    mean: Array,
    invstd: Array,
    weight: Array | None,
    bias: Array | None,
    wdtype: Any,
    device: Any,
) -> _Factors:
    sdev = array_api_compat.device(mean)
    w = None if weight is None else _to(weight, xp, sdev, mean.dtype)
    hi, lo = kernels.split_mean(mean, wdtype, xp=xp)
    scale = kernels.scale_of(invstd, w, xp=xp)
    return _Factors(
        _to(hi, xp, device, wdtype),
        None if lo is None else _to(lo, xp, device, wdtype),
        _to(scale, xp, device, wdtype),
        None if bias is None else _to(bias, xp, device, wdtype),
    )


def _global_count(buf: Array, exact_float64: bool) -> int:
    value = float(buf[0])
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise CollectiveMismatchError(
            f"the reduced element count is {value}, not a non-negative integer: "
            "the communicator returned a corrupt sum"
        )
    if not exact_float64 and value >= 2.0**24:
        raise ValueError(
            f"a global batch of {value:.0f} elements per channel cannot be counted exactly "
            "in float32, and this array library has no float64 device"
        )
    return int(value)


class PrecisionWarning(RuntimeWarning):
    """The one-pass merge of the statistics lost much of its precision.

    Raised (as a warning, on every rank alike) when the data sits so many
    standard deviations from the merge's center that float64 cancellation
    cost about half of the output's significant digits. Pass ``center=``
    (a previous reduced mean); ``SyncBatchNorm`` does so from its second step.
    """


def _warn_tolerance(xp: Any, wdtype: Any) -> float:
    """Relative variance error past which :class:`PrecisionWarning` is given:
    the square root of the work dtype's epsilon (half its digits)."""
    return math.sqrt(float(xp.finfo(wdtype).eps))


def _batch_statistics(
    x: Array,
    axis: int,
    comm: Communicator,
    *,
    xp: Any,
    acc: Any,
    sdev: Any,
    sdt: Any,
    center: Array | None,
    eps: float,
) -> tuple[int, Array, Array]:
    """Return the global ``(N, mean, biased var)`` of x over every rank.

    Exactly one allreduce, of ``[n, Σ(x − K), Σ(x − K)²]`` with the center K
    every rank shares. Its float64 merge cancels as ``ulp·(|mean − K|/std)²``;
    where that loses about half the work precision, every rank warns alike
    (:class:`PrecisionWarning`).
    """
    channels = x.shape[axis]
    n, c, a, b = kernels.local_moments(x, axis, xp=xp, acc=acc)
    c = _to(c, xp, sdev, sdt)
    k = None if center is None else _to(center, xp, sdev, sdt)
    s1, s2 = kernels.moment_sums(
        n, c if k is None else c - k, _to(a, xp, sdev, sdt), _to(b, xp, sdev, sdt), xp=xp
    )
    head = xp.asarray([float(n)], dtype=sdt, device=sdev)
    buf = comm.allreduce(xp.concat([head, s1, s2]))
    if tuple(buf.shape) != (1 + 2 * channels,):
        raise CollectiveMismatchError(
            f"the reduced buffer has shape {tuple(buf.shape)}, expected ({1 + 2 * channels},)"
        )
    count = _global_count(buf, sdt == xp.float64)
    if count == 1:
        raise ValueError(
            "expected more than 1 value per channel when using batch statistics, got a "
            f"global batch of 1 (input shape {tuple(x.shape)} on rank {comm.rank})"
        )
    if count == 0:
        zeros = xp.zeros((channels,), dtype=sdt, device=sdev)
        return 0, zeros, zeros
    rel, var = kernels.finalize_moments(count, buf[1 : 1 + channels], buf[1 + channels :], xp=xp)
    # The merge's rounding is at most ~4(size+2)·ulp·Σ(x−K)²/N, relative to
    # var + eps (what invstd depends on).
    ulp = float(xp.finfo(sdt).eps)
    loss = float(xp.max(buf[1 + channels :] / count * (4.0 * (comm.size + 2) * ulp) / (var + eps)))
    if loss > _warn_tolerance(xp, kernels.work_dtype(xp, x.dtype)):
        warnings.warn(
            f"SyncBN statistics may have lost precision (relative variance error up to "
            f"{loss:.1e}): the data sits far from the merge's center in units of its "
            "standard deviation; pass center= (e.g. a previous reduced mean) — "
            "SyncBatchNorm does so from its second step",
            PrecisionWarning,
            stacklevel=4,
        )
    return count, rel if k is None else k + rel, var


def _running_update(
    xp: Any,
    running: Array,
    batch_value: Array,
    momentum: float,
) -> Array:
    """Return ``(1 − m)·running + m·batch_value`` in running's dtype and device.

    Computed in batch_value's (float64) dtype on its device, from values
    every rank shares, so every rank gets the same bits.
    """
    sdev = array_api_compat.device(batch_value)
    r = _to(running, xp, sdev, batch_value.dtype)
    new = (1.0 - momentum) * r + momentum * batch_value
    return _to(new, xp, array_api_compat.device(running), running.dtype)


def sync_batch_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    comm: Communicator | None = None,
    num_batches_tracked: int = 0,
    check: bool = False,
    center: Array | None = None,
) -> tuple[Array, Array | None, Array | None, SavedForBackward]:
    """Synchronized batch normalization of this rank's shard ``x``.

    Parameters
    ----------
    x : array, at least 2-D, real floating dtype
        This rank's local batch, channels on ``axis``. May be empty.
    weight, bias : arrays of shape ``(C,)`` or None
        Affine parameters (None: no scale / no shift).
    running_mean, running_var : arrays of shape ``(C,)`` or None
        Running statistics; both or neither. Not modified.
    training : bool
        Normalize with the batch statistics of all ranks and return updated
        running statistics. When False and running statistics are given,
        normalize with them and communicate nothing. When running statistics
        are None, batch statistics are used either way.
    momentum : float in [0, 1] or None
        ``running = (1 − m)·running + m·batch``; None uses the cumulative
        average, ``m = 1/(num_batches_tracked + 1)``.
    eps : float > 0
        Added to the variance.
    axis : int
        Channel axis (1 for NCHW, -1 for channels-last).
    comm : Communicator or None
        The group of ranks; None is a world of one.
    num_batches_tracked : int
        Batches counted *before* this step (only used when momentum is None).
    check : bool
        Before the statistics allreduce, verify with :func:`check_consistency`
        that all ranks agree on channels, dtype, axis, eps, momentum, whether
        weight or bias is given (``affine``) and whether running statistics
        are (``track_running_stats``): one more small collective. Only when
        batch statistics are used.
    center : array of shape ``(C,)`` or None
        A per-channel value near the batch mean, **bitwise identical on every
        rank** (a previous step's reduced mean, as ``SyncBatchNorm`` passes).
        Statistics are merged around it: the float64 merge loses about
        ``1e-16·(|mean − center|/std)²`` of the variance, so data far from
        zero (|mean|/std ≳ 1e3 in float64 input, 1e5 in float32) wants a
        center. None centers at zero. A :class:`PrecisionWarning` says when
        the loss reached half the work precision.

    Returns
    -------
    y : array like ``x`` (namespace, device, dtype, shape)
    new_running_mean, new_running_var : arrays or None
        Updated running statistics in their input dtype; the inputs themselves
        when nothing was updated (eval, or global N = 0).
    saved : SavedForBackward
        Pass to :func:`sync_batch_norm_backward`; ``saved.count`` is the
        global N (0: statistics were not updated).

    Raises
    ------
    TypeError
        Non-array or non-floating inputs, arrays of different libraries, or
        an eps, momentum or num_batches_tracked of the wrong type (a bool, a
        str, None where a number is needed, a float where an int is).
    ValueError
        Bad shapes, axis, devices, or values of eps, momentum or
        num_batches_tracked (before any communication); a global batch of
        one element per channel (on every rank, after the allreduce).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from arraysyncbn import sync_batch_norm_forward
    >>> x = xp.reshape(xp.arange(8, dtype=xp.float64), (4, 2))
    >>> y, rm, rv, saved = sync_batch_norm_forward(x, None, None, None, None, eps=0.0 + 1e-12)
    >>> [round(float(v), 6) for v in y[:, 0]]
    [-1.341641, -0.447214, 0.447214, 1.341641]
    """
    xp, ax = _validate_forward(
        x, weight, bias, running_mean, running_var, axis, eps, momentum, num_batches_tracked
    )
    if center is not None:
        if _namespace(x=x, center=center) is not xp:
            raise TypeError("center comes from a different array library than x")
        _check_floating(xp, "center", center)
        if tuple(center.shape) != (x.shape[ax],):
            raise ValueError(f"center must have shape ({x.shape[ax]},), got {tuple(center.shape)}")
    communicator = as_communicator(comm)
    device = array_api_compat.device(x)
    acc = kernels.accumulation_dtype(xp, device)
    sdev, sdt = statistics_device(xp, device)
    wdtype = kernels.work_dtype(xp, x.dtype)
    channels = x.shape[ax]

    if not (training or running_mean is None):
        mean = _to(running_mean, xp, sdev, sdt)
        invstd = kernels.invstd_of(_to(running_var, xp, sdev, sdt), eps, xp=xp)
        f = _factors(xp, mean, invstd, weight, bias, wdtype, device)
        y = kernels.normalize(x, f.hi, f.lo, f.scale, f.offset, ax, xp=xp)
        saved = SavedForBackward(
            x, f.hi, f.lo, f.scale, mean, invstd, weight, bias, ax, None, False,
            communicator, xp, acc,
        )  # fmt: skip
        return y, running_mean, running_var, saved

    if check:
        check_consistency(
            communicator, x, num_features=channels, axis=ax, eps=eps, momentum=momentum,
            affine=weight is not None or bias is not None,
            track_running_stats=running_mean is not None,
        )  # fmt: skip
    count, mean, var = _batch_statistics(
        x, ax, communicator, xp=xp, acc=acc, sdev=sdev, sdt=sdt, center=center, eps=eps
    )
    invstd = kernels.invstd_of(var, eps, xp=xp)
    f = _factors(xp, mean, invstd, weight, bias, wdtype, device)
    y = kernels.normalize(x, f.hi, f.lo, f.scale, f.offset, ax, xp=xp)

    new_mean, new_var = running_mean, running_var
    if training and count > 0 and running_mean is not None and running_var is not None:
        m = 1.0 / (num_batches_tracked + 1) if momentum is None else float(momentum)
        new_mean = _running_update(xp, running_mean, mean, m)
        new_var = _running_update(xp, running_var, var * (count / (count - 1)), m)
    saved = SavedForBackward(
        x, f.hi, f.lo, f.scale, mean, invstd, weight, bias, ax, count, True,
        communicator, xp, acc,
    )  # fmt: skip
    return y, new_mean, new_var, saved


def sync_batch_norm_backward(
    dy: Array, saved: SavedForBackward
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`sync_batch_norm_forward`.

    Parameters
    ----------
    dy : array of y's shape, namespace and device, real floating dtype
    saved : what the forward returned

    Returns
    -------
    dx : array like the forward's x
    dweight, dbias : arrays of shape ``(C,)`` in weight's and bias's dtype, or None
        This rank's contribution only, *not* reduced across ranks (as in
        PyTorch, data-parallel gradient averaging reduces them).

    When the forward used batch statistics this communicates once: one
    allreduce of the packed per-channel ``Σdy`` and ``Σdy·x̂`` (2·C values).
    """
    if not isinstance(saved, SavedForBackward):
        raise TypeError(
            f"saved must be the SavedForBackward of a forward, got {type(saved).__name__}"
        )
    if not array_api_compat.is_array_api_obj(dy):
        raise TypeError(f"dy must be an array, got {type(dy).__name__}")
    xp, x = saved.xp, saved.x
    if _namespace(dy=dy, x=x) is not xp:
        raise TypeError("dy comes from a different array library than the forward's x")
    _check_floating(xp, "dy", dy)
    _check_devices(x=x, dy=dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"dy has shape {tuple(dy.shape)}, but the forward's output has shape {tuple(x.shape)}"
        )
    ax, sdt = saved.axis, saved.invstd.dtype
    device, sdev = array_api_compat.device(x), array_api_compat.device(saved.invstd)
    wdtype = kernels.work_dtype(xp, x.dtype)
    sum_dy, sum_dy_xc = kernels.backward_sums(dy, x, saved.hi, saved.lo, ax, xp=xp, acc=saved.acc)
    sum_dy = _to(sum_dy, xp, sdev, sdt)
    sum_dy_xhat = _to(sum_dy_xc, xp, sdev, sdt) * saved.invstd
    if not saved.batch_stats:
        dx = kernels.backward_input(dy, x, saved.hi, saved.lo, saved.scale, None, None, ax, xp=xp)
    elif saved.count == 0:
        dx = xp.zeros_like(x)
    else:
        channels = x.shape[ax]
        buf = saved.comm.allreduce(xp.concat([sum_dy, sum_dy_xhat]))
        count = float(saved.count)  # type: ignore[arg-type]
        mean_dy = _to(buf[:channels] / count, xp, device, wdtype)
        k = _to(saved.invstd * (buf[channels:] / count), xp, device, wdtype)
        dx = kernels.backward_input(dy, x, saved.hi, saved.lo, saved.scale, mean_dy, k, ax, xp=xp)
    dweight = None if saved.weight is None else _to(sum_dy_xhat, xp, device, saved.weight.dtype)
    dbias = None if saved.bias is None else _to(sum_dy, xp, device, saved.bias.dtype)
    return dx, dweight, dbias


CHECK_ENV = "ARRAYSYNCBN_CHECK"
"""Set to 1 to run :func:`check_consistency` on every batch-statistics call."""


def check_every_call() -> bool:
    """Whether ``ARRAYSYNCBN_CHECK`` asks for the consistency check on every call."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() in ("1", "true", "yes")


_DTYPE_CODES = {"float16": 16.0, "bfloat16": 17.0, "float32": 32.0, "float64": 64.0}


def _dtype_name(dtype: Any) -> str:
    text = str(dtype)
    for name in sorted(_DTYPE_CODES, key=len, reverse=True):
        if text.endswith(name):
            return name
    return text


_MOMENTUM_NONE = -1.0
"""How ``momentum=None`` is encoded: outside [0, 1], so no real momentum collides."""


def _bits16(value: float) -> list[float]:
    """The 64 bits of float64 ``value`` as four 16-bit integers.

    Exact in float32 too, so floats are compared bit for bit even where the
    check buffer is float32 (a namespace with no float64 device).
    """
    (bits,) = struct.unpack("<Q", struct.pack("<d", value))
    return [float((bits >> shift) & 0xFFFF) for shift in (48, 32, 16, 0)]


@dataclass(frozen=True)
class _Field:
    """One compared quantity: its label, its encoding, how to show a value."""

    label: str
    values: list[float]
    show: Callable[[float], str]


def _show_int(v: float) -> str:
    return str(int(v))


def _show_bool(v: float) -> str:
    return str(bool(v))


def _show_dtype(v: float) -> str:
    return {code: name for name, code in _DTYPE_CODES.items()}.get(v, "other")


def _show_momentum(v: float) -> str:
    return "None" if v == _MOMENTUM_NONE else repr(v)


def _show_float(v: float) -> str:
    return repr(v)


def check_consistency(
    comm: Communicator | None,
    x: Array,
    *,
    num_features: int,
    axis: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
) -> None:
    """Raise :class:`CollectiveMismatchError` on every rank unless all ranks agree.

    One small allreduce (``max`` of each value and of its negation) compares
    across ranks the channel count, the input dtype, the channel axis, the
    number of dimensions, the ``ARRAYSYNCBN_CHECK`` setting (which decides
    whether later calls check again, so it must agree too), ``eps`` and
    ``momentum`` (bit for bit; ``None`` included), and whether the layer is
    ``affine`` and tracks running statistics. Ranks that differ in any of
    these would otherwise drift apart silently (different running
    statistics) or, for ``track_running_stats``, take different collectives
    in eval mode. Call it with arguments that passed validation, on every
    rank, at the same point of the program. The defaults of the keyword
    arguments are :class:`~arraysyncbn.SyncBatchNorm`'s.
    """
    communicator = as_communicator(comm)
    xp = array_api_compat.array_namespace(x)
    device = array_api_compat.device(x)
    sdev, sdt = statistics_device(xp, device)
    name = _dtype_name(x.dtype)
    e = float(eps)
    m = _MOMENTUM_NONE if momentum is None else float(momentum)
    fields = [
        _Field("channel count", [float(num_features)], _show_int),
        _Field("dtype", [_DTYPE_CODES.get(name, 99.0)], _show_dtype),
        _Field("channel axis", [float(axis % x.ndim)], _show_int),
        _Field("number of dimensions", [float(x.ndim)], _show_int),
        _Field(f"{CHECK_ENV} (checks on every call)", [float(check_every_call())], _show_int),
        # The float itself to show it, its bits to compare it exactly.
        _Field("eps", [e, *_bits16(e)], _show_float),
        _Field("momentum", [m, *_bits16(m)], _show_momentum),
        _Field("affine", [float(bool(affine))], _show_bool),
        _Field("track_running_stats", [float(bool(track_running_stats))], _show_bool),
    ]
    values = [v for f in fields for v in f.values]
    # On the statistics device in its dtype, like the statistics buffer, so
    # ranks whose x sits on different kinds of device still pass the same MPI type.
    buf = xp.asarray(values + [-v for v in values], dtype=sdt, device=sdev)
    reduced = communicator.allreduce(buf, "max")
    high = [float(v) for v in reduced[: len(values)]]
    low = [-float(v) for v in reduced[len(values) :]]
    problems = []
    start = 0
    for f in fields:
        stop = start + len(f.values)
        if low[start:stop] != high[start:stop]:
            problems.append(
                f"{f.label} differs (values seen include {f.show(low[start])} and "
                f"{f.show(high[start])})"
            )
        start = stop
    if problems:
        raise CollectiveMismatchError(
            f"ranks disagree on this SyncBatchNorm call (rank {communicator.rank} has "
            f"{num_features} channels, dtype {name}, axis {axis % x.ndim}, "
            f"{x.ndim} dimensions, eps {e!r}, momentum {_show_momentum(m)}, "
            f"affine {bool(affine)}, track_running_stats {bool(track_running_stats)}): "
            + "; ".join(problems)
        )
