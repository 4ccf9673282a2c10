"""The fast route for host memory: numba kernels behind the step's four kernel calls.

:class:`HostKernels` offers the same four steps as
:class:`arraysyncbn.functional.PortableKernels` (local statistics, normalize,
backward sums, backward input) over numpy arrays, with fused compiled
kernels from :mod:`.host_jit`. :func:`arraysyncbn.functional` picks it
per call when x lives in host memory and can be viewed as a C-contiguous
``(P, C, Q)`` block without a copy (numpy arrays; torch CPU tensors through
zero-copy views, see :mod:`arraysyncbn._fast`).

float16 and bfloat16 x run the same kernels on x's bit patterns (see
:mod:`.host_jit`), in float32 like the portable route. Per-channel vectors
in a half dtype (weight, bias, running statistics, center) are turned into
float32 numbers first (C values); new running statistics in a half dtype are
rounded by the caller's library (:meth:`arraysyncbn._fast.HostIO.cast`) and
judged finite as stored, as the portable route judges them.

Threads (:func:`thread_count`): ``ARRAYSYNCBN_THREADS``, else numba's
pool size divided among the ranks that share the node (``MPI_LOCALNRANKS``,
``OMPI_COMM_WORLD_LOCAL_SIZE``, ``MV2_COMM_WORLD_LOCAL_SIZE`` or torchrun's
``LOCAL_WORLD_SIZE``), at most ``OMP_NUM_THREADS`` and, for torch tensors,
at most torch's own thread count. Inputs below :data:`PARALLEL_MIN_BYTES`
run serially, because waking idle pool threads costs more than they save.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import threading
from typing import Any

import numpy as np

from . import (
    _F16,
    BF16_BITS,
    F16_BITS,
    THREADS_AS,
    THREADS_ENV,
    HostIO,
    environ_reader,
    environ_value,
    explicit_threads,
    values,
)
from . import host_jit as hk
from .host_jit import numba_config

__all__ = ["PARALLEL_MIN_BYTES", "HostKernels", "block_view", "thread_count"]

PARALLEL_MIN_BYTES = 1 << 19
"""Inputs (x's bytes) below this run on one thread.

Measured here (2 cores, another process busy, forward + backward of
(N, 64, 16, 16) float32, 2 threads against 1): 0.87 × at 128 KiB, 1.56 × at
512 KiB, 1.9 × from 2 MiB on.
"""


class _TorchThreads:
    """Keeps PyTorch's thread count as it was across what it wraps.

    numba's OpenMP threading layer can share torch's OpenMP runtime, and
    starting numba's pool set torch's thread count to numba's: a user's
    ``torch.set_num_threads(1)`` became 2 here, and torch's next ops on 2
    busy cores ran 30 times slower.
    """

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        torch = sys.modules.get("torch")
        self._before = None if torch is None else torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        before = self._before
        if before is not None:
            torch = sys.modules["torch"]
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


# numba's workqueue threading layer (the fallback where neither TBB nor
# OpenMP loads) aborts on concurrent parallel launches, which thread ranks
# would make; launches are cheap to serialize compared with a kernel.
_LAUNCH = threading.Lock()

# How many ranks share this node, as launchers say: MPICH/Hydra, Open MPI,
# MVAPICH, torchrun.
_LOCAL_SIZE_VARS = (
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
)


def _lenient_int(name: str) -> int | None:
    """A launcher's or OpenMP's variable as a positive integer, None when
    absent or unreadable (not ours to refuse). ``OMP_NUM_THREADS`` may list
    nested levels ("4,2"): the first is this process's."""
    text = (environ_value(name) or "").split(",")[0].strip()
    # isdecimal, not isdigit: "²" is a digit that int() refuses.
    return int(text) if text.isdecimal() and int(text) >= 1 else None


# Every variable the thread count depends on, read raw on each threaded call
# (one C-level pass over them): their values key the counts worked out before.
_THREAD_VARS = (THREADS_ENV, *_LOCAL_SIZE_VARS, "OMP_NUM_THREADS")
_read_thread_vars = environ_reader(_THREAD_VARS)
_THREAD_COUNTS: dict[Any, int] = {}


def thread_count(library: str = "numpy") -> int:
    """Threads one rank's kernels use on an input of ``library``'s arrays.

    ``ARRAYSYNCBN_THREADS`` if set; otherwise numba's pool divided among the
    ranks on this node, at most ``OMP_NUM_THREADS`` and, for torch tensors,
    at most torch's own count (``torch.get_num_threads()``: what its batch
    norm would use, and what ``torch.set_num_threads`` and torchrun set).
    Never more than numba's pool, never below one.

    Asked on every threaded call, and every change of these variables (or of
    torch's count, or numba's pool) is seen at the next call: the count is
    worked out once per combination of their values and kept (a value
    refused raises, every time, and is never kept).
    """
    torch_threads = sys.modules["torch"].get_num_threads() if library == "torch" else 0
    key = (_read_thread_vars(), torch_threads, numba_config.NUMBA_NUM_THREADS)
    n = _THREAD_COUNTS.get(key)
    if n is None:
        n = _thread_count(torch_threads)
        if len(_THREAD_COUNTS) < 64:  # a few settings, not every value a job sets
            _THREAD_COUNTS[key] = n
    return n


def _thread_count(torch_threads: int) -> int:
    """:func:`thread_count` worked out (``torch_threads``: torch's count, or 0
    for arrays of other libraries)."""
    # The pool's size, not get_num_threads(): the kernels' set_num_threads
    # changes the latter.
    available = numba_config.NUMBA_NUM_THREADS
    explicit = explicit_threads()
    if explicit is not None:
        return min(explicit, available)
    local = next((v for v in map(_lenient_int, _LOCAL_SIZE_VARS) if v is not None), 1)
    n = available // local
    # numba's pool is the core count whatever OpenMP's variable says, and
    # threads beyond what the user allowed oversubscribe the cores: measured
    # here, fork-join on a busy core ran 10 × slower than serial.
    omp = _lenient_int("OMP_NUM_THREADS")
    if omp is not None:
        n = min(n, omp)
    if torch_threads:
        n = min(n, torch_threads)
    return max(1, n)


def layout(a: np.ndarray, axis: int) -> str | None:
    """``"c"`` if ``a`` is C-contiguous, ``"last"`` if it is with the channel axis
    moved last (channels-last memory seen with channels elsewhere), else None."""
    if a.flags.c_contiguous:
        return "c"
    if np.moveaxis(a, axis, -1).flags.c_contiguous:
        return "last"
    return None


def block_view(a: np.ndarray, axis: int, mode: str | None = None) -> np.ndarray | None:
    """Return ``a`` as a C-contiguous ``(P, C, Q)`` view, or None if that needs a copy.

    ``mode`` (see :func:`layout`) asks for one way of walking memory; None
    takes ``a``'s own. Channels-last memory with the channel on another axis
    (a torch ``channels_last`` tensor seen as NCHW) is viewed as
    ``(N·H·W, C, 1)``.
    """
    shape = a.shape
    channels = shape[axis]
    if mode is None:
        mode = layout(a, axis)
    if mode == "c" and a.flags.c_contiguous:
        return a.reshape(math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))
    if mode == "last":
        moved = np.moveaxis(a, axis, -1)
        if moved.flags.c_contiguous:
            return moved.reshape(-1, channels, 1)
    return None


def empty_in_layout(x: np.ndarray, axis: int, mode: str, dtype: Any = None) -> np.ndarray:
    """A new array of x's shape and dtype (or ``dtype``) whose memory is walked as ``mode``.

    Not ``np.empty_like``: for size-1 and zero-size axes its strides need not
    match x's, and the kernels compare layouts, not strides.
    """
    dtype = x.dtype if dtype is None else dtype
    if mode == "c":
        return np.empty(x.shape, dtype=dtype)
    moved = np.empty(np.moveaxis(x, axis, -1).shape, dtype=dtype)
    return np.moveaxis(moved, -1, axis)


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _bits(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels take it: float16 through its bit patterns (numba
    has no float16), everything else as it is."""
    return a.view(F16_BITS) if a.dtype is _F16 else a


def _half(a: np.ndarray) -> bool:
    """Whether a host-route array holds float16 or bfloat16 (by identity: the
    dtypes numpy and torch give are numpy's own instances, and this is asked
    on every call)."""
    return a.dtype is _F16 or a.dtype is BF16_BITS


def all_finite(v: np.ndarray) -> bool:
    """Whether every element of a per-channel host vector is finite (one
    compiled loop for float32/float64; numpy's isfinite and all, with their
    temporaries, for the 16-bit kinds)."""
    if v.dtype is _F32 or v.dtype is _F64:
        return bool(hk.all_finite(v))
    return bool(np.isfinite(values(v)).all())


_HALF_DTYPES = frozenset((_F16, BF16_BITS))
_DTYPE = operator.attrgetter("dtype")
_PRESENT = functools.partial(operator.is_not, None)


def _any_half(vectors: tuple[Any, ...]) -> bool:
    """Whether any of the arrays (None entries skipped) is float16 or bfloat16's
    bits; in C-level loops: asked on every call."""
    return not _HALF_DTYPES.isdisjoint(map(_DTYPE, filter(_PRESENT, vectors)))


class HostKernels:
    """The per-rank steps on host memory, as fused numba kernels.

    :meth:`bind` fixes one forward's x (and its backward's) and the number
    of threads: methods then take and return full-shape numpy arrays like
    the portable route's, with per-channel vectors in float64 (statistics)
    or the work dtype (factors).
    """

    name = "host"
    dense = True
    device = "cpu"

    def __init__(self, io: HostIO) -> None:
        self.io = io
        self.axis = 0
        self.mode = "c"
        self.xb: np.ndarray = _NO_BLOCK
        self._released: tuple[int, ...] = ()  # xb's shape while x is released
        self.parts = 1
        # The last dy and its block view: the backward's two kernels read the
        # same dy, which may need one copy into x's layout, not two.
        self._dy: tuple[np.ndarray, np.ndarray] | None = None

    def bind(self, x: np.ndarray, axis: int, out: np.ndarray | None) -> HostKernels | None:
        """Fix x; None if x (or ``out``) needs a copy to be viewed as (P, C, Q)."""
        mode = layout(x, axis)
        if mode is None:
            return None
        self.axis, self.mode, self.xb = axis, mode, block_view(_bits(x), axis, mode)
        if out is not None and self._view(out, x) is None:
            return None
        # Small inputs never ask for the thread count (nor wake the pool).
        if x.nbytes < PARALLEL_MIN_BYTES:
            self.parts = 1
        else:
            self.parts = thread_count(THREADS_AS.get() or self.io.library)
        return self

    def release_input(self) -> None:
        """Forget x's block (see ``SavedForBackward.release_input``), keeping its shape."""
        self._released = self.xb.shape
        self.xb = _NO_BLOCK
        self._dy = None

    def restore_input(self, x: np.ndarray) -> None:
        """Take x back after :meth:`release_input`: its block, walked as before."""
        shape = self._released
        if self.mode == "c" and x.flags.c_contiguous:  # the common case, as in _block
            xb = _bits(x).reshape(shape)
        else:
            xb = block_view(_bits(x), self.axis, self.mode)
        if xb is None or xb.shape != shape:
            raise ValueError("restore_input got an x laid out unlike the forward's")
        self.xb = xb

    def _block(self, a: np.ndarray) -> np.ndarray | None:
        """``a`` (x's shape and dtype) as a block walked like x's, or None.

        A C-contiguous ``a`` with C-contiguous x is reshaped to x's block
        shape directly: the common case, asked several times a step, where
        :func:`block_view`'s general walk costs more than the reshape.
        """
        if a.dtype is _F16:  # _bits, inlined: asked several times a step
            a = a.view(F16_BITS)
        if self.mode == "c" and a.flags.c_contiguous:
            return a.reshape(self.xb.shape)
        return block_view(a, self.axis, self.mode)

    def _view(self, a: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """``a``'s block view walked like x's, or None (other shape, dtype or layout)."""
        if a.shape != x.shape or a.dtype != x.dtype:
            return None
        return self._block(a)

    def _new(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A fresh output like x and its block view."""
        a = empty_in_layout(x, self.axis, self.mode)
        return a, self._block(a)  # type: ignore[return-value]

    def _like_x(self, a: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``a`` (dy) as a block in x's layout and dtype, copied only if needed
        (and then once for the backward's two kernels).

        The copy holds dy's values in the work dtype (float32 for half x), as
        the portable route casts dy: never its bits in another format.
        """
        if self._dy is not None and self._dy[0] is a:
            return self._dy[1]
        view = self._view(a, x)
        if view is None:
            work = _F32 if _half(x) else x.dtype
            copy = empty_in_layout(x, self.axis, self.mode, work)
            copy[...] = values(a)
            view = block_view(copy, self.axis, self.mode)
        self._dy = (a, view)
        return view

    def pack_statistics(
        self, x: np.ndarray, center: np.ndarray | None, tail: tuple[float, ...]
    ) -> np.ndarray:
        """``[n, Σ(x − center), Σ(x − center)², *tail]`` in float64 (center None: 0;
        ``tail``: the call's signature).

        One read of x, around a sample K of each channel; the float64 shift
        to ``center`` is exact algebra.
        """
        xb = self.xb
        p, channels, q = xb.shape
        n = p * q
        base = 1 + 2 * channels
        buf = np.empty(base + len(tail))
        _put(buf, base, tail)
        if n == 0:
            buf[:base] = 0.0
            return buf
        if self.parts == 1:
            center = _DUMMY if center is None else values(center)
            hk.stats_packed_serial(xb, center, float(n), buf, _statistics_sums(xb))
            return buf
        acc = _statistics_sums(xb)
        k = hk.shifts(xb, _DUMMY if center is None else values(center), acc)
        part = np.empty((self.parts, 2, channels))
        _set_threads(self.parts)
        with _LAUNCH:
            hk.stats_parallel(xb, k, part, acc)
            if acc is _F32_SUMS:
                hk.redo_statistics_parallel(xb, k, part)
        zero = _zeros(channels) if center is None else values(center).astype(np.float64, copy=False)
        hk.pack_statistics(_merged(part), k, zero, float(n), buf)
        return buf

    def finalize(
        self,
        buf: np.ndarray,
        count: int,
        center: np.ndarray | None,
        eps: float,
        params: tuple[Any, ...],
        momentum: float | None,
        size: int,
        wdtype: Any,
    ) -> Any:
        """As :meth:`arraysyncbn.functional.PortableKernels.finalize`, in one kernel."""
        channels = self.xb.shape[1]
        weight, bias, rm, rv = params
        update = momentum is not None and rm is not None
        half = _any_half(params)
        if half:  # float16 as its bits; the kernel reads 16-bit patterns by value
            weight, bias, rm, rv = (None if a is None else _bits(a) for a in params)
        stats = np.empty((5, channels))
        hi, lo, scale, shift = np.empty((4, channels), dtype=wdtype)
        center = _zeros(channels) if center is None else values(center)
        new_rm = new_rv = _DUMMY
        if update:
            # The kernel writes float32/float64 running statistics as stored and
            # judges them; half ones it writes in float64, rounded and judged below.
            new_rm, new_rv = np.empty_like(rm), np.empty_like(rv)
            if half:
                new_rm, new_rv = _zeros(channels), _zeros(channels)
        loss, overflowed, bad = hk.finalize_forward(
            buf, float(count), center, float(eps),
            _ones(channels) if weight is None else weight,
            _zeros(channels) if bias is None else bias,
            rm if update else _DUMMY, rv if update else _DUMMY,
            momentum if update else -1.0, size, stats, hi, lo, scale, shift, new_rm, new_rv,
        )  # fmt: skip
        if not update:
            new_rm, new_rv = params[2], params[3]
        elif half:
            new_rm, new_rv, lost = self._stored(new_rm, new_rv, params[2], params[3], stats, center)
            bad += lost
        f = _types.Factors(hi, lo, scale, shift)
        return _types.Step(
            stats[0], stats[1], stats[2], f, new_rm, new_rv, loss, overflowed, stats[3],
            tuple(np.flatnonzero(stats[4]).tolist()) if bad else (),
        )  # fmt: skip

    def eval_factors(self, params: tuple[Any, ...], eps: float, wdtype: Any) -> tuple[Any, ...]:
        """As :meth:`arraysyncbn.functional.PortableKernels.eval_factors`, in one kernel."""
        channels = self.xb.shape[1]
        if _any_half(params):  # float16 as its bits; the kernel reads them by value
            params = tuple(None if a is None else _bits(a) for a in params)
        weight, bias, rm, rv = params
        stats = np.empty((2, channels))
        hi, lo, scale, shift = np.empty((4, channels), dtype=wdtype)
        hk.eval_factors(
            rm, rv, float(eps),
            _ones(channels) if weight is None else weight,
            _zeros(channels) if bias is None else bias,
            stats, hi, lo, scale, shift,
        )  # fmt: skip
        return stats[0], stats[1], _types.Factors(hi, lo, scale, shift)

    def _stored(
        self,
        new_rm: np.ndarray,
        new_rv: np.ndarray,
        rm: np.ndarray,
        rv: np.ndarray,
        stats: np.ndarray,
        center: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """float64 running statistics in rm's and rv's dtypes, rounded as the
        caller's library rounds, and judged finite as stored: the channels
        that are not keep their old statistics and their center. Returns both
        and how many channels were lost.

        Writes the kernel's ``stats`` rows 3 and 4 (next center, non-finite flag).
        """
        new_rm, new_rv = self.cast(new_rm, rm.dtype), self.cast(new_rv, rv.dtype)
        lost = hk.keep_unstored(_bits(new_rm), _bits(new_rv), _bits(rm), _bits(rv), center, stats)
        return new_rm, new_rv, int(lost)

    def cast(self, v: np.ndarray, dtype: Any) -> np.ndarray:
        """Per-channel float64 ``v`` (dweight, dbias) in ``dtype``, rounded as the
        caller's library rounds."""
        if dtype is _F32:
            # numpy's astype would need np.errstate to keep an overflow quiet
            # (judged by the caller); the kernel rounds alike and warns of nothing.
            out = np.empty(v.shape, _F32)
            hk.cast_into(v, out)
            return out
        if self.io.library == "torch" and (dtype is BF16_BITS or dtype is _F16):
            # torch's rounding (through float32) in one compiled loop, not a
            # round trip through torch: ~40 µs a vector once x has streamed.
            bits = np.empty(v.shape, BF16_BITS if dtype is BF16_BITS else F16_BITS)
            hk.cast_half_into(v, bits)
            return bits if dtype is BF16_BITS else bits.view(_F16)
        return self.io.cast(v, dtype)

    def normalize(self, x: np.ndarray, f: Any, out: np.ndarray | None) -> np.ndarray:
        """Return ``((x − hi) − lo)·scale + shift`` (written into ``out`` if given)."""
        y, yb = self._new(x) if out is None else (out, self._view(out, x))
        if self.parts == 1:
            hk.normalize_serial(self.xb, f.hi, f.lo, f.scale, f.offset, yb)
        else:
            _set_threads(self.parts)
            with _LAUNCH:
                hk.normalize_parallel(self.xb, f.hi, f.lo, f.scale, f.offset, yb, self.parts)
        return y

    def pack_backward(
        self, dy: np.ndarray, x: np.ndarray, f: Any, invstd: Any, tail: tuple[float, ...]
    ) -> np.ndarray:
        """``[Σdy, Σdy·x̂, *tail]`` per channel, float64."""
        self._dy = None  # a backward starts here: never reuse an earlier call's dy
        dyb = self._like_x(dy, x)
        channels = self.xb.shape[1]
        packed = np.empty(2 * channels + len(tail))
        _put(packed, 2 * channels, tail)
        acc = _partial_sums(self.xb)  # by x: a half x's dy copy is float32
        if self.parts == 1:
            hk.backward_packed_serial(dyb, self.xb, f.hi, f.lo, invstd, packed, acc)
            return packed
        part = np.empty((self.parts, 2, channels))
        _set_threads(self.parts)
        with _LAUNCH:
            hk.backward_sums_parallel(dyb, self.xb, f.hi, f.lo, part, acc)
            if acc is _F32_SUMS:
                hk.redo_gradient_sums_parallel(dyb, self.xb, f.hi, f.lo, part)
        hk.pack_backward(_merged(part), invstd, packed)
        return packed

    def backward_coefficients(
        self, buf: np.ndarray, count: int, invstd: np.ndarray, wdtype: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global ``mean(dy)`` and ``invstd·mean(dy·x̂)`` in the work dtype."""
        mean_dy, k = np.empty((2, invstd.shape[0]), dtype=wdtype)
        hk.backward_coefficients(buf, float(count), invstd, mean_dy, k)
        return mean_dy, k

    def backward_input(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        f: Any,
        mean_dy: Any,
        k: Any,
        out: np.ndarray | None,
    ) -> np.ndarray:
        """Return ``scale·((dy − mean_dy) − (x − mean)·k)`` (``scale·dy`` for None,
        without reading x)."""
        dyb = self._like_x(dy, x)
        # An out= walked unlike x (the forward's bind() saw only its own
        # out=) gets dx computed in x's layout, then copied in.
        view = None if out is None else self._view(out, x)
        dx, dxb = self._new(x) if view is None else (out, view)
        self._dy = None  # the last use: do not keep dy (or its copy) alive
        if mean_dy is None or k is None:  # eval: the statistics are constants
            args: tuple[Any, ...] = (dyb, f.scale, dxb)
            serial, parallel = hk.backward_scale_serial, hk.backward_scale_parallel
        else:
            args = (dyb, self.xb, f.hi, f.lo, f.scale, mean_dy, k, dxb)
            serial, parallel = hk.backward_input_serial, hk.backward_input_parallel
        if self.parts == 1:
            serial(*args)
        else:
            _set_threads(self.parts)
            with _LAUNCH:
                parallel(*args, self.parts)
        if out is not None and view is None:
            out[...] = dx
            return out
        return dx


def inference(
    x: np.ndarray, axis: int, params: tuple[Any, ...], eps: float, library: str
) -> np.ndarray | None:
    """Batch norm in eval mode on a host-route ``x`` (params: weight or None,
    bias or None, running mean, running variance; host-route vectors):
    ``HostKernels.eval_factors`` then ``normalize`` in one kernel call, the
    same bits. None where x cannot be viewed as a block without a copy.
    ``library``: whose thread count applies (see :func:`thread_count`)."""
    shape = x.shape
    channels = shape[axis]
    if x.flags.c_contiguous:  # the common case, without layout()'s general walk
        block = (math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))
        y = np.empty(shape, x.dtype)
        xb, yb = _bits(x).reshape(block), _bits(y).reshape(block)
    else:
        mode = layout(x, axis)
        if mode is None:
            return None
        y = empty_in_layout(x, axis, mode)
        xb, yb = block_view(_bits(x), axis, mode), block_view(_bits(y), axis, mode)
    if _any_half(params):  # float16 as its bits; the kernel reads them by value
        params = tuple(None if a is None else _bits(a) for a in params)
    weight, bias, rm, rv = params
    args = (
        xb, rm, rv, eps,
        _ones(channels) if weight is None else weight,
        _zeros(channels) if bias is None else bias,
        yb,
    )  # fmt: skip
    parts = 1 if x.nbytes < PARALLEL_MIN_BYTES else thread_count(library)
    if parts == 1:
        hk.inference_serial(*args)
    else:
        _set_threads(parts)
        with _LAUNCH:
            hk.inference_parallel(*args, parts)
    return y


class _Types:
    """functional's result types, imported on first use (functional imports
    this module) and kept: an import statement per call costs microseconds."""

    def __getattr__(self, name: str) -> Any:
        # Only for the two names (doctest and other tools probe attributes).
        if name not in ("Factors", "Step"):
            raise AttributeError(name)
        from .. import functional

        self.Factors, self.Step = functional._Factors, functional._Step
        return getattr(self, name)


_types = _Types()


def _merged(part: np.ndarray) -> np.ndarray:
    """Per-thread partials as the kernels merge them (in thread order); a seam
    where the tests plant a merge bug."""
    return part


def _put(buf: np.ndarray, start: int, values: tuple[float, ...]) -> None:
    """``buf[start:] = values``; item by item, 3 times faster for a few values."""
    for i, v in enumerate(values):
        buf[start + i] = v


_DUMMY = np.empty(0)
# Markers of the kernels' partial sums (hk.in_sums): float32 ones, of at most
# hk.HALF_BLOCK elements, for float16 and bfloat16 planes; float64 otherwise.
# Channels whose float32 partial sums are not finite, tiny or amplified by the
# shift are summed again in float64 (hk.redo_statistics, hk.redo_gradient_sums
# and their threaded forms).
_F32_SUMS = np.empty(0, np.float32)
_F64_SUMS = _DUMMY


def _partial_sums(xb: np.ndarray) -> np.ndarray:
    """The partial-sum marker for the (P, C, Q) view ``xb``: float32 for a
    16-bit x (its planes, or its rows for a (P, C, 1) view, summed in
    float32 partial sums), float64 otherwise."""
    return _F32_SUMS if xb.itemsize == 2 else _F64_SUMS


def _statistics_sums(xb: np.ndarray) -> np.ndarray:
    """:func:`_partial_sums` for the statistics pass, but float64 for planes
    shorter than ``hk.WIDE_PLANES``: there float32 partial sums gained
    little (bfloat16 (2,2048,7,7): 66 → 63 µs) and the shift they need
    (``hk.shifts``) cost more (75 µs)."""
    if 1 < xb.shape[2] < hk.WIDE_PLANES:
        return _F64_SUMS
    return _partial_sums(xb)


_NO_BLOCK = np.empty((0, 0, 0))  # x's block before bind()


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n)


def _ones(n: int) -> np.ndarray:
    return np.ones(n)


def _set_threads(n: int) -> None:
    import numba

    with _TorchThreads():  # the first call starts numba's pool
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
