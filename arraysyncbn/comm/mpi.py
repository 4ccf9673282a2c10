"""SyncBN over MPI: an mpi4py communicator that moves host and device buffers.

:class:`MPICommunicator` wraps any mpi4py intracommunicator (``COMM_WORLD`` by
default, or a ``Split`` of it for SyncBN over a subgroup, like PyTorch's
``process_group``) and implements the
:class:`~arraysyncbn.comm.base.Communicator` protocol with one buffer-based
allreduce per call (``Iallreduce`` waited with a deadline, see below); the
pickling lowercase ``allreduce`` is never used.
The MPI datatype follows the buffer's dtype (float32 → ``MPI.FLOAT``,
float64 → ``MPI.DOUBLE``).

How bytes reach MPI is decided per call by :func:`transfer_path`, a pure
function of the array and of :attr:`MPICommunicator.cuda_aware`:

* ``"direct"``: MPI reads the array's own memory. Host memory (numpy, torch
  CPU tensors, array-api-strict's default device) always goes this way; CUDA
  memory (cupy, torch CUDA) does when the MPI library is CUDA-aware, after
  the producing stream has been synchronized (mpi4py does not synchronize).
* ``"staged"``: the buffer is copied to a numpy host array, reduced there,
  and the result copied back to the array's device with the array's own
  namespace. CUDA memory takes this path when MPI is not CUDA-aware, and so
  does every device this module cannot prove MPI can read (array-api-strict's
  ``Device("device1")`` stands in for such a device in the tests).

Both paths start exactly one allreduce per :meth:`MPICommunicator.allreduce`,
so the choice (which may differ between ranks, e.g. a forced
``ARRAYSYNCBN_CUDA_AWARE`` on one node) never changes which collectives a
rank calls. (SyncBN makes one per forward and one per backward, plus the
first forward's consistency check, or one on every call with
``ARRAYSYNCBN_CHECK=1``, and one to three more statistics allreduces on a
step whose merge lost precision.)

Every wait has a deadline (:mod:`~arraysyncbn.comm.watchdog`): the allreduce
is a nonblocking ``Iallreduce`` whose request is polled (yielding the
core between tests), so a healthy wait costs no more than a blocking
``Allreduce``. When
``ARRAYSYNCBN_TIMEOUT`` seconds (default 600) pass, the rank prints which
SyncBN call it waited in (:mod:`~arraysyncbn.comm.calls`) and how long, and
calls ``MPI.COMM_WORLD.Abort(1)``: a rank that skipped the call would
otherwise leave this one waiting forever. ``ARRAYSYNCBN_TIMEOUT=0`` waits
forever in a blocking ``Allreduce``, as before the watchdog.

CUDA-awareness is detected from the MPI-4.1 info key
``mpi_memory_alloc_kinds`` of the communicator (it lists ``cuda`` when MPI
accepts CUDA memory; MPICH 5 without CUDA reports ``mpi,system``). The
environment variable ``ARRAYSYNCBN_CUDA_AWARE`` overrides it: ``auto``
(default) detects, ``1`` forces device buffers straight to MPI (only correct
for a CUDA-aware MPI whose info key is missing), ``0`` forces staging.

Contract inherited from the protocol: the reduced buffer must be **bitwise
identical on every rank**, since SyncBN takes branches and updates running
statistics from it. The MPI standard only advises implementations to give
that; MPICH's ``Allreduce`` algorithms (recursive doubling, reduce-scatter
plus allgather) combine the same operands in the same grouping on every rank
and give identical bits in practice, which ``tests/test_mpi.py`` checks on
the running statistics. An MPI library that breaks this would let ranks
drift apart; use a different algorithm (or Reduce + Bcast) with it.

mpi4py is imported when a communicator is constructed, not when this module
is, so ``import arraysyncbn`` works without it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, NoReturn

import array_api_compat
import numpy as np

from .base import ReduceOp, check_allreduce_args, host_values
from .watchdog import report_timeout, resolve_timeout, wait_or_end

__all__ = [
    "CUDA_AWARE_ENV",
    "MPICommunicator",
    "TransferPath",
    "cuda_aware_from_info",
    "memory_kind",
    "resolve_cuda_aware",
    "transfer_path",
]

CUDA_AWARE_ENV = "ARRAYSYNCBN_CUDA_AWARE"
"""Environment variable that forces CUDA-awareness: ``auto``, ``0`` or ``1``."""

TransferPath = Literal["direct", "staged"]
MemoryKind = Literal["host", "cuda", "device"]

# DLPack device types (dlpack.h): host-readable, and CUDA memory that a
# CUDA-aware MPI reads. Anything else (ROCm, Metal, ...) is staged.
_DLPACK_HOST = {1, 3}  # kDLCPU, kDLCUDAHost (pinned)
_DLPACK_CUDA = {2, 13}  # kDLCUDA, kDLCUDAManaged

# Libraries whose CUDA stream this module knows how to synchronize.
_SYNCHRONIZABLE = ("cupy", "torch")


def _library(array: Any) -> str:
    return type(array).__module__.split(".")[0]


def memory_kind(array: Any) -> MemoryKind:
    """Return where ``array``'s memory lives, as far as MPI is concerned.

    ``"host"``: ordinary host memory MPI can read (numpy, torch CPU,
    array-api-strict's default device). ``"cuda"``: CUDA device or managed
    memory. ``"device"``: anything else, including array-api-strict's
    non-default devices, which pretend to be devices MPI cannot read.
    """
    lib = _library(array)
    if lib == "numpy":
        return "host"
    if lib == "array_api_strict":
        # Strict's devices all report DLPack CPU; only the default one is
        # meant to be host memory, the others stand in for accelerators.
        return "host" if array.device == _strict_cpu() else "device"
    try:
        device_type = int(array.__dlpack_device__()[0])
    except (AttributeError, TypeError, ValueError, BufferError, RuntimeError):
        return "device"
    if device_type in _DLPACK_HOST:
        return "host"
    if device_type in _DLPACK_CUDA:
        return "cuda"
    return "device"


def _strict_cpu() -> Any:
    import array_api_strict

    return array_api_strict.Device("CPU_DEVICE")


def transfer_path(array: Any, cuda_aware: bool) -> TransferPath:
    """Return how an allreduce should hand ``array`` to MPI.

    ``"direct"`` for host memory, and for CUDA memory of a library whose
    stream can be synchronized (cupy, torch) when ``cuda_aware``;
    ``"staged"`` (through a numpy host copy) otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> transfer_path(np.zeros(3), cuda_aware=False)
    'direct'
    >>> import array_api_strict as xp
    >>> transfer_path(xp.zeros(3, device=xp.Device("device1")), cuda_aware=True)
    'staged'
    """
    kind = memory_kind(array)
    if kind == "host":
        return "direct"
    if kind == "cuda" and cuda_aware and _library(array) in _SYNCHRONIZABLE:
        return "direct"
    return "staged"


def cuda_aware_from_info(alloc_kinds: str | None) -> bool:
    """Return whether an ``mpi_memory_alloc_kinds`` value lists CUDA memory.

    The value is a comma-separated list of ``kind[:restrictor...]`` entries
    (MPI 4.1, section 11.4.3), e.g. ``"mpi,system,cuda:device,cuda:managed"``.

    Examples
    --------
    >>> cuda_aware_from_info("mpi,system")
    False
    >>> cuda_aware_from_info("mpi,system,cuda:device")
    True
    >>> cuda_aware_from_info(None)
    False
    """
    if not alloc_kinds:
        return False
    kinds = (entry.strip().split(":", 1)[0].lower() for entry in alloc_kinds.split(","))
    return "cuda" in kinds


def resolve_cuda_aware(setting: str | None, detected: bool) -> bool:
    """Combine the ``ARRAYSYNCBN_CUDA_AWARE`` setting with what was detected.

    Parameters
    ----------
    setting : str or None
        ``"auto"`` (or None, or empty) uses ``detected``; ``"1"`` forces
        True, ``"0"`` forces False (``true``/``false``/``yes``/``no`` are
        accepted too, in any case).
    detected : bool
        What :func:`cuda_aware_from_info` found.

    Raises
    ------
    ValueError
        For any other value.
    """
    value = (setting or "auto").strip().lower()
    if value == "auto":
        return detected
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(
        f"{CUDA_AWARE_ENV}={setting!r} is not understood; use 'auto' (detect from the "
        "MPI library), '1' (pass CUDA buffers to MPI) or '0' (stage through the host)"
    )


def _detached(array: Any) -> Any:
    """torch tensors that require grad refuse DLPack and buffer export."""
    return array.detach() if _library(array) == "torch" else array


def _host_view(array: Any) -> np.ndarray:
    """Return a numpy view of host memory, copying only if it is not contiguous."""
    view = array if isinstance(array, np.ndarray) else np.from_dlpack(_detached(array))
    return np.ascontiguousarray(view)


def _synchronize(array: Any) -> None:
    """Wait for the CUDA stream that produces ``array`` (mpi4py does not)."""
    if _library(array) == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    else:
        import torch

        torch.cuda.current_stream(array.device).synchronize()


def _dtype_name(dtype: Any) -> str:
    text = str(dtype)
    for name in ("float32", "float64"):
        if text.endswith(name):
            return name
    raise TypeError(
        f"MPICommunicator reduces float32 or float64 buffers, got dtype {dtype} "
        "(SyncBN packs its sums in the accumulation dtype, which is one of these)"
    )


_ABORT_GRACE_SECONDS = 0.3
"""Pause between the abort message and ``Abort`` (negligible after a timeout)."""


class MPICommunicator:
    """A :class:`~arraysyncbn.Communicator` over an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm or None
        The ranks to synchronize over; None is ``MPI.COMM_WORLD``. Any
        intracommunicator works, e.g. ``COMM_WORLD.Split(rank // 2)`` for
        SyncBN over pairs of ranks.
    timeout : float or None
        Seconds a collective may wait before the job is aborted; ``0`` waits
        forever; None (default) reads ``ARRAYSYNCBN_TIMEOUT`` (unset: 600).

    Attributes
    ----------
    comm : mpi4py.MPI.Intracomm
        The wrapped communicator.
    cuda_aware : bool
        Whether CUDA buffers are handed to MPI directly (see the module
        docstring for detection and ``ARRAYSYNCBN_CUDA_AWARE``).
    timeout : float or None
        The wait limit in seconds; None waits forever.

    Raises
    ------
    ImportError
        mpi4py is not installed.
    TypeError
        ``comm`` is not an mpi4py intracommunicator, or is ``COMM_NULL``.
    ValueError
        ``ARRAYSYNCBN_CUDA_AWARE`` has a value other than auto, 1/true/yes
        or 0/false/no;
        ``timeout`` or ``ARRAYSYNCBN_TIMEOUT`` is not a non-negative number.

    Examples
    --------
    Under ``mpiexec -n 2 python -m mpi4py script.py``::

        from mpi4py import MPI
        import numpy as np
        from arraysyncbn import MPICommunicator, SyncBatchNorm

        comm = MPICommunicator()  # or MPICommunicator(MPI.COMM_WORLD.Split(color))
        bn = SyncBatchNorm(16, comm=comm)
        y = bn(np.random.default_rng(comm.rank).normal(size=(8, 16, 4, 4)))
    """

    def __init__(self, comm: Any = None, *, timeout: float | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                "MPICommunicator needs mpi4py and an MPI library: "
                "pip install 'arraysyncbn[mpi]' (brings mpi4py and the mpich wheel)"
            ) from exc
        self._mpi = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(
                "comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD or one "
                f"made by Split, got {comm!r}"
            )
        self.comm = comm
        self._detected = cuda_aware_from_info(self._alloc_kinds())
        self._cuda_aware = resolve_cuda_aware(os.environ.get(CUDA_AWARE_ENV), self._detected)
        self._timeout = resolve_timeout(timeout)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX}
        self._types = {"float32": MPI.FLOAT, "float64": MPI.DOUBLE}

    def _alloc_kinds(self) -> str | None:
        """The communicator's ``mpi_memory_alloc_kinds`` (None before MPI 4.1)."""
        try:
            info = self.comm.Get_info()
        except self._mpi.Exception:
            return None
        try:
            return info.Get("mpi_memory_alloc_kinds")
        finally:
            info.Free()

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    @property
    def cuda_aware(self) -> bool:
        """Whether CUDA buffers go to MPI directly (else through the host)."""
        return self._cuda_aware

    @property
    def cuda_aware_detected(self) -> bool:
        """What the MPI library itself reports, before ``ARRAYSYNCBN_CUDA_AWARE``."""
        return self._detected

    @property
    def timeout(self) -> float | None:
        """Seconds a collective waits before the job is aborted; None: forever."""
        return self._timeout

    def transfer_path(self, buf: Any) -> TransferPath:
        """Return the path :meth:`allreduce` takes for ``buf`` on this rank."""
        return transfer_path(buf, self._cuda_aware)

    def allreduce(self, buf: Any, op: ReduceOp = "sum") -> Any:
        """Return the elementwise ``op`` of ``buf`` over all ranks (one allreduce).

        ``buf`` is a 1-D float32 or float64 array; the result is a new array
        in ``buf``'s namespace, on its device, with its dtype. ``buf`` is
        not modified. Aborts the MPI job when the wait outlasts
        :attr:`timeout`.
        """
        check_allreduce_args(buf, op)
        mpi_type = self._types[_dtype_name(buf.dtype)]
        mpi_op = self._ops[op]
        kind = memory_kind(buf)
        direct = transfer_path(buf, self._cuda_aware) == "direct"
        if direct and kind == "cuda":
            return self._allreduce_device(buf, mpi_type, mpi_op)
        send = _host_view(buf) if direct else host_values(buf)  # read only
        recv = np.empty_like(send)
        self._reduce(send, recv, mpi_type, mpi_op)
        if isinstance(buf, np.ndarray):
            return recv
        xp = array_api_compat.array_namespace(buf)
        return xp.asarray(recv, device=array_api_compat.device(buf))

    def _allreduce_device(self, buf: Any, mpi_type: Any, mpi_op: Any) -> Any:
        xp = array_api_compat.array_namespace(buf)
        send = xp.asarray(_detached(buf), copy=True)  # contiguous; buf stays untouched
        recv = xp.empty_like(send)
        _synchronize(send)
        self._reduce(send, recv, mpi_type, mpi_op)
        return recv

    def _reduce(self, send: Any, recv: Any, mpi_type: Any, mpi_op: Any) -> None:
        """Allreduce ``send`` into ``recv``; abort the job past the deadline."""
        if self._timeout is None:
            self.comm.Allreduce([send, mpi_type], [recv, mpi_type], op=mpi_op)
            return
        request = self.comm.Iallreduce([send, mpi_type], [recv, mpi_type], op=mpi_op)
        wait_or_end(request.Test, self._timeout, self._abort_after)

    def _abort_after(self, waited: float) -> NoReturn:
        """Say which call this rank waited in, then end the whole MPI job.

        Aborting is the only way out: the request cannot be cancelled (MPI
        forbids cancelling collectives), and a rank that skipped the call
        will never complete it.
        """
        world = self._mpi.COMM_WORLD
        who = f"rank {world.Get_rank()}"
        if self.comm != world:
            who += f" (rank {self.rank} of {self.size} in its communicator)"
        report_timeout(who, waited, "aborting the MPI job", self._timeout)
        # Give the launcher's output forwarding a moment: Abort kills every
        # process at once, and the line above was seen lost under load.
        time.sleep(_ABORT_GRACE_SECONDS)
        world.Abort(1)
        raise SystemExit(1)  # Abort does not return; this keeps the type checker honest

    def __repr__(self) -> str:
        name = self.comm.Get_name() or type(self.comm).__name__
        return (
            f"MPICommunicator(comm={name}, rank={self.rank}, size={self.size}, "
            f"cuda_aware={self._cuda_aware}, timeout={self._timeout})"
        )
