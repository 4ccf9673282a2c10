"""Communicators: how ranks sum the packed SyncBN buffer.

See :class:`~arraysyncbn.comm.base.Communicator` for the protocol,
:mod:`~arraysyncbn.comm.mpi` for MPI (mpi4py is imported only when an
:class:`MPICommunicator` is constructed), :mod:`~arraysyncbn.comm.torch_dist`
for ``torch.distributed`` process groups (torch is imported only when a
:class:`TorchDistributedCommunicator` is constructed), :mod:`~arraysyncbn.comm.watchdog`
for the deadline of every wait (``ARRAYSYNCBN_TIMEOUT``) and
:mod:`~arraysyncbn.comm.calls` for the labels that name the SyncBN call a
timed-out wait was in.
"""

from .base import Communicator, ReduceOp, SelfCommunicator, as_communicator
from .calls import CallLabel, active_call, current_call, next_call
from .mpi import MPICommunicator
from .threads import ThreadCommunicator, ThreadGroup, run_ranks, thread_group
from .torch_dist import TorchDistributedCommunicator

__all__ = [
    "CallLabel",
    "Communicator",
    "MPICommunicator",
    "ReduceOp",
    "SelfCommunicator",
    "ThreadCommunicator",
    "ThreadGroup",
    "TorchDistributedCommunicator",
    "active_call",
    "as_communicator",
    "current_call",
    "next_call",
    "run_ranks",
    "thread_group",
]
