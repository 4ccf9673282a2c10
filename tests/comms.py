"""Communicators for tests: count calls, or forbid communication outright."""

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


class ForbiddenComm:
    """A communicator that fails the test if anything is communicated."""

    rank = 0
    size = 2

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        raise AssertionError("communicated, but this call must not communicate")
