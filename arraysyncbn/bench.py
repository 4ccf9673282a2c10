"""``python -m arraysyncbn bench``: our routes against PyTorch's CPU batch norm.

Every figure is a ratio measured side by side in one run: contenders are
interleaved (each repeat runs every contender once, in a rotating order)
and each reports the median of its repeats, so load that comes and goes on
a shared machine hits every contender alike. The portable route, much
slower, is timed in a rotation of its own right after: its large
temporaries slowed whatever ran next. Contenders, at the same thread
count: the host route (fused numba kernels), the portable array-API route,
and ``torch.nn.functional.batch_norm`` (training mode; autograd for the
backward) when torch is installed. Each goes through its public API with
weight, bias and running statistics, and fresh outputs (no ``out=``).
Half-precision cases take float32 parameters, as mixed-precision models do;
ours gets numpy float16 arrays, and torch bfloat16 tensors (numpy has no
bfloat16; those cases need torch). For NCHW float32 and half-precision
cases, the modules too (``row["torch_module"]``, forward plus backward
through autograd; and eval-mode forward under ``torch.no_grad()``,
``row["torch_module"]["eval"]``): :class:`arraysyncbn.torch.SyncBatchNorm`
(``comm=None``) against PyTorch's unsynchronized ``torch.nn.BatchNorm2d``.

Also measured in the same run: the copy bandwidth (a copy of x runs in each
case's rotation, so it meets the caches the contenders meet), and each
contender's fraction of the memory floor (a training forward must read x
twice and write y: 3 × bytes(x); forward plus backward at least 8 ×); each contender's max
error against a float64 reference on the same data (channel means are offset
from zero, where precision differs); the peak extra memory our routes
allocate per pass (tracemalloc), relative to bytes(y) or bytes(dx).

glibc returns freed memory to the system by default, so a fresh 25 MB
output costs page faults in every contender. The main figures are taken
with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (the
benchmark re-runs itself in a child process with them set) and the
default-allocator ratios are reported beside them.

Under ``mpiexec -n 2`` it instead times the same step with
:class:`~arraysyncbn.MPICommunicator` against ``comm=None`` on the same
per-rank shape, in the same job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from . import functional as F
from ._fast import check_environment

__all__ = ["main"]

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
_CHILD_FLAG = "--child-allocator"


@dataclass(frozen=True)
class Case:
    """One benchmark input: shape as our functional API sees it, channel axis."""

    name: str
    shape: tuple[int, ...]
    axis: int
    dtype: str = "float32"
    channels_last: bool = False  # torch gets the NCHW shape in channels_last memory


FULL_CASES = (
    Case("(32,64,56,56) NCHW", (32, 64, 56, 56), 1),
    Case("(32,64,56,56) channels-last", (32, 56, 56, 64), 3, channels_last=True),
    Case("(8,256,14,14) NCHW", (8, 256, 14, 14), 1),
    Case("(2,64,128,128) NCHW", (2, 64, 128, 128), 1),
    Case("(256,1024)", (256, 1024), 1),
    Case("(64,2048)", (64, 2048), 1),
    Case("(64,128,1024)", (64, 128, 1024), 1),
    Case("(8,64,56,56) float64", (8, 64, 56, 56), 1, "float64"),
    Case("(32,64,56,56) NCHW bfloat16", (32, 64, 56, 56), 1, "bfloat16"),
    Case("(32,64,56,56) NCHW float16", (32, 64, 56, 56), 1, "float16"),
    Case("(8,256,14,14) NCHW bfloat16", (8, 256, 14, 14), 1, "bfloat16"),
    Case("(8,256,14,14) NCHW float16", (8, 256, 14, 14), 1, "float16"),
    Case(
        "(32,64,56,56) channels-last bfloat16", (32, 56, 56, 64), 3, "bfloat16", channels_last=True
    ),
    Case("(4,8) tiny", (4, 8), 1),
    # Two images per rank, SyncBN's own use: the layers of a ResNet's last stages.
    Case("(2,256,14,14) NCHW", (2, 256, 14, 14), 1),
    Case("(2,2048,7,7) NCHW", (2, 2048, 7, 7), 1),
)
QUICK_CASES = (
    Case("(4,64,28,28) NCHW", (4, 64, 28, 28), 1),
    Case("(4,28,28,64) channels-last", (4, 28, 28, 64), 3, channels_last=True),
    Case("(4,8) tiny", (4, 8), 1),
    Case("(4,16,8,8) NCHW float16", (4, 16, 8, 8), 1, "float16"),
    Case("(4,16,8,8) NCHW bfloat16", (4, 16, 8, 8), 1, "bfloat16"),
)
HALF = ("float16", "bfloat16")


def _itemsize(dtype: str) -> int:
    return 2 if dtype in HALF else np.dtype(dtype).itemsize


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m arraysyncbn bench",
        description=(
            "Benchmark SyncBN's host (numba) and portable routes against PyTorch's CPU "
            "batch norm, side by side in one run (medians of interleaved repeats). "
            "Under mpiexec -n 2: the synchronized step against comm=None."
        ),
    )
    p.add_argument("--threads", type=int, default=1, help="threads for every contender (1)")
    p.add_argument(
        "--repeats", type=int, default=15, help="timed repeats per contender (15, at least 3)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{len(QUICK_CASES)} small cases, a smoke run (under mpiexec: the first one)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (needs matplotlib)")
    p.add_argument(
        "--default-allocator-only",
        action="store_true",
        help="skip the run with glibc's trimming off (faster; different figures)",
    )
    p.add_argument(_CHILD_FLAG, choices=("tuned", "default"), help=argparse.SUPPRESS)
    return p


# -- timing -------------------------------------------------------------------
def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, run in rotating order."""
    names = list(fns)
    for fn in fns.values():  # warm-up (compilation, caches)
        fn()
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    inner = _inner_loops(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, loops = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            times[name].append((time.perf_counter() - t0) / loops)
    return {n: statistics.median(v) for n, v in times.items()}


def _inner_loops(fns: dict[str, Callable[[], Any]]) -> dict[str, int]:
    """Calls per timing sample so that each sample lasts about 2 ms or more."""
    loops = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        loops[name] = max(1, min(2000, int(2e-3 / max(dt, 1e-7))))
    return loops


def _raw_bytes(a: Any) -> np.ndarray:
    """The bytes of a contiguous numpy array or torch tensor, as uint8 (no copy)."""
    if isinstance(a, np.ndarray):
        return a.reshape(-1).view(np.uint8)  # bytes: numba has no float16
    import torch

    return a.reshape(-1).view(torch.uint8).numpy()


def _copier(x: Any, threads: int) -> Callable[[], Any]:
    """A copy of x's bytes into a buffer of its size, at ``threads`` threads:
    the floor's yardstick (each copy reads and writes bytes(x) once)."""
    import numba

    from ._fast.host_jit import copy_parallel

    src = _raw_bytes(x)
    dst = np.empty_like(src)
    if threads <= 1:
        return lambda: np.copyto(dst, src)
    parts = min(threads, numba.config.NUMBA_NUM_THREADS)

    def run() -> None:
        numba.set_num_threads(parts)
        copy_parallel(src, dst, parts)

    return run


def _copy_gbps(nbytes: int, repeats: int, threads: int) -> float:
    """Copy bandwidth (bytes read + written per second) on a buffer of nbytes,
    timed alone (the header's figure; each row's floor uses its own copy)."""
    import numba

    from ._fast.host_jit import copy_parallel

    parts = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(parts)
    src = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    dst = np.empty_like(src)
    t = _interleaved({"copy": lambda: copy_parallel(src, dst, parts)}, repeats)["copy"]
    return 2 * src.nbytes / t / 1e9


# -- contenders -----------------------------------------------------------------
def _data(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels = case.shape[case.axis]
    view = [1] * len(case.shape)
    view[case.axis] = channels
    offsets = (np.linspace(-1.0, 1.0, channels) * 1e3).reshape(view)
    x = rng.standard_normal(case.shape) + offsets
    dy = rng.standard_normal(case.shape)
    if case.dtype == "bfloat16":  # float32 arrays holding bfloat16 numbers
        return _bfloat16_values(x), _bfloat16_values(dy)
    return x.astype(case.dtype), dy.astype(case.dtype)


def _bfloat16_values(a: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(a.astype(np.float32)).bfloat16().float().numpy()


def _api_inputs(case: Case, x: np.ndarray, dy: np.ndarray) -> tuple[Any, Any]:
    """x and dy as our API gets them: numpy arrays, torch tensors for bfloat16."""
    if case.dtype != "bfloat16":
        return x, dy
    import torch

    return torch.from_numpy(x).bfloat16(), torch.from_numpy(dy).bfloat16()


def _f64(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    return a.detach().double().numpy()  # type: ignore[no-any-return]


def _reference_y(x: np.ndarray, axis: int, eps: float) -> np.ndarray:
    axes = tuple(i for i in range(x.ndim) if i != axis)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


def _ours(case: Case, x: Any, dy: Any, route: str) -> dict[str, Any]:
    channels = case.shape[case.axis]
    pdt = np.float32 if case.dtype != "float64" else np.float64
    w, b = np.ones(channels, pdt), np.zeros(channels, pdt)
    rm, rv = np.zeros(channels, pdt), np.ones(channels, pdt)
    if not isinstance(x, np.ndarray):  # torch input: torch parameters
        import torch

        w, b, rm, rv = (torch.from_numpy(a) for a in (w, b, rm, rv))

    def forward() -> Any:
        return F.sync_batch_norm_forward(x, w, b, rm, rv, axis=case.axis)

    def step() -> Any:
        _, _, _, saved = F.sync_batch_norm_forward(x, w, b, rm, rv, axis=case.axis)
        return F.sync_batch_norm_backward(dy, saved)

    if route == "host":
        fwd, fwd_bwd = forward, step
    else:
        fwd, fwd_bwd = _portable(forward), _portable(step)
    y, _, _, saved = fwd()
    if saved.route != route:
        raise RuntimeError(f"the {route} route did not run for {case.name} ({saved.route} did)")
    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "y": y, "route": saved.route, "forward": forward}


def _portable(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with the portable route forced (the host route is the default)."""

    def run() -> Any:
        os.environ["ARRAYSYNCBN_FAST"] = "0"
        try:
            return fn()
        finally:
            os.environ["ARRAYSYNCBN_FAST"] = "1"

    return run


def _peak_ratios(ours: dict[str, Any], dy: Any) -> tuple[float, float]:
    """Peak traced allocation of one forward (one backward) over bytes(y) (bytes(dx))."""
    forward = ours["fwd"]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        y, _, _, saved = forward()
        fwd_peak = tracemalloc.get_traced_memory()[1] - base
        backward = (
            (lambda: F.sync_batch_norm_backward(dy, saved))
            if ours["route"] == "host"
            else _portable(lambda: F.sync_batch_norm_backward(dy, saved))
        )
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dx, _, _ = backward()
        bwd_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return fwd_peak / y.nbytes, bwd_peak / dx.nbytes


def _torch(case: Case, x: np.ndarray, dy: np.ndarray) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    tdt = getattr(torch, case.dtype)
    if case.channels_last:
        xt = torch.from_numpy(np.moveaxis(x, -1, 1)).contiguous(memory_format=torch.channels_last)
        dyt = torch.from_numpy(np.moveaxis(dy, -1, 1)).contiguous(memory_format=torch.channels_last)
    else:
        xt, dyt = torch.from_numpy(x.copy()), torch.from_numpy(dy.copy())
    xt, dyt = xt.to(tdt), dyt.to(tdt)
    channels = case.shape[case.axis]
    pdt = torch.float64 if case.dtype == "float64" else torch.float32
    rm, rv = torch.zeros(channels, dtype=pdt), torch.ones(channels, dtype=pdt)
    w = torch.ones(channels, dtype=pdt, requires_grad=True)
    b = torch.zeros(channels, dtype=pdt, requires_grad=True)
    fn = torch.nn.functional.batch_norm
    xg = xt.detach().requires_grad_(True)

    def fwd() -> Any:
        with torch.no_grad():
            return fn(xt, rm, rv, w, b, training=True)

    def fwd_bwd() -> Any:
        y = fn(xg, rm, rv, w, b, training=True)
        y.backward(dyt)
        xg.grad = w.grad = b.grad = None
        return y

    try:
        y = fwd().float()
    except RuntimeError:  # e.g. no half-precision batch norm on this CPU build
        return None
    try:
        fwd_bwd()
    except RuntimeError:  # no backward for this dtype on this build
        fwd_bwd = None  # type: ignore[assignment]
    y_np = y.numpy()
    if case.channels_last:
        y_np = np.moveaxis(y_np, 1, -1)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "y": y_np}


def _torch_modules(case: Case, x: np.ndarray, dy: np.ndarray) -> dict[str, Any] | None:
    """The module contenders: ``arraysyncbn.torch.SyncBatchNorm`` (comm=None) against
    ``torch.nn.BatchNorm2d``, forward + backward through autograd (``"fwd_bwd"``) and
    eval-mode forward under no_grad (``"eval"``), NCHW float32 and half precision
    (float32 parameters) only."""
    if case.dtype not in ("float32", *HALF) or case.channels_last or len(case.shape) != 4:
        return None
    try:
        import torch

        from .torch import SyncBatchNorm
    except ImportError:
        return None
    channels = case.shape[1]
    tdt = getattr(torch, case.dtype)
    xt = torch.from_numpy(x.copy()).to(tdt).requires_grad_(True)
    dyt = torch.from_numpy(dy.copy()).to(tdt)

    xe = xt.detach()

    def step(module: Any) -> Callable[[], Any]:
        def fn() -> Any:
            y = module(xt)
            y.backward(dyt)
            xt.grad = module.weight.grad = module.bias.grad = None
            return y

        return fn

    def inference(module: Any) -> Callable[[], Any]:
        module.eval()

        def fn() -> Any:
            with torch.no_grad():
                return module(xe)

        return fn

    return {
        "fwd_bwd": {
            "ours": step(SyncBatchNorm(channels)),
            "torch": step(torch.nn.BatchNorm2d(channels)),
        },
        "eval": {
            "ours": inference(SyncBatchNorm(channels)),
            "torch": inference(torch.nn.BatchNorm2d(channels)),
        },
    }


def _max_error(y: Any, ref: np.ndarray) -> float:
    return float(np.max(np.abs(_f64(y) - ref))) if ref.size else 0.0


def run_case(case: Case, repeats: int, threads: int) -> dict[str, Any]:
    """Every contender on one case; times in seconds, ratios torch/ours."""
    x, dy = _data(case)
    ref = _reference_y(x, case.axis, 1e-5)
    xa, dya = _api_inputs(case, x, dy)
    contenders = {
        "host": _ours(case, xa, dya, "host"),
        "portable": _ours(case, xa, dya, "portable"),
    }
    torch_c = _torch(case, x, dy)
    if torch_c is not None:
        contenders["torch"] = torch_c
    row: dict[str, Any] = {"case": case.name, "shape": list(case.shape), "dtype": case.dtype}
    copy = _copier(xa, threads)
    nbytes = math.prod(case.shape) * _itemsize(case.dtype)
    copy_times = []
    for what in ("fwd", "fwd_bwd"):
        fns = {n: c[what] for n, c in contenders.items() if c[what] is not None}
        # The portable route gets its own rotation: its x-sized temporaries
        # (~100 ms of them for the large half-precision cases) slowed the
        # contenders that followed it, up to twice for half precision.
        portable = fns.pop("portable", None)
        # The copy runs in the same rotation: what the other contenders left
        # in the caches it finds too, so the floor is measured alike.
        row[what] = _interleaved({**fns, "copy": copy}, repeats)
        copy_times.append(row[what].pop("copy"))
        if portable is not None:
            row[what]["portable"] = _interleaved({"portable": portable}, repeats)["portable"]
    row["copy_gbps"] = 2 * nbytes / statistics.median(copy_times) / 1e9
    row["error"] = {n: _max_error(c["y"], ref) for n, c in contenders.items()}
    row["route"] = contenders["host"]["route"]
    row["bytes"] = nbytes
    for what, passes in (("fwd", 3), ("fwd_bwd", 8)):
        row[f"{what}_floor_fraction"] = {
            n: passes * nbytes / t / 1e9 / row["copy_gbps"] for n, t in row[what].items()
        }
        if "torch" in row[what]:
            row[f"{what}_ratio"] = {
                n: row[what]["torch"] / t for n, t in row[what].items() if n != "torch"
            }
    modules = _torch_modules(case, x, dy)
    if modules is not None:
        seconds = _interleaved(modules["fwd_bwd"], repeats)
        evals = _interleaved(modules["eval"], repeats)
        row["torch_module"] = {
            "fwd_bwd": seconds,
            "ratio": seconds["torch"] / seconds["ours"],
            "eval": evals,
            "eval_ratio": evals["torch"] / evals["ours"],
        }
    if math.prod(case.shape) > 4096:
        # tracemalloc sees numpy's allocations, not torch's (the portable route's
        # on torch tensors): those would read as nothing.
        routes = ("host", "portable") if isinstance(xa, np.ndarray) else ("host",)
        row["peak_memory"] = {
            route: dict(zip(("fwd", "bwd"), _peak_ratios(contenders[route], dya), strict=True))
            for route in routes
        }
    return row


# -- the job --------------------------------------------------------------------
def _set_threads(threads: int) -> None:
    os.environ["ARRAYSYNCBN_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def machine() -> dict[str, Any]:
    """CPU, cores and versions, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {
        "arraysyncbn": __version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    for name in ("numba", "torch"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "route": _route_info(),
    }


def _route_info() -> str:
    from ._fast import route_info

    return route_info()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """All cases in this process (whatever its allocator settings)."""
    _set_threads(args.threads)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if not _has_torch():  # numpy has no bfloat16
        cases = tuple(c for c in cases if c.dtype != "bfloat16")
    largest = max(math.prod(c.shape) * _itemsize(c.dtype) for c in cases)
    copy = _copy_gbps(largest, args.repeats, args.threads)
    rows = [run_case(c, args.repeats, args.threads) for c in cases]
    return {"copy_gbps": copy, "threads": args.threads, "rows": rows}


def _child(args: argparse.Namespace, allocator: str) -> dict[str, Any]:
    env = dict(os.environ)
    for name in TUNED_MALLOC:
        env.pop(name, None)
    if allocator == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [sys.executable, "-m", "arraysyncbn", "bench", _CHILD_FLAG, allocator, "--json"]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    if args.quick:
        cmd.append("--quick")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child ({allocator} allocator) failed:\n{done.stderr}")
    return json.loads(done.stdout)


def _mpi_world() -> Any:
    if not any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def measure_sync(args: argparse.Namespace, world: Any) -> dict[str, Any]:
    """The synchronized step (MPICommunicator) against comm=None, same shape."""
    from .comm.mpi import MPICommunicator

    _set_threads(args.threads)
    comm = MPICommunicator(world)
    case = QUICK_CASES[0] if args.quick else Case("(16,64,56,56) NCHW", (16, 64, 56, 56), 1)
    x, dy = _data(case, seed=world.Get_rank())
    channels = case.shape[1]
    w, b = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)

    def step(c: Any) -> Callable[[], Any]:
        def fn() -> Any:
            _, _, _, saved = F.sync_batch_norm_forward(x, w, b, rm, rv, comm=c)
            return F.sync_batch_norm_backward(dy, saved)

        return fn

    # Interleave with a barrier per sample so both ranks time the same thing.
    fns = {"synchronized": step(comm), "local": step(None)}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(max(args.repeats, 3)):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            world.Barrier()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    slowest = {n: world.allreduce(v, op=_mpi_max()) for n, v in med.items()}
    return {
        "case": case.name,
        "ranks": world.Get_size(),
        "threads": args.threads,
        "seconds": slowest,
        "ratio": slowest["synchronized"] / slowest["local"],
    }


def _mpi_max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parser().parse_args(argv)
    if args.threads < 1:
        _parser().error(f"--threads must be at least 1, got {args.threads}")
    if args.repeats < 3:
        _parser().error(
            f"--repeats must be at least 3 (medians of interleaved runs), got {args.repeats}"
        )
    _set_threads(args.threads)  # before machine(): its route line names the threads
    try:
        check_environment()
    except ValueError as exc:  # a bad ARRAYSYNCBN_FAST: say so, as the job does
        print(f"arraysyncbn bench: {exc}", file=sys.stderr)
        return 2
    world = _mpi_world()
    if world is not None:
        result = {"machine": machine(), "mpi": measure_sync(args, world)}
        if world.Get_rank() == 0:
            _emit(args, result)
        return 0
    if args.child_allocator is not None:
        print(json.dumps(measure(args)))
        return 0
    result = {"machine": machine()}
    if not args.default_allocator_only:
        result["tuned"] = _child(args, "tuned")
    result["default"] = _child(args, "default")
    _emit(args, result)
    return 0


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.plot:
        from .bench_report import plot

        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    elif args.markdown:
        from .bench_report import markdown

        print(markdown(result))
    else:
        from .bench_report import print_tables

        print_tables(result)
