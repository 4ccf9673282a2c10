"""arraysyncbn: synchronized batch normalization on any array-API library.

SyncBN normalizes each channel with the statistics of the global batch, the
union of every rank's local batch. The kernels are written once against the
Python array API standard (numpy, cupy, torch, array-api-strict, ...), with
fused numba kernels for host memory; ranks communicate through one packed
allreduce per pass in the steady state (one to three more statistics
allreduces on a step whose reduced values show the merge lost precision, and
a small consistency check on a layer's first call).

Public API
----------
SyncBatchNorm
    The layer (parameters, running statistics, train/eval, state_dict).
sync_batch_norm_forward, sync_batch_norm_backward
    The functional form.
batch_norm_inference
    Eval mode alone (running statistics, no communication, no backward
    record): the forward's values with less work around the kernel.
Communicator, SelfCommunicator, thread_group, run_ranks
    Groups of ranks; ``comm=None`` is a world of one.
MPICommunicator
    Ranks of an MPI job (wraps an mpi4py communicator; mpi4py is imported
    when one is constructed). ``python -m arraysyncbn`` runs the check and
    benchmark job, under ``mpiexec`` or alone.
TorchDistributedCommunicator
    Ranks of a ``torch.distributed`` process group (torch is imported when
    one is constructed).
arraysyncbn.torch
    The PyTorch module (``SyncBatchNorm``, a ``torch.nn.SyncBatchNorm``
    drop-in), ``convert_sync_batchnorm`` and ``revert_sync_batchnorm``;
    importing it imports torch, ``import arraysyncbn`` does not.
arraysyncbn.testing
    Float64 reference, hypothesis strategies and assertions.
"""

from .comm import (
    Communicator,
    MPICommunicator,
    SelfCommunicator,
    ThreadCommunicator,
    TorchDistributedCommunicator,
    run_ranks,
    thread_group,
)
from .errors import CollectiveMismatchError, CommunicatorAbortedError, NoForwardError
from .functional import (
    NonFiniteWarning,
    PrecisionWarning,
    SavedForBackward,
    batch_norm_inference,
    check_consistency,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
)
from .layer import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "CollectiveMismatchError",
    "Communicator",
    "CommunicatorAbortedError",
    "MPICommunicator",
    "NoForwardError",
    "NonFiniteWarning",
    "PrecisionWarning",
    "SavedForBackward",
    "SelfCommunicator",
    "SyncBatchNorm",
    "ThreadCommunicator",
    "TorchDistributedCommunicator",
    "__version__",
    "batch_norm_inference",
    "check_consistency",
    "run_ranks",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
    "thread_group",
]
