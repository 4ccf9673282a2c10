"""Ranks that run as threads of one process.

:func:`thread_group` returns one communicator per rank; each rank runs in its
own thread and calls collectives as it would under MPI. This is how the tests
run K ranks without MPI, and how users can try multi-rank code in a notebook.

Reductions are computed by every rank from the same slots in rank order, so
all ranks see bitwise-identical results. A rank that never arrives cannot
hang the others: every wait has a timeout (``thread_group(timeout=)``, else
``ARRAYSYNCBN_TIMEOUT`` as for MPI), after which every waiting rank raises
:class:`~arraysyncbn.CommunicatorAbortedError` naming the SyncBN call the
first one timed out in; and :meth:`ThreadGroup.abort` (called by
:func:`run_ranks` when a rank raises) wakes every waiting rank the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import array_api_compat

from ..errors import CollectiveMismatchError, CommunicatorAbortedError
from .base import ReduceOp
from .calls import describe_active
from .watchdog import resolve_timeout, timeout_advice

__all__ = ["ThreadCommunicator", "ThreadGroup", "run_ranks", "thread_group"]

T = TypeVar("T")


class _Rendezvous:
    """A reusable barrier whose abort never fails a generation that completed.

    ``threading.Barrier.abort`` breaks the barrier for threads that were
    released but not yet scheduled; a rank would then report a failure for a
    collective that every rank finished. Here a waiter first checks whether
    its generation completed, so only ranks that are truly still waiting see
    the abort.
    """

    def __init__(self, parties: int, timeout: float | None) -> None:
        self.parties = parties
        self.timeout = timeout
        self._cond = threading.Condition()
        self._count = 0
        self._generation = 0
        self.reason: str | None = None

    def abort(self, reason: str) -> None:
        with self._cond:
            if self.reason is None:
                self.reason = reason
            self._cond.notify_all()

    def wait(self, rank: int) -> None:
        start = time.monotonic()
        with self._cond:
            if self.reason is not None:
                raise CommunicatorAbortedError(f"thread group {self.reason}")
            generation = self._generation
            self._count += 1
            if self._count == self.parties:
                self._count = 0
                self._generation += 1
                self._cond.notify_all()
                return
            self._cond.wait_for(
                lambda: self._generation != generation or self.reason is not None,
                self.timeout,
            )
            if self._generation != generation:
                return
            if self.reason is None:
                self.reason = (
                    f"timed out: rank {rank} waited {time.monotonic() - start:.1f} s in "
                    f"{describe_active()} and not every rank joined it (a rank raised, "
                    "returned early, skipped this call or took another branch); "
                    f"{timeout_advice(self.timeout)} or pass thread_group(timeout=)"
                )
                self._cond.notify_all()
            raise CommunicatorAbortedError(f"thread group {self.reason}")


class ThreadGroup:
    """State shared by the ranks of one :func:`thread_group`."""

    def __init__(self, size: int, timeout: float | None) -> None:
        self.size = size
        self.timeout = timeout
        self._slots: list[tuple[Any, str] | None] = [None] * size
        self._rendezvous = _Rendezvous(size, timeout)

    def abort(self, reason: str = "aborted") -> None:
        """Wake every waiting rank with an error; later collectives fail too."""
        self._rendezvous.abort(reason)

    def allreduce(self, rank: int, buf: Any, op: str) -> Any:
        self._slots[rank] = (buf, op)
        self._rendezvous.wait(rank)
        try:
            result: Any = _reduce_slots(self._slots)  # type: ignore[arg-type]
        except CollectiveMismatchError as exc:
            result = exc
        # Nobody may overwrite a slot before every rank has read them all.
        self._rendezvous.wait(rank)
        if isinstance(result, CollectiveMismatchError):
            raise result
        return result


def _reduce_slots(slots: list[tuple[Any, str]]) -> Any:
    """Combine every rank's buffer in rank order (same bits on every rank)."""
    first, op = slots[0]
    xp = array_api_compat.array_namespace(first)
    device = array_api_compat.device(first)
    for r, (buf, other_op) in enumerate(slots[1:], start=1):
        if other_op != op:
            raise CollectiveMismatchError(
                f"ranks called different reductions: rank 0 {op!r}, rank {r} {other_op!r}"
            )
        # Library and device first: comparing dtypes of two libraries warns,
        # and adding arrays of two devices fails with the library's own error.
        other_xp = array_api_compat.array_namespace(buf)
        if other_xp is not xp:
            raise CollectiveMismatchError(
                "ranks passed buffers of different library to allreduce: rank 0 "
                f"{xp.__name__}, rank {r} {other_xp.__name__}"
            )
        if array_api_compat.device(buf) != device:
            raise CollectiveMismatchError(
                "ranks passed buffers on different device to allreduce: rank 0 "
                f"{device}, rank {r} {array_api_compat.device(buf)}"
            )
        if buf.shape != first.shape or buf.dtype != first.dtype:
            raise CollectiveMismatchError(
                "ranks passed different buffers to allreduce: rank 0 "
                f"{first.shape} {first.dtype}, rank {r} {buf.shape} {buf.dtype}"
            )
    out = xp.asarray(first, copy=True)
    for buf, _ in slots[1:]:
        out = out + buf if op == "sum" else xp.maximum(out, buf)
    return out


class ThreadCommunicator:
    """One rank's view of a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.group.size

    def allreduce(self, buf: Any, op: ReduceOp = "sum") -> Any:
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduction op {op!r}; expected 'sum' or 'max'")
        return self.group.allreduce(self._rank, buf, op)

    def __repr__(self) -> str:
        return f"ThreadCommunicator(rank={self._rank}, size={self.size})"


def thread_group(world_size: int, *, timeout: float | None = None) -> list[ThreadCommunicator]:
    """Return one communicator per rank for ranks that run as threads.

    Parameters
    ----------
    world_size : int
        Number of ranks, at least 1.
    timeout : float or None
        Seconds a rank waits for the others at a collective before every
        waiting rank fails with :class:`~arraysyncbn.CommunicatorAbortedError`
        (naming the SyncBN call); ``0`` waits forever (not recommended).
        None (default) reads ``ARRAYSYNCBN_TIMEOUT`` (unset: 600 s), once,
        here.

    Raises
    ------
    ValueError
        ``world_size`` is not a positive int, ``timeout`` is negative or not
        a number, or ``ARRAYSYNCBN_TIMEOUT`` is malformed.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from arraysyncbn import thread_group, run_ranks
    >>> comms = thread_group(2)
    >>> run_ranks(lambda c: float(c.allreduce(xp.asarray([c.rank + 1.0]))[0]), comms)
    [3.0, 3.0]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    group = ThreadGroup(world_size, resolve_timeout(timeout))
    return [ThreadCommunicator(group, r) for r in range(world_size)]


def run_ranks(
    fn: Callable[[ThreadCommunicator], T],
    comms: list[ThreadCommunicator],
    *,
    return_exceptions: bool = False,
) -> list[Any]:
    """Run ``fn(comm)`` for every rank in its own thread; return results in rank order.

    If any rank raises, the group is aborted so that the others stop waiting.
    Then, with ``return_exceptions=False``, the first exception raised by any
    rank (in time) is re-raised here with its rank noted; errors that are mere
    consequences of the abort do not mask the original one. With
    ``return_exceptions=True`` each rank's exception takes its place in the
    returned list instead.
    """
    if not comms:
        raise ValueError("run_ranks needs at least one communicator")
    group = comms[0].group
    if sorted(c.rank for c in comms) != list(range(comms[0].size)) or any(
        c.group is not group for c in comms
    ):
        # A rank left out would leave the others waiting for it until the timeout.
        raise ValueError(
            "run_ranks needs every rank of one thread_group, each once, got ranks "
            f"{[c.rank for c in comms]} of a group of {comms[0].size}"
        )
    results: list[Any] = [None] * len(comms)
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def body(comm: ThreadCommunicator) -> None:
        try:
            results[comm.rank] = fn(comm)
        except BaseException as exc:
            with lock:
                errors.append((comm.rank, exc))
            group.abort(f"aborted: rank {comm.rank} raised {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=body, args=(c,), name=f"arraysyncbn-rank{c.rank}", daemon=True)
        for c in comms
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if return_exceptions:
        for rank, exc in errors:
            results[rank] = exc
        return results
    if errors:
        primary = [e for e in errors if not isinstance(e[1], CommunicatorAbortedError)]
        rank, exc = (primary or errors)[0]
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"raised on rank {rank} of {len(comms)}")
        raise exc
    return results
