"""numba.cuda kernels of the CUDA route (:mod:`.cuda`): the four passes over x.

Arrays are C-contiguous ``(P, C, Q)`` blocks, as on the host route
(:func:`arraysyncbn._fast.host.block_view`), passed flat with ``C`` and
``Q``: element ``i`` belongs to channel ``(i // Q) % C``. float32 and
float64 x; the work dtype is x's, the sums are float64, as everywhere.

The two reduction kernels repeat their block tree rather than call a device
function: numba's PTX compiler (``tests/test_cuda_route.py``, which needs no
GPU) resolves a device-function call through the CUDA driver.

The reductions are deterministic: a block of :data:`THREADS` threads
reduces one channel's share of the elements through shared memory in a
fixed tree, each block writes one partial, and a one-thread-per-channel
kernel adds the partials in block order. No atomics: the same input gives
the same bits on every run.

Kernels launch on the caller's CuPy stream (:func:`current_stream`). NVVM
contracts ``a·b + c`` into FMAs, so y and dx may differ from the host route's
by a rounding (within the bounds).

Tested on the CPU in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``,
``tests/test_cuda_route.py``); the launch shapes are not yet tuned on a GPU.
"""

from __future__ import annotations

import math
import threading
import warnings

from numba import config, cuda, float64

__all__ = [
    "SIMULATED",
    "THREADS",
    "backward_input",
    "current_stream",
    "normalize",
    "pack_backward",
    "pack_statistics",
    "partial_blocks",
]

THREADS = 256
"""Threads per block of the reductions (a power of two, at most 256)."""

SIMULATED = bool(config.ENABLE_CUDASIM)
"""Whether these kernels run in numba's CUDA simulator (on the CPU)."""

# Launches take turns: the simulator refuses concurrent kernels (thread ranks
# launch concurrently), and the warning filter around a launch is process-wide.
# A launch is asynchronous on a GPU, so the lock is held for microseconds.
_launch = threading.Lock()
_LOW_OCCUPANCY = r"Grid size \d+ will likely result in GPU under-utilization"

# Per-thread work before a reduction block is worth adding, and the most
# partials per channel (the merge kernel adds them serially).
_PER_THREAD = 16
_MAX_BLOCKS = 64


def partial_blocks(per_channel: int, threads: int = THREADS) -> int:
    """Blocks per channel for the reductions: about ``_PER_THREAD`` elements
    per thread, at least 1, at most ``_MAX_BLOCKS``."""
    want = math.ceil(per_channel / (threads * _PER_THREAD))
    return max(1, min(_MAX_BLOCKS, want))


@cuda.jit
def _stats_partials(x, channels, q, k, part):  # pragma: no cover - compiled
    """``part[g, 0, c] = Σ(x − k[c])``, ``part[g, 1, c] = Σ(x − k[c])²`` over
    block g's share of channel c (grid: (blocks, C))."""
    a = cuda.shared.array(THREADS, float64)
    b = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    g = cuda.blockIdx.x
    c = cuda.blockIdx.y
    blocks = cuda.gridDim.x
    n = x.shape[0] // channels
    kc = k[c]
    s1 = 0.0
    s2 = 0.0
    e = g * threads + tid
    while e < n:
        p = e // q
        d = float64(x[(p * channels + c) * q + (e - p * q)]) - kc
        s1 += d
        s2 += d * d
        e += blocks * threads
    a[tid] = s1
    b[tid] = s2
    cuda.syncthreads()
    # A fixed pairwise tree over the block (threads is a power of two).
    half = threads // 2
    while half > 0:
        if tid < half:
            a[tid] += a[tid + half]
            b[tid] += b[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        part[g, 0, c] = a[0]
        part[g, 1, c] = b[0]


@cuda.jit
def _pack_statistics(part, k, center, n, tail, ntail, buf):  # pragma: no cover - compiled
    """``buf = [n, Σ(x − center), Σ(x − center)², *tail[:ntail]]`` from the
    partials around k, added in block order (one thread per channel): the
    shift to the center is exact algebra, as in the host route's
    ``pack_statistics``."""
    c = cuda.grid(1)
    channels = k.shape[0]
    if c == 0:
        buf[0] = n
        for i in range(ntail):
            buf[1 + 2 * channels + i] = tail[i]
    if c < channels:
        s1 = 0.0
        s2 = 0.0
        for g in range(part.shape[0]):
            s1 += part[g, 0, c]
            s2 += part[g, 1, c]
        d = k[c] - center[c]
        buf[1 + c] = s1 + n * d
        buf[1 + channels + c] = s2 + d * (2.0 * s1 + n * d)


@cuda.jit
def _sample(x, channels, q, k):  # pragma: no cover - compiled
    """``k[c] = x[0, c, 0]`` in float64: a value of each channel to shift around."""
    c = cuda.grid(1)
    if c < channels:
        k[c] = float64(x[c * q])


@cuda.jit
def _normalize(x, channels, q, hi, lo, scale, shift, y):  # pragma: no cover - compiled
    """``y = ((x − hi) − lo)·scale + shift`` per channel, in the work dtype."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.shape[0]:
        c = (i // q) % channels
        y[i] = ((x[i] - hi[c]) - lo[c]) * scale[c] + shift[c]
        i += stride


@cuda.jit
def _bsums_partials(dy, x, channels, q, hi, lo, part):  # pragma: no cover - compiled
    """``part[g, 0, c] = Σdy``, ``part[g, 1, c] = Σdy·((x − hi) − lo)`` over block
    g's share of channel c, the centered value formed in the work dtype."""
    a = cuda.shared.array(THREADS, float64)
    b = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    g = cuda.blockIdx.x
    c = cuda.blockIdx.y
    blocks = cuda.gridDim.x
    n = x.shape[0] // channels
    h = hi[c]
    m = lo[c]
    s1 = 0.0
    s2 = 0.0
    e = g * threads + tid
    while e < n:
        p = e // q
        i = (p * channels + c) * q + (e - p * q)
        d = float64(dy[i])
        s1 += d
        s2 += d * float64((x[i] - h) - m)
        e += blocks * threads
    a[tid] = s1
    b[tid] = s2
    cuda.syncthreads()
    # A fixed pairwise tree over the block (threads is a power of two).
    half = threads // 2
    while half > 0:
        if tid < half:
            a[tid] += a[tid + half]
            b[tid] += b[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        part[g, 0, c] = a[0]
        part[g, 1, c] = b[0]


@cuda.jit
def _pack_backward(part, invstd, tail, ntail, buf):  # pragma: no cover - compiled
    """``buf = [Σdy, Σdy·x̂, *tail[:ntail]]`` (x̂ = (x − mean)·invstd), partials
    added in block order."""
    c = cuda.grid(1)
    channels = invstd.shape[0]
    if c == 0:
        for i in range(ntail):
            buf[2 * channels + i] = tail[i]
    if c < channels:
        s1 = 0.0
        s2 = 0.0
        for g in range(part.shape[0]):
            s1 += part[g, 0, c]
            s2 += part[g, 1, c]
        buf[c] = s1
        buf[channels + c] = s2 * invstd[c]


@cuda.jit
def _backward_input(dy, x, channels, q, hi, lo, scale, mean_dy, k, dx):  # pragma: no cover
    """``dx = scale·((dy − mean_dy) − ((x − hi) − lo)·k)`` per channel, in the work dtype."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.shape[0]:
        c = (i // q) % channels
        dx[i] = ((dy[i] - mean_dy[c]) - ((x[i] - hi[c]) - lo[c]) * k[c]) * scale[c]
        i += stride


def _grid(n: int, threads: int) -> int:
    """Blocks for an elementwise pass over n elements (grid-stride beyond)."""
    return max(1, min(math.ceil(n / threads), 65535))


def current_stream(x: object) -> object:
    """The stream to launch on for x's library: CuPy's current stream (so the
    kernels are ordered with the caller's work and CuPy's memory pool), 0
    (the default stream) in the simulator or for CuPy's legacy null stream."""
    if SIMULATED or type(x).__module__.partition(".")[0] != "cupy":
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _device(a: object) -> object:
    """A kernel argument: arrays of another library as numba device arrays
    without the host synchronization numba's own conversion does (the launch
    is ordered on their stream already); scalars and simulator arrays as they are."""
    if SIMULATED or not hasattr(a, "__cuda_array_interface__"):
        return a
    return cuda.as_cuda_array(a, sync=False)


def _configured(kernel, grid, threads, stream):  # type: ignore[no-untyped-def]
    """``kernel[grid, threads, stream]``. numba warns about grids under 128
    blocks, which the per-channel kernels have by design: not here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOW_OCCUPANCY)
        return kernel[grid, threads, stream]


def _run(kernel, grid, threads, stream, *args) -> None:  # type: ignore[no-untyped-def]
    """Launch ``kernel`` on ``stream`` (under the launch lock: the warning
    filter of :func:`_configured` is process-wide)."""
    with _launch:
        _configured(kernel, grid, threads, stream)(*(_device(a) for a in args))


def pack_statistics(
    x, channels, q, center, n, tail, ntail, k, part, buf, stream=0, threads=THREADS
):  # type: ignore[no-untyped-def]
    """Launch the statistics passes over the flat block ``x`` (n > 0 elements
    per channel); fills ``buf``. Scratch: ``k`` (C,) and ``part``
    ``(partial_blocks(n), 2, C)``, float64. ``tail`` holds at least one value
    (``ntail`` of them are written)."""
    per_channel = _grid(channels, threads)
    _run(_sample, per_channel, threads, stream, x, channels, q, k)
    _run(_stats_partials, (part.shape[0], channels), threads, stream, x, channels, q, k, part)
    _run(
        _pack_statistics, per_channel, threads, stream, part, k, center, float(n), tail, ntail, buf
    )


def normalize(x, channels, q, hi, lo, scale, shift, y, stream=0, threads=THREADS):  # type: ignore[no-untyped-def]
    grid = _grid(x.shape[0], threads)
    _run(_normalize, grid, threads, stream, x, channels, q, hi, lo, scale, shift, y)


def pack_backward(
    dy, x, channels, q, hi, lo, invstd, tail, ntail, part, buf, stream=0, threads=THREADS
):  # type: ignore[no-untyped-def]
    """Launch the backward sums (scratch ``part`` as for :func:`pack_statistics`)."""
    grid = (part.shape[0], channels)
    _run(_bsums_partials, grid, threads, stream, dy, x, channels, q, hi, lo, part)
    _run(_pack_backward, _grid(channels, threads), threads, stream, part, invstd, tail, ntail, buf)


def backward_input(dy, x, channels, q, hi, lo, scale, mean_dy, k, dx, stream=0, threads=THREADS):  # type: ignore[no-untyped-def]
    grid = _grid(x.shape[0], threads)
    _run(_backward_input, grid, threads, stream, dy, x, channels, q, hi, lo, scale, mean_dy, k, dx)
