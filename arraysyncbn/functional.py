"""One SyncBN step: validate, compute local moments, allreduce once, normalize.

This module owns the path of a training step (``docs/numerics.md`` gives the numerics)::

    x ─validate─> local moments ─pack─> allreduce ─unpack─> mean, var, N ─> y

and its backward. It calls :mod:`arraysyncbn.kernels` for the math and the
communicator once per pass in the steady state: one packed buffer for the
statistics, one for the backward sums (plus, when asked, the small
consistency check), each signed with its call (:mod:`arraysyncbn.comm.calls`)
so that ranks in different calls fail alike. When the reduced values show
that the one-pass merge lost precision or overflowed, every rank merges
again around the reduced mean, up to three more times. Every decision that
changes whether a rank communicates or raises after communication (N = 0,
N = 1, each further pass, a signature mismatch) is taken from reduced
values, which are bitwise identical on every rank, so every rank takes the
same branch.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from . import _fast, kernels
from .comm.base import Communicator, SelfCommunicator, as_communicator, host_values
from .comm.calls import CallLabel, current_call, next_call, signature_mismatch, signature_values
from .errors import CollectiveMismatchError

__all__ = [
    "NonFiniteWarning",
    "PrecisionWarning",
    "SavedForBackward",
    "batch_norm_inference",
    "check_consistency",
    "check_input",
    "statistics_device",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
]

Array = Any


class _Factors(NamedTuple):
    """Per-channel normalization factors in the work dtype on x's device.

    A NamedTuple, built once or twice a call: its constructor is one line of
    Python, a dataclass's one a field (see tests/test_overhead.py)."""

    hi: Array
    lo: Array | None
    scale: Array
    offset: Array | None


@dataclass(slots=True)
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
        namespace has no float64 device) on the statistics device. On the
        host route they may be numpy arrays even for torch input.
    route : str
        ``"portable"`` (array API), ``"host"`` (fused numba kernels) or
        ``"cuda"`` (the experimental numba.cuda kernels), the route the
        forward ran and the backward will run.
    center : per-channel array or None
        The merge center for the next call, the same bits on every rank:
        ``mean`` where it is finite, else the center this call used (None
        when this call used none and merged nothing).
    label : CallLabel or None
        The forward's call (None when it communicated nothing); the backward
        signs its collective with the same call number.
    """

    x: Array
    factors: _Factors
    mean: Array
    invstd: Array
    weight: Array | None
    bias: Array | None
    axis: int
    count: int | None
    batch_stats: bool
    comm: Communicator
    xp: Any
    kern: Any
    io: Any
    center: Array | None = None
    label: CallLabel | None = None
    # x's shape and dtype while it is released (see release_input).
    released: tuple[Any, Any] | None = None

    @property
    def route(self) -> str:
        return str(self.kern.name)

    def release_input(self) -> None:
        """Drop this record's references to the forward's x until
        :meth:`restore_input` gives it back.

        For framework adapters whose framework keeps x itself for the
        backward and frees it afterwards (torch's ``save_for_backward``):
        a record kept past the backward (an autograd node outlives it while
        anything downstream is referenced) then holds per-channel values
        only, not an x-sized array. :func:`sync_batch_norm_backward` on a
        released record raises ValueError.
        """
        x = self.x
        if x is not None:
            self.released = (x.shape, x.dtype)
            self.kern.release_input()
            self.x = None

    def restore_input(self, x: Array) -> None:
        """Give back the forward's x (the array passed to the forward, or one
        with its values, shape, dtype and memory layout) after
        :meth:`release_input`. ValueError for any other shape, dtype or
        layout."""
        released = self.released
        if released is None:
            return
        io = self.io
        xk = x if io is None or io.library == "numpy" else io.to_numpy(x)
        if xk.shape != released[0] or xk.dtype != released[1]:
            raise ValueError(
                f"restore_input got an array of shape {tuple(xk.shape)} and dtype {xk.dtype}; "
                f"the forward's x had shape {tuple(released[0])} and dtype {released[1]}"
            )
        self.kern.restore_input(xk)
        self.x, self.released = xk, None


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


def _check_count(num_batches_tracked: Any) -> int:
    """``num_batches_tracked`` as an int; TypeError unless an integer (numpy
    integers and 0-d integer tensors too), ValueError if negative."""
    count = as_int(num_batches_tracked, "num_batches_tracked")
    if count < 0:
        raise ValueError(
            f"num_batches_tracked must be a non-negative int, got {num_batches_tracked!r}"
        )
    return count


def _check_training(training: Any) -> None:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def _shares_memory(a: Array, b: Array) -> bool:
    """Whether ``a`` and ``b`` may overlap in memory (False where that cannot be told)."""
    if a is b:
        return True
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    lib = type(a).__module__.split(".")[0]
    if lib == "torch":
        (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
        return a.device == b.device and a0 < b1 and b0 < a1
    if lib == "cupy":
        import cupy

        return bool(cupy.may_share_memory(a, b))
    try:  # host memory of other libraries: zero-copy numpy views
        return bool(np.may_share_memory(np.from_dlpack(a), np.from_dlpack(b)))
    except Exception:  # no DLPack, or not host memory
        return False


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
) -> tuple[Any, int, int]:
    """Check every argument of a forward; return ``(xp, axis, num_batches_tracked)``."""
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
    return xp, ax, _check_count(num_batches_tracked)


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
    if type(v) is np.ndarray:  # host memory: the only device; skip the lookups
        if v.dtype.kind != "f":  # the host route's view of a bfloat16 vector: its bits
            v = _fast.values(v)
        return v.astype(dtype, copy=False)
    if array_api_compat.device(v) == device:
        return xp.astype(v, dtype, copy=False)
    if dtype == xp.float64:
        return xp.astype(array_api_compat.to_device(v, device), dtype)
    return array_api_compat.to_device(xp.astype(v, dtype), device)


def _factors(
    xp: Any,
    mean: Array,
    invstd: Array,
    weight: Array | None,
    bias: Array | None,
    wdtype: Any,
    device: Any,
    *,
    dense: bool = False,
) -> _Factors:
    """Per-channel factors in the work dtype on x's device.

    ``dense`` (the host kernels) gives zeros instead of None for ``lo`` and
    ``offset``, so the compiled kernels have one signature.
    """
    sdev = array_api_compat.device(mean)
    w = None if weight is None else _to(weight, xp, sdev, mean.dtype)
    hi, lo = kernels.split_mean(mean, wdtype, xp=xp)
    scale = kernels.scale_of(invstd, w, xp=xp)
    hi_w = _to(hi, xp, device, wdtype)
    lo_w = None if lo is None else _to(lo, xp, device, wdtype)
    offset = None if bias is None else _to(bias, xp, device, wdtype)
    if dense:
        lo_w = xp.zeros_like(hi_w) if lo_w is None else lo_w
        offset = xp.zeros_like(hi_w) if offset is None else offset
    return _Factors(hi_w, lo_w, _to(scale, xp, device, wdtype), offset)


class _Step(NamedTuple):
    """What finalizing the reduced statistics gives the rest of the step (a
    NamedTuple, as :class:`_Factors`)."""

    mean: Array
    var: Array
    invstd: Array
    factors: _Factors
    running_mean: Array | None
    running_var: Array | None
    loss: float
    """The merge's worst relative variance error over the finite channels."""
    overflowed: bool
    """Whether some channel's mean is finite but its variance overflowed
    around this center (so another pass, around the mean, may repair it)."""
    center: Array
    """The next merge center: the mean where finite, else the previous center."""
    nonfinite: tuple[int, ...]
    """Channels whose statistics are not finite (as stored); their running
    statistics and center were kept."""


def _overflow_judged() -> Any:
    """Around the local moments, the merge's sums and the variance on the
    portable route: numpy would warn of squares and sums that overflowed
    around a far center (and of inf − inf in a batch holding both), which
    the step judges from the reduced values and repairs with another pass
    (or warns of once, as a NonFiniteWarning)."""
    return np.errstate(over="ignore", invalid="ignore")


class PortableKernels:
    """The per-rank steps through the array API (:mod:`arraysyncbn.kernels`).

    The source of truth: runs on every array-API library and device. Same
    methods as :class:`arraysyncbn._fast.host.HostKernels`, so the step's
    code is the same whatever the route: pack the local statistics,
    finalize the reduced ones, normalize; pack the backward sums, turn the
    reduced ones into coefficients, compute dx.
    """

    name = "portable"
    dense = False  # None, not zeros, for an absent lo or offset factor

    def __init__(self, xp: Any, axis: int, acc: Any, sdev: Any, sdt: Any, device: Any) -> None:
        self.xp, self.axis, self.acc, self.sdev, self.sdt = xp, axis, acc, sdev, sdt
        self.device = device

    def release_input(self) -> None:
        """Forget x (see :meth:`SavedForBackward.release_input`): this route keeps none."""

    def restore_input(self, x: Array) -> None:
        """Take x back after :meth:`release_input`: nothing to do here."""

    def pack_statistics(self, x: Array, center: Array | None, tail: tuple[float, ...]) -> Array:
        """``[n, Σ(x − center), Σ(x − center)², *tail]`` on the statistics device
        (``tail``: the call's signature)."""
        xp = self.xp
        with _overflow_judged():
            n, c, a, b = kernels.local_moments(x, self.axis, xp=xp, acc=self.acc)
        c = _to(c, xp, self.sdev, self.sdt)
        with _overflow_judged():
            s1, s2 = kernels.moment_sums(
                n,
                c if center is None else c - center,
                _to(a, xp, self.sdev, self.sdt),
                _to(b, xp, self.sdev, self.sdt),
                xp=xp,
            )
        head = xp.asarray([float(n)], dtype=self.sdt, device=self.sdev)
        end = xp.asarray(tail, dtype=self.sdt, device=self.sdev)
        return xp.concat([head, s1, s2, end])

    def finalize(
        self,
        buf: Array,
        count: int,
        center: Array | None,
        eps: float,
        params: tuple[Array | None, ...],
        momentum: float | None,
        size: int,
        wdtype: Any,
    ) -> _Step:
        """Statistics, factors, running statistics (``momentum`` None: no update),
        the merge's worst relative variance error over the finite channels and
        whether a variance overflowed around ``center``, from the reduced buffer."""
        xp, c = self.xp, (buf.shape[0] - 1) // 2
        weight, bias, running_mean, running_var = params
        s2 = buf[1 + c :]
        with _overflow_judged():
            rel, var = kernels.finalize_moments(count, buf[1 : 1 + c], s2, xp=xp)
        mean = rel if center is None else center + rel
        finite_mean = xp.isfinite(mean)
        # A finite mean with a variance that is not (NaN from inf − inf as
        # often as inf): the variance overflowed, so it is +inf, whatever
        # the route's arithmetic made of it (invstd 0, as PyTorch's float64).
        var = xp.where(finite_mean & ~xp.isfinite(var), math.inf, var)
        ok = finite_mean & xp.isfinite(var)
        # The merge's rounding is at most ~4(size+2)·ulp·Σ(x−K)²/N, relative
        # to var + eps (what invstd depends on); the host kernel evaluates
        # the same expression in the same order, so every route decides alike.
        ulp = float(xp.finfo(self.sdt).eps)
        with _overflow_judged():
            ratio = s2 / count * (4.0 * (size + 2) * ulp) / (var + eps)
        # A finite mean with a variance that is not: the sums overflowed
        # around this center (finite data far from it; a NaN or inf in the
        # data makes the mean non-finite too). Every rank merges again around
        # the mean, and judges the channel only then. Kept apart from the
        # loss, which a channel still overflowing would otherwise hide from
        # the PrecisionWarning.
        worst = xp.stack(
            [xp.max(xp.where(ok, ratio, 0.0)), xp.max(xp.astype(finite_mean & ~ok, ratio.dtype))]
        )
        loss, overflowed = _tail(worst, 0)  # one transfer from a device, as one loss was
        invstd = kernels.invstd_of(var, eps, xp=xp)
        f = _factors(xp, mean, invstd, weight, bias, wdtype, self.device, dense=self.dense)
        previous = xp.zeros_like(mean) if center is None else center
        new_mean, new_var = running_mean, running_var
        if momentum is not None and running_mean is not None and running_var is not None:
            new_mean, new_var, ok = _guarded_running_update(
                xp, running_mean, running_var, mean, var * (count / (count - 1)), momentum, ok
            )
        bad: tuple[int, ...] = ()
        if not bool(xp.all(ok)):
            bad = tuple(int(i) for i in _to_host_list(xp, ~ok))
        return _Step(
            mean, var, invstd, f, new_mean, new_var, loss, overflowed != 0.0,
            xp.where(ok, mean, previous), bad,
        )  # fmt: skip

    def eval_factors(
        self, params: tuple[Array | None, ...], eps: float, wdtype: Any
    ) -> tuple[Array, Array, _Factors]:
        """The mean and invstd of the running statistics (``params[2:]``) on the
        statistics device, and the factors that normalize with them."""
        xp = self.xp
        weight, bias, running_mean, running_var = params
        mean = _to(running_mean, xp, self.sdev, self.sdt)
        invstd = kernels.invstd_of(_to(running_var, xp, self.sdev, self.sdt), eps, xp=xp)
        f = _factors(xp, mean, invstd, weight, bias, wdtype, self.device, dense=self.dense)
        return mean, invstd, f

    def cast(self, v: Array, dtype: Any) -> Array:
        """Per-channel ``v`` (dweight, dbias) in ``dtype`` on x's device."""
        return _to(v, self.xp, self.device, dtype)

    def normalize(self, x: Array, f: _Factors, out: Array | None) -> Array:
        y = kernels.normalize(x, f.hi, f.lo, f.scale, f.offset, self.axis, xp=self.xp)
        return y if out is None else _write(out, y)

    def pack_backward(
        self, dy: Array, x: Array, f: _Factors, invstd: Array, tail: tuple[float, ...]
    ) -> Array:
        """``[Σdy, Σdy·x̂, *tail]`` per channel on the statistics device."""
        xp = self.xp
        s, sx = kernels.backward_sums(dy, x, f.hi, f.lo, self.axis, xp=xp, acc=self.acc)
        s = _to(s, xp, self.sdev, self.sdt)
        end = xp.asarray(tail, dtype=self.sdt, device=self.sdev)
        return xp.concat([s, _to(sx, xp, self.sdev, self.sdt) * invstd, end])

    def backward_coefficients(
        self, buf: Array, count: int, invstd: Array, wdtype: Any
    ) -> tuple[Array, Array]:
        """Global ``mean(dy)`` and ``invstd·mean(dy·x̂)`` in the work dtype on x's device."""
        xp, c = self.xp, buf.shape[0] // 2
        mean_dy = _to(buf[:c] / count, xp, self.device, wdtype)
        return mean_dy, _to(invstd * (buf[c:] / count), xp, self.device, wdtype)

    def backward_input(
        self,
        dy: Array,
        x: Array,
        f: _Factors,
        mean_dy: Array | None,
        k: Array | None,
        out: Array | None,
    ) -> Array:
        dx = kernels.backward_input(dy, x, f.hi, f.lo, f.scale, mean_dy, k, self.axis, xp=self.xp)
        return dx if out is None else _write(out, dx)


def _write(out: Array, value: Array) -> Array:
    out[...] = value
    return out


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
    """The statistics lost much of their precision even after further passes.

    Given (as a warning, on every rank alike) when, after the last of the
    statistics passes centered on the reduced mean (three at most after the
    first), the merge's estimated relative variance error still exceeds the
    square root of the work dtype's epsilon in some channel whose statistics
    are finite: in practice only a merge in float32 (a library with no
    float64 device) over very many ranks (in float64: beyond ~1.7e7 ranks
    for float64 input), or data more than ~1e45 standard deviations from
    the merge center. Channels judged non-finite in the same step are no
    part of that estimate; they get their :class:`NonFiniteWarning`.
    """


class NonFiniteWarning(RuntimeWarning):
    """Some channels' batch statistics are not finite (NaN or inf).

    Given on every rank alike (the decision comes from reduced values) and
    naming the channels: a NaN or inf in some rank's batch, a variance
    beyond the statistics' dtype even around the batch mean (float64:
    |x − mean| beyond ~1e154), or statistics beyond the running statistics'
    dtype. Their running statistics, and the merge center ``SyncBatchNorm``
    keeps, keep their last finite values, so the next finite batch is
    normalized correctly; this batch's output may be non-finite in those
    channels.
    """


@functools.lru_cache(maxsize=64)
def _tolerances(xp: Any, size: int, sdt: Any, wdtype: Any) -> tuple[float, float]:
    """``(second_pass, warn)``: relative variance errors of the merge past
    which every rank runs another statistics pass, and past which it warns
    after the last one.

    The float64 merge loses ``L0 = 4(size+2)·ulp`` even around the exact
    mean, and ``L0·(1 + ((mean − K)/std)²)`` around a center K; another
    pass is run past ``max(16·L0, e_w)``: a center more than ~4 standard
    deviations off for float64 work (so a layer's steady state, whose center
    is its last mean, stays one pass), or a loss above one ulp of float32
    work. The warning is for half the work precision, ``sqrt(e_w)``.
    """
    e_w = float(xp.finfo(wdtype).eps)
    l0 = 4.0 * (size + 2) * float(xp.finfo(sdt).eps)
    return max(16.0 * l0, e_w), math.sqrt(e_w)


def _batch_statistics(
    kern: Any,
    x: Array,
    channels: int,
    comm: Communicator,
    *,
    io: Any,
    exact_count: bool,
    center: Array | None,
    shape: tuple[int, ...],
    label: CallLabel,
) -> tuple[int, Array, bool]:
    """Return the global N, the reduced buffer ``[N, Σ(x − K), Σ(x − K)²]``
    and whether every rank merged around a center or none did.

    Exactly one allreduce, with the center K every rank shares and, beyond
    one rank, whether this rank has one and the call's signature appended
    (and checked, then dropped). ``io`` (host route) hands the buffer to the
    communicator as an array of the caller's library. The decisions are
    taken from the reduced buffer, which is the same on every rank.
    """
    bits = 53 if exact_count else 24
    # A world of one is always in step with itself: no signature to carry.
    tail: tuple[float, ...] = ()
    if comm.size > 1:
        tail = (float(center is not None), *signature_values(label, "sum", bits, comm.size))
    buf = _allreduce_signed(kern.pack_statistics(x, center, tail), comm, io, label)
    base = 1 + 2 * channels
    if tuple(buf.shape) != (base + len(tail),):
        raise CollectiveMismatchError(
            f"the reduced buffer has shape {tuple(buf.shape)}, expected ({base + len(tail)},)"
        )
    agreed = True
    if tail:
        centered, *signature = _tail(buf, base)
        _check_signature(signature, label, "sum", bits, comm)
        agreed = centered in (0.0, float(comm.size))
        buf = buf[:base]
    count = _global_count(buf, exact_count)
    if count == 1:
        raise ValueError(
            "expected more than 1 value per channel when using batch statistics, got a "
            f"global batch of 1 (input shape {shape} on rank {comm.rank})"
        )
    return count, buf, agreed


def _again(
    statistics: Callable[..., tuple[int, Array, bool]],
    center: Array | None,
    label: CallLabel,
    count: int,
) -> Array:
    """The reduced buffer of the statistics allreduce run again, around
    ``center`` (every rank alike). Raises if N differs from the first pass's.
    ``statistics`` is :func:`_batch_statistics` with the call's arguments."""
    again, buf, _ = statistics(center=center, label=label.with_pass("recenter"))
    if again != count:
        raise CollectiveMismatchError(
            f"a repeated statistics pass counted {again} elements per channel, "
            f"the first {count}: ranks passed different batches"
        )
    return buf


_RECENTER_LIMIT = 3
"""Statistics passes at most after the first, each centered on the last
reduced mean. A float64 merge moves the center from ``D`` standard
deviations off the mean to about ``1e-15·D`` (often exactly onto it), so
three reach data ~1e45 standard deviations from the first center, and
repair a variance whose sums overflowed around it (``N·(mean − K)²`` beyond
float64) as soon as one pass centers on a mean near enough."""


def _recentered(xp: Any, st: _Step) -> Array:
    """The next pass's center: the reduced mean where finite (also where the
    variance overflowed around the last center), else the last center."""
    return xp.where(xp.isfinite(st.mean), st.mean, st.center)


def _mean_moves(xp: Any, buf: Array) -> bool:
    """Whether a pass around the reduced mean would merge other sums than the
    last: some finite ``Σ(x − center)`` of the reduced buffer ``buf`` is not
    0. Where every one is 0 the mean is the center already (a variance
    beyond float64 around its own mean), and a non-finite one keeps its
    center. Read from the reduced buffer alone, never from a rank's own
    center (promised alike on every rank, but checked only with
    ``check=True``), so every rank decides alike."""
    channels = (buf.shape[0] - 1) // 2
    s1 = buf[1 : 1 + channels]
    return bool(xp.any(xp.isfinite(s1) & (s1 != 0)))


def _kept_center(xp: Any, st: _Step, entry: Array | None, sdev: Any, sdt: Any) -> Array:
    """``st.center`` with its non-finite channels back at ``entry`` (zero for
    None), the center the step began with: a channel judged non-finite keeps
    its center, however many passes ran."""
    start = xp.zeros_like(st.mean) if entry is None else _to(entry, xp, sdev, sdt)
    bad = set(st.nonfinite)
    mask = xp.asarray([c in bad for c in range(st.mean.shape[0])], device=sdev)
    return xp.where(mask, start, st.center)


def _allreduce_signed(packed: Array, comm: Communicator, io: Any, label: CallLabel) -> Array:
    """Sum ``packed`` across ranks under ``label`` (named if the wait times out)."""
    if type(comm) is SelfCommunicator:  # a world of one returns its input, never waits
        return packed
    with current_call(label):
        if io is None:
            return comm.allreduce(packed)
        return io.to_numpy(comm.allreduce(io.from_numpy(packed)))


def _tail(buf: Array, start: int) -> list[float]:
    """``buf[start:]`` as Python floats (a handful of values; one transfer from
    a device, not one per value)."""
    return host_values(buf[start:]).tolist()  # type: ignore[no-any-return]


def _check_signature(
    values: list[float], label: CallLabel, op: str, bits: int, comm: Communicator
) -> None:
    """Raise :class:`CollectiveMismatchError` on every rank unless every rank
    was in ``label``'s call (decided from the reduced signature ``values``
    alone)."""
    if len(values) == 2 and op == "sum":
        # The steady state's one exact digit: Σv = size·v and Σv² = size·v²
        # mean every rank's v is this rank's (Cauchy–Schwarz).
        v, size = label.code, comm.size
        if values[0] == size * v and values[1] == size * v * v:
            return
    problem = signature_mismatch(label, op, values, bits, comm.size, comm.rank)
    if problem is not None:
        raise CollectiveMismatchError(problem)


def _warn_if_imprecise(loss: float, tolerance: float, passes: int) -> None:
    """Warn (every rank alike: loss comes from reduced values) past the
    tolerance, after ``passes`` more statistics passes. ``loss`` is that of
    the finite channels: a variance that overflowed even around the mean is
    judged non-finite and warned of as such, beside this warning."""
    if loss > tolerance:
        warn_at_caller(
            f"SyncBN statistics may have lost precision (relative variance error up to "
            f"{loss:.1e}) even after {passes} more pass(es), each centered on the "
            "reduced mean",
            PrecisionWarning,
        )


def _warn_nonfinite(channels: tuple[int, ...]) -> None:
    """Name the channels whose statistics were not finite (every rank alike)."""
    shown = ", ".join(str(c) for c in channels[:20]) + (", ..." if len(channels) > 20 else "")
    warn_at_caller(
        f"SyncBN statistics are not finite in {len(channels)} channel(s) [{shown}]: NaN or "
        "inf in some rank's batch, a variance beyond the statistics' dtype, a batch beyond "
        "the running statistics' dtype, or running statistics that were not finite already "
        "(a checkpoint, an assignment). Those channels' running statistics and merge center "
        "keep their last values",
        NonFiniteWarning,
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame outside
    this package and outside torch's module and autograd machinery (a
    warning raised through ``model(x)`` used to point inside the package)."""
    skip = [_PACKAGE_DIR]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        skip.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    prefixes = tuple(skip)
    frame, level = sys._getframe(1), 2  # level 2: warn_at_caller's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _guarded_running_update(
    xp: Any,
    running_mean: Array,
    running_var: Array,
    mean: Array,
    unbiased_var: Array,
    momentum: float,
    ok: Array,
) -> tuple[Array, Array, Array]:
    """Running statistics updated where ``ok`` and finite once stored.

    Returns ``(new_mean, new_var, ok)`` with ``ok`` cleared for channels
    whose update is not finite in the buffers' dtypes (a float64 1e39 is
    finite, not in float32): those keep their old values.
    """
    sdev, sdt = array_api_compat.device(mean), mean.dtype
    old_m, old_v = _to(running_mean, xp, sdev, sdt), _to(running_var, xp, sdev, sdt)
    new_m = (1.0 - momentum) * old_m + momentum * mean
    new_v = (1.0 - momentum) * old_v + momentum * unbiased_var
    with np.errstate(over="ignore"):  # the overflow is judged here, and warned of once
        ok = ok & xp.isfinite(xp.astype(new_m, running_mean.dtype))
        ok = ok & xp.isfinite(xp.astype(new_v, running_var.dtype))
    new_m, new_v = xp.where(ok, new_m, old_m), xp.where(ok, new_v, old_v)
    return (
        _to(new_m, xp, array_api_compat.device(running_mean), running_mean.dtype),
        _to(new_v, xp, array_api_compat.device(running_var), running_var.dtype),
        ok,
    )


def _to_host_list(xp: Any, mask: Array) -> list[int]:
    """Indices where the boolean vector ``mask`` is true, as Python ints (one
    transfer from a device)."""
    return np.flatnonzero(host_values(mask)).tolist()  # type: ignore[no-any-return]


_NDARRAY = {np.ndarray}
_NONE = type(None)
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")
# The dtypes the lean path takes, per stand-in dtype for floats (None: none).
_HOST_DTYPE_SETS: dict[Any, frozenset[Any]] = {None: frozenset(_fast.HOST_DTYPES)}


def _host_dtype_set(bits: Any) -> frozenset[Any]:
    """The host route's dtypes, with ``bits`` (a stand-in for floats) if given."""
    dtypes = _HOST_DTYPE_SETS.get(bits)
    if dtypes is None:
        dtypes = _HOST_DTYPE_SETS[bits] = frozenset((*_fast.HOST_DTYPES, bits))
    return dtypes


def _numpy_args_valid(
    x: Any,
    params: tuple[Any, ...],
    axis: Any,
    eps: Any,
    momentum: Any,
    num_batches_tracked: Any,
    center: Any,
    out: Any,
    bits: Any = None,
) -> bool:
    """True when every argument is plainly valid numpy input (the lean path).

    ``bits``: a non-floating dtype that stands for floats here (bfloat16's
    :data:`~arraysyncbn._fast.BF16_BITS` in views of torch tensors). False
    sends the call through the full validation, which raises the precise
    error or accepts what this quick test was unsure of.
    """
    if type(axis) is not int or not -x.ndim <= axis < x.ndim or x.ndim < 2:
        return False
    if (params[2] is None) != (params[3] is None):
        return False
    vectors = (*params, center)
    if _NONE in map(type, vectors):  # by type: `None in` would compare arrays
        vectors = tuple(a for a in vectors if a is not None)
    dtypes = _host_dtype_set(bits)
    # One set per property, filled by C-level loops: asked on every call.
    if not (
        set(map(type, vectors)) <= _NDARRAY
        and set(map(_SHAPE, vectors)) <= {(x.shape[axis],)}
        and set(map(_DTYPE, vectors)) <= dtypes
    ):
        return False
    if out is not None and (
        type(out) is not np.ndarray
        or out.shape != x.shape
        or out.dtype != x.dtype
        or not out.flags.writeable
        or np.may_share_memory(out, x)
    ):
        return False
    if center is not None and not _fast.host_all_finite(center):
        return False
    if type(eps) is not float or not 0.0 < eps < math.inf:
        return False
    if momentum is not None and (type(momentum) is not float or not 0.0 <= momentum <= 1.0):
        return False
    return type(num_batches_tracked) is int and num_batches_tracked >= 0


def _host_grads_valid(x: np.ndarray, dy: Any, out: Any, bits: Any = None) -> bool:
    """True when ``dy`` and ``out`` (numpy views) plainly fit the host forward's
    x (``bits`` as in :func:`_numpy_args_valid`)."""
    if (
        type(dy) is not np.ndarray
        or dy.shape != x.shape
        or (dy.dtype.kind != "f" and dy.dtype is not bits)
    ):
        return False
    if out is None:
        return True
    return (
        type(out) is np.ndarray
        and out.shape == x.shape
        and out.dtype == x.dtype
        and out.flags.writeable
    )


def _overlaps_unlike(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether host arrays ``a`` and ``b`` may share memory without being the
    same elements in the same places (the same array written in place is fine
    for elementwise kernels; a shifted or transposed view is not)."""
    if not _shares_memory(a, b):
        return False
    return not (
        a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _byte_range(t: Any) -> tuple[int, int]:
    """The addresses a strided torch tensor's elements span, ``[start, end)``."""
    start = end = t.data_ptr()
    if t.numel() == 0:
        return start, end
    size = t.element_size()
    for n, step in zip(t.shape, t.stride(), strict=True):
        if step > 0:
            end += (n - 1) * step * size
        else:
            start += (n - 1) * step * size
    return start, end + size


def _validate_center(xp: Any, x: Array, ax: int, center: Array) -> None:
    if _namespace(x=x, center=center) is not xp:
        raise TypeError("center comes from a different array library than x")
    _check_floating(xp, "center", center)
    if tuple(center.shape) != (x.shape[ax],):
        raise ValueError(f"center must have shape ({x.shape[ax]},), got {tuple(center.shape)}")
    if not bool(xp.all(xp.isfinite(center))):
        raise ValueError("center must be finite")


def _validate_out(xp: Any, x: Array, out: Array, name: str = "out", *, kept: bool = False) -> None:
    """Check ``out`` against x; ``kept``: x is kept for the backward, so
    ``out`` must not overlap it."""
    if _namespace(x=x, **{name: out}) is not xp:
        raise TypeError(f"{name} comes from a different array library than x")
    _check_devices(x=x, **{name: out})
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise ValueError(
            f"{name} must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
            f"{tuple(out.shape)} and {out.dtype}"
        )
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if kept and _shares_memory(out, x):
        raise ValueError(
            f"{name} shares memory with x, which the backward reads: y cannot be "
            "written over x (use a separate output array)"
        )


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
    out: Array | None = None,
    label: CallLabel | None = None,
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
        weight or bias is given (``affine``), whether running statistics
        are (``track_running_stats``) and, among the ranks that pass a
        ``center``, that it is the same bits: one more small collective.
        Only when batch statistics are used.
    center : array of shape ``(C,)`` or None
        A per-channel value near the batch mean, **bitwise identical on every
        rank** (a previous step's reduced mean, as ``SyncBatchNorm`` passes).
        Statistics are merged around it. Precision does not depend on it:
        when the reduced values show that the merge lost precision (data
        far from the center in units of its spread: |mean − center|/std
        beyond ~4 for float64 input, ~7e3 for float32) or that its sums
        overflowed, every rank runs another statistics allreduce centered
        on the reduced mean, and again, up to three more in all, while the
        reduced values still show a loss or an overflow and the mean still
        moves (each pass brings the center ~1e15 times closer in units of
        the spread, so data up to ~1e45 standard deviations from the center
        is exact). A good center saves those extra collectives. None
        centers at zero. A :class:`PrecisionWarning` remains only for a
        loss that even the last pass could not repair.
    out : array like x, or None
        Where to write y (same shape, dtype, library and device as x; not
        overlapping x, which the backward reads; writeable). On
        the host route it is written in place, so a training loop that
        passes the same buffer each step saves a fresh x-sized allocation;
        on the portable route y is computed, then copied into it. An ``out``
        laid out differently from x sends the call to the portable route.
    label : CallLabel or None
        The call's signature (``SyncBatchNorm`` passes its layer number and
        call number). None: the next call of the functional API on ``comm``
        (:func:`arraysyncbn.comm.calls.next_call`), counted only when the
        call communicates. Every collective of the call carries it, so
        ranks in different calls raise :class:`CollectiveMismatchError` on
        every rank, naming the calls, instead of mixing statistics.

    Returns
    -------
    y : array like ``x`` (namespace, device, dtype, shape); ``out`` if given
    new_running_mean, new_running_var : arrays or None
        Updated running statistics in their input dtype; the inputs themselves
        when nothing was updated (eval, global N = 0, or no channels).
    saved : SavedForBackward
        Pass to :func:`sync_batch_norm_backward`; ``saved.count`` is the
        global N (0: statistics were not updated). It holds x itself (a
        view, not a copy): x must not change before the backward, which
        would otherwise differentiate the new values silently.

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

    Notes
    -----
    numpy arrays and torch CPU tensors (float16, bfloat16 for torch, float32,
    float64; numpy's in native byte order) run fused compiled kernels (the host route,
    :mod:`arraysyncbn._fast`); everything else, and everything when
    ``ARRAYSYNCBN_FAST=0``, runs the portable array-API route. Both give
    results within the same documented bounds.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from arraysyncbn import sync_batch_norm_forward
    >>> x = xp.reshape(xp.arange(8, dtype=xp.float64), (4, 2))
    >>> y, rm, rv, saved = sync_batch_norm_forward(x, None, None, None, None, eps=0.0 + 1e-12)
    >>> [round(float(v), 6) for v in y[:, 0]]
    [-1.341641, -0.447214, 0.447214, 1.341641]
    """
    params = caller_params = (weight, bias, running_mean, running_var)
    caller_center, caller_out = center, out
    xk, outk = x, out
    io = _fast.host_io(x)
    views = None if io is None else io.views((x, *params, center, out))
    if (
        views is not None
        and type(training) is bool
        and _numpy_args_valid(
            views[0],
            views[1:5],
            axis,
            eps,
            momentum,
            num_batches_tracked,
            views[5],
            views[6],
            io.bits,
        )
    ):
        # Lean path: plain host arrays, checked as numpy views in one go.
        xk, params, center, outk = views[0], views[1:5], views[5], views[6]
        xp, ax = np, axis % x.ndim
    else:
        xp, ax, num_batches_tracked = _validate_forward(
            x, *params, axis, eps, momentum, num_batches_tracked
        )
        _check_training(training)
        if center is not None:
            _validate_center(xp, x, ax, center)
        if out is not None:
            _validate_out(xp, x, out, kept=True)
        if io is not None:
            try:
                xk, outk = io.to_numpy(x), io.to_numpy(out)
                params = tuple(io.to_numpy(a) for a in params)
                center = io.to_numpy(center)
            except (RuntimeError, TypeError):  # a view numpy refuses (neg or conj bit)
                io = None
            else:
                xp = np
        if io is not None and not all(
            a is None or a.dtype in _fast.HOST_DTYPES or a.dtype is _fast.BF16_BITS
            for a in (*params, center)
        ):
            io = None  # parameters the kernels do not take (long double, byte-swapped)
    communicator = as_communicator(comm)
    channels = x.shape[ax]
    kern: Any = None
    if io is not None:
        kern = _fast.host_kernels(io).bind(xk, ax, outk)
    if kern is None:
        io = None
        xk, outk, params, center = x, out, caller_params, caller_center
        xp = array_api_compat.array_namespace(x)
        device = array_api_compat.device(x)
        sdev, sdt = statistics_device(xp, device)
        acc = kernels.accumulation_dtype(xp, device)
        kern = _fast.cuda_kernels(xp, x, ax, acc, sdev, sdt, device)
        if kern is None:
            kern = PortableKernels(xp, ax, acc, sdev, sdt, device)
    else:
        device, sdev, sdt = "cpu", "cpu", np.float64
    wdtype = kernels.work_dtype(xp, xk.dtype)
    weight, bias, running_mean, running_var = params

    if not (training or running_mean is None):
        mean, invstd, f = kern.eval_factors(params, eps, wdtype)
        y = kern.normalize(xk, f, outk)
        saved = SavedForBackward(
            xk, f, mean, invstd, weight, bias, ax, None, False, communicator, xp, kern, io
        )
        return _result(io, y, caller_out), caller_params[2], caller_params[3], saved

    if label is None:
        label = next_call(communicator, "forward")
    elif not isinstance(label, CallLabel):
        raise TypeError(f"label must be a CallLabel or None, got {type(label).__name__}")
    if check:
        affine_param = next((a for a in caller_params[:2] if a is not None), None)
        check_consistency(
            communicator, x, num_features=channels, axis=ax, eps=eps, momentum=momentum,
            affine=weight is not None or bias is not None,
            track_running_stats=running_mean is not None, label=label.with_pass("check"),
            parameter_dtype=None if affine_param is None else affine_param.dtype,
            statistics_dtype=None if running_mean is None else caller_params[2].dtype,
            num_batches_tracked=num_batches_tracked, center=center,
        )  # fmt: skip
    statistics = functools.partial(
        _batch_statistics, kern, xk, channels, communicator, io=io,
        exact_count=sdt == xp.float64, shape=tuple(x.shape),
    )  # fmt: skip
    count, buf, agreed = statistics(center=center, label=label)
    if not agreed:
        # Some ranks merged around a center and some around zero (a layer's
        # state loaded on some ranks only): the sums mix centers, so every
        # rank merges again around zero, and they share the next center again.
        center = None
        buf = _again(statistics, None, label, count)
    if count == 0 or channels == 0:
        # Nothing to finalize: every shard empty, or no channel at all (whose
        # reductions, a max among them, have no identity on some libraries).
        # Taken from the reduced count and the checked channel count, so
        # every rank and every route comes here alike.
        zeros = xp.zeros((channels,), dtype=sdt, device=sdev)
        mean = var = zeros
        invstd = kernels.invstd_of(var, eps, xp=xp)
        f = _factors(xp, mean, invstd, weight, bias, wdtype, device, dense=kern.dense)
        new_mean, new_var = caller_params[2], caller_params[3]
        next_center = center
    else:
        update = training and running_mean is not None
        m = None
        if update:
            m = 1.0 / (num_batches_tracked + 1) if momentum is None else float(momentum)
        size = communicator.size
        st = kern.finalize(buf, count, center, eps, params, m, size, wdtype)
        second, warn = _tolerances(xp, size, sdt, wdtype)
        entry = center
        passes = 0
        while (
            passes < _RECENTER_LIMIT
            and (st.overflowed or st.loss > second)
            and _mean_moves(xp, buf)
        ):
            # Exact first, fast second: the reduced values (the same bits on
            # every rank) show the merge cancelled or overflowed, so every
            # rank merges again around the reduced mean, which each pass
            # moves orders of magnitude closer to the data.
            center = _recentered(xp, st)
            buf = _again(statistics, center, label, count)
            st = kern.finalize(buf, count, center, eps, params, m, size, wdtype)
            passes += 1
        _warn_if_imprecise(st.loss, warn, passes)
        if st.nonfinite:
            _warn_nonfinite(st.nonfinite)
        next_center = st.center
        if st.nonfinite and center is not entry:
            next_center = _kept_center(xp, st, entry, sdev, sdt)
        mean, invstd, f = st.mean, st.invstd, st.factors
        new_mean, new_var = st.running_mean, st.running_var
        if not update:
            new_mean, new_var = caller_params[2], caller_params[3]
        elif _wraps(io):
            new_mean, new_var = io.from_numpy(new_mean), io.from_numpy(new_var)
    y = kern.normalize(xk, f, outk)
    if _wraps(io):
        mean, next_center = io.from_numpy(mean), io.from_numpy(next_center)
        if caller_out is None:
            y = io.from_numpy(y)
    saved = SavedForBackward(
        xk, f, mean, invstd, weight, bias, ax, count, True, communicator, xp, kern, io,
        next_center, label,
    )  # fmt: skip
    return y if caller_out is None else caller_out, new_mean, new_var, saved


def batch_norm_inference(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    *,
    eps: float = 1e-5,
    axis: int = 1,
) -> Array:
    """Batch normalization in eval mode: ``x`` normalized with the running statistics.

    ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias`` per
    channel, computed as :func:`sync_batch_norm_forward` computes it with
    ``training=False`` (centered first, never ``x·scale + shift``), with the
    same result bit for bit. Nothing is communicated and nothing is kept for
    a backward (call :func:`sync_batch_norm_forward` where gradients are
    needed), so on the host route the call does far less around its single
    kernel: that is what counts at small inputs (inference, a batch of one).

    Parameters
    ----------
    x : array, at least 2-D, real floating dtype
        Channels on ``axis``.
    weight, bias : arrays of shape ``(C,)`` or None
    running_mean, running_var : arrays of shape ``(C,)``
        Required (a layer without them normalizes with batch statistics,
        which :func:`sync_batch_norm_forward` computes across ranks).
    eps : float > 0
    axis : int
        Channel axis.

    Returns
    -------
    y : array like ``x`` (namespace, device, dtype, shape)

    Raises
    ------
    ValueError, TypeError
        As :func:`sync_batch_norm_forward`; ValueError if either running
        statistic is None.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from arraysyncbn import batch_norm_inference
    >>> x = xp.reshape(xp.arange(6, dtype=xp.float64), (3, 2))
    >>> mean, var = xp.asarray([2.0, 3.0]), xp.asarray([4.0, 1.0])
    >>> y = batch_norm_inference(x, None, None, mean, var, eps=1e-12)
    >>> [float(v) for v in y[:, 0]]
    [-1.0, 0.0, 1.0]
    """
    params = (weight, bias, running_mean, running_var)
    io = _fast.host_io(x)
    views = None if io is None else io.views((x, *params))
    if views is not None and _inference_args_valid(views[0], views[1:], axis, eps, io.bits):
        library = _fast.THREADS_AS.get() or io.library
        y = _fast.host_inference(views[0], axis % x.ndim, views[1:], eps, library)
        if y is not None:
            return y if io.library == "numpy" else io.from_numpy(y)
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm_inference normalizes with running statistics: running_mean and "
            "running_var must both be given (sync_batch_norm_forward uses batch statistics)"
        )
    y, _, _, _ = sync_batch_norm_forward(
        x, weight, bias, running_mean, running_var, training=False, eps=eps, axis=axis
    )
    return y


def _inference_args_valid(
    x: np.ndarray, params: tuple[Any, ...], axis: Any, eps: Any, bits: Any = None
) -> bool:
    """True when :func:`batch_norm_inference`'s arguments (host-route views;
    ``bits`` as in :func:`_numpy_args_valid`) are plainly valid for the host
    kernel (vectors of x's channel count, both running statistics given);
    False sends the call through the full validation, which raises the
    precise error or accepts the rest."""
    if type(axis) is not int or x.ndim < 2 or not -x.ndim <= axis < x.ndim:
        return False
    if params[2] is None or params[3] is None or type(eps) is not float or not 0.0 < eps < math.inf:
        return False
    arrays = (x, *params)
    if params[0] is None or params[1] is None:  # no weight or no bias
        arrays = tuple(a for a in arrays if a is not None)
    dtypes = _host_dtype_set(bits)
    # One set per property, filled by C-level loops: asked on every call.
    return (
        set(map(type, arrays)) == _NDARRAY
        and set(map(_SHAPE, arrays[1:])) == {(x.shape[axis],)}
        and set(map(_DTYPE, arrays)) <= dtypes
    )


def _result(io: Any, a: Array, out: Array | None) -> Array:
    """The caller's ``out`` itself when given (``a`` was written into it), else
    ``a`` as an array of the caller's library."""
    if out is not None:
        return out
    return io.from_numpy(a) if _wraps(io) else a


def _wraps(io: Any) -> bool:
    """Whether host-route results go back to the caller as another library's
    arrays (:meth:`~arraysyncbn._fast.HostIO.from_numpy`, no copy)."""
    return io is not None and io.library != "numpy"


def sync_batch_norm_backward(
    dy: Array, saved: SavedForBackward, *, out: Array | None = None
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`sync_batch_norm_forward`.

    Parameters
    ----------
    dy : array of y's shape, namespace and device, real floating dtype
    saved : what the forward returned
    out : array like the forward's x, or None
        Where to write dx. It may be dy or x itself (dx is written in place
        of them); an ``out`` that overlaps them otherwise (a shifted view of
        the same buffer) gets dx computed in a fresh array, then copied in.

    Returns
    -------
    dx : array like the forward's x; ``out`` if given
    dweight, dbias : arrays of shape ``(C,)`` in weight's and bias's dtype, or None
        This rank's contribution only, *not* reduced across ranks (as in
        PyTorch, data-parallel gradient averaging reduces them).

    When the forward used batch statistics over a global batch of N > 0
    elements this communicates once: one allreduce of the packed
    per-channel ``Σdy`` and ``Σdy·x̂`` (2·C values, plus the call signature
    when there is more than one rank). It runs the route its forward ran.
    """
    if not isinstance(saved, SavedForBackward):
        raise TypeError(
            f"saved must be the SavedForBackward of a forward, got {type(saved).__name__}"
        )
    xp, kern, io, f = saved.xp, saved.kern, saved.io, saved.factors
    x, caller_out, caller_dy = saved.x, out, dy
    if x is None:
        raise ValueError(
            "the forward's x was released (SavedForBackward.release_input) and not "
            "restored: call saved.restore_input(x) before the backward"
        )
    views = None if io is None else io.views((dy, out))
    if views is not None and _host_grads_valid(x, *views, io.bits):
        dy, out = views  # lean path: plain host arrays
    else:
        if not array_api_compat.is_array_api_obj(dy):
            raise TypeError(f"dy must be an array, got {type(dy).__name__}")
        caller_x = x if io is None else io.from_numpy(x)
        cxp = array_api_compat.array_namespace(caller_x)
        if _namespace(dy=dy, x=caller_x) is not cxp:
            raise TypeError("dy comes from a different array library than the forward's x")
        _check_floating(cxp, "dy", dy)
        _check_devices(x=caller_x, dy=dy)
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(
                f"dy has shape {tuple(dy.shape)}, but the forward's output has shape "
                f"{tuple(x.shape)}"
            )
        if out is not None:
            _validate_out(cxp, caller_x, out)
        if io is not None:
            dy, out = io.to_numpy(dy), io.to_numpy(out)
    final_out = out
    # dx written over dy itself (out=dy) is the common in-place case: known
    # without asking numpy, whose checks cost a third of a small backward.
    read = (x,) if caller_out is caller_dy else (x, dy)
    if io is not None and out is not None and any(_overlaps_unlike(out, a) for a in read):
        # The host kernel writes dx[i] while it still reads x and dy at other
        # indices: an out shifted against them would feed it values it has
        # already overwritten. Compute into a fresh array, then copy.
        out = None
    wdtype = kernels.work_dtype(xp, x.dtype)
    channels = x.shape[saved.axis]
    communicates = saved.batch_stats and saved.count != 0 and saved.label is not None
    signed = communicates and saved.comm.size > 1  # a world of one is always in step
    if communicates:
        label = saved.label.with_pass("backward")  # type: ignore[union-attr]
    if signed:
        bits = 53 if saved.invstd.dtype == xp.float64 else 24
        # Two padding values (the forward's count and center flag): as long
        # as the forward's buffer, so that a rank in a forward and one in a
        # backward fail on the signature, not on mismatched lengths (which
        # MPI does not promise to detect).
        tail = (0.0, 0.0, *signature_values(label, "sum", bits, saved.comm.size))
        packed = kern.pack_backward(dy, x, f, saved.invstd, tail)
    else:
        packed = kern.pack_backward(dy, x, f, saved.invstd, ())
    if not saved.batch_stats:
        dx = kern.backward_input(dy, x, f, None, None, out)
    elif not communicates:
        dx = xp.zeros_like(x) if out is None else _write(out, xp.zeros_like(x))
    else:
        buf = _allreduce_signed(packed, saved.comm, io, label)
        if tuple(buf.shape) != tuple(packed.shape):
            raise CollectiveMismatchError(
                f"the reduced buffer has shape {tuple(buf.shape)}, expected {tuple(packed.shape)}"
            )
        if signed:
            _check_signature(_tail(buf, 2 * channels + 2), label, "sum", bits, saved.comm)
            buf = buf[: 2 * channels]
        mean_dy, k = kern.backward_coefficients(buf, saved.count, saved.invstd, wdtype)
        dx = kern.backward_input(dy, x, f, mean_dy, k, out)
    if final_out is not None and out is None:
        dx = _write(final_out, dx)
    dweight = dbias = None
    if saved.weight is not None:
        dweight = kern.cast(packed[channels : 2 * channels], saved.weight.dtype)
    if saved.bias is not None:
        dbias = kern.cast(packed[:channels], saved.bias.dtype)
    if _wraps(io):
        dweight, dbias = io.from_numpy(dweight), io.from_numpy(dbias)
    return _result(io, dx, caller_out), dweight, dbias


CHECK_ENV = "ARRAYSYNCBN_CHECK"
"""Set to 1 to run :func:`check_consistency` on every batch-statistics call."""


def check_every_call() -> bool:
    """Whether ``ARRAYSYNCBN_CHECK`` asks for the consistency check on every call."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() in ("1", "true", "yes")


_DTYPE_CODES = {
    "float16": 16.0,
    "bfloat16": 17.0,
    "float32": 32.0,
    "float64": 64.0,
    "float96": 96.0,  # numpy's long double, by its width in memory
    "float128": 128.0,
}
"""The check's codes of the dtypes it can name on every rank; any other
dtype's code is a hash of its name (:func:`_dtype_code`)."""


def _dtype_name(dtype: Any) -> str:
    """The name of ``dtype``'s number format, without the library's prefix
    (``torch.float32``: ``float32``) and without numpy's byte order: a
    byte-swapped ``>f8`` holds float64 numbers and is computed as float64
    (:func:`arraysyncbn.kernels.work_dtype`), so it is ``float64``."""
    if isinstance(dtype, np.dtype):
        return dtype.newbyteorder("=").name
    return str(dtype).rsplit(".", 1)[-1]


def _dtype_label(dtype: Any) -> str:
    """``dtype`` as the check's message names it: its format's name, and
    numpy's spelling where the byte order is not native (``float64 (>f8)``)."""
    name = _dtype_name(dtype)
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        return f"{name} ({dtype.str})"
    return name


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
    show: Callable[[float], str] | None
    """How to show a value in the message; None: say only that it differs."""
    negated: list[float] | None = None
    """What goes into the max of the negations (None: ``-values``): with
    ``values``, a value below every real one leaves a rank out of the comparison."""
    absent: tuple[list[float], list[float]] | None = None
    """The reduced (high, low) when every rank left itself out: agreement."""


def _show_int(v: float) -> str:
    return str(int(v))


def _show_bool(v: float) -> str:
    return str(bool(v))


_HASHED = 256.0
"""The smallest code of a dtype named by a hash: above every code of
:data:`_DTYPE_CODES`."""


def _dtype_code(dtype: Any) -> float:
    """``dtype``'s code in the check (0 for None: no such arrays): one per
    number format, equal on two ranks when :func:`_dtype_name` is. A dtype
    without a code of its own gets 24 bits of a CRC-32 of its name (exact in
    float32 too), so two different ones differ but for a one in ~1.7e7
    collision (they used to share one code, and pass the check)."""
    if dtype is None:
        return 0.0
    name = _dtype_name(dtype)
    code = _DTYPE_CODES.get(name)
    if code is None:
        code = _HASHED + zlib.crc32(name.encode()) % (2**24 - int(_HASHED))
    return code


def _dtype_field(label: str, dtype: Any) -> _Field:
    """The check's field for ``dtype`` (None: no such arrays), shown by name:
    the codes of :data:`_DTYPE_CODES` on every rank, this rank's own dtype
    by its name too, any other hashed one as such."""
    own = _dtype_code(dtype)
    names = {code: name for name, code in _DTYPE_CODES.items()}
    names[0.0] = "None"
    if dtype is not None:
        names[own] = _dtype_name(dtype)

    def show(v: float) -> str:
        return names.get(v, "a dtype this rank cannot name")

    return _Field(label, [own], show)


def _show_momentum(v: float) -> str:
    return "None" if v == _MOMENTUM_NONE else repr(v)


_UNUSED = -1.0
"""A compared count that does not matter (``num_batches_tracked`` with a momentum)."""


def _show_count(v: float) -> str:
    return "unused (a momentum is set)" if v == _UNUSED else str(int(v))


def _show_float(v: float) -> str:
    return repr(v)


_NO_DIGIT = (-1.0, -(2.0**17))
"""A rank without a center in the center's comparison: below every 16-bit
digit in the max, and below every negated digit in the max of negations."""


def _center_field(center: Array | None) -> _Field:
    """The merge center's CRC-32 (of its values as float64; two 16-bit digits,
    exact in float32 too), compared among the ranks that have one (one
    transfer from a device)."""
    label = "merge center (must be the same bits on every rank that has one)"
    absent = ([_NO_DIGIT[0]] * 2, [-_NO_DIGIT[1]] * 2)
    if center is None:
        return _Field(label, [_NO_DIGIT[0]] * 2, None, [_NO_DIGIT[1]] * 2, absent)
    values = np.ascontiguousarray(_fast.values(host_values(center)), dtype=np.float64)
    crc = zlib.crc32(values.tobytes())
    digits = [float(crc >> 16), float(crc & 0xFFFF)]
    return _Field(label, digits, None, None, absent)


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
    label: CallLabel | None = None,
    parameter_dtype: Any = None,
    statistics_dtype: Any = None,
    num_batches_tracked: int = 0,
    center: Array | None = None,
) -> None:
    """Raise :class:`CollectiveMismatchError` on every rank unless all ranks agree.

    One small allreduce (``max`` of each value and of its negation) compares
    across ranks the channel count, the input dtype (its number format:
    numpy's byte order is storage, so ``>f8`` and ``<f8`` agree), the
    channel axis, the number of dimensions, the ``ARRAYSYNCBN_CHECK``
    setting (which decides whether later calls check again, so it must
    agree too), ``eps`` and ``momentum`` (bit for bit; ``None`` included),
    whether the layer is ``affine`` and tracks running statistics, the
    dtypes of its parameters and running statistics (None: it has none),
    and, with ``momentum=None`` (a cumulative average),
    ``num_batches_tracked``, and the merge ``center`` (a CRC-32 of its
    values as float64, among the ranks that pass one: a rank passing None
    is fine, the statistics pass handles that).
    Ranks that differ in any of these would otherwise drift apart silently
    (different running statistics or, for the center, statistics merged in
    different frames) or take different collectives: in eval mode for
    ``track_running_stats``, in the statistics passes for the input dtype
    (whose work precision sets the tolerance that asks for another pass).
    Call it with arguments that passed validation, on every rank, at the
    same point of the program. The defaults of the keyword arguments are
    :class:`~arraysyncbn.SyncBatchNorm`'s. ``label`` signs the collective
    (None: the next ``check`` call of the functional API on ``comm``); ranks
    in different calls are reported as such first, since their other values
    need not agree.
    """
    communicator = as_communicator(comm)
    xp = array_api_compat.array_namespace(x)
    device = array_api_compat.device(x)
    sdev, sdt = statistics_device(xp, device)
    e = float(eps)
    m = _MOMENTUM_NONE if momentum is None else float(momentum)
    fields = [
        _Field("channel count", [float(num_features)], _show_int),
        _dtype_field("dtype", x.dtype),
        _Field("channel axis", [float(axis % x.ndim)], _show_int),
        _Field("number of dimensions", [float(x.ndim)], _show_int),
        _Field(f"{CHECK_ENV} (checks on every call)", [float(check_every_call())], _show_int),
        # The float itself to show it, its bits to compare it exactly.
        _Field("eps", [e, *_bits16(e)], _show_float),
        _Field("momentum", [m, *_bits16(m)], _show_momentum),
        _Field("affine", [float(bool(affine))], _show_bool),
        _Field("track_running_stats", [float(bool(track_running_stats))], _show_bool),
        _dtype_field("parameter dtype", parameter_dtype),
        _dtype_field("running statistics dtype", statistics_dtype),
    ]
    # The cumulative average's weight (momentum=None) depends on the count;
    # always present, so that every rank's buffer has the same length.
    n = float(num_batches_tracked) if momentum is None else _UNUSED
    fields.append(_Field("num_batches_tracked", [n, *_bits16(n)], _show_count))
    # Ranks without a center (state loaded on some ranks only) are fine: the
    # statistics pass sees that and merges around zero. Among the others the
    # centers must be the same bits.
    fields.append(_center_field(center))
    values = [v for f in fields for v in f.values]
    negated = [v for f in fields for v in (f.negated or [-v for v in f.values])]
    # On the statistics device in its dtype, like the statistics buffer, so
    # ranks whose x sits on different kinds of device still pass the same MPI type.
    if label is None:
        label = next_call(communicator, "check")
    tail = signature_values(label, "max", 24, communicator.size)  # exact in float32 too
    buf = xp.asarray(values + negated + list(tail), dtype=sdt, device=sdev)
    with current_call(label):
        reduced = communicator.allreduce(buf, "max")
    if tuple(reduced.shape) != tuple(buf.shape):
        raise CollectiveMismatchError(
            f"the reduced check has shape {tuple(reduced.shape)}, expected {tuple(buf.shape)}"
        )
    got = _tail(reduced, 0)  # one transfer from a device
    _check_signature(got[2 * len(values) :], label, "max", 24, communicator)
    high = got[: len(values)]
    low = [-v for v in got[len(values) : 2 * len(values)]]
    problems = []
    start = 0
    for f in fields:
        stop = start + len(f.values)
        if low[start:stop] != high[start:stop] and not (
            f.absent is not None
            and high[start:stop] == f.absent[0]
            and low[start:stop] == f.absent[1]
        ):
            seen = ""
            if f.show is not None:
                seen = f" (values seen include {f.show(low[start])} and {f.show(high[start])})"
            problems.append(f"{f.label} differs{seen}")
        start = stop
    if problems:
        raise CollectiveMismatchError(
            f"ranks disagree on this SyncBatchNorm call (rank {communicator.rank} has "
            f"{num_features} channels, dtype {_dtype_label(x.dtype)}, axis {axis % x.ndim}, "
            f"{x.ndim} dimensions, eps {e!r}, momentum {_show_momentum(m)}, "
            f"affine {bool(affine)}, track_running_stats {bool(track_running_stats)}): "
            + "; ".join(problems)
        )
