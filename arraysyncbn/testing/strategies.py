"""Hypothesis strategies for SyncBN property tests.

:func:`sharded_batches` draws a whole problem: a global batch split into one
shard per rank (uneven, empty shards included, or shards that differ in every
non-channel size), per-channel data far from zero or nearly constant,
optional affine parameters and running statistics, and upstream gradients.
Everything is numpy; convert the shards to the library under test and build
the reference from the *converted* values (``to_numpy`` of what you pass in),
so rounding into bfloat16 and friends is part of the input, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = ["ShardedBatch", "sharded_batches", "splits"]

_CENTERS = {
    "float16": [0.0, 1.0, -3.0, 50.0],
    "bfloat16": [0.0, 1.0, -3.0, 50.0],
    "float32": [0.0, 1.0, -3.0, 1e3, -1e4],
    "float64": [0.0, 1.0, -3.0, 1e3, -1e4, 1e6],
}
_SPREADS = [1e-2, 1.0, 30.0]


@dataclass(frozen=True)
class ShardedBatch:
    """One drawn SyncBN problem; ``shards[i]`` and ``dys[i]`` belong to rank i.

    ``dtype`` names the input dtype (``"bfloat16"`` shards are float32 arrays
    to be rounded by the library under test). ``num_batches_tracked`` is the
    count of earlier training steps, which ``momentum=None`` (the cumulative
    average, ``m = 1/(num_batches_tracked + 1)``) reads: pass it to the
    implementation, :func:`~arraysyncbn.testing.reference_forward` and
    :func:`~arraysyncbn.testing.forward_bounds` alike.
    """

    shards: list[np.ndarray]
    dys: list[np.ndarray]
    axis: int
    dtype: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    momentum: float | None
    eps: float
    num_batches_tracked: int = 0

    @property
    def channels(self) -> int:
        return int(self.shards[0].shape[self.axis])

    @property
    def count(self) -> int:
        """Global number of elements per channel."""
        return sum(int(s.size) // self.channels for s in self.shards)


@st.composite
def splits(draw: st.DrawFn, total: int, parts: int) -> list[int]:
    """Non-negative sizes summing to ``total``; zeros (empty shards) allowed."""
    if parts < 1 or total < 0:
        raise ValueError(
            f"splits needs parts >= 1 and total >= 0, got parts={parts}, total={total}"
        )
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(parts)]


def _dtype_name(value: object) -> str:
    """The name in ``_CENTERS`` of a drawn dtype: a name (``"float32"``,
    ``"half"``, ``"f4"``), a numpy dtype or type, or another library's dtype
    (``torch.float32``); ValueError naming the supported ones otherwise."""
    from .assertions import _dtype_text

    text = _dtype_text(value).removeprefix("torch.")
    if text not in _CENTERS:
        raise ValueError(
            f"sharded_batches: the dtypes strategy drew {value!r}; expected one of "
            f"{', '.join(sorted(_CENTERS))} (a name, or a numpy or torch dtype)"
        )
    return text


def _strategy(value: object, name: str) -> st.SearchStrategy:
    """``value`` if a strategy, else ``st.just(value)`` for a plain value of
    the expected kind; TypeError otherwise (hypothesis' own error named
    ``validate``)."""
    if isinstance(value, st.SearchStrategy):
        return value
    kinds = {"ranks": (int,), "dtypes": (str, type, np.dtype)}[name]
    if isinstance(value, kinds) or (name == "dtypes" and "dtype" in type(value).__name__):
        return st.just(value)
    what = {"ranks": "an int", "dtypes": "a dtype"}[name]
    raise TypeError(
        f"sharded_batches: {name}: expected {what} or a hypothesis strategy, got {value!r}"
    )


def _check_limits(**limits: object) -> None:
    """ValueError naming a size limit of :func:`sharded_batches` that draws
    nothing (hypothesis' own error named ``min_value``/``max_value``)."""
    least = {"max_ndim": 2, "max_channels": 1, "max_side": 1, "min_count": 0}
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"sharded_batches: {name} must be an int, got {value!r}")
        if value < least[name]:
            what = {
                "max_ndim": "at least 2 (inputs are (N, C, ...))",
                "max_channels": "at least 1",
                "max_side": "at least 1 (sides are drawn from 0 to it)",
                "min_count": "0 or more",
            }[name]
            raise ValueError(f"sharded_batches: {name} must be {what}, got {value}")


def _numpy_dtype(name: str) -> type:
    return np.float32 if name == "bfloat16" else getattr(np, name)


@st.composite
def _values(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    axis: int,
    centers: list[float],
    spreads: list[float],
    dtype: str,
) -> np.ndarray:
    """Data whose channel ``c`` has its own center and spread."""
    channels = shape[axis]
    z = draw(
        hnp.arrays(
            np.float64,
            shape,
            elements=st.floats(-4, 4, allow_subnormal=False, width=32),
        )
    )
    view = [1] * len(shape)
    view[axis] = channels
    center = np.array([draw(st.sampled_from(centers)) for _ in range(channels)]).reshape(view)
    spread = np.array([draw(st.sampled_from(spreads)) for _ in range(channels)]).reshape(view)
    return (center + spread * z).astype(_numpy_dtype(dtype))


@st.composite
def sharded_batches(
    draw: st.DrawFn,
    *,
    ranks: st.SearchStrategy[int] | int | None = None,
    dtypes: st.SearchStrategy[Any] | Any = None,
    max_ndim: int = 4,
    max_channels: int = 4,
    max_side: int = 4,
    min_count: int = 2,
    same_shapes: bool | None = None,
) -> ShardedBatch:
    """Draw a :class:`ShardedBatch`.

    Parameters
    ----------
    ranks, dtypes : strategies for the world size (default 1..4) and the dtype
        (default float32 or float64; ``"float16"`` and ``"bfloat16"`` are
        supported too), or one fixed value. A dtype may be drawn as a name
        (``"float32"``, ``"half"``), a numpy dtype or type, or a torch
        dtype; ``batch.dtype`` is its name. Anything else is a ValueError
        (a drawn dtype) or TypeError (neither a strategy nor a value).
    max_ndim, max_channels, max_side : size limits (ndim is at least 2, so
        ``(N, C)`` inputs are drawn; ``max_ndim=5`` adds 5-D ones). The
        channel axis is any axis, channels-last included, given as a
        non-negative or a negative index.
    min_count : the drawn global count per channel is at least this (use 0
        to allow all shards empty, which also draws a count of 1; 1 to allow
        the single-sample error case without empty batches; 2049 or more to
        reach counts that float16 cannot hold exactly). The default, 2,
        draws neither.
        With the defaults, counts stay below a few hundred; a min_count of
        a few hundred thousand makes each draw slow enough for hypothesis'
        health check to fail (100000 drew fine here) (suppress ``HealthCheck.too_slow`` and
        ``HealthCheck.data_too_large`` there). A limit that draws nothing
        (``max_ndim`` < 2, ``max_channels`` or ``max_side`` < 1, a negative
        ``min_count``) is a ValueError, a non-integer one a TypeError.
    same_shapes : True splits one global batch along its first non-channel
        axis (uneven, empty shards allowed): the shards then differ only in
        that axis, so they concatenate along it. False draws every shard's
        non-channel sizes independently; None draws which.

    Notes
    -----
    Edge cases are drawn on purpose: empty shards on some ranks, a single
    rank, one channel, one element per shard, sides of length 0 and 1,
    channels far from zero relative to their spread (up to 1e8 standard
    deviations for float64), nearly constant channels, and momentum 0, 1 and
    None (with ``num_batches_tracked`` 0 to 3 or 99). ``hypothesis.find``
    or ``hypothesis.assume`` on ``batch.count``, ``batch.axis`` or the shard
    shapes narrows a test to one of them.
    """
    _check_limits(max_ndim=max_ndim, max_channels=max_channels, max_side=max_side,
                  min_count=min_count)  # fmt: skip
    k = draw(st.integers(1, 4) if ranks is None else _strategy(ranks, "ranks"))
    if not isinstance(k, int) or k < 1:
        raise ValueError(
            f"sharded_batches: the ranks strategy drew {k!r}; a world has 1 or more ranks"
        )
    default = st.sampled_from(["float32", "float64"])
    dtype = _dtype_name(draw(default if dtypes is None else _strategy(dtypes, "dtypes")))
    ndim = draw(st.integers(2, max_ndim))
    axis = draw(st.integers(0, ndim - 1))
    channels = draw(st.integers(1, max_channels))
    split = draw(st.booleans()) if same_shapes is None else same_shapes
    batch_axis = 0 if axis != 0 else 1
    side = st.integers(0, max_side)
    if split:
        rest = [draw(st.integers(1, max_side)) for _ in range(ndim)]
        per_row = int(np.prod([n for i, n in enumerate(rest) if i not in (axis, batch_axis)]))
        # Enough rows for min_count here, so that every shard keeps the same
        # non-batch sizes (growing one shard afterwards would break that).
        least = -(-max(min_count, 0) // per_row)
        total = draw(st.integers(least, max(least, 3 * max_side)))
        sizes = draw(splits(total, k))
        shapes = []
        for n in sizes:
            shape = list(rest)
            shape[axis], shape[batch_axis] = channels, n
            shapes.append(tuple(shape))
    else:
        shapes = []
        for _ in range(k):
            shape = [draw(side) for _ in range(ndim)]
            shape[axis] = channels
            shapes.append(tuple(shape))
    count = sum(int(np.prod(s)) // channels for s in shapes)
    if count < min_count:  # only independent shapes get here
        shape = [2] * ndim
        shape[axis] = channels
        shape[batch_axis] = max(2, min_count)
        shapes[0] = tuple(shape)
    centers, spreads = _CENTERS[dtype], _SPREADS
    shards = [draw(_values(s, axis, centers, spreads, dtype)) for s in shapes]
    dys = [draw(_values(s, axis, [0.0, 1.0], [1.0], dtype)) for s in shapes]
    param = hnp.arrays(
        np.float64, (channels,), elements=st.floats(-2, 2, width=32, allow_subnormal=False)
    )
    positive = hnp.arrays(np.float64, (channels,), elements=st.floats(0.125, 5, width=32))
    weight = draw(st.none() | param)
    bias = draw(st.none() | param)
    tracked = draw(st.booleans())
    running_mean = draw(param) if tracked else None
    running_var = draw(positive) if tracked else None
    momentum = draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, None]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-1]))
    # Drawn last, so that the draws above keep their order.
    tracked_steps = draw(st.integers(0, 3) | st.just(99))
    return ShardedBatch(
        shards,
        dys,
        axis - ndim if draw(st.booleans()) else axis,
        dtype,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        tracked_steps,
    )
