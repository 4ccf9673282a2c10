"""Fast routes: fused compiled kernels for one kind of memory, chosen per call.

The portable array-API route (:mod:`arraysyncbn.kernels`) is the source of
truth and runs everywhere. A fast route runs instead where it applies and
computes the same four steps (statistics, normalize, backward sums, backward
input) with the same numerics; the property tests compare both with the
float64 reference and with each other.

Today there is one: host memory (:mod:`.host`, numba). It takes float32 and
float64 arrays of numpy, and torch CPU tensors through zero-copy numpy views.
Every other library, dtype or device runs the portable route; so does
everything when ``ARRAYSYNCBN_FAST=0`` or when numba cannot be imported
(:func:`route_info` says which). A CUDA route (cupy kernels) will sit beside
this one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FAST_ENV", "HostIO", "host_io", "host_kernels", "route_info"]

FAST_ENV = "ARRAYSYNCBN_FAST"
"""Set to 0 to force the portable route everywhere."""

_HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_numba_error: str | None = None
_host_module: Any = None


def _disabled() -> bool:
    value = os.environ.get(FAST_ENV)
    if value is None or value == "1":  # the common cases, checked first: every call asks
        return False
    return value.strip().lower() in ("0", "false", "no", "off")


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


@dataclass(frozen=True)
class HostIO:
    """How one caller's arrays become numpy views and results go back.

    ``to_numpy`` returns a zero-copy view; ``from_numpy`` wraps a numpy
    result as an array of the caller's library without copying.
    """

    library: str

    def to_numpy(self, a: Any) -> Any:
        if a is None or self.library == "numpy":
            return a
        return a.detach().numpy()

    def from_numpy(self, a: Any) -> Any:
        if a is None or self.library == "numpy":
            return a
        import torch

        return torch.from_numpy(a)

    def views(self, arrays: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """numpy views of a call's arrays (None entries kept), or None unless
        each is a plain host array of this library (the lean path's test;
        anything else goes through the full validation, which names it)."""
        if self.library == "numpy":
            return arrays
        tensor = sys.modules["torch"].Tensor
        out = []
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            if not (isinstance(a, tensor) and a.is_cpu):
                return None
            try:  # refuses what numpy cannot view: bfloat16, conj or neg bits
                out.append(a.detach().numpy())
            except (RuntimeError, TypeError):
                return None
        return tuple(out)


_NUMPY_IO = HostIO("numpy")
_TORCH_IO = HostIO("torch")


def host_io(x: Any) -> HostIO | None:
    """The :class:`HostIO` for x if the host route may run it, else None."""
    if type(x) is np.ndarray:
        if x.dtype not in _HOST_DTYPES or _disabled() or _load_host() is None:
            return None
        return _NUMPY_IO
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return None
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.is_conj()
        or x.is_neg()
        or _disabled()
        or _load_host() is None
    ):
        return None
    return _TORCH_IO


def host_kernels() -> Any:
    """A fresh :class:`.host.HostKernels` (one per forward, kept for its backward)."""
    return _load_host().HostKernels()


def route_info() -> str:
    """One line saying which route numpy/torch-CPU input takes, and why."""
    if _disabled():
        return f"portable (array API): {FAST_ENV}=0"
    if _load_host() is None:
        return f"portable (array API): {_numba_error}"
    n = _host_module.thread_count()
    if n == 1:
        return "host (numba, 1 thread per rank)"
    kib = _host_module.PARALLEL_MIN_BYTES // 1024
    return f"host (numba, up to {n} threads per rank; inputs under {kib} KiB: 1)"
