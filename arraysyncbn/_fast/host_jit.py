"""Fused numba kernels for SyncBN on host memory (imported only with numba).

Every kernel works on a C-contiguous 3-D view ``(P, C, Q)`` of x: ``P`` the
product of the axes before the channel axis, ``Q`` of those after it (1 for
channels-last and 2-D input). Each kernel reads its inputs once and writes
its output once, which is what makes SyncBN on host memory run at memory
speed instead of the ~6 passes and temporaries of the array-API route.

float16 and bfloat16 x (and y, dy, dx) are read and written through their
16-bit patterns (numba has no half types): an array of dtype
:data:`~arraysyncbn._fast.F16_BITS` (uint16) holds float16, one of
:data:`~arraysyncbn._fast.BF16_BITS` (int16) bfloat16. The kernels convert
each element with :func:`work` on the way in (exactly, to float32, the work
dtype) and :func:`stored` on the way out (float32 to the storage format,
round-to-nearest-even, as numpy's and torch's casts). Both are resolved per
array type when a kernel compiles, so one body serves every dtype; for
float32/float64 arrays they are the identity and the kernels compile to what
they were without them. bfloat16 converts with integer operations (a shift
in, a rounding add out); float16 with the CPU's conversion instructions
where :func:`native_f16` finds them, else with integer operations and one
float32 addition of normal numbers. None of them does arithmetic on
subnormal numbers, so all are exact when denormals are flushed
(``torch.set_flush_denormal``), and all are branch-free, so LLVM
vectorizes them.

Each kernel exists twice, from one body: ``*_serial`` (compiled without
threads, so a small input never wakes the thread pool, which costs
milliseconds on a loaded machine) and ``*_parallel`` (``prange`` over
``nthreads`` contiguous chunks of x in memory order; reductions keep
per-thread partials that the caller merges in a fixed order, so results are
deterministic for a given thread count).

Numerics match the portable route (``arraysyncbn.kernels``):

* statistics: one pass over ``x − K`` with K a sample of each channel (the
  first element; any value is exact, a sample keeps ``|mean − K|/std``
  below ``sqrt(n)``), sums in float64 (for float16 and bfloat16 planes
  through float32 partial sums of at most :data:`HALF_BLOCK` elements);
* normalize / backward input: elementwise math in the work dtype, centering
  first as ``(x − hi) − lo`` (the float64 mean split in two work-dtype
  numbers), never ``x·scale + shift``;
* backward sums: ``dy·(x − mean)`` with the centering in the work dtype
  and the product and sums in float64 (float16 and bfloat16 planes: the
  product and partial sums in float32, as for the statistics).

Reductions are compiled with ``fastmath={"reassoc", "contract"}``: without
reassociation LLVM keeps a float64 sum over a contiguous row scalar (~6 GB/s);
with it the row is summed in vector lanes. No flag that assumes finite
values is used, so NaN and inf propagate as in the portable route.
Elementwise kernels use no fast-math flag at all: reassociation could fold
``(x − hi) − lo`` into ``x − (hi + lo)`` and lose the compensation.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import codegen
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

from . import BF16_BITS, F16_BITS

_REDUCE = {"reassoc", "contract"}
_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


def _chunk(total: int, parts: int, i: int) -> tuple[int, int]:
    return total * i // parts, total * (i + 1) // parts


chunk = numba.njit(inline="always", **_OPTS)(_chunk)


@intrinsic
def wide_vectors(typingctx):  # pragma: no cover - compiled
    """Let LLVM vectorize the calling kernel with 512-bit registers where the
    CPU has them (AVX-512).

    LLVM tunes most AVX-512 CPUs to prefer 256-bit vectors, against the
    clock slowdown some older ones take on wide floating-point work. The
    reductions here keep float64 sums, so a 16-bit input's are compute-bound:
    measured here (Xeon with AVX-512, (32,64,56,56), one thread), 512-bit
    lanes made bfloat16 statistics 1.7 × and backward sums 1.2 × faster,
    float32's backward sums 1.1 ×. Elementwise kernels did not gain, so they
    stay as they are. The hint is LLVM's ``"prefer-vector-width"`` function
    attribute; it never selects instructions the CPU lacks. llvmlite's
    attribute set checks names against a fixed list without it, hence the
    plain ``set.add``; should that ever fail, the kernel compiles without it.
    """

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except TypeError:  # llvmlite's attributes no longer a set: skip the hint
            pass
        return context.get_dummy_value()

    return types.none(), codegen


# Rows of planes shorter than this many elements are reduced with LLVM's
# default (256-bit) vectors: a 512-bit float64 sum unrolled over several
# accumulators leaves most of a 49-element row (7×7) to its scalar
# remainder. Measured here (float32 and bfloat16, one thread): at 49
# elements the default width made statistics and backward sums 1.3–1.7 ×
# faster; from 196 on the two were alike for float32 and 512 bits won for
# bfloat16 (1.6 × at 3136).
WIDE_PLANES = 128


def over_planes(rows):  # type: ignore[no-untyped-def]
    """An inlined loop over the planes ``u0..u1`` (index ``p·C + c``) of a
    ``(P, C, Q)`` view, in memory order: ``rows(p, c0, c1, args)`` for each
    sample p's run of channels ``c0..c1``.

    The kernels' bodies were one loop over u with ``p = u // C``: an integer
    division and a view per plane, which cost 2 × on ResNet's 7×7 planes
    (measured here: (2,2048,49) float32 normalize 70 µs, 32 µs nested). The
    first and last samples of a chunk may be partial; the others run every
    channel, a loop LLVM keeps tight.
    """

    @numba.njit(inline="always", **_OPTS)
    def each(c_count, u0, u1, args):  # pragma: no cover - compiled
        p0 = u0 // c_count
        p1 = u1 // c_count
        c0 = u0 - p0 * c_count
        c1 = u1 - p1 * c_count
        if p0 == p1:
            rows(p0, c0, c1, args)
            return
        rows(p0, c0, c_count, args)
        for p in range(p0 + 1, p1):
            rows(p, 0, c_count, args)
        if c1 > 0:
            rows(p1, 0, c1, args)

    return each


# -- 16-bit storage (float16, bfloat16) ----------------------------------------
# Kept in this module, not in one of their own: numba's cache checks only the
# source file of the cached function, so a change here must touch this file.
_U = np.uint32
# numba computes with 64-bit integers whatever the operands' width; every
# result is cut back to 32 bits (_U) so that LLVM keeps the vector lanes 32
# bits wide and the wrap-around of uint32 arithmetic holds.


def _f16_to_f32(h):  # pragma: no cover - compiled
    """float16 bits (uint16) as the float32 of the same value (exact: ±0, inf, NaN payload)."""
    u = _U(h)
    sign = _U(_U(u & _U(0x8000)) << _U(16))
    em = _U(u & _U(0x7FFF))
    normal = _U(_U(em << _U(13)) + _U(0x38000000))  # exponent rebiased by 127 − 15
    special = _U(normal + _U(0x38000000))  # inf/NaN: exponent 31 becomes 255
    # Subnormals: mantissa·2⁻²⁴, a product of normal float32 numbers.
    sub = np.float32(np.float32(np.int32(em)) * np.float32(2.0**-24)).view(np.uint32)
    bits = special if em >= _U(0x7C00) else normal
    bits = sub if em < _U(0x400) else bits
    return _U(bits | sign).view(np.float32)


def _bf16_to_f32(h):  # pragma: no cover - compiled
    """bfloat16 bits (int16) as float32: the upper half of a float32's bits."""
    return _U(_U(h) << _U(16)).view(np.float32)


def _f32_to_f16(f):  # pragma: no cover - compiled
    """float32 to float16 bits (uint16), round-to-nearest-even; overflow to inf, quiet NaN."""
    u = np.float32(f).view(np.uint32)
    sign = _U(_U(u >> _U(16)) & _U(0x8000))
    a = _U(u & _U(0x7FFFFFFF))
    # Normal results: rebias the exponent (−112 << 23, mod 2³²), add 0xFFF plus
    # the kept mantissa's lowest bit (ties to even), drop 13 bits. A carry
    # out of the mantissa bumps the exponent, up to inf from 65520 on.
    odd = _U(_U(a >> _U(13)) & _U(1))
    normal = _U(_U(_U(a + _U(0xC8000FFF)) + odd) >> _U(13))
    # Subnormal results (|f| < 2⁻¹⁴): adding 0.5 puts the float16 spacing
    # 2⁻²⁴ at float32's last bit, so the float32 addition rounds to even.
    sub = _U(np.float32(a.view(np.float32) + np.float32(0.5)).view(np.uint32) - _U(0x3F000000))
    big = _U(0x7E00) if a > _U(0x7F800000) else _U(0x7C00)
    r = sub if a < _U(0x38800000) else normal
    r = big if a >= _U(0x47800000) else r
    return np.uint16(_U(r | sign))


def _f32_to_bf16(f):  # pragma: no cover - compiled
    """float32 to bfloat16 bits (int16), round-to-nearest-even; quiet NaN, sign kept."""
    u = np.float32(f).view(np.uint32)
    odd = _U(_U(u >> _U(16)) & _U(1))
    r = _U(_U(_U(u + _U(0x7FFF)) + odd) >> _U(16))
    nan = _U(_U(_U(u >> _U(16)) & _U(0x8000)) | _U(0x7FC0))
    r = nan if _U(u & _U(0x7FFFFFFF)) > _U(0x7F800000) else r
    return np.int16(r)


f16_to_f32 = numba.njit(**_OPTS)(_f16_to_f32)
bf16_to_f32 = numba.njit(**_OPTS)(_bf16_to_f32)
f32_to_f16 = numba.njit(**_OPTS)(_f32_to_f16)
f32_to_bf16 = numba.njit(**_OPTS)(_f32_to_bf16)


@intrinsic
def f16_to_f32_native(typingctx, h):  # pragma: no cover - compiled
    """float16 bits to float32 by the CPU's conversion instruction (x86 F16C)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16_native(typingctx, f):  # pragma: no cover - compiled
    """float32 to float16 bits by the CPU's conversion instruction (round-to-nearest-even)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def native_f16() -> bool:
    """Whether the CPU numba compiles for converts float16 in one instruction.

    x86-64 with F16C (every x86 CPU since 2012-13): ``vcvtph2ps``/``vcvtps2ph``
    are exact for all non-NaN values and ignore flush-to-zero, and measured
    here they make float16 forward plus backward 2.4 × faster than the integer
    conversions. Elsewhere LLVM would call a runtime function that numba does
    not link (the process aborts), so other CPUs take the integer conversions.
    """
    if not llvm.get_process_triple().startswith("x86_64"):
        return False
    features = numba_config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    return "+f16c" in features.split(",")


NATIVE_F16 = native_f16()


def work(v):  # pragma: no cover - replaced when compiled
    """An element of x (or dy) as a number of the work dtype."""
    raise NotImplementedError("only inside compiled kernels")


def stored(v, a):  # pragma: no cover - replaced when compiled
    """A work-dtype number ``v`` as an element of array ``a``'s storage."""
    raise NotImplementedError("only inside compiled kernels")


_F16_TYPE = numba.from_dtype(F16_BITS)
_BF16_TYPE = numba.from_dtype(BF16_BITS)


@overload(work)
def _work(v):  # pragma: no cover - compiled
    if v == _F16_TYPE:
        return (lambda v: f16_to_f32_native(v)) if NATIVE_F16 else (lambda v: f16_to_f32(v))
    if v == _BF16_TYPE:
        return lambda v: bf16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v
    return None


@overload(stored)
def _stored(v, a):  # pragma: no cover - compiled
    if a.dtype == _F16_TYPE:
        return (lambda v, a: f32_to_f16_native(v)) if NATIVE_F16 else (lambda v, a: f32_to_f16(v))
    if a.dtype == _BF16_TYPE:
        return lambda v, a: f32_to_bf16(v)
    if isinstance(a.dtype, types.Float):
        return lambda v, a: v
    return None


def work_rows(n, c, a):  # pragma: no cover - replaced when compiled
    """A new ``(n, c)`` array of the work dtype of array ``a``'s elements."""
    raise NotImplementedError("only inside compiled kernels")


@overload(work_rows)
def _work_rows(n, c, a):  # pragma: no cover - compiled
    if a.dtype in (_F16_TYPE, _BF16_TYPE):
        return lambda n, c, a: np.empty((n, c), np.float32)
    if isinstance(a.dtype, types.Float):
        return lambda n, c, a: np.empty((n, c), a.dtype)
    return None


# -- one plane's sums ---------------------------------------------------------
HALF_BLOCK = 512
"""Elements per float32 partial sum of a 16-bit input's plane (or, for a
(P, C, 1) view, rows per partial sum of each channel).

A float16 or bfloat16 plane's sums are compute-bound in float64 (8 lanes
of AVX-512, and a conversion per element); in float32 partial sums of at
most this many elements, each added to the float64 sum, they run ~2 ×
faster (measured here, one thread: statistics of (8,256,14,14) bfloat16
77 → 44 µs, of (32,64,56,56) 1.0 → 0.54 ms). The partial sums add at most
``HALF_BLOCK·2⁻²⁴ ≈ 3e-5`` of relative error to each sum, far below the
16-bit output's rounding (2⁻⁸ for bfloat16, 2⁻¹¹ for float16);
the testing module's bounds include it (``partial_sums``, whose default for
16-bit input, ``arraysyncbn.testing.HALF_PARTIAL_SUMS``, must name this
length: a test holds the two equal; the constant lives here because numba's
cache checks only this file).
512 against 256 and 1024: 3136-element planes (56×56) took 0.64, 0.54
and 0.51 ms, and the error term grows with the block.
"""


def in_sums(v, acc):  # pragma: no cover - replaced when compiled
    """A work-dtype number ``v`` (or a float64 sample) in the dtype of the
    partial sums that marker ``acc`` (an empty array) names: float32 or float64."""
    raise NotImplementedError("only inside compiled kernels")


def partial_length(acc):  # pragma: no cover - replaced when compiled
    """Elements per partial sum for marker ``acc``: :data:`HALF_BLOCK` for
    float32 partial sums; 0 for float64 ones, which take a whole row in one
    loop (a constant: LLVM drops the blocked loop, whose per-plane slice cost
    float32 input's 196-element planes 4 %)."""
    raise NotImplementedError("only inside compiled kernels")


@overload(in_sums)
def _in_sums(v, acc):  # pragma: no cover - compiled
    if acc.dtype == types.float32:
        return lambda v, acc: np.float32(v)
    if acc.dtype == types.float64:
        return lambda v, acc: np.float64(v)
    return None


@overload(partial_length)
def _partial_length(acc):  # pragma: no cover - compiled
    if acc.dtype == types.float32:
        return lambda acc: HALF_BLOCK
    if acc.dtype == types.float64:
        return lambda acc: 0
    return None


@numba.njit(inline="always", **_OPTS)
def shifted_sums(row, kc, acc):  # pragma: no cover - compiled
    """``(Σ(x − kc), Σ(x − kc)²)`` of a plane ``row`` in float64, through
    partial sums in the dtype marker ``acc`` names (float32 ones only for a
    16-bit row: ``kc``, a float64 sample of the row, is exact in float32).

    No branch on the values: a test for non-finite partial sums here, even
    once per row, halved the speed of short rows. The callers sum a channel
    again in float64 where its float32 partial sums were not finite or tiny
    (:func:`redo_statistics`, :data:`_SMALL`).
    Inlined into the kernels, so compiled with their fast-math flags (as a
    called function it would be compiled without, and stay scalar).
    """
    a = 0.0
    b = 0.0
    step = partial_length(acc)
    if step == 0:
        for q in range(row.shape[0]):
            d = np.float64(work(row[q])) - kc
            a += d
            b += d * d
        return a, b
    k = in_sums(kc, acc)
    for q0 in range(0, row.shape[0], step):
        blk = row[q0 : q0 + step]  # a view: LLVM sees a non-negative index
        pa = in_sums(0.0, acc)
        pb = in_sums(0.0, acc)
        for q in range(blk.shape[0]):
            d = in_sums(work(blk[q]), acc) - k
            pa += d
            pb += d * d
        a += np.float64(pa)
        b += np.float64(pb)
    return a, b


@numba.njit(inline="always", **_OPTS)
def gradient_sums(gr, xr, h, m, acc):  # pragma: no cover - compiled
    """``(Σdy, Σdy·((x − h) − m))`` of a plane's dy ``gr`` and x ``xr`` in
    float64, through partial sums as :func:`shifted_sums` forms them."""
    a = 0.0
    b = 0.0
    step = partial_length(acc)
    if step == 0:
        for q in range(xr.shape[0]):
            g = np.float64(work(gr[q]))
            a += g
            b += g * np.float64((work(xr[q]) - h) - m)
        return a, b
    for q0 in range(0, xr.shape[0], step):
        xb = xr[q0 : q0 + step]
        gb = gr[q0 : q0 + step]
        pa = in_sums(0.0, acc)
        pb = in_sums(0.0, acc)
        for q in range(xb.shape[0]):
            g = in_sums(work(gb[q]), acc)
            pa += g
            pb += g * in_sums((work(xb[q]) - h) - m, acc)
        a += np.float64(pa)
        b += np.float64(pb)
    return a, b


_F64 = np.empty(0)
"""The float64 partial-sum marker (:func:`in_sums`) for the sums made again."""

_SMALL = 2.0**-100
"""Per element: a channel's float32 partial sums whose ``|Σ|`` of squares
(or of products ``dy·(x − c)``) is below ``n·_SMALL`` are summed again in
float64. A square or product that underflowed in float32 errs by at most
2⁻¹²⁶ (flushed), so above that line the underflow costs less than 2⁻²⁶ of
the sum, within the partial sums' own float32 rounding; below it (data
within ~1e-19 of its sample, such as subnormal bfloat16, where eps is tiny
too) the float32 squares could lose the variance entirely."""


def variance_budget(x):  # pragma: no cover - replaced when compiled
    """The relative variance error float32 partial sums of 16-bit ``x`` may
    cost before its channel is summed again in float64: an eighth of the
    output's epsilon for bfloat16 (2⁻¹⁰), a quarter for float16 (2⁻¹²), so
    that y moves by well under an ulp where |x̂| ≤ 4."""
    raise NotImplementedError("only inside compiled kernels")


@overload(variance_budget)
def _variance_budget(x):  # pragma: no cover - compiled
    if x.dtype == _BF16_TYPE:
        return lambda x: 2.0**-10
    if x.dtype == _F16_TYPE:
        return lambda x: 2.0**-12
    if isinstance(x.dtype, types.Float):  # typed, never run: no partial sums
        return lambda x: 1.0
    return None


def squares_underflow(x):  # pragma: no cover - replaced when compiled
    """Whether float32 squares of ``x − K`` may underflow for 16-bit ``x``:
    True for bfloat16 (its exponent range is float32's), False for float16,
    whose nonzero differences from a float32 K are past 2⁻⁵⁰, squares past
    2⁻¹⁰⁰ (and a channel whose differences are all 0 is summed exactly)."""
    raise NotImplementedError("only inside compiled kernels")


@overload(squares_underflow)
def _squares_underflow(x):  # pragma: no cover - compiled
    if x.dtype == _F16_TYPE:
        return lambda x: False
    if isinstance(x.dtype, (types.Float, types.Integer)):  # bfloat16 bits, floats
        return lambda x: True
    return None


@numba.njit(**_OPTS)
def _redone(part, n, small, amplified):  # pragma: no cover - compiled
    """The channels whose partial sums (merged over ``part``'s threads) are
    to be summed again in float64, as an index array: those not finite or
    whose ``|Σ|`` of squares (products) is below ``small`` (``n·_SMALL``,
    or 0 where nothing underflows); and, with ``amplified`` > 0
    (statistics), those whose float32 rounding may cost the variance more
    than its budget: Σd² errs by up to about ``3·2⁻²⁴·L·Σd²`` (L elements
    per partial sum; Σd's error is at most as large through the merge), and
    the variance numerator is ``Σd² − (Σd)²/n``, smaller by
    ``1 + ((mean − K)/σ)²``: a sample K far from the mean amplifies
    float32's rounding (seen: a float16 y 3 ulps off with K 260σ away).
    ``amplified`` is ``3·2⁻²⁴·L/budget``."""
    c_count = part.shape[2]
    redo = np.zeros(c_count, np.bool_)
    for c in range(c_count):
        s1, s2 = merged_partials(part, c)
        redo[c] = not (np.isfinite(s1) and np.isfinite(s2) and abs(s2) >= small)
        if amplified > 0.0 and amplified * s2 > s2 - s1 * (s1 / n):
            redo[c] = True
    return np.flatnonzero(redo)


@numba.njit(**_OPTS)
def _statistics_redone(x, part):  # pragma: no cover - compiled
    """:func:`_redone` for the statistics of ``x``."""
    rows = x.shape[2] if x.shape[2] > 1 else x.shape[0]
    amplified = 3.0 * 2.0**-24 * min(HALF_BLOCK, rows) / variance_budget(x)
    n = x.shape[0] * x.shape[2]
    small = n * _SMALL if squares_underflow(x) else 0.0
    return _redone(part, n, small, amplified)


@numba.njit(**_OPTS)
def _put_redone(part, idx, sums):  # pragma: no cover - compiled
    """Channel ``idx[j]``'s partials in ``part`` replaced by the float64 sums
    ``sums[:, :, j]`` (one row per thread): merged into ``part[0]``, zero
    elsewhere."""
    for j in range(idx.shape[0]):
        c = idx[j]
        part[:, :, c] = 0.0
        for i in range(sums.shape[0]):
            part[0, 0, c] += sums[i, 0, j]
            part[0, 1, c] += sums[i, 1, j]


@numba.njit(inline="always", **_OPTS)
def _redo_stats_run(p, j0, j1, args):  # pragma: no cover - compiled
    x, k, idx, s, wide = args
    for j in range(j0, j1):
        c = idx[j]
        pa, pb = shifted_sums(x[p, c], k[c], wide)
        s[0, j] += pa
        s[1, j] += pb


@numba.njit(inline="always", **_OPTS)
def _redo_grads_run(p, j0, j1, args):  # pragma: no cover - compiled
    dy, x, hi, lo, idx, s, wide = args
    for j in range(j0, j1):
        c = idx[j]
        pa, pb = gradient_sums(dy[p, c], x[p, c], hi[c], lo[c], wide)
        s[0, j] += pa
        s[1, j] += pb


# Thread i's share of the planes (rows) of the channels idx, in float64, into
# sums[i]: units p·len(idx) + j, in memory order.
_redo_stats_each = over_planes(_redo_stats_run)
_redo_grads_each = over_planes(_redo_grads_run)


@numba.njit(fastmath=_REDUCE, **_OPTS)
def redo_statistics(x, k, part):  # pragma: no cover - compiled
    """Sum again in float64 the channels of float32 partial sums (merged over
    the threads' ``part``) that overflowed, met NaN or inf, may have lost
    squares to underflow (:data:`_SMALL`; bfloat16 only), or whose shift K
    amplifies float32's rounding (:func:`_redone`): into ``part[0]``, zero
    elsewhere. Serial: :func:`redo_statistics_parallel` shares the work
    among threads (all-constant channels, e.g. a ReLU's dead ones, are all
    redone in bfloat16)."""
    idx = _statistics_redone(x, part)
    if idx.shape[0] > 0:
        sums = np.zeros((1, 2, idx.shape[0]))
        _redo_stats_each(idx.shape[0], 0, x.shape[0] * idx.shape[0], (x, k, idx, sums[0], _F64))
        _put_redone(part, idx, sums)


@numba.njit(parallel=True, fastmath=_REDUCE, **_OPTS)
def redo_statistics_parallel(x, k, part):  # pragma: no cover - compiled
    """:func:`redo_statistics` in ``part.shape[0]`` threads."""
    idx = _statistics_redone(x, part)
    if idx.shape[0] > 0:
        nparts = part.shape[0]
        sums = np.zeros((nparts, 2, idx.shape[0]))
        units = x.shape[0] * idx.shape[0]
        for i in numba.prange(nparts):
            u0, u1 = chunk(units, nparts, i)
            _redo_stats_each(idx.shape[0], u0, u1, (x, k, idx, sums[i], _F64))
        _put_redone(part, idx, sums)


@numba.njit(fastmath=_REDUCE, **_OPTS)
def redo_gradient_sums(dy, x, hi, lo, part):  # pragma: no cover - compiled
    """:func:`redo_statistics` for the backward sums ``Σdy``, ``Σdy·(x − mean)``
    (x centered on the global mean: no amplification to guard against; dy
    may underflow whatever x's dtype)."""
    idx = _redone(part, x.shape[0] * x.shape[2], x.shape[0] * x.shape[2] * _SMALL, 0.0)
    if idx.shape[0] > 0:
        sums = np.zeros((1, 2, idx.shape[0]))
        args = (dy, x, hi, lo, idx, sums[0], _F64)
        _redo_grads_each(idx.shape[0], 0, x.shape[0] * idx.shape[0], args)
        _put_redone(part, idx, sums)


@numba.njit(parallel=True, fastmath=_REDUCE, **_OPTS)
def redo_gradient_sums_parallel(dy, x, hi, lo, part):  # pragma: no cover - compiled
    """:func:`redo_gradient_sums` in ``part.shape[0]`` threads."""
    idx = _redone(part, x.shape[0] * x.shape[2], x.shape[0] * x.shape[2] * _SMALL, 0.0)
    if idx.shape[0] > 0:
        nparts = part.shape[0]
        sums = np.zeros((nparts, 2, idx.shape[0]))
        units = x.shape[0] * idx.shape[0]
        for i in numba.prange(nparts):
            u0, u1 = chunk(units, nparts, i)
            _redo_grads_each(idx.shape[0], u0, u1, (dy, x, hi, lo, idx, sums[i], _F64))
        _put_redone(part, idx, sums)


# -- statistics --------------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _stats_run(p, c0, c1, args):  # pragma: no cover - compiled
    x, k, s1, s2, acc = args
    for c in range(c0, c1):
        a, b = shifted_sums(x[p, c], k[c], acc)
        s1[c] += a
        s2[c] += b


_stats_each = over_planes(_stats_run)


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _stats_planes(x, k, u0, u1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σ(x−K), Σ(x−K)² of planes ``u0..u1`` (index p·C + c) into s1, s2
    (planes of at least :data:`WIDE_PLANES` elements)."""
    wide_vectors()
    _stats_each(x.shape[1], u0, u1, (x, k, s1, s2, acc))


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _stats_short_planes(x, k, u0, u1, s1, s2, acc):  # pragma: no cover - compiled
    """:func:`_stats_planes` for shorter planes, in LLVM's default vector width."""
    _stats_each(x.shape[1], u0, u1, (x, k, s1, s2, acc))


@numba.njit(inline="always", **_OPTS)
def _stats_row_run(x, k, p0, p1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σ(x−k), Σ(x−k)² of rows ``p0..p1`` of a (P, C, 1) view into s1, s2,
    in the dtype of s1, s2 and ``k`` (marker ``acc``'s).

    Four rows at a time: the per-channel accumulators live in memory (C of
    them), so each load/store of them is shared by four elements.
    """
    c_count = x.shape[1]
    p = p0
    while p + 4 <= p1:
        for c in range(c_count):
            kc = k[c]
            d0 = in_sums(work(x[p, c, 0]), acc) - kc
            d1 = in_sums(work(x[p + 1, c, 0]), acc) - kc
            d2 = in_sums(work(x[p + 2, c, 0]), acc) - kc
            d3 = in_sums(work(x[p + 3, c, 0]), acc) - kc
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        p += 4
    while p < p1:
        for c in range(c_count):
            d = in_sums(work(x[p, c, 0]), acc) - k[c]
            s1[c] += d
            s2[c] += d * d
        p += 1


@numba.njit(inline="always", **_OPTS)
def _flush(pa, pb, s1, s2):  # pragma: no cover - compiled
    """Add float32 partial sums pa, pb to the float64 sums s1, s2."""
    for c in range(pa.shape[0]):
        s1[c] += np.float64(pa[c])
        s2[c] += np.float64(pb[c])


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _stats_rows(x, k, p0, p1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σ(x−K), Σ(x−K)² of rows ``p0..p1`` of a (P, C, 1) view into s1, s2
    (float64): directly, or for 16-bit x through float32 partial sums of
    :data:`HALF_BLOCK` rows (measured here, bfloat16 statistics one thread:
    channels-last (32,64,56,56) 1.26 → 0.69 ms, (256,1024) 45 → 18 µs)."""
    wide_vectors()
    step = partial_length(acc)
    if step == 0:
        _stats_row_run(x, k, p0, p1, s1, s2, acc)
        return
    c_count = x.shape[1]
    k32 = np.empty(c_count, np.float32)
    for c in range(c_count):
        k32[c] = in_sums(k[c], acc)
    pa = np.empty(c_count, np.float32)
    pb = np.empty(c_count, np.float32)
    for b0 in range(p0, p1, step):
        pa[:] = 0.0
        pb[:] = 0.0
        _stats_row_run(x, k32, b0, min(b0 + step, p1), pa, pb, acc)
        _flush(pa, pb, s1, s2)


@numba.njit(**_OPTS)
def _stats_body(x, k, nparts, i, s1, s2, acc):  # pragma: no cover - compiled
    if x.shape[2] == 1:
        p0, p1 = chunk(x.shape[0], nparts, i)
        _stats_rows(x, k, p0, p1, s1, s2, acc)
    else:
        u0, u1 = chunk(x.shape[0] * x.shape[1], nparts, i)
        if x.shape[2] >= WIDE_PLANES:
            _stats_planes(x, k, u0, u1, s1, s2, acc)
        else:
            _stats_short_planes(x, k, u0, u1, s1, s2, acc)


_SHIFT_SAMPLES = 8


@numba.njit(fastmath=_REDUCE, **_OPTS)
def shifts(x, center, acc):  # pragma: no cover - compiled
    """Each channel's shift K for the statistics pass, in float64: x's first
    sample (any value is exact), except for float32 partial sums (16-bit x),
    whose rounding grows with ``((mean − K)/σ)²`` (:func:`_redone`): there
    the merge center where one is given (the previous step's mean, for the
    layer), rounded to float32, else the float32 mean of the channel's
    first 8 elements (of its first plane, or its first rows): an outlier
    there moves K by an eighth of its distance, and a K still far from the
    mean sends the channel to the float64 pass (:func:`_redone`), which
    keeps the result right; a longer mean would cost a pass over small
    inputs. A K that is not finite falls back to the sample."""
    c_count = x.shape[1]
    k = np.empty(c_count)
    for c in range(c_count):
        k[c] = np.float64(work(x[0, c, 0]))
    if partial_length(acc) == 0:
        return k
    means = np.zeros(c_count, np.float32)
    if center.shape[0] > 0:
        for c in range(c_count):
            means[c] = np.float32(center[c])
    elif x.shape[2] > 1:
        for c in range(c_count):
            row = x[0, c, :_SHIFT_SAMPLES]
            a = np.float32(0.0)
            for q in range(row.shape[0]):
                a += work(row[q])
            means[c] = a / np.float32(row.shape[0])
    else:  # rows in memory order, channels summed side by side
        rows = min(_SHIFT_SAMPLES, x.shape[0])
        for p in range(rows):
            for c in range(c_count):
                means[c] += work(x[p, c, 0])
        for c in range(c_count):
            means[c] /= np.float32(rows)
    for c in range(c_count):
        if np.isfinite(means[c]):
            k[c] = np.float64(means[c])
    return k


@numba.njit(**_OPTS)
def stats_packed_serial(x, center, n, buf, acc):  # pragma: no cover - compiled
    """Per-channel ``Σ(x−K)``, ``Σ(x−K)²`` packed about ``center`` into ``buf``
    as :func:`pack_statistics` packs them, in one call (a small input's
    cost is mostly per-call work), with K from :func:`shifts`, as the
    caller takes it for the threaded kernels.
    ``center`` of length 0 stands for zeros; ``n`` > 0."""
    c_count = x.shape[1]
    k = shifts(x, center, acc)
    part = np.zeros((1, 2, c_count))
    _stats_body(x, k, 1, 0, part[0, 0], part[0, 1], acc)
    if partial_length(acc) > 0:
        redo_statistics(x, k, part)
    if center.shape[0] == 0:
        pack_statistics(part, k, np.zeros(c_count), n, buf)
    else:
        pack_statistics(part, k, center, n, buf)


@numba.njit(parallel=True, **_OPTS)
def stats_parallel(x, k, part, acc):  # pragma: no cover - compiled
    """Per-channel ``Σ(x−K)``, ``Σ(x−K)²``, one partial per thread in ``part`` (T, 2, C)."""
    nparts = part.shape[0]
    for i in numba.prange(nparts):
        part[i, :, :] = 0.0
        _stats_body(x, k, nparts, i, part[i, 0], part[i, 1], acc)


# -- normalize ---------------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _normalize_run(p, c0, c1, args):  # pragma: no cover - compiled
    x, hi, lo, scale, shift, y = args
    for c in range(c0, c1):
        h, m, s, b = hi[c], lo[c], scale[c], shift[c]
        xr = x[p, c]
        yr = y[p, c]
        for q in range(xr.shape[0]):
            yr[q] = stored(((work(xr[q]) - h) - m) * s + b, yr)


_normalize_each = over_planes(_normalize_run)


@numba.njit(**_OPTS)
def _normalize_body(x, hi, lo, scale, shift, y, nparts, i):  # pragma: no cover - compiled
    c_count = x.shape[1]
    if x.shape[2] == 1:
        p0, p1 = chunk(x.shape[0], nparts, i)
        for p in range(p0, p1):
            for c in range(c_count):
                y[p, c, 0] = stored(((work(x[p, c, 0]) - hi[c]) - lo[c]) * scale[c] + shift[c], y)
    else:
        u0, u1 = chunk(x.shape[0] * c_count, nparts, i)
        _normalize_each(c_count, u0, u1, (x, hi, lo, scale, shift, y))


@numba.njit(**_OPTS)
def normalize_serial(x, hi, lo, scale, shift, y):  # pragma: no cover - compiled
    """``y = ((x − hi) − lo)·scale + shift`` per channel, in the work dtype."""
    _normalize_body(x, hi, lo, scale, shift, y, 1, 0)


@numba.njit(parallel=True, **_OPTS)
def normalize_parallel(x, hi, lo, scale, shift, y, nparts):  # pragma: no cover - compiled
    for i in numba.prange(nparts):
        _normalize_body(x, hi, lo, scale, shift, y, nparts, i)


# -- backward sums -----------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _bsums_run(p, c0, c1, args):  # pragma: no cover - compiled
    dy, x, hi, lo, s1, s2, acc = args
    for c in range(c0, c1):
        a, b = gradient_sums(dy[p, c], x[p, c], hi[c], lo[c], acc)
        s1[c] += a
        s2[c] += b


_bsums_each = over_planes(_bsums_run)


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _bsums_planes(dy, x, hi, lo, u0, u1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σdy, Σdy·(x − mean) of planes ``u0..u1`` (at least
    :data:`WIDE_PLANES` elements) into s1, s2."""
    wide_vectors()
    _bsums_each(x.shape[1], u0, u1, (dy, x, hi, lo, s1, s2, acc))


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _bsums_short_planes(dy, x, hi, lo, u0, u1, s1, s2, acc):  # pragma: no cover - compiled
    """:func:`_bsums_planes` for shorter planes, in LLVM's default vector width."""
    _bsums_each(x.shape[1], u0, u1, (dy, x, hi, lo, s1, s2, acc))


@numba.njit(inline="always", **_OPTS)
def _bsums_row_run(dy, x, hi, lo, p0, p1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σdy, Σdy·(x − mean) of rows ``p0..p1`` into s1, s2 in their dtype
    (marker ``acc``'s), four rows at a time as in :func:`_stats_row_run`."""
    c_count = x.shape[1]
    p = p0
    while p + 4 <= p1:
        for c in range(c_count):
            h, m = hi[c], lo[c]
            g0 = in_sums(work(dy[p, c, 0]), acc)
            g1 = in_sums(work(dy[p + 1, c, 0]), acc)
            g2 = in_sums(work(dy[p + 2, c, 0]), acc)
            g3 = in_sums(work(dy[p + 3, c, 0]), acc)
            s1[c] += (g0 + g1) + (g2 + g3)
            s2[c] += (
                g0 * in_sums((work(x[p, c, 0]) - h) - m, acc)
                + g1 * in_sums((work(x[p + 1, c, 0]) - h) - m, acc)
            ) + (
                g2 * in_sums((work(x[p + 2, c, 0]) - h) - m, acc)
                + g3 * in_sums((work(x[p + 3, c, 0]) - h) - m, acc)
            )
        p += 4
    while p < p1:
        for c in range(c_count):
            g = in_sums(work(dy[p, c, 0]), acc)
            s1[c] += g
            s2[c] += g * in_sums((work(x[p, c, 0]) - hi[c]) - lo[c], acc)
        p += 1


@numba.njit(fastmath=_REDUCE, **_OPTS)
def _bsums_rows(dy, x, hi, lo, p0, p1, s1, s2, acc):  # pragma: no cover - compiled
    """Add Σdy, Σdy·(x − mean) of rows ``p0..p1`` into s1, s2 (float64), through
    float32 partial sums of :data:`HALF_BLOCK` rows for 16-bit x, as
    :func:`_stats_rows`."""
    wide_vectors()
    step = partial_length(acc)
    if step == 0:
        _bsums_row_run(dy, x, hi, lo, p0, p1, s1, s2, acc)
        return
    c_count = x.shape[1]
    pa = np.empty(c_count, np.float32)
    pb = np.empty(c_count, np.float32)
    for b0 in range(p0, p1, step):
        pa[:] = 0.0
        pb[:] = 0.0
        _bsums_row_run(dy, x, hi, lo, b0, min(b0 + step, p1), pa, pb, acc)
        _flush(pa, pb, s1, s2)


@numba.njit(**_OPTS)
def _bsums_body(dy, x, hi, lo, nparts, i, s1, s2, acc):  # pragma: no cover - compiled
    if x.shape[2] == 1:
        p0, p1 = chunk(x.shape[0], nparts, i)
        _bsums_rows(dy, x, hi, lo, p0, p1, s1, s2, acc)
    else:
        u0, u1 = chunk(x.shape[0] * x.shape[1], nparts, i)
        if x.shape[2] >= WIDE_PLANES:
            _bsums_planes(dy, x, hi, lo, u0, u1, s1, s2, acc)
        else:
            _bsums_short_planes(dy, x, hi, lo, u0, u1, s1, s2, acc)


@numba.njit(**_OPTS)
def backward_packed_serial(dy, x, hi, lo, invstd, buf, acc):  # pragma: no cover - compiled
    """Per-channel ``Σdy`` and ``Σdy·(x − mean)`` packed into ``buf`` as
    :func:`pack_backward` packs them, in one call."""
    c_count = x.shape[1]
    part = np.zeros((1, 2, c_count))
    _bsums_body(dy, x, hi, lo, 1, 0, part[0, 0], part[0, 1], acc)
    if partial_length(acc) > 0:
        redo_gradient_sums(dy, x, hi, lo, part)
    pack_backward(part, invstd, buf)


@numba.njit(parallel=True, **_OPTS)
def backward_sums_parallel(dy, x, hi, lo, part, acc):  # pragma: no cover - compiled
    """Per-channel ``Σdy`` and ``Σdy·(x − mean)``, one partial per thread in ``part``."""
    nparts = part.shape[0]
    for i in numba.prange(nparts):
        part[i, :, :] = 0.0
        _bsums_body(dy, x, hi, lo, nparts, i, part[i, 0], part[i, 1], acc)


# -- backward input ----------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _binput_run(p, c0, c1, args):  # pragma: no cover - compiled
    dy, x, hi, lo, scale, mdy, k, dx = args
    for c in range(c0, c1):
        h, m, s, g0, kc = hi[c], lo[c], scale[c], mdy[c], k[c]
        xr = x[p, c]
        gr = dy[p, c]
        dr = dx[p, c]
        for q in range(xr.shape[0]):
            dr[q] = stored(((work(gr[q]) - g0) - ((work(xr[q]) - h) - m) * kc) * s, dr)


_binput_each = over_planes(_binput_run)


@numba.njit(**_OPTS)
def _binput_body(dy, x, hi, lo, scale, mdy, k, dx, nparts, i):  # pragma: no cover - compiled
    c_count = x.shape[1]
    if x.shape[2] == 1:
        p0, p1 = chunk(x.shape[0], nparts, i)
        for p in range(p0, p1):
            for c in range(c_count):
                xc = (work(x[p, c, 0]) - hi[c]) - lo[c]
                dx[p, c, 0] = stored(((work(dy[p, c, 0]) - mdy[c]) - xc * k[c]) * scale[c], dx)
    else:
        u0, u1 = chunk(x.shape[0] * c_count, nparts, i)
        _binput_each(c_count, u0, u1, (dy, x, hi, lo, scale, mdy, k, dx))


@numba.njit(**_OPTS)
def backward_input_serial(dy, x, hi, lo, scale, mdy, k, dx):  # pragma: no cover - compiled
    """``dx = scale·((dy − mean_dy) − (x − mean)·k)`` in the work dtype."""
    _binput_body(dy, x, hi, lo, scale, mdy, k, dx, 1, 0)


@numba.njit(parallel=True, **_OPTS)
def backward_input_parallel(dy, x, hi, lo, scale, mdy, k, dx, nparts):  # pragma: no cover
    for i in numba.prange(nparts):
        _binput_body(dy, x, hi, lo, scale, mdy, k, dx, nparts, i)


@numba.njit(inline="always", **_OPTS)
def _bscale_run(p, c0, c1, args):  # pragma: no cover - compiled
    dy, scale, dx = args
    for c in range(c0, c1):
        s = scale[c]
        gr = dy[p, c]
        dr = dx[p, c]
        for q in range(gr.shape[0]):
            dr[q] = stored(work(gr[q]) * s, dr)


_bscale_each = over_planes(_bscale_run)


@numba.njit(**_OPTS)
def _bscale_body(dy, scale, dx, nparts, i):  # pragma: no cover - compiled
    c_count = dy.shape[1]
    if dy.shape[2] == 1:
        p0, p1 = chunk(dy.shape[0], nparts, i)
        for p in range(p0, p1):
            for c in range(c_count):
                dx[p, c, 0] = stored(work(dy[p, c, 0]) * scale[c], dx)
    else:
        u0, u1 = chunk(dy.shape[0] * c_count, nparts, i)
        _bscale_each(c_count, u0, u1, (dy, scale, dx))


@numba.njit(**_OPTS)
def backward_scale_serial(dy, scale, dx):  # pragma: no cover - compiled
    """``dx = scale·dy`` in the work dtype: the backward input of eval mode,
    whose statistics are constants (x is not read: an infinite x must not
    turn dx into NaN through ``(x − mean)·0``)."""
    _bscale_body(dy, scale, dx, 1, 0)


@numba.njit(parallel=True, **_OPTS)
def backward_scale_parallel(dy, scale, dx, nparts):  # pragma: no cover - compiled
    for i in numba.prange(nparts):
        _bscale_body(dy, scale, dx, nparts, i)


@numba.njit(**_OPTS)
def all_finite(v):  # pragma: no cover - compiled
    """Whether every element of the 1-D float array ``v`` is finite."""
    for i in range(v.shape[0]):
        if not np.isfinite(v[i]):
            return False
    return True


@numba.njit(**_OPTS)
def cast_into(src, dst):  # pragma: no cover - compiled
    """``dst[:] = src`` in dst's dtype, rounded to nearest (an overflow is ±inf,
    as numpy's cast gives, without its warning)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@numba.njit(**_OPTS)
def cast_half_into(src, dst):  # pragma: no cover - compiled
    """float64 ``src`` into ``dst``'s 16-bit format (float16 or bfloat16 bits)
    as torch casts float64 to those: to float32, then to 16 bits, each to
    nearest even (an overflow is ±inf, NaN stays NaN)."""
    for i in range(src.shape[0]):
        dst[i] = stored(np.float32(src[i]), dst)


@numba.njit(parallel=True, **_OPTS)
def copy_parallel(src, dst, parts):  # pragma: no cover - compiled
    """``dst[:] = src`` in ``parts`` threads: the benchmark's bandwidth floor."""
    n = src.shape[0]
    for i in numba.prange(parts):
        lo, hi = chunk(n, parts, i)
        dst[lo:hi] = src[lo:hi]


# -- per-channel glue (tiny inputs live or die by Python overhead) ------------
def _merged_partials(part, c):  # pragma: no cover - compiled
    """Channel c's two sums over the per-thread partials, in thread order."""
    s1 = 0.0
    s2 = 0.0
    for t in range(part.shape[0]):
        s1 += part[t, 0, c]
        s2 += part[t, 1, c]
    return s1, s2


merged_partials = numba.njit(inline="always", **_OPTS)(_merged_partials)


@numba.njit(**_OPTS)
def pack_statistics(part, k, center, n, buf):  # pragma: no cover - compiled
    """Merge partials in thread order and write ``[n, Σ(x−K), Σ(x−K)²]`` about ``center``.

    ``Σ(x−K) = S1 + nδ`` and ``Σ(x−K)² = S2 + δ(2·S1 + nδ)`` with δ = k − K:
    exact algebra in float64.
    """
    c_count = k.shape[0]
    buf[0] = n
    for c in range(c_count):
        s1, s2 = merged_partials(part, c)
        d = k[c] - center[c]
        buf[1 + c] = s1 + n * d
        buf[1 + c_count + c] = s2 + d * (2.0 * s1 + n * d)


@numba.njit(**_OPTS)
def finalize_forward(
    buf,
    count,
    center,
    eps,
    weight,
    bias,
    rm,
    rv,
    momentum,
    size,
    stats,
    hi,
    lo,
    scale,
    shift,
    new_rm,
    new_rv,
):  # pragma: no cover - compiled
    """Statistics, factors and running statistics from the reduced buffer
    (per-channel inputs of a 16-bit format as their bits, read by value).

    Rows of ``stats``: mean, biased var, invstd, the next merge center (the
    mean of an unflagged channel, else ``center``) and a non-finite flag (1.0
    for a channel whose mean or var is not finite, or whose running
    statistics would not be finite once stored in new_rm's and new_rv's
    dtype; those keep their running statistics). The work-dtype factors go
    to hi, lo, scale, shift; the running statistics (``momentum`` < 0: no
    update) to new_rm, new_rv (float64 for a half dtype's: the caller rounds
    and judges those).

    Returns ``(loss, overflowed, bad)``: the merge's worst relative variance
    error over the finite channels and whether some mean is finite but its
    variance is not (as ``PortableKernels.finalize`` computes them, bit for
    bit, so every route takes the same branch), and the number of flagged
    channels.
    Simple loops, so that they vectorize: with thousands of channels this is
    not negligible.
    """
    c_count = hi.shape[0]
    ulp = 2.220446049250313e-16
    s1 = buf[1 : 1 + c_count]
    s2 = buf[1 + c_count : 1 + 2 * c_count]
    mean, var, inv, nxt, flag = stats[0], stats[1], stats[2], stats[3], stats[4]
    # One simple loop per quantity: LLVM vectorizes these, not their fusion.
    for c in range(c_count):
        rel = s1[c] / count
        var[c] = max(s2[c] / count - rel * rel, 0.0)
        mean[c] = center[c] + rel
    # A finite mean with a variance that is not: it overflowed, so +inf (as
    # the portable route makes it), not whatever inf − inf or max(NaN, 0) gave.
    for c in range(c_count):
        if np.isfinite(mean[c]) and not np.isfinite(var[c]):
            var[c] = np.inf
    for c in range(c_count):
        inv[c] = 1.0 / np.sqrt(var[c] + eps)
    bad = 0
    for c in range(c_count):
        ok = np.isfinite(mean[c]) and np.isfinite(var[c])
        flag[c] = 0.0 if ok else 1.0
    loss = 0.0
    factor = 4.0 * (size + 2) * ulp
    for c in range(c_count):
        e = s2[c] / count * factor / (var[c] + eps)
        if flag[c] == 0.0 and e > loss:
            loss = e
    # A finite mean whose variance overflowed around this center: every rank
    # merges again around the mean (apart from the loss, which it must not
    # hide from the PrecisionWarning).
    overflowed = False
    for c in range(c_count):
        if flag[c] != 0.0 and np.isfinite(mean[c]):
            overflowed = True
    # Stores cast to each array's dtype (the work dtype, the running
    # statistics' dtype) with round-to-nearest, like the portable astype.
    for c in range(c_count):
        hi[c] = mean[c]
    split_low(mean, hi, lo)
    for c in range(c_count):
        scale[c] = inv[c] * np.float64(work(weight[c]))
        shift[c] = work(bias[c])
    if momentum >= 0.0:
        bessel = count / (count - 1.0)
        for c in range(c_count):
            new_rm[c] = (1.0 - momentum) * np.float64(work(rm[c])) + momentum * mean[c]
            new_rv[c] = (1.0 - momentum) * np.float64(work(rv[c])) + momentum * (var[c] * bessel)
        # Judged as stored: a float64 1e39 is finite, not once in float32.
        for c in range(c_count):
            if not (np.isfinite(new_rm[c]) and np.isfinite(new_rv[c])):
                flag[c] = 1.0
        for c in range(c_count):
            if flag[c] != 0.0:
                new_rm[c] = work(rm[c])
                new_rv[c] = work(rv[c])
    # After the running statistics' verdict: a channel they reject keeps its
    # center too, as in the portable route.
    for c in range(c_count):
        nxt[c] = mean[c] if flag[c] == 0.0 else center[c]
    for c in range(c_count):
        if flag[c] != 0.0:
            bad += 1
    return loss, overflowed, bad


@numba.njit(**_OPTS)
def keep_unstored(new_rm, new_rv, rm, rv, center, stats):  # pragma: no cover - compiled
    """Running statistics rounded to a 16-bit format (``new_rm``, ``new_rv``;
    bits, like ``rm``, ``rv``) judged as stored: a channel not flagged yet
    (``stats[4]``) whose either value is not finite keeps its old ones and
    its ``center`` (``stats[3]``) and is flagged. Returns how many were."""
    lost = 0
    for c in range(new_rm.shape[0]):
        if stats[4, c] == 0.0 and not (
            np.isfinite(work(new_rm[c])) and np.isfinite(work(new_rv[c]))
        ):
            new_rm[c] = rm[c]
            new_rv[c] = rv[c]
            stats[3, c] = center[c]
            stats[4, c] = 1.0
            lost += 1
    return lost


@numba.njit(**_OPTS)
def eval_factors(rm, rv, eps, weight, bias, stats, hi, lo, scale, shift):  # pragma: no cover
    """Mean and invstd of the running statistics (rows of ``stats``) and the
    work-dtype factors, with the portable route's float64 operations in its
    order (``1/sqrt(var + eps)``, then ``invstd·weight``), so bit for bit alike."""
    mean, inv = stats[0], stats[1]
    for c in range(hi.shape[0]):
        mean[c] = work(rm[c])
        inv[c] = 1.0 / np.sqrt(np.float64(work(rv[c])) + eps)
    for c in range(hi.shape[0]):
        hi[c] = mean[c]
    split_low(mean, hi, lo)
    for c in range(hi.shape[0]):
        scale[c] = inv[c] * np.float64(work(weight[c]))
        shift[c] = work(bias[c])


@numba.njit(**_OPTS)
def _inference_factors(rm, rv, eps, weight, bias, y):  # pragma: no cover - compiled
    """:func:`eval_factors` into fresh rows ``hi, lo, scale, shift`` of y's
    work dtype."""
    channels = rm.shape[0]
    stats = np.empty((2, channels))
    f = work_rows(4, channels, y)
    eval_factors(rm, rv, eps, weight, bias, stats, f[0], f[1], f[2], f[3])
    return f


@numba.njit(**_OPTS)
def inference_serial(x, rm, rv, eps, weight, bias, y):  # pragma: no cover - compiled
    """Eval mode in one call: :func:`eval_factors`, then :func:`normalize_serial`
    (the same operations, so the same bits)."""
    f = _inference_factors(rm, rv, eps, weight, bias, y)
    _normalize_body(x, f[0], f[1], f[2], f[3], y, 1, 0)


@numba.njit(parallel=True, **_OPTS)
def inference_parallel(x, rm, rv, eps, weight, bias, y, nparts):  # pragma: no cover - compiled
    f = _inference_factors(rm, rv, eps, weight, bias, y)
    for i in numba.prange(nparts):
        _normalize_body(x, f[0], f[1], f[2], f[3], y, nparts, i)


@numba.njit(**_OPTS)
def split_low(mean, hi, lo):  # pragma: no cover - compiled
    """``lo = mean − hi`` in the work dtype; zero where that is float64 (hi
    holds the mean exactly: the portable route has no ``lo`` then) and where
    hi is not finite (as :func:`arraysyncbn.kernels.split_mean`: an infinite
    mean, or one beyond float32, must not make ``inf − inf = NaN`` of it)."""
    if hi.itemsize == 8:  # float64 (the work dtypes are float32 and float64)
        lo[:] = 0.0
    else:
        for c in range(hi.shape[0]):
            wide = np.float64(hi[c])
            lo[c] = mean[c] - wide if np.isfinite(wide) else 0.0


@numba.njit(**_OPTS)
def pack_backward(part, invstd, buf):  # pragma: no cover - compiled
    """Merge partials in thread order into ``[Σdy, Σdy·x̂]`` (x̂ = (x − mean)·invstd)."""
    c_count = invstd.shape[0]
    for c in range(c_count):
        s1, s2 = merged_partials(part, c)
        buf[c] = s1
        buf[c_count + c] = s2 * invstd[c]


@numba.njit(**_OPTS)
def backward_coefficients(buf, count, invstd, mean_dy, k):  # pragma: no cover - compiled
    """Global ``mean(dy)`` and ``invstd·mean(dy·x̂)`` in the work dtype."""
    c_count = invstd.shape[0]
    for c in range(c_count):
        mean_dy[c] = buf[c] / count
        k[c] = invstd[c] * (buf[c_count + c] / count)
