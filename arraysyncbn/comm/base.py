"""The :class:`Communicator` protocol and the world of one.

A communicator sums (or takes the maximum of) one 1-D array across the ranks
of a group. SyncBN calls it once per pass (in the steady state) with
everything packed into that array, which is why the protocol has a single
method. The array lives in the caller's namespace and on the caller's
device; a communicator returns the result there too, moving bytes however it
must (a thread group adds arrays in place, MPI passes device buffers or
stages through the host).

Contract every implementation must keep: the reduced array is **bitwise
identical on every rank**. SyncBN takes decisions (skip an empty batch, raise
on a single-sample batch) and updates running statistics from reduced values;
ranks that saw different bits could take different branches and deadlock, or
drift apart. :func:`~arraysyncbn.thread_group` sums in rank order on every
rank; MPICH's ``Allreduce`` gives identical results on every rank in practice.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, Protocol, runtime_checkable

import array_api_compat
import numpy as np

__all__ = [
    "Communicator",
    "ReduceOp",
    "SelfCommunicator",
    "as_communicator",
    "check_allreduce_args",
    "host_values",
]

ReduceOp = Literal["sum", "max"]


@runtime_checkable
class Communicator(Protocol):
    """What SyncBN needs from a group of ranks.

    Attributes
    ----------
    rank : int
        This rank's index in ``range(size)``.
    size : int
        Number of ranks in the group.
    """

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def allreduce(self, buf: Any, op: ReduceOp = "sum") -> Any:
        """Return the elementwise ``op`` of ``buf`` over all ranks.

        ``buf`` is a 1-D array of a real floating dtype, of the same length,
        dtype and namespace on every rank. The result has ``buf``'s
        namespace, device, dtype and shape; ``buf`` itself may be reused as
        the result or left untouched, never partly written.
        """
        ...


class SelfCommunicator:
    """The world of one: every reduction returns its input."""

    rank = 0
    size = 1

    def allreduce(self, buf: Any, op: ReduceOp = "sum") -> Any:
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduction op {op!r}; expected 'sum' or 'max'")
        return buf

    def __repr__(self) -> str:
        return "SelfCommunicator()"


def as_communicator(comm: Any) -> Communicator:
    """Return ``comm``, or the world of one for None; reject anything else."""
    if comm is None:
        return _WORLD_OF_ONE
    if type(comm) in _CHECKED:
        if not _integral_rank_and_size(comm):  # per instance: cheap, unlike the protocol's
            raise TypeError(_NOT_A_COMMUNICATOR.format(type(comm).__name__))
        return comm  # type: ignore[no-any-return]
    library = type(comm).__module__.partition(".")[0]
    if library in _WRAPPERS:
        # mpi4py's and torch.distributed's own groups have a rank, a size and
        # an allreduce, but not this protocol's: an object allreduce (mpi4py)
        # or a work handle (torch) instead of the reduced array. Accepted,
        # they failed on one rank and left the others waiting.
        raise TypeError(
            f"comm is a raw {library} group ({type(comm).__module__}.{type(comm).__name__}), "
            f"not an arraysyncbn communicator: wrap it once, {_WRAPPERS[library]}, and "
            "pass that to every layer"
        )
    if not isinstance(comm, Communicator) or not _integral_rank_and_size(comm):
        raise TypeError(_NOT_A_COMMUNICATOR.format(type(comm).__name__))
    _CHECKED.add(type(comm))
    return comm


_NOT_A_COMMUNICATOR = (
    "comm must provide rank and size (integers) and allreduce(buf, op) (the "
    "arraysyncbn.Communicator protocol), got {}; wrap an mpi4py communicator with "
    "arraysyncbn.MPICommunicator"
)


def _integral_rank_and_size(comm: Any) -> bool:
    """Whether ``comm.rank`` and ``comm.size`` are integers (numpy's too), not
    methods (torch.distributed's spelling) or strings."""
    rank, size = comm.rank, comm.size
    if type(rank) is int and type(size) is int:  # the common case, asked every call
        return True
    return (
        isinstance(rank, numbers.Integral)
        and isinstance(size, numbers.Integral)
        and not isinstance(rank, bool)
        and not isinstance(size, bool)
    )


_WRAPPERS = {
    "mpi4py": "comm=arraysyncbn.MPICommunicator(mpi_comm)",
    "torch": "comm=arraysyncbn.TorchDistributedCommunicator(group) (or, for "
    "arraysyncbn.torch.SyncBatchNorm, process_group=group)",
}
"""Libraries whose group objects look like communicators but are not, and what
wraps them."""


# Classes whose instances passed the protocol check: isinstance against a
# runtime-checkable Protocol inspects every member (~10 µs), and layers ask
# on every call.
_CHECKED: set[type] = {SelfCommunicator}

_WORLD_OF_ONE = SelfCommunicator()
"""The one world of one (stateless): a fresh one per call would cost the
per-communicator call count a weak reference made and dropped every call."""


_REDUCE_OPS = frozenset({"sum", "max"})


def check_allreduce_args(buf: Any, op: Any) -> None:
    """Raise ValueError unless ``op`` is a known reduction and ``buf`` a 1-D array.

    For communicators that hand ``buf`` to a library (MPI, ``torch.distributed``),
    whose own errors would not say what was wrong.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduction op {op!r}; expected 'sum' or 'max'")
    if not array_api_compat.is_array_api_obj(buf) or buf.ndim != 1:
        raise ValueError(
            f"allreduce takes a 1-D array, got {type(buf).__name__} of shape "
            f"{tuple(getattr(buf, 'shape', ()))}"
        )


def host_values(array: Any) -> np.ndarray:
    """``array``'s values as a numpy array: itself if it is one, else a host
    copy made in one transfer (synchronizing as the copy does). Not to be
    written into: for a torch CPU tensor it is a view."""
    if isinstance(array, np.ndarray):
        return array
    library = type(array).__module__.split(".")[0]
    if library == "cupy":
        return array.get()  # type: ignore[no-any-return]
    if library == "torch":
        return array.detach().cpu().numpy()  # type: ignore[no-any-return]
    return np.from_dlpack(array, device="cpu", copy=True)
