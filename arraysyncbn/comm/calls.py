"""Which SyncBN call a collective belongs to, for messages about a wait.

A communicator only sees ``allreduce(buf, op)``; when a wait expires it must
still say *which* SyncBN call it was waiting in, so that a user can find the
rank that skipped it. :mod:`arraysyncbn.functional` therefore wraps each of
its collectives in::

    with current_call(next_call(comm, "forward")):
        buf = comm.allreduce(packed)

:func:`next_call` counts the calls of each pass on each communicator (every
rank calls the same collectives in the same order, so every rank counts
alike) and returns a :class:`CallLabel`; :func:`current_call` makes it the
label :func:`active_call` returns while the collective runs. The label lives
in a :class:`contextvars.ContextVar`, so ranks that run as threads of one
process (:func:`~arraysyncbn.thread_group`) each see their own.

A label is only for messages: nothing here changes which collectives run.
Layer numbers (the order of a layer's first communicating call on its
communicator) are left to the caller; ``layer=None`` describes a call of the
functional API.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CallLabel", "Pass", "active_call", "current_call", "describe_active", "next_call"]

Pass = Literal["forward", "backward", "check"]
"""The collective's part of a step: the forward statistics, the backward
sums, or the consistency check of :func:`~arraysyncbn.check_consistency`."""

_PASSES: tuple[str, ...] = ("forward", "backward", "check")


@dataclass(frozen=True)
class CallLabel:
    """One SyncBN collective, as a message names it.

    Attributes
    ----------
    pass_ : {"forward", "backward", "check"}
        Which part of a step the collective belongs to.
    call : int or None
        1-based number of this call among the calls of the same pass on the
        same communicator (of the same layer, once ``layer`` is known); None
        when the communicator could not be counted (it cannot be weakly
        referenced).
    layer : int or None
        The layer's number on its communicator; None for the functional API.

    Examples
    --------
    >>> CallLabel("forward", 7, layer=2).describe()
    'SyncBatchNorm layer 2, call 7, forward'
    >>> CallLabel("backward", 3).describe()
    'SyncBN call 3, backward (functional API, no layer number)'
    """

    pass_: Pass
    call: int | None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.pass_ not in _PASSES:
            raise ValueError(f"pass_ must be one of {_PASSES}, got {self.pass_!r}")
        for name in ("call", "layer"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    def describe(self) -> str:
        """Return the label as a message names the call."""
        call = "call ?" if self.call is None else f"call {self.call}"
        if self.layer is None:
            return f"SyncBN {call}, {self.pass_} (functional API, no layer number)"
        return f"SyncBatchNorm layer {self.layer}, {call}, {self.pass_}"


_active: contextvars.ContextVar[CallLabel | None] = contextvars.ContextVar(
    "arraysyncbn_active_call", default=None
)

# Per communicator, the number of calls of each pass so far. Weak keys: a
# communicator that is dropped takes its counts with it. One lock for all,
# since the ranks of a thread group count (different keys) from several
# threads at once.
_counts: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
_counts_lock = threading.Lock()


def next_call(comm: Any, pass_: Pass, *, layer: int | None = None) -> CallLabel:
    """Count one more ``pass_`` call on ``comm``; return its label.

    Call it on every rank exactly where the collective is made (every rank
    then counts alike). Communicators that cannot be weakly referenced or
    hashed are not counted: their label has ``call=None``.
    """
    if pass_ not in _PASSES:
        raise ValueError(f"pass_ must be one of {_PASSES}, got {pass_!r}")
    try:
        with _counts_lock:
            counts = _counts.setdefault(comm, {})
            counts[pass_] = number = counts.get(pass_, 0) + 1
    except TypeError:
        return CallLabel(pass_, None, layer)
    return CallLabel(pass_, number, layer)


class current_call:  # lowercase: used like a function, ``with current_call(label):``
    """Make ``label`` the :func:`active_call` of this thread while the block runs.

    A class rather than a generator-based context manager: it runs around
    every SyncBN collective, and this costs half as much.
    """

    __slots__ = ("_label", "_token")

    def __init__(self, label: CallLabel) -> None:
        if not isinstance(label, CallLabel):
            raise TypeError(f"label must be a CallLabel, got {type(label).__name__}")
        self._label = label
        self._token: contextvars.Token[CallLabel | None] | None = None

    def __enter__(self) -> CallLabel:
        self._token = _active.set(self._label)
        return self._label

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _active.reset(self._token)
            self._token = None


def active_call() -> CallLabel | None:
    """Return the label of the SyncBN call this thread is in, or None outside one."""
    return _active.get()


def describe_active() -> str:
    """Return :meth:`CallLabel.describe` of the active call, or say there is none."""
    label = _active.get()
    return "an allreduce outside any SyncBN call" if label is None else label.describe()
