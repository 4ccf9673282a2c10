"""The ``python -m arraysyncbn`` job: check SyncBN across MPI ranks, then time it.

Run it as ``mpiexec -n 4 python -m arraysyncbn`` (or alone, as a world of
one). Every rank draws its own shard of an embedded workload (batch sizes
differ between ranks), runs :class:`~arraysyncbn.SyncBatchNorm` forward and
backward, and rank 0 gathers host copies of everything and compares them with
the float64 reference of :mod:`arraysyncbn.testing` under its documented
bounds. A short benchmark follows (median over ``--steps`` of the slowest
rank). Rank 0 prints a table, or one JSON object with ``--json``; progress
goes to stderr, from rank 0 only. The exit status is 0 when every result is
within its bound and the running statistics are bitwise identical on every
rank, 1 when not, 2 for a setup error (such as ``--backend cupy`` without
cupy), the same on every rank.

The gather and the broadcast of the verdict use mpi4py's pickling
collectives or the communicator's ``allreduce`` on small numpy buffers; they
belong to the check, not to the SyncBN path being checked.

No rank can hang the others: :func:`run_aborting` (used by ``__main__``) gives
the job ``python -m mpi4py`` semantics, so an uncaught exception on any rank
prints its traceback and aborts the whole MPI job; every decision that
changes whether a rank communicates comes from arguments or reduced values
that all ranks share. Without mpi4py the job runs as a world of one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import kernels
from ._fast import check_environment
from .comm.base import Communicator, SelfCommunicator
from .layer import SyncBatchNorm
from .testing import (
    backward_bounds,
    channel_bound,
    flushes_subnormals,
    forward_bounds,
    reference_backward,
    reference_forward,
    to_numpy,
)

__all__ = ["build_parser", "launcher_rank", "main", "run_aborting"]

DEFAULT_SHAPE = (8, 16, 32, 32)
MOMENTUM = 0.1
EPS = 1e-5


class SetupError(Exception):
    """This rank cannot run the job as asked (message shown without traceback)."""


# -- command line ----------------------------------------------------------------
def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape takes comma-separated integers like 8,16,32,32, got {text!r}"
        ) from None
    if len(dims) < 2 or any(d < 0 for d in dims) or dims[1] < 1:
        raise argparse.ArgumentTypeError(
            f"--shape needs at least 2 non-negative sizes (batch, channels, ...) with "
            f"at least one channel, got {text!r}"
        )
    return dims


_LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launcher_rank() -> int:
    """This process's rank as the MPI launcher announced it, 0 when none did.

    Read from the environment, so it is known before MPI starts: the command
    line is parsed (and ``--help`` answered) without initializing MPI.
    """
    for name in _LAUNCHER_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


class _RankZeroParser(argparse.ArgumentParser):
    """An ArgumentParser that prints help, usage and errors on rank 0 only.

    Every rank parses the same command line, so every rank exits alike (0
    for ``--help``, 2 for an error); only the message is printed once
    instead of once per rank.
    """

    def _print_message(self, message: str, file: Any = None) -> None:
        if launcher_rank() == 0:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m arraysyncbn``.

    Under an MPI launcher, help and errors are printed by rank 0 only.
    """
    parser = _RankZeroParser(
        prog="python -m arraysyncbn",
        description=(
            "Check synchronized batch norm across the ranks of an MPI job against the "
            "float64 reference, then time it. Run under mpiexec "
            "(mpiexec -n 4 python -m arraysyncbn) or alone as a world of one."
        ),
        epilog=(
            "Each rank's batch size is drawn between half and all of the batch size of "
            "--shape, so shards are uneven. Exit status: 0 when every result is within "
            "its documented bound, 1 when the check fails, 2 for a setup error. "
            "Environment: ARRAYSYNCBN_CUDA_AWARE=auto|0|1 (cupy buffers straight to MPI "
            "or staged through the host), ARRAYSYNCBN_CHECK=1 (cross-rank consistency "
            "check on every call), ARRAYSYNCBN_TIMEOUT=seconds (a rank waiting longer in "
            "a SyncBN collective aborts the job; default 600, 0 waits forever), "
            "ARRAYSYNCBN_FAST=0 (portable array-API kernels instead of numba's), "
            "ARRAYSYNCBN_THREADS=n (numba threads per rank), ARRAYSYNCBN_CUDA_KERNELS=1 "
            "(cupy arrays on the experimental numba.cuda kernels)."
        ),
    )
    parser.add_argument(
        "--backend",
        choices=("numpy", "cupy"),
        default="numpy",
        help="array library to run SyncBN on (default: numpy; cupy uses one GPU per rank)",
    )
    parser.add_argument(
        "--shape",
        type=_shape,
        default=DEFAULT_SHAPE,
        metavar="N,C,...",
        help=(
            "largest per-rank shape, batch first and channels second, e.g. 8,16,32,32 "
            "(the default); each rank's batch size is drawn from N//2..N"
        ),
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32", "float64"),
        default="float32",
        help="input dtype (default: float32; parameters are float32 for float16 input)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="lay the input out with channels on the last axis (NHWC) and use axis=-1",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed forward+backward steps of the benchmark; 0 skips it (default: 20)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the workload, >= 0 (default: 0)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (rank 0, stdout) instead of the table",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help=(
            "progress bar on rank 0's stderr: auto draws it only when stderr is a "
            "terminal, which it is not under mpiexec (its ranks write into pipes): "
            "use on there (default: auto)"
        ),
    )
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    if args.seed < 0:
        # numpy's generators take non-negative seeds only; say so here, once,
        # rather than with a traceback from every rank.
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


# -- the world -----------------------------------------------------------------
@dataclass
class World:
    """The ranks of this job, and what the table says about MPI."""

    comm: Communicator
    mpi_comm: Any
    library: str
    standard: str

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def barrier(self) -> None:
        if self.mpi_comm is not None:
            self.mpi_comm.Barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        return [obj] if self.mpi_comm is None else self.mpi_comm.gather(obj, root=0)

    def reduce_floats(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Elementwise ``op`` of ``values`` over all ranks, on every rank."""
        buf = self.comm.allreduce(np.asarray(values, dtype=np.float64), op)  # type: ignore[arg-type]
        return [float(v) for v in buf]

    def first_failing(self, failed: bool) -> int | None:
        """The lowest rank where ``failed`` holds, on every rank (None: none failed)."""
        low = -self.reduce_floats([-float(self.rank) if failed else -math.inf], "max")[0]
        return None if math.isinf(low) else int(low)


def _under_launcher() -> bool:
    """Whether an MPI launcher started this process (then MPI must work)."""
    markers = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
    return any(name in os.environ for name in markers)


def open_world() -> World:
    """The MPI world when mpi4py loads, else a world of one.

    Raises SetupError when mpiexec started this process but MPI cannot be
    loaded or ARRAYSYNCBN_CUDA_AWARE is not understood.
    """
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # mpi4py 4 raises RuntimeError without libmpi
        if _under_launcher():
            raise SetupError(f"started by an MPI launcher, but mpi4py cannot load: {exc}") from exc
        return World(SelfCommunicator(), None, "none", "")
    from .comm.mpi import MPICommunicator

    first = MPI.Get_library_version().strip().splitlines()[0]
    library = " ".join(first.replace("Version:", "").split()).split(",")[0]
    major, minor = MPI.Get_version()
    try:
        comm = MPICommunicator()
    except ValueError as exc:  # a bad ARRAYSYNCBN_CUDA_AWARE
        raise SetupError(str(exc)) from exc
    return World(comm, MPI.COMM_WORLD, library, f"MPI {major}.{minor}")


def check_settings() -> None:
    """Raise SetupError for an ``ARRAYSYNCBN_FAST`` or ``ARRAYSYNCBN_THREADS``
    value the kernels refuse (they would raise mid-run, on some ranks only)."""
    try:
        check_environment()
    except ValueError as exc:
        raise SetupError(str(exc)) from exc


def run_aborting(main_fn: Callable[[], int]) -> int:
    """Run ``main_fn`` with ``python -m mpi4py`` semantics; return its status.

    An uncaught exception (not a ``SystemExit``, which argparse raises
    identically on every rank) prints its traceback and, when MPI runs more
    than one rank, calls ``MPI.COMM_WORLD.Abort(1)``: the other ranks may be
    waiting in a collective this rank will never reach, and only an abort
    ends them. In a world of one the exception propagates as usual. A reader
    of stdout that went away (``python -m arraysyncbn --json | head``) ends
    the run with status 1 and no traceback, as Python's documentation
    recommends.
    """
    try:
        status = main_fn()
        sys.stdout.flush()  # a closed pipe shows here, not in Python's exit
        return status
    except SystemExit:
        raise
    except BrokenPipeError:
        if not _stdout_closed():
            _abort_parallel_job()
            raise  # another pipe: a real error
        # Nothing more can reach stdout: point it at devnull, so that the
        # interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _abort_parallel_job(show_traceback=False)
        return 1
    except BaseException:
        _abort_parallel_job()
        raise


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, no file descriptor
        return False


def _abort_parallel_job(show_traceback: bool = True) -> None:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    if mpi.COMM_WORLD.Get_size() <= 1:
        return
    rank = mpi.COMM_WORLD.Get_rank()
    print(f"arraysyncbn: rank {rank} raised; aborting the MPI job", file=sys.stderr)
    if show_traceback:
        traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    mpi.COMM_WORLD.Abort(1)


# -- backend and workload -------------------------------------------------------
@dataclass
class Backend:
    """Where the job's arrays live."""

    name: str
    xp: Any
    device: Any
    description: str
    synchronize: Callable[[], None]

    def asarray(self, a: np.ndarray) -> Any:
        return self.xp.asarray(a, device=self.device)


def _local_rank(world: World) -> int:
    if world.mpi_comm is None:
        return 0
    from mpi4py import MPI

    node = world.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


def open_backend(name: str, world: World) -> Backend:
    """Return the backend, or raise :class:`SetupError` saying why not.

    Collective for cupy (ranks on one node split the GPUs by local rank).
    """
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend("numpy", xp, "cpu", "cpu", lambda: None)
    local = _local_rank(world)
    try:
        import cupy
        import cupy.cuda

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or CUDA driver/runtime errors
        raise SetupError(
            f"--backend cupy needs cupy and a CUDA GPU: {type(exc).__name__}: {exc}. "
            "Install cupy-cuda12x or cupy-cuda13x (pip install 'arraysyncbn[cuda12]')"
        ) from None
    if count < 1:
        raise SetupError("--backend cupy: cupy found no CUDA device")
    device = cupy.cuda.Device(local % count)
    device.use()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    import array_api_compat.cupy as cupy_xp

    def synchronize() -> None:
        cupy.cuda.get_current_stream().synchronize()

    return Backend("cupy", cupy_xp, device, f"cuda:{device.id} ({gpu})", synchronize)


@dataclass
class Workload:
    """Every rank's shard shape, and this rank's data."""

    shapes: list[tuple[int, ...]]
    axis: int
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @property
    def channels(self) -> int:
        return self.shapes[0][self.axis]


def _batch_sizes(seed: int, batch: int, world_size: int) -> list[int]:
    """Every rank's batch size, from a seed all ranks share (uneven on purpose)."""
    rng = np.random.default_rng([seed, 0xBA7C])
    sizes = [int(n) for n in rng.integers(batch // 2, batch + 1, size=world_size)]
    if world_size > 1 and len(set(sizes)) == 1:
        # Never let the draw hide the point: at least two sizes differ.
        sizes[-1] = batch // 2 if sizes[-1] != batch // 2 else batch
    return sizes


def make_workload(args: argparse.Namespace, rank: int, world_size: int) -> Workload:
    """Draw this rank's shard; raise SetupError if the global batch is too small."""
    batch, channels, *spatial = args.shape
    sizes = _batch_sizes(args.seed, batch, world_size)
    shapes = []
    for n in sizes:
        shapes.append((n, *spatial, channels) if args.channels_last else (n, channels, *spatial))
    axis = -1 if args.channels_last else 1
    per_channel = sum(math.prod(s) for s in shapes) // channels
    if per_channel < 2:
        raise SetupError(
            f"the global batch has {per_channel} value(s) per channel (batch sizes {sizes}); "
            "batch statistics need at least 2: use a larger --shape"
        )
    shared = np.random.default_rng([args.seed, 0xC4A7])
    loc = shared.uniform(-3.0, 3.0, channels)
    scale = shared.uniform(0.5, 2.0, channels)
    weight = shared.uniform(0.5, 1.5, channels)
    bias = shared.uniform(-0.5, 0.5, channels)
    own = np.random.default_rng([args.seed, rank])
    view = [1] * len(shapes[rank])
    view[axis] = channels
    x = loc.reshape(view) + scale.reshape(view) * own.standard_normal(shapes[rank])
    dy = own.standard_normal(shapes[rank])
    return Workload(shapes, axis, x.astype(args.dtype), dy.astype(args.dtype), weight, bias)


# -- check -----------------------------------------------------------------------
@dataclass
class RankOutput:
    """Host copies of one rank's inputs and results, gathered on rank 0."""

    x: np.ndarray
    dy: np.ndarray
    y: np.ndarray
    dx: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray


def _max_error(actual: np.ndarray, expected: Any, bound: Any) -> tuple[float, bool]:
    """Max |actual − expected| (NaN counts as infinite) and whether it is within bound."""
    if expected is None:
        raise ValueError("the reference has no value to compare with")
    if actual.size == 0:
        return 0.0, True
    err = np.abs(actual.astype(np.float64) - expected)
    err = np.where(np.isnan(err), np.inf, err)
    return float(np.max(err)), bool(np.all(err <= bound))


def _param_dtype(dtype: str) -> str:
    return dtype if dtype in ("float32", "float64") else "float32"


def run_check(
    world: World, backend: Backend, work: Workload, dtype: str
) -> tuple[dict[str, Any], SyncBatchNorm]:
    """One forward and backward on every rank, compared on rank 0; verdict on all."""
    bn = SyncBatchNorm(work.channels, eps=EPS, momentum=MOMENTUM, axis=work.axis, comm=world.comm)
    pdtype = _param_dtype(dtype)
    state = {
        "weight": backend.asarray(work.weight.astype(pdtype)),
        "bias": backend.asarray(work.bias.astype(pdtype)),
        "running_mean": backend.asarray(np.zeros(work.channels, pdtype)),
        "running_var": backend.asarray(np.ones(work.channels, pdtype)),
        "num_batches_tracked": 0,
    }
    bn.load_state_dict(state)
    x, dy = backend.asarray(work.x), backend.asarray(work.dy)
    y = bn(x)
    dx = bn.backward(dy)
    out = RankOutput(
        work.x,
        work.dy,
        to_numpy(y),
        to_numpy(dx),
        to_numpy(bn.grad_weight),
        to_numpy(bn.grad_bias),
        to_numpy(bn.running_mean),
        to_numpy(bn.running_var),
    )
    gathered = world.gather(out)
    acc = kernels.accumulation_dtype(backend.xp, backend.device)
    acc_eps = float(backend.xp.finfo(acc).eps)
    errors = None
    if gathered is not None:
        # CuPy flushes float32 subnormals: its bounds' floors allow for that.
        xp = backend.xp
        ftz = flushes_subnormals(xp.zeros((1,), dtype=xp.float32, device=backend.device))
        errors = _compare(gathered, work, dtype, acc_eps, ftz)
    keys = ["y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var", "ok"]
    values = [errors[k] for k in keys] if errors is not None else [0.0] * len(keys)
    shared = world.reduce_floats(values)
    result = {f"{k}_max_error": v for k, v in zip(keys[:-1], shared, strict=False)}
    result["ok"] = shared[-1] == 1.0
    return result, bn


def _compare(
    outs: list[RankOutput], work: Workload, dtype: str, acc_eps: float, ftz: bool
) -> dict[str, float]:
    """Rank 0: the largest error of each result, and 1.0 if all are in bounds."""
    pdtype = _param_dtype(dtype)
    weight, bias = work.weight.astype(pdtype), work.bias.astype(pdtype)
    channels = work.channels
    ref = reference_forward(
        [o.x for o in outs],
        weight,
        bias,
        np.zeros(channels, pdtype),
        np.ones(channels, pdtype),
        momentum=MOMENTUM,
        eps=EPS,
        axis=work.axis,
    )
    grads = reference_backward(ref, [o.dy for o in outs], weight)
    fb = forward_bounds(
        ref,
        dtype,
        weight=weight,
        bias=bias,
        param_dtype=pdtype,
        accumulation_eps=acc_eps,
        flush_to_zero=ftz,
    )
    bb = backward_bounds(
        ref, grads, [o.dy for o in outs], dtype, weight=weight, param_dtype=pdtype,
        accumulation_eps=acc_eps, flush_to_zero=ftz,
    )  # fmt: skip
    checks: dict[str, list[tuple[float, bool]]] = {k: [] for k in ("y", "dx", "gw", "gb")}
    for r, o in enumerate(outs):
        along = {"ndim": o.y.ndim, "axis": work.axis}
        checks["y"].append(_max_error(o.y, ref.ys[r], channel_bound(fb.y, **along)))
        checks["dx"].append(_max_error(o.dx, grads.dxs[r], channel_bound(bb.dx, **along)))
        checks["gw"].append(_max_error(o.grad_weight, grads.dweights[r], bb.dweight))
        checks["gb"].append(_max_error(o.grad_bias, grads.dbiases[r], bb.dbias))
    checks["rm"] = [_max_error(outs[0].running_mean, ref.running_mean, fb.running_mean)]
    checks["rv"] = [_max_error(outs[0].running_var, ref.running_var, fb.running_var)]
    identical = all(
        np.array_equal(o.running_mean, outs[0].running_mean)
        and np.array_equal(o.running_var, outs[0].running_var)
        for o in outs
    )
    ok = identical and all(within for pairs in checks.values() for _, within in pairs)
    worst = {k: max(e for e, _ in pairs) for k, pairs in checks.items()}
    return {
        "y": worst["y"],
        "dx": worst["dx"],
        "grad_weight": worst["gw"],
        "grad_bias": worst["gb"],
        "running_mean": worst["rm"],
        "running_var": worst["rv"],
        "ok": 1.0 if ok else 0.0,
    }


# -- benchmark ----------------------------------------------------------------------
def _timed(world: World, backend: Backend, fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on this rank, all ranks starting together."""
    world.barrier()
    start = time.perf_counter()
    fn()
    backend.synchronize()
    return time.perf_counter() - start


def run_benchmark(
    world: World,
    backend: Backend,
    work: Workload,
    bn: SyncBatchNorm,
    steps: int,
    advance: Callable[[], None],
) -> dict[str, Any]:
    """Median per-step times of the slowest rank, and bandwidth at the memory floor."""
    x, dy = backend.asarray(work.x), backend.asarray(work.dy)
    acc = kernels.accumulation_dtype(backend.xp, backend.device)
    packed = backend.xp.zeros((1 + 2 * work.channels,), dtype=acc, device=backend.device)
    fwd, bwd, red = [], [], []
    for _ in range(steps):
        fwd.append(_timed(world, backend, lambda: bn(x)))
        bwd.append(_timed(world, backend, lambda: bn.backward(dy)))
        red.append(_timed(world, backend, lambda: world.comm.allreduce(packed)))
        advance()
    local = [statistics.median(fwd), statistics.median(bwd), statistics.median(red)]
    t_fwd, t_bwd, t_red = world.reduce_floats(local, "max")
    total_bytes = world.reduce_floats([float(work.x.nbytes)])[0]
    # The memory floor, as `python -m arraysyncbn bench` counts it: a forward
    # reads x twice (statistics, then normalize) and writes y; a backward
    # reads x and dy twice (sums, then dx) and writes dx.
    return {
        "forward_ms": 1e3 * t_fwd,
        "backward_ms": 1e3 * t_bwd,
        "forward_gbps": 3 * total_bytes / t_fwd / 1e9,
        "backward_gbps": 5 * total_bytes / t_bwd / 1e9,
        "allreduce_us": 1e6 * t_red,
    }


# -- output ---------------------------------------------------------------------
def _transfer(world: World, backend: Backend) -> tuple[bool | None, str]:
    from .comm.mpi import MPICommunicator

    if not isinstance(world.comm, MPICommunicator):
        return None, "none (world of one)"
    sample = backend.xp.zeros((1,), dtype=backend.xp.float32, device=backend.device)
    path = world.comm.transfer_path(sample)
    if backend.name == "numpy":
        return world.comm.cuda_aware, "host buffers (direct)"
    if path == "direct":
        return True, "CUDA-aware (device buffers direct)"
    return world.comm.cuda_aware, "staged through host"


def _progress(args: argparse.Namespace, world: World) -> Progress:
    """Rank 0's progress bar; drawn in auto mode only when stderr is a terminal.

    Under mpiexec every rank's stderr is a pipe, and nothing a rank can see
    tells whether mpiexec's own stderr is a terminal or a file: a bar forced
    there wrote escape codes into redirected logs, so auto leaves it off.
    """
    live = sys.stderr.isatty() if args.progress == "auto" else args.progress == "on"
    console = Console(stderr=True, force_terminal=live or None)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=world.rank != 0 or not live,
    )


_ROWS = [
    ("backend", "backend"),
    ("device", "device"),
    ("world size", "world_size"),
    ("MPI library", "mpi_library"),
    ("transfer", "transfer"),
    ("kernels", "route"),
    ("per-rank shapes", "shapes"),
    ("dtype", "dtype"),
    ("max error y", "forward_max_error"),
    ("max error dx", "dx_max_error"),
    ("max error grad_weight", "grad_weight_max_error"),
    ("max error grad_bias", "grad_bias_max_error"),
    ("max error running_mean / var", "running_stats_max_error"),
    ("forward (ms, median, slowest rank)", "forward_ms"),
    ("backward (ms)", "backward_ms"),
    ("GB/s at the memory floor, forward / backward", "gbps"),
    ("allreduce latency (µs)", "allreduce_us"),
    ("check", "ok"),
]


def _cell(key: str, r: dict[str, Any]) -> str:
    if key == "mpi_library":
        return f"{r['mpi_library']} ({r['mpi_standard']})" if r["mpi_standard"] else "none"
    if key == "shapes":
        return ", ".join("x".join(map(str, s)) for s in r["shapes"])
    if key == "running_stats_max_error":
        return f"{r['running_mean_max_error']:.2e} / {r['running_var_max_error']:.2e}"
    if key == "gbps":
        if r["forward_gbps"] is None:
            return "-"
        return f"{r['forward_gbps']:.2f} / {r['backward_gbps']:.2f} (all ranks)"
    if key == "ok":
        return "[green]passed[/]" if r["ok"] else "[bold red]FAILED[/]"
    value = r[key]
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if key.endswith(("_ms", "_us")) else f"{value:.2e}"
    return str(value)


def route_description(bn: Any) -> str:
    """Which kernels ran the check's forward (host numba, CUDA or portable), and why."""
    from ._fast import route_info

    saved = getattr(bn, "_saved", None)
    general = route_info()
    if saved is not None and saved.route == "cuda":
        return "cuda (numba.cuda kernels, experimental: ARRAYSYNCBN_CUDA_KERNELS=1)"
    if saved is None or saved.route == "host" or general.startswith("portable"):
        return general
    return "portable (array API): the fast route does not take this library, device or dtype"


def render_table(result: dict[str, Any]) -> Table:
    """The human-readable summary of a run."""
    table = Table(title="arraysyncbn: SyncBatchNorm across MPI ranks", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    for label, key in _ROWS:
        table.add_row(label, _cell(key, result))
    return table


# -- main -----------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; return the exit status (the same on every rank)."""
    args = _parse(argv)
    try:
        world = open_world()
    except SetupError as exc:
        # Every rank fails the same way here (same environment) or aborts:
        # nothing to agree on, as no communicator exists yet; say it once.
        if launcher_rank() == 0:
            print(f"arraysyncbn: {exc}", file=sys.stderr)
        return 2
    backend: Backend | None = None
    work: Workload | None = None
    problem = ""
    try:
        check_settings()
        backend = open_backend(args.backend, world)
        work = make_workload(args, world.rank, world.size)
    except SetupError as exc:
        problem = str(exc)
    reporter = world.first_failing(bool(problem))
    if reporter is not None:
        if reporter == world.rank:
            print(f"arraysyncbn (rank {world.rank}): {problem}", file=sys.stderr)
        return 2
    assert backend is not None and work is not None
    cuda_aware, transfer = _transfer(world, backend)
    with _progress(args, world) as progress:
        task = progress.add_task("check", total=1 + args.steps)
        check, bn = run_check(world, backend, work, args.dtype)
        progress.update(task, advance=1, description="benchmark")
        bench: dict[str, Any] = dict.fromkeys(
            ("forward_ms", "backward_ms", "forward_gbps", "backward_gbps", "allreduce_us")
        )
        if args.steps:
            bench = run_benchmark(
                world, backend, work, bn, args.steps, lambda: progress.advance(task)
            )
    result: dict[str, Any] = {
        "world_size": world.size,
        "backend": backend.name,
        "device": backend.description,
        "mpi_library": world.library,
        "mpi_standard": world.standard,
        "cuda_aware": cuda_aware,
        "transfer": transfer,
        "route": route_description(bn),
        "shapes": [list(s) for s in work.shapes],
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "seed": args.seed,
        "steps": args.steps,
        "forward_max_error": check["y_max_error"],
        "backward_max_error": max(
            check["dx_max_error"], check["grad_weight_max_error"], check["grad_bias_max_error"]
        ),
        **check,
        **bench,
    }
    if world.rank == 0:
        if args.json:
            # NaN/inf errors (a broken run) become null: JSON has no Infinity.
            clean = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in result.items()
            }
            print(json.dumps(clean, allow_nan=False))
        else:
            Console().print(render_table(result))
    return 0 if result["ok"] else 1
