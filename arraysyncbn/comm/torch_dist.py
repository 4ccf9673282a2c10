"""SyncBN over ``torch.distributed``: the packed buffer through a process group.

:class:`TorchDistributedCommunicator` implements the
:class:`~arraysyncbn.comm.base.Communicator` protocol with one
``torch.distributed.all_reduce`` per call, on any process group (the default
one, or one from ``new_group``), so SyncBN shares the job's existing
``torchrun``/``init_process_group`` setup; it is what
``arraysyncbn.torch.SyncBatchNorm(process_group=...)`` builds.

Where the reduction runs: on the buffer's own CUDA device when the group's
backend handles CUDA tensors (NCCL, or a ``cpu:gloo,cuda:nccl`` group); on
the host for CPU buffers when it handles CPU tensors (gloo); a buffer the
backend cannot take is staged (a CPU buffer goes to the current CUDA device
of an NCCL-only group and comes back). Any array library works: numpy
arrays and other libraries' buffers are copied into a torch tensor and the
result returned in the buffer's library. SyncBN's packed buffers are float64
(float32 only where a device has no float64), which gloo and NCCL reduce.
``buf`` is never modified: ``all_reduce`` works in place on a copy.

Contract inherited from the protocol: the reduced buffer must be **bitwise
identical on every rank**. gloo's and NCCL's allreduce algorithms (ring,
reduce-scatter then allgather, trees that reduce up and broadcast down) give
each element one reduction that every rank then receives, so ranks get
identical bits, which the tests check for gloo; they do not promise it.

Deadlines: every wait goes through the same watchdog as
:class:`~arraysyncbn.MPICommunicator` (:mod:`~arraysyncbn.comm.watchdog`,
``ARRAYSYNCBN_TIMEOUT`` seconds, default 600, or ``timeout=``): the
allreduce is started with ``async_op=True`` and its ``Work`` is polled
(``is_completed``), yielding the core between tests at first. When the deadline passes, the rank
prints which SyncBN call it waited in and ends its process with exit status
1 (``os._exit``: the pending collective cannot be cancelled, and a clean
interpreter exit would wait on it); ``torchrun`` then stops the other
workers. ``ARRAYSYNCBN_TIMEOUT=0`` (``timeout=0``) waits in a blocking
``all_reduce`` instead, and only the process group's own timeout
(``init_process_group(timeout=...)``, 30 minutes by default for gloo; NCCL's
needs its watchdog or ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) ends a wait for a
rank that never comes. What the watchdog cannot cover: a backend whose
``Work`` cannot be polled (it is then waited on blockingly, under the
process group's timeout), and a rank stuck in another collective of the same
group, which the group's timeout reports.

torch is imported when a communicator is constructed, not when this module
is, so ``import arraysyncbn`` works without it.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import array_api_compat
import numpy as np

from .base import ReduceOp, check_allreduce_args, host_values
from .watchdog import report_timeout, resolve_timeout, wait_or_end

__all__ = ["TorchDistributedCommunicator"]


def _backend_devices(backend: str) -> set[str]:
    """Device types a process group's backend string reduces on.

    ``"gloo"`` → {"cpu"}; ``"nccl"`` → {"cuda"}; ``"cpu:gloo,cuda:nccl"`` →
    both; other backends (mpi, ucc, custom ones) are assumed to take both.

    Examples
    --------
    >>> sorted(_backend_devices("cpu:gloo,cuda:nccl"))
    ['cpu', 'cuda']
    >>> sorted(_backend_devices("nccl"))
    ['cuda']
    """
    text = backend.lower()
    if ":" in text:
        return {part.split(":", 1)[0].strip() for part in text.split(",") if ":" in part}
    if text == "gloo":
        return {"cpu"}
    if text == "nccl":
        return {"cuda"}
    return {"cpu", "cuda"}


class TorchDistributedCommunicator:
    """A :class:`~arraysyncbn.Communicator` over a ``torch.distributed`` process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None
        The ranks to synchronize over; None is the default (world) group.
        ``torch.distributed`` must be initialized (``init_process_group``,
        as ``torchrun`` scripts do).
    timeout : float or None
        Seconds a collective may wait before this process exits; ``0`` waits
        forever (under the process group's own timeout); None (default) reads
        ``ARRAYSYNCBN_TIMEOUT`` (unset: 600).

    Attributes
    ----------
    group : ProcessGroup or None
        The wrapped group.
    backend : str
        The group's backend (``"gloo"``, ``"nccl"``, ...).
    timeout : float or None
        The wait limit in seconds; None waits forever.

    Raises
    ------
    ImportError
        torch is not installed.
    RuntimeError
        ``torch.distributed`` is unavailable or not initialized, or this
        process is not a member of ``group``.

    Examples
    --------
    In a script run by ``torchrun --nproc-per-node 2``::

        import torch.distributed as dist
        from arraysyncbn import TorchDistributedCommunicator
        from arraysyncbn.torch import convert_sync_batchnorm

        dist.init_process_group("gloo")
        model = convert_sync_batchnorm(model, comm=TorchDistributedCommunicator())
    """

    def __init__(self, group: Any = None, *, timeout: float | None = None) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:
            raise ImportError(
                "TorchDistributedCommunicator needs PyTorch: pip install 'arraysyncbn[torch]'"
            ) from exc
        if not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed")
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) first (torchrun sets up its "
                "environment)"
            )
        self._torch, self._dist = torch, dist
        self.group = group
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError("this process is not a member of the given process group")
        self._rank = int(rank)
        self._size = int(dist.get_world_size(group))
        self.backend = str(dist.get_backend(group))
        self._devices = _backend_devices(self.backend)
        self._timeout = resolve_timeout(timeout)
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def timeout(self) -> float | None:
        """Seconds a collective waits before this process exits; None: forever."""
        return self._timeout

    def _work_device(self, buf: Any) -> Any:
        """The torch device the reduction runs on for ``buf``."""
        torch = self._torch
        if isinstance(buf, torch.Tensor) and buf.device.type in self._devices:
            return buf.device
        if "cpu" in self._devices:
            return torch.device("cpu")
        if "cuda" in self._devices:
            return torch.device("cuda", torch.cuda.current_device())
        raise RuntimeError(f"the {self.backend!r} backend reduces neither CPU nor CUDA tensors")

    def allreduce(self, buf: Any, op: ReduceOp = "sum") -> Any:
        """Return the elementwise ``op`` of ``buf`` over the group (one ``all_reduce``).

        ``buf`` is a 1-D floating array of any library; the result is a new
        array in ``buf``'s library, on its device, with its dtype. ``buf`` is
        not modified. Ends the process when the wait outlasts :attr:`timeout`.
        """
        check_allreduce_args(buf, op)
        torch = self._torch
        is_tensor = isinstance(buf, torch.Tensor)
        source = buf.detach() if is_tensor else torch.from_numpy(np.array(host_values(buf)))
        work = source.to(self._work_device(source), copy=True).contiguous()
        self._reduce(work, self._ops[op])
        if is_tensor:
            return work.to(buf.device)
        result = work.cpu().numpy()
        if isinstance(buf, np.ndarray):
            return result
        xp = array_api_compat.array_namespace(buf)
        return xp.asarray(result, device=array_api_compat.device(buf))

    def _reduce(self, tensor: Any, op: Any) -> None:
        """All-reduce ``tensor`` in place; exit the process past the deadline."""
        dist = self._dist
        if self._timeout is None:
            dist.all_reduce(tensor, op=op, group=self.group)
            return
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        is_completed = getattr(work, "is_completed", None)
        if is_completed is None:  # a backend without polling: its own timeout applies
            work.wait()
            return
        wait_or_end(is_completed, self._timeout, self._abort_after)
        # Completion seen by polling; wait() still raises a backend error and,
        # for CUDA, orders the current stream after the collective.
        work.wait()

    def _abort_after(self, waited: float) -> NoReturn:
        """Say which call this rank waited in, then end this process."""
        who = f"rank {self._rank} of {self._size} (torch.distributed, {self.backend})"
        report_timeout(who, waited, "exiting this process", self._timeout)
        os._exit(1)

    def __repr__(self) -> str:
        return (
            f"TorchDistributedCommunicator(backend={self.backend!r}, rank={self._rank}, "
            f"size={self._size}, timeout={self._timeout})"
        )
