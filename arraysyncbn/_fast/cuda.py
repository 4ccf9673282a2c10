"""The CUDA route: the four passes over x as fused numba.cuda kernels, for cupy arrays.

Experimental and opt-in (``ARRAYSYNCBN_CUDA_KERNELS=1``) until it has run on a
GPU: written and tested on the CPU in numba's CUDA simulator. It takes
float32 and float64 cupy arrays that can be viewed as C-contiguous
``(P, C, Q)`` blocks (contiguous, or channels-last); everything else stays
on the portable route.

:class:`CudaKernels` is a :class:`arraysyncbn.functional.PortableKernels`
whose passes over x (local statistics, normalize, backward sums, backward
input) are kernels of :mod:`.cuda_jit` (two or three launches each, instead
of dozens of array operations); the per-channel steps between them
(finalizing the reduced statistics, the backward coefficients) stay the
portable array-API code on the device. The numerics are the host route's
algorithm: sums in float64 around a sample of each channel, shifted to the
merge center exactly, partials added in a fixed order (y and dx may round
differently by one unit: NVVM forms FMAs). Kernels run on CuPy's current
stream.

``ARRAYSYNCBN_CUDA_KERNELS=sim`` routes float32/float64 numpy arrays here too,
for tests in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
numba.cuda is imported).
"""

from __future__ import annotations

from typing import Any

from ..functional import PortableKernels, _write
from . import cuda_jit as cj

__all__ = ["CudaKernels", "bind"]


def _flat(a: Any) -> Any:
    """A 1-D view of a C-contiguous array (never a copy)."""
    return a.reshape(-1)


class CudaKernels(PortableKernels):
    """The per-rank steps with the passes over x on the GPU (numba.cuda)."""

    name = "cuda"
    # Zeros, not None, for an absent lo or offset (one kernel signature); the
    # inherited finalize builds its factors so too.
    dense = True

    def __init__(self, xp: Any, axis: int, acc: Any, sdev: Any, sdt: Any, device: Any) -> None:
        super().__init__(xp, axis, acc, sdev, sdt, device)
        # The simulator runs every thread in Python: small blocks keep tests quick.
        self.threads = 32 if cj.SIMULATED else cj.THREADS
        self.mode = "c"
        self.channels = self.q = self.per_channel = 0
        self.xf: Any = None
        self.stream: Any = 0

    def bind(self, x: Any) -> CudaKernels | None:
        """Fix x; None if x cannot be walked as a (P, C, Q) block without a copy."""
        axis, shape = self.axis, tuple(x.shape)
        channels = shape[axis]
        if x.flags.c_contiguous:
            self.mode, q = "c", 1
            for s in shape[axis + 1 :]:
                q *= s
            self.xf = _flat(x)
        else:
            moved = self.xp.moveaxis(x, axis, -1)
            if not moved.flags.c_contiguous:
                return None
            self.mode, q = "last", 1
            self.xf = _flat(moved)
        self.channels, self.q = channels, q
        self.stream = cj.current_stream(x)
        self.per_channel = int(self.xf.shape[0]) // channels if channels else 0
        return self

    def release_input(self) -> None:
        """Forget x (see ``SavedForBackward.release_input``)."""
        self.xf = None

    def restore_input(self, x: Any) -> None:
        """Take x back after :meth:`release_input`, walked as before."""
        mode = self.mode
        if self.bind(x) is None or self.mode != mode:
            raise ValueError("restore_input got an x laid out unlike the forward's")

    # -- arrays in x's layout -----------------------------------------------------
    def _empty(self, x: Any) -> tuple[Any, Any]:
        """A new array like x, walked as x is, and its flat view."""
        xp = self.xp
        if self.mode == "c":
            a = xp.empty(x.shape, dtype=x.dtype, device=self.device)
            return a, _flat(a)
        moved = xp.empty(xp.moveaxis(x, self.axis, -1).shape, dtype=x.dtype, device=self.device)
        return xp.moveaxis(moved, -1, self.axis), _flat(moved)

    def _like_x(self, a: Any, x: Any) -> Any:
        """``a`` (dy) flat in x's layout and dtype, copied only if needed."""
        xp = self.xp
        if a.dtype != x.dtype:
            a = xp.astype(a, x.dtype)
        view = a if self.mode == "c" else xp.moveaxis(a, self.axis, -1)
        if view.flags.c_contiguous:
            return _flat(view)
        copy, flat = self._empty(x)
        copy[...] = a
        return flat

    def _partials(self) -> Any:
        """Scratch for the reductions' per-block partials, (blocks, 2, C) float64."""
        xp, c = self.xp, self.channels
        blocks = cj.partial_blocks(self.per_channel, self.threads)
        return xp.empty((blocks, 2, c), dtype=xp.float64, device=self.device)

    def _tail(self, tail: tuple[float, ...]) -> Any:
        return self.xp.asarray(list(tail) or [0.0], dtype=self.xp.float64, device=self.device)

    # -- the four passes ----------------------------------------------------------------
    def pack_statistics(self, x: Any, center: Any, tail: tuple[float, ...]) -> Any:
        if self.per_channel == 0:  # nothing to launch over: the portable zeros
            return super().pack_statistics(x, center, tail)
        xp, c = self.xp, self.channels
        buf = xp.empty((1 + 2 * c + len(tail),), dtype=xp.float64, device=self.device)
        if center is None:
            center = xp.zeros((c,), dtype=xp.float64, device=self.device)
        k = xp.empty((c,), dtype=xp.float64, device=self.device)
        cj.pack_statistics(
            self.xf, c, self.q, center, self.per_channel, self._tail(tail), len(tail),
            k, self._partials(), buf, self.stream, self.threads,
        )  # fmt: skip
        return buf

    def normalize(self, x: Any, f: Any, out: Any) -> Any:
        if self.per_channel == 0:
            return super().normalize(x, f, out)
        y, yf = self._empty(x)
        c, q = self.channels, self.q
        cj.normalize(self.xf, c, q, f.hi, f.lo, f.scale, f.offset, yf, self.stream, self.threads)
        return y if out is None else _write(out, y)

    def pack_backward(self, dy: Any, x: Any, f: Any, invstd: Any, tail: tuple[float, ...]) -> Any:
        if self.per_channel == 0:
            return super().pack_backward(dy, x, f, invstd, tail)
        xp, c = self.xp, self.channels
        buf = xp.empty((2 * c + len(tail),), dtype=xp.float64, device=self.device)
        cj.pack_backward(
            self._like_x(dy, x), self.xf, c, self.q, f.hi, f.lo, invstd, self._tail(tail),
            len(tail), self._partials(), buf, self.stream, self.threads,
        )  # fmt: skip
        return buf

    def backward_input(self, dy: Any, x: Any, f: Any, mean_dy: Any, k: Any, out: Any) -> Any:
        if self.per_channel == 0:
            return super().backward_input(dy, x, f, mean_dy, k, out)
        if mean_dy is None or k is None:  # running statistics: dx = scale·dy
            mean_dy = k = self.xp.zeros_like(f.hi)
        dx, dxf = self._empty(x)
        cj.backward_input(
            self._like_x(dy, x), self.xf, self.channels, self.q, f.hi, f.lo, f.scale,
            mean_dy, k, dxf, self.stream, self.threads,
        )  # fmt: skip
        return dx if out is None else _write(out, dx)


def bind(xp: Any, x: Any, axis: int, acc: Any, sdev: Any, sdt: Any, device: Any) -> Any:
    """Bound :class:`CudaKernels` for x, or None where the route does not apply."""
    if acc != xp.float64 or sdt != xp.float64 or x.dtype not in (xp.float32, xp.float64):
        return None
    channels = x.shape[axis]
    if not 1 <= channels <= 65535:  # a grid dimension per channel
        return None
    return CudaKernels(xp, axis, acc, sdev, sdt, device).bind(x)
