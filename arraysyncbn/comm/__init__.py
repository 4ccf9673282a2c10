"""Communicators: how ranks sum the packed SyncBN buffer.

See :class:`~arraysyncbn.comm.base.Communicator` for the protocol.
"""

from .base import Communicator, ReduceOp, SelfCommunicator, as_communicator
from .threads import ThreadCommunicator, ThreadGroup, run_ranks, thread_group

__all__ = [
    "Communicator",
    "ReduceOp",
    "SelfCommunicator",
    "ThreadCommunicator",
    "ThreadGroup",
    "as_communicator",
    "run_ranks",
    "thread_group",
]
