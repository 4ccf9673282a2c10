"""Communicators for tests: count calls, stand in for very many ranks, or
forbid communication outright."""

from __future__ import annotations

from typing import Any


class CountingComm:
    """Wraps a communicator and records every allreduce (op, length)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        self.calls.append((op, int(buf.shape[0])))
        return self.inner.allreduce(buf, op)


class ReplicatedComm:
    """Rank 0 of ``size`` ranks (a power of two) that all hold its buffer.

    The sum is ``buf·size``, exact, as a pairwise tree sums equal copies;
    the max is ``buf``. Stands in for a job of more ranks than threads can
    run: the statistics are the one buffer's, the merge's rounding estimate
    that of ``size`` ranks.
    """

    rank = 0

    def __init__(self, size: int) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"size must be a power of two, got {size}")
        self.size = size

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        return buf * float(self.size) if op == "sum" else buf


class ForbiddenComm:
    """A communicator that fails the test if anything is communicated."""

    rank = 0
    size = 2

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        raise AssertionError("communicated, but this call must not communicate")
