"""Fast routes: fused compiled kernels for one kind of memory, chosen per call.

The portable array-API route (:mod:`arraysyncbn.kernels`) is the source of
truth and runs everywhere. A fast route runs instead where it applies and
computes the same four steps (statistics, normalize, backward sums, backward
input) with the same numerics; the property tests compare both with the
float64 reference and with each other.

The default one is host memory (:mod:`.host`, numba). It takes float16,
float32 and float64 arrays of numpy in native byte order, and float16,
bfloat16, float32 and float64 torch CPU tensors through zero-copy numpy
views. Every other library,
dtype or device runs the portable route; so does everything when
``ARRAYSYNCBN_FAST=0`` or when numba cannot be imported (:func:`route_info`
says which). Beside it, an experimental CUDA route (:mod:`.cuda`, numba.cuda
kernels for cupy arrays) runs only on request, ``ARRAYSYNCBN_CUDA_KERNELS=1``
(:func:`cuda_kernels`), until it has been verified on a GPU.

numpy has no bfloat16: the host route sees a torch bfloat16 tensor as an
array of its bit patterns, of dtype :data:`BF16_BITS` (int16), which
:class:`HostIO` turns back into bfloat16 tensors and :func:`values` into
numbers. Per-channel results go back to the caller's dtype through
:meth:`HostIO.cast`, which rounds as the caller's library does (torch rounds
float64 to a half dtype through float32, numpy directly), so that they come
out as the portable route's.
"""

from __future__ import annotations

import contextvars
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BF16_BITS",
    "CUDA_ENV",
    "F16_BITS",
    "FAST_ENV",
    "THREADS_ENV",
    "HostIO",
    "check_environment",
    "cuda_kernels",
    "environ_reader",
    "explicit_threads",
    "host_all_finite",
    "host_inference",
    "host_io",
    "host_kernels",
    "route_info",
    "values",
]

FAST_ENV = "ARRAYSYNCBN_FAST"
"""Set to 0 (or false, no, off) to force the portable route everywhere; 1
(true, yes, on), empty or unset for the fast routes. Other values raise
ValueError."""
_FAST_OFF = ("0", "false", "no", "off")
_FAST_ON = ("", "1", "true", "yes", "on")

THREADS_ENV = "ARRAYSYNCBN_THREADS"
"""Threads per rank for the host route (:func:`.host.thread_count`): a
positive integer, or empty or unset for the default."""

CUDA_ENV = "ARRAYSYNCBN_CUDA_KERNELS"
"""Set to 1 to run cupy arrays on the experimental CUDA route (:mod:`.cuda`);
``sim`` also takes numpy arrays the host route leaves (tests in numba's CUDA
simulator)."""

F16_BITS = np.dtype(np.uint16)
"""The dtype through which the host kernels see float16 data (its bit patterns)."""
BF16_BITS = np.dtype(np.int16)
"""The dtype through which the host route sees bfloat16 data (its bit patterns):
signed, to tell it from float16's, and what torch's zero-copy ``torch.int16``
view of a bfloat16 tensor gives."""

_F16 = np.dtype(np.float16)
HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), _F16)
"""numpy dtypes the host kernels take (native byte order), besides the bit views."""
_TORCH_HOST_DTYPES: tuple[Any, ...] = ()
_numba_error: str | None = None
_host_module: Any = None


def _environ_reader(name: str) -> Any:
    """A function returning the raw value of environment variable ``name``, or
    None when unset, that reads the mapping behind ``os.environ``.

    Asked on every call of the host route: ``os.environ.get`` runs four
    Python frames of the os module, ~10 µs the first time after the kernels
    have streamed x. CPython's ``os.environ`` keeps its entries in a dict
    (``_data``, encoded keys and values), updated by every assignment and
    deletion through ``os.environ`` (what ``monkeypatch.setenv`` does); a
    raw value means the same as its decoded text, which is decoded where it
    is parsed. Elsewhere, or once ``os.environ`` has been replaced, this is
    ``os.environ.get`` itself.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    try:
        key = environ.encodekey(name)  # type: ignore[attr-defined]
    except AttributeError:
        data = None
    if not isinstance(data, dict):
        return lambda: os.environ.get(name)

    def read() -> Any:
        if os.environ is not environ:
            return os.environ.get(name)
        return data.get(key)

    return read


def environ_reader(names: tuple[str, ...]) -> Any:
    """A function returning the raw values of environment variables ``names``
    (a tuple, None for each one unset), read as :func:`_environ_reader` reads
    one: from the dict behind ``os.environ`` in one C-level pass, or through
    ``os.environ.get`` where that dict is missing or ``os.environ`` has been
    replaced. Raw values are hashable, and the same raw value means the same
    text, so a tuple of them can key what was worked out from them."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    try:
        keys = tuple(environ.encodekey(name) for name in names)  # type: ignore[attr-defined]
    except AttributeError:
        data = None
    if not isinstance(data, dict):
        return lambda: tuple(map(os.environ.get, names))
    get = data.get

    def read() -> tuple[Any, ...]:
        if os.environ is not environ:
            return tuple(map(os.environ.get, names))
        return tuple(map(get, keys))

    return read


_READERS: dict[str, Any] = {}


def environ_value(name: str) -> str | None:
    """``os.environ.get(name)``, read as :func:`_environ_reader` reads (the
    thread count's variables are asked on every threaded call)."""
    reader = _READERS.get(name)
    if reader is None:
        reader = _READERS[name] = _environ_reader(name)
    raw = reader()
    if raw is None or isinstance(raw, str):
        return raw
    return os.environ.decodevalue(raw)  # type: ignore[attr-defined,no-any-return]


_read_fast = _environ_reader(FAST_ENV)
# Verdicts on raw values seen before (None: unset); a value refused is never kept.
_FAST_VERDICTS: dict[Any, bool] = {None: False}


def _disabled() -> bool:
    """Whether ``ARRAYSYNCBN_FAST`` turns the fast routes off.

    Raises ValueError for a value that is neither on nor off: a typo must
    not pass for "on" silently.
    """
    raw = _read_fast()
    verdict = _FAST_VERDICTS.get(raw)
    if verdict is not None:  # the common case: every call asks
        return verdict
    value = raw if isinstance(raw, str) else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    word = value.strip().lower()
    if word in _FAST_OFF:
        verdict = True
    elif word in _FAST_ON:
        verdict = False
    else:
        raise ValueError(
            f"{FAST_ENV} must be 0, 1, true, false, yes, no, on or off (any case), got {value!r}"
        )
    if len(_FAST_VERDICTS) < 64:  # a few spellings, not every value a job ever sets
        _FAST_VERDICTS[raw] = verdict
    return verdict


def explicit_threads() -> int | None:
    """``ARRAYSYNCBN_THREADS`` as a positive integer, None when unset or empty.

    Raises ValueError, naming the variable, for anything else.
    """
    text = (environ_value(THREADS_ENV) or "").strip()
    if not text:
        return None
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {text!r}")
    return value


def check_environment() -> None:
    """Raise ValueError, naming the variable, if ``ARRAYSYNCBN_FAST`` or
    ``ARRAYSYNCBN_THREADS`` holds a value the fast routes refuse.

    The routes read them on each call, ``ARRAYSYNCBN_THREADS`` only for
    inputs large enough to run threaded, so a bad value would surface in
    the middle of a job, on some ranks and not others; a job checks up front.
    """
    _disabled()
    explicit_threads()


def _load_host() -> Any:
    """The host kernel module, or None (with the reason kept) without numba."""
    global _host_module, _numba_error
    if _host_module is None and _numba_error is None:
        try:
            from . import host
        except ImportError as exc:  # numba missing or broken
            _numba_error = f"numba cannot be imported ({exc})"
        else:
            _host_module = host
    return _host_module


def _torch() -> Any:
    """torch, once the caller has imported it (never imported here)."""
    return sys.modules["torch"]


def host_all_finite(v: np.ndarray) -> bool:
    """Whether a per-channel host-route vector is all finite (only asked once
    :func:`host_io` has loaded the host kernels)."""
    return _host_module.all_finite(v)  # type: ignore[no-any-return,union-attr]


def values(a: np.ndarray) -> np.ndarray:
    """A host-route array by value, as float32 or float64.

    16-bit patterns (:data:`BF16_BITS`, :data:`F16_BITS`) and float16 become
    float32 (exactly); float32 and float64 arrays are returned as they are.
    Meant for per-channel vectors: it copies.
    """
    dtype = a.dtype
    if dtype.itemsize > 2:  # float32, float64: asked several times a call
        return a
    if dtype is BF16_BITS:
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype is F16_BITS:
        return a.view(np.float16).astype(np.float32)
    if dtype is _F16:
        return a.astype(np.float32)
    return a


@dataclass(frozen=True)
class HostIO:
    """How one caller's arrays become numpy arrays and results go back.

    ``to_numpy`` returns a zero-copy view (of the bit patterns for a torch
    bfloat16 tensor, see :data:`BF16_BITS`); ``from_numpy`` wraps a numpy
    result as an array of the caller's library without copying; ``cast``
    rounds a per-channel result to a dtype as the caller's library would.
    """

    library: str
    bits: Any = None
    """The non-floating dtype that stands for floats in this library's views
    (bfloat16's bits for torch), or None."""

    def to_numpy(self, a: Any) -> Any:
        if a is None or self.library == "numpy":
            return a
        a = a.detach()
        if a.dtype is _torch().bfloat16:
            return a.view(_torch().int16).numpy()
        return a.numpy()

    def from_numpy(self, a: Any) -> Any:
        if a is None or self.library == "numpy":
            return a
        t = _torch().from_numpy(a)
        return t.view(_torch().bfloat16) if a.dtype is BF16_BITS else t

    def cast(self, v: np.ndarray, dtype: Any) -> np.ndarray:
        """Per-channel float ``v`` in ``dtype`` (a dtype of :meth:`to_numpy`'s
        arrays), rounded as the caller's library rounds: torch casts float64 to
        float16 and bfloat16 through float32 (two roundings), numpy directly."""
        if self.library == "numpy" or not (dtype is BF16_BITS or dtype is _F16):
            with np.errstate(over="ignore"):  # judged by the caller, warned of once
                return v.astype(dtype, copy=False)
        torch = _torch()
        target = torch.bfloat16 if dtype is BF16_BITS else torch.float16
        return self.to_numpy(torch.from_numpy(np.ascontiguousarray(v)).to(target))

    def views(self, arrays: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """numpy views of a call's arrays (None entries kept; bfloat16 as its
        bits, :data:`BF16_BITS`), or None unless each is a plain floating
        host array of this library (the lean path's test; anything else goes
        through the full validation, which names it)."""
        if self.library == "numpy":
            return arrays
        torch = _torch()
        out = []
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            if not (isinstance(a, torch.Tensor) and a.is_cpu and a.is_floating_point()):
                return None  # an int16 tensor must not pass for bfloat16 bits
            try:  # refuses what numpy cannot view: conj or neg bits
                out.append(self.to_numpy(a))
            except (RuntimeError, TypeError):
                return None
        return tuple(out)


THREADS_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "arraysyncbn_threads_as", default=None
)
"""Set to ``"torch"`` around calls made on numpy views of torch tensors (the
torch module's route): their kernels then use at most torch's thread count,
as the tensors themselves would (:func:`.host.thread_count`)."""


_NUMPY_IO = HostIO("numpy")
_TORCH_IO = HostIO("torch", BF16_BITS)


def host_route_off() -> bool:
    """Whether ``ARRAYSYNCBN_FAST`` turns the host route off, or numba is missing."""
    return _disabled() or _load_host() is None


def host_io(x: Any) -> HostIO | None:
    """The :class:`HostIO` for x if the host route may run it, else None."""
    if type(x) is np.ndarray:
        if x.dtype not in HOST_DTYPES or host_route_off():
            return None
        return _NUMPY_IO
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return None
    if (
        not x.is_cpu
        or x.dtype not in _torch_host_dtypes(torch)
        or x.is_conj()
        or x.is_neg()
        or host_route_off()
    ):
        return None
    return _TORCH_IO


def _torch_host_dtypes(torch: Any) -> tuple[Any, ...]:
    global _TORCH_HOST_DTYPES
    if not _TORCH_HOST_DTYPES:
        _TORCH_HOST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return _TORCH_HOST_DTYPES


def cuda_kernels(xp: Any, x: Any, axis: int, acc: Any, sdev: Any, sdt: Any, device: Any) -> Any:
    """Bound :class:`.cuda.CudaKernels` for x where ``ARRAYSYNCBN_CUDA_KERNELS``
    asks for the CUDA route and it applies, else None (the portable route)."""
    mode = os.environ.get(CUDA_ENV)
    if mode is None or mode in ("", "0"):
        return None
    library = type(x).__module__.partition(".")[0]
    if mode not in ("1", "sim"):
        raise ValueError(f"{CUDA_ENV} must be 0, 1 or sim, got {mode!r}")
    if library != "cupy" and not (mode == "sim" and library == "numpy"):
        return None
    from . import cuda  # numba.cuda: imported only on request

    return cuda.bind(xp, x, axis, acc, sdev, sdt, device)


def host_inference(
    x: np.ndarray, axis: int, params: tuple[Any, ...], eps: float, library: str
) -> Any:
    """:func:`.host.inference` (asked once :func:`host_route_off` has loaded the host module)."""
    return _host_module.inference(x, axis, params, eps, library)


def host_kernels(io: HostIO) -> Any:
    """A fresh :class:`.host.HostKernels` for ``io``'s arrays (one per forward,
    kept for its backward)."""
    return _load_host().HostKernels(io)


def route_info() -> str:
    """One line saying which route numpy/torch-CPU input takes, and why."""
    if _disabled():
        return f"portable (array API): {FAST_ENV}=0"
    if _load_host() is None:
        return f"portable (array API): {_numba_error}"
    n = _host_module.thread_count()
    n_torch = _host_module.thread_count("torch") if "torch" in sys.modules else n
    if n_torch != n:
        threads = f"{n} thread(s) per rank for numpy, {n_torch} for torch (capped by its own count)"
    elif n == 1:
        return "host (numba, 1 thread per rank)"
    else:
        threads = f"up to {n} threads per rank"
    kib = _host_module.PARALLEL_MIN_BYTES // 1024
    return f"host (numba, {threads}; inputs under {kib} KiB: 1)"
