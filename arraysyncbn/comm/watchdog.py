"""Deadlines for collective waits: ``ARRAYSYNCBN_TIMEOUT`` and a cheap poll.

A rank that skips a SyncBN call (it is in eval mode, its loop ran one step
fewer, it raised and was caught) leaves the other ranks waiting in the
collective forever; under MPI they busy-spin at full CPU and the job never
ends. Every communicator therefore waits with a deadline of
``ARRAYSYNCBN_TIMEOUT`` seconds (default 600; ``0`` waits forever). What
happens when it passes is the communicator's choice: an
:class:`~arraysyncbn.MPICommunicator` prints the call it waited in and aborts
the MPI job, a :func:`~arraysyncbn.thread_group` raises
:class:`~arraysyncbn.CommunicatorAbortedError` on every waiting rank.

:func:`wait_for` polls a completion test (``MPI.Request.Test``) so that a
healthy wait costs what the blocking call costs: for the first
:data:`YIELD_SECONDS` it tests, yields the core (``sched_yield``: at once
when nothing else is runnable) and tests again; only then does it sleep
between tests, each sleep a fraction (:data:`SLEEP_FRACTION`) of the time
already waited, capped at :data:`MAX_SLEEP_SECONDS`. MPI makes progress only
inside MPI calls, so a sleeping rank delays its peers' completion by up to
one sleep, a few percent of a wait that was already long. With more ranks
than cores (4 ranks on 2 cores, as the main job runs on a 2-core machine), a
pure spin on the test starves the late ranks (an allreduce of 129 values:
5 ms instead of 15 µs; the main job's, with its compute in between: 2.7 ms
instead of 0.14 ms); the yields let them run.

:func:`wait_or_end` is that poll with the communicator's way out attached,
and :func:`report_timeout` the line a process-ending communicator
(:class:`~arraysyncbn.MPICommunicator`,
:class:`~arraysyncbn.TorchDistributedCommunicator`) prints before it ends:
which SyncBN call it waited in (:mod:`~arraysyncbn.comm.calls`) and for how
long.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from .calls import describe_active

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_SLEEP_SECONDS",
    "SLEEP_FRACTION",
    "TIMEOUT_ENV",
    "YIELD_SECONDS",
    "parse_timeout",
    "report_timeout",
    "resolve_timeout",
    "timeout_advice",
    "wait_for",
    "wait_or_end",
]

TIMEOUT_ENV = "ARRAYSYNCBN_TIMEOUT"
"""Environment variable: seconds a rank waits in a collective; ``0`` waits forever."""

DEFAULT_TIMEOUT = 600.0
"""Seconds waited when ``ARRAYSYNCBN_TIMEOUT`` is unset: longer than any
healthy step's imbalance (a slow data loader, a checkpoint on rank 0), short
enough that a hung job gives its allocation back."""

YIELD_SECONDS = 1.0
"""How long :func:`wait_for` tests and yields the core before it starts to sleep."""

SLEEP_FRACTION = 0.05
"""Each sleep after the yielding polls, as a fraction of the time waited so far."""

MAX_SLEEP_SECONDS = 0.01
"""The longest sleep between two tests."""


def _yield_core() -> None:
    """Give the core to another runnable process, if any (no fixed delay)."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()
    else:  # pragma: no cover - not on Linux
        time.sleep(0)


def parse_timeout(text: str | None) -> float | None:
    """Return the wait limit that an ``ARRAYSYNCBN_TIMEOUT`` value asks for.

    Parameters
    ----------
    text : str or None
        The variable's value; None or blank means unset.

    Returns
    -------
    float or None
        Seconds (a positive finite number); :data:`DEFAULT_TIMEOUT` when
        unset; None (wait forever) for ``0``.

    Raises
    ------
    ValueError
        For anything but a non-negative finite number of seconds.

    Examples
    --------
    >>> parse_timeout("2.5"), parse_timeout("0"), parse_timeout(None)
    (2.5, None, 600.0)
    """
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"{TIMEOUT_ENV}={text!r} is not understood; give the seconds a rank may wait "
            f"in a collective as a non-negative number (default {DEFAULT_TIMEOUT:g}; "
            "0 waits forever)"
        )
    return None if seconds == 0 else seconds


def resolve_timeout(timeout: float | None) -> float | None:
    """Return the wait limit for a communicator given ``timeout=``.

    ``None`` reads ``ARRAYSYNCBN_TIMEOUT`` (:func:`parse_timeout`); a number
    is taken as is, ``0`` meaning wait forever (returned as None).

    Raises
    ------
    ValueError
        ``timeout`` is negative, not finite or not a number, or the variable
        is malformed.
    """
    if timeout is None:
        return parse_timeout(os.environ.get(TIMEOUT_ENV))
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not (math.isfinite(float(timeout)) and timeout >= 0):
        raise ValueError(
            f"timeout must be a non-negative finite number of seconds (0 waits forever) "
            f"or None (read {TIMEOUT_ENV}), got {timeout!r}"
        )
    seconds = float(timeout)
    return None if seconds == 0 else seconds


def timeout_advice(timeout: float | None) -> str:
    """Return the sentence that says how to change the limit of a timed-out wait."""
    limit = "unlimited" if timeout is None else f"{timeout:g} s"
    return (
        f"the limit is {limit}: set {TIMEOUT_ENV} to the seconds a rank may wait (0 waits forever)"
    )


def wait_for(
    test: Callable[[], bool],
    timeout: float | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    yield_: Callable[[], None] = _yield_core,
) -> float | None:
    """Poll ``test`` until it returns True or ``timeout`` seconds have passed.

    Parameters
    ----------
    test : callable returning bool
        The completion test, e.g. ``request.Test`` of an ``Iallreduce``; it
        must make progress on the operation it tests (MPI's does).
    timeout : float or None
        Seconds to wait; None waits forever.
    clock, sleep, yield_
        Time sources (for tests).

    Returns
    -------
    float or None
        None when ``test`` returned True; the seconds waited when the
        deadline passed first.
    """
    if test():
        return None
    start = clock()
    waited = 0.0
    # Test, then yield the core: nothing else runnable, the yield returns at
    # once (a healthy wait costs what the blocking call does); more ranks
    # than cores, it lets the late ranks run. A pure spin starved them: 4
    # ranks on 2 cores took 5 ms per allreduce instead of 15 µs.
    while waited < YIELD_SECONDS:
        if timeout is not None and waited >= timeout:
            return waited
        yield_()
        if test():
            return None
        waited = clock() - start
    while True:
        if timeout is not None and waited >= timeout:
            return waited
        sleep(min(MAX_SLEEP_SECONDS, waited * SLEEP_FRACTION))
        if test():
            return None
        waited = clock() - start


def wait_or_end(
    test: Callable[[], bool], timeout: float | None, end: Callable[[float], NoReturn]
) -> None:
    """Poll ``test`` (:func:`wait_for`) until it returns True; past ``timeout``
    call ``end`` with the seconds waited.

    ``end`` must not return: a collective that a rank skipped never
    completes, and neither MPI nor ``torch.distributed`` can cancel it.
    """
    waited = wait_for(test, timeout)
    if waited is not None:
        end(waited)


def report_timeout(who: str, waited: float, ending: str, timeout: float | None) -> None:
    """Write on stderr that ``who`` waited ``waited`` s in the active SyncBN call.

    ``ending`` says what happens next (``aborting the MPI job``). stdout is
    flushed first and stderr after, as the process is about to end without
    Python's own flushing.
    """
    sys.stdout.flush()
    sys.stderr.write(
        f"arraysyncbn: {who} waited {waited:.1f} s in {describe_active()} and not "
        "every rank joined it (a rank skipped this call, e.g. in eval mode or "
        f"one step short, or is stuck elsewhere); {ending}; {timeout_advice(timeout)}\n"
    )
    sys.stderr.flush()
