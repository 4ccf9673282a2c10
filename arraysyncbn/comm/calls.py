"""Which SyncBN call a collective belongs to: its label, and its signature.

A communicator only sees ``allreduce(buf, op)``. :mod:`arraysyncbn.functional`
therefore labels each of its collectives with a :class:`CallLabel` (which
layer, which of its batch-statistics calls, which pass) and uses the label
twice:

* for messages: :func:`current_call` makes it the label :func:`active_call`
  returns while the collective runs, so a watchdog that gives up can say
  *which* SyncBN call it waited in;
* as a signature: :func:`signature_values` turns the label's 20-bit
  :attr:`CallLabel.code` into a few values appended to the collective's own
  buffer (no extra collective), and :func:`signature_mismatch` tells from the
  reduced values, exactly and alike on every rank, whether every rank was in
  the same call. Ranks in different calls (swapped layers, a skipped
  backward, a rank one step behind) then raise
  :class:`~arraysyncbn.CollectiveMismatchError` instead of mixing statistics.

For a sum, each rank contributes ``v`` and ``v²`` per digit ``v`` of the code:
by Cauchy–Schwarz, ``size·Σv² = (Σv)²`` holds iff every rank's ``v`` is the
same, and both sides are exact integers as long as ``size·v²`` fits the
buffer's significand (digits of 20 bits for float64 buffers; fewer, and more
digits, for float32 buffers, which hold integers exactly only below 2²⁴).
For a max (the consistency check), each rank contributes ``v`` and ``−v``:
every rank agrees iff ``max v = −max(−v)``.

Numbers: :func:`next_call` counts the calls of the functional API on each
communicator (every rank calls the same collectives in the same order, so
every rank counts alike; eval-mode calls that communicate nothing are not
counted). A :class:`~arraysyncbn.SyncBatchNorm` numbers itself by the order
of its *first communicating call* on its communicator (:func:`next_layer`),
not by construction, so a model built on one rank only (an evaluation copy)
does not shift the numbers, and counts its own batch-statistics calls. The
label lives in a :class:`contextvars.ContextVar`, so ranks that run as
threads of one process (:func:`~arraysyncbn.thread_group`) each see their own.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CODE_BITS",
    "CallLabel",
    "Pass",
    "active_call",
    "current_call",
    "describe_active",
    "next_call",
    "next_layer",
    "signature_mismatch",
    "signature_values",
]

Pass = Literal["forward", "backward", "check", "recenter"]
"""The collective's part of a step: the forward statistics, the backward
sums, the consistency check of :func:`~arraysyncbn.check_consistency`, or
the further statistics passes around the reduced mean (``recenter``)."""

_PASSES: tuple[str, ...] = ("forward", "backward", "check", "recenter")
_PASS_INDEX = {p: i for i, p in enumerate(_PASSES)}

CODE_BITS = 20
"""Bits of :attr:`CallLabel.code`: 2 for the pass, 6 for the layer, 12 for the call."""
_LAYER_BITS, _CALL_BITS = 6, 12
_LAYER_MOD = (1 << _LAYER_BITS) - 1  # layer field 0 is the functional API
_CALL_MOD = 1 << _CALL_BITS


@dataclass(frozen=True)
class CallLabel:
    """One SyncBN collective, as a message names it.

    Attributes
    ----------
    pass_ : {"forward", "backward", "check", "recenter"}
        Which part of a step the collective belongs to.
    call : int or None
        1-based number of the step: of the layer's batch-statistics calls
        (``layer`` given) or of the functional API's on the communicator;
        a backward, check or further pass carries the number of its forward.
        None when the communicator could not be counted (it cannot be
        weakly referenced).
    layer : int or None
        The layer's number on its communicator; None for the functional API.

    Examples
    --------
    >>> CallLabel("forward", 7, layer=2).describe()
    'SyncBatchNorm layer 2, call 7, forward'
    >>> CallLabel("backward", 3).describe()
    'SyncBN call 3, backward (functional API, no layer number)'
    >>> CallLabel.from_code(CallLabel("forward", 7, layer=2).code)
    CallLabel(pass_='forward', call=7, layer=2)
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

    @classmethod
    def _trusted(cls, pass_: str, call: int | None, layer: int | None) -> CallLabel:
        """A label from values already known valid, without re-checking them:
        one is made for every collective, so the check's cost counts."""
        label = object.__new__(cls)
        # The frozen dataclass's fields, written as its __init__ would.
        label.__dict__.update(pass_=pass_, call=call, layer=layer)
        return label

    @property
    def code(self) -> int:
        """The call as an integer below ``2**CODE_BITS``, for the signature.

        Layer numbers are taken modulo 63 (1..63; 0 is the functional API)
        and call numbers modulo 4096: calls that differ by less than that
        in both always have different codes.
        """
        # Computed on first use and kept (a world of one never signs), not a
        # field, so equality and hashing stay those of (pass_, call, layer).
        code: int | None = self.__dict__.get("_code")
        if code is None:
            code = self.__dict__["_code"] = _code_of(self.pass_, self.call, self.layer)
        return code

    @classmethod
    def from_code(cls, code: int) -> CallLabel:
        """The label a :attr:`code` stands for (numbers as their residues)."""
        layer = (code >> 2) & ((1 << _LAYER_BITS) - 1)
        call = (code >> (_LAYER_BITS + 2)) + 1
        return cls(_PASSES[code & 3], call, layer or None)  # type: ignore[arg-type]

    def with_pass(self, pass_: Pass) -> CallLabel:
        """This call's label for another of its passes."""
        if pass_ not in _PASS_INDEX:
            raise ValueError(f"pass_ must be one of {_PASSES}, got {pass_!r}")
        return CallLabel._trusted(pass_, self.call, self.layer)

    def describe(self) -> str:
        """Return the label as a message names the call."""
        call = "call ?" if self.call is None else f"call {self.call}"
        if self.layer is None:
            return f"SyncBN {call}, {self.pass_} (functional API, no layer number)"
        return f"SyncBatchNorm layer {self.layer}, {call}, {self.pass_}"


def _code_of(pass_: str, call: int | None, layer: int | None) -> int:
    field = 0 if layer is None else (layer - 1) % _LAYER_MOD + 1
    number = 0 if call is None else (call - 1) % _CALL_MOD
    return (number << (_LAYER_BITS + 2)) | (field << 2) | _PASS_INDEX[pass_]


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
    if layer is None:  # the count is a positive int: nothing to check
        return CallLabel._trusted(pass_, number, None)
    return CallLabel(pass_, number, layer)


_layers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def next_layer(comm: Any) -> int | None:
    """Number one more layer on ``comm`` (1-based); None if ``comm`` cannot
    be counted. Call it at a layer's first communicating call, on every rank."""
    try:
        with _counts_lock:
            _layers[comm] = number = _layers.get(comm, 0) + 1
    except TypeError:
        return None
    return number


@functools.lru_cache(maxsize=256)
def _digit_bits(exact_bits: int, size: int) -> int:
    """Bits per digit so that ``size·(2**bits − 1)²`` is an exact integer."""
    return max(1, min(CODE_BITS, (exact_bits - size.bit_length()) // 2))


def _digits(code: int, bits: int) -> list[int]:
    mask = (1 << bits) - 1
    return [(code >> shift) & mask for shift in range(0, CODE_BITS, bits)]


def signature_values(label: CallLabel, op: str, exact_bits: int, size: int) -> tuple[float, ...]:
    """The values a rank appends to a collective's buffer for ``label``.

    ``op`` is the collective's reduction ("sum" or "max"), ``exact_bits`` the
    significand of the buffer's dtype (53 for float64, 24 for float32) and
    ``size`` the number of ranks. Their number depends only on these, so it
    is the same on every rank.
    """
    if op == "max":
        code = float(label.code)  # below 2**20: exact in float32 too
        return (code, -code)
    bits = _digit_bits(exact_bits, size)
    if bits == CODE_BITS:
        v = float(label.code)
        return (v, v * v)
    out: list[float] = []
    for d in _digits(label.code, bits):
        out += [float(d), float(d * d)]
    return tuple(out)


def signature_mismatch(
    label: CallLabel, op: str, reduced: list[float], exact_bits: int, size: int, rank: int
) -> str | None:
    """None if every rank was in ``label``'s call, else a message naming it.

    ``reduced`` are the reduced values of :func:`signature_values`; the
    verdict is exact integer arithmetic on them, the same on every rank.
    """
    mine = label.code
    if (
        op == "sum"
        and len(reduced) == 2
        and reduced[0] == size * mine
        and reduced[1] == size * mine * mine
    ):
        # The common case, one exact digit: Σv = size·v and Σv² = size·v²
        # give size·Σv² = (Σv)², so every rank's v is this rank's.
        return None
    others: int | None = None
    if op == "max":
        high, low = int(reduced[0]), -int(reduced[1])
        if high == low == mine:
            return None
        others = high if high != mine else low
        seen = "another rank is in " + CallLabel.from_code(others).describe()
    else:
        bits = _digit_bits(exact_bits, size)
        agree, other = True, 0
        for i, d in enumerate(_digits(mine, bits)):
            total, squares = int(reduced[2 * i]), int(reduced[2 * i + 1])
            agree = agree and size * squares == total * total and total == size * d
            other |= (total - d) << (i * bits)
        if agree:
            return None
        if size == 2 and 0 <= other < (1 << CODE_BITS):
            seen = "the other rank is in " + CallLabel.from_code(other).describe()
        else:
            seen = "not every rank is in that call"
    return (
        f"ranks are in different SyncBN calls: rank {rank} is in {label.describe()}; {seen} "
        "(layer numbers as residues modulo 63, call numbers modulo 4096). Statistics of "
        "different calls must not be mixed: every rank must make the same SyncBN calls in "
        "the same order (the same layers, and a backward for each training forward)"
    )


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
