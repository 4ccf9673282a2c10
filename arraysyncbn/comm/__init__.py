"""Communicators: how ranks sum the packed SyncBN buffer.

See :class:`~arraysyncbn.comm.base.Communicator` for the protocol,
:mod:`~arraysyncbn.comm.mpi` for MPI (mpi4py is imported only when an
:class:`MPICommunicator` is constructed).
"""

from .base import Communicator, ReduceOp, SelfCommunicator, as_communicator
from .mpi import MPICommunicator
from .threads import ThreadCommunicator, ThreadGroup, run_ranks, thread_group

__all__ = [
    "Communicator",
    "MPICommunicator",
    "ReduceOp",
    "SelfCommunicator",
    "ThreadCommunicator",
    "ThreadGroup",
    "as_communicator",
    "run_ranks",
    "thread_group",
]
