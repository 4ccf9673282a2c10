"""Exceptions raised by arraysyncbn.

Wrong types raise :class:`TypeError`, wrong values or shapes
:class:`ValueError`; the classes here cover what the builtins do not say.
"""

from __future__ import annotations

__all__ = [
    "CollectiveMismatchError",
    "CommunicatorAbortedError",
    "NoForwardError",
]


class NoForwardError(RuntimeError):
    """``backward`` was called with no forward to differentiate."""


class CollectiveMismatchError(RuntimeError):
    """Ranks disagree on something they must share (channels, dtype, axis).

    Raised on every rank of the communicator, so that none is left waiting.
    """


class CommunicatorAbortedError(RuntimeError):
    """A collective could not complete: a peer failed, aborted or timed out."""
