"""What the two training demos share: command line, shards, verdict, CSV and plot.

``scripts/train_numpy.py`` and ``scripts/train_torch.py`` each train one model
three ways, for the same steps, from the same initial weights, on the same
sequence of global batches:

``whole_batch``
    one rank, the whole global batch, plain batch norm: the reference;
``syncbn``
    every rank of the job on its own (uneven) shard of the global batch, with
    synchronized batch norm and gradients averaged across ranks;
``local_bn``
    the same shards and gradient averaging, but each rank's batch norm sees
    only its own shard, as plain data-parallel training does.

The ``syncbn`` curve must equal the ``whole_batch`` one up to rounding (the
claim of SyncBN: data-parallel training behaves like one big batch); the
``local_bn`` curve must visibly differ. :func:`verdict` turns that into the
exit status. Everything here is plain Python and numpy: no communication, so
each rank can call any of it, and only rank 0 prints or writes files.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

RUNS = ("whole_batch", "syncbn", "local_bn")
LABELS = {
    "whole_batch": "1 rank, whole batch",
    "syncbn": "{ranks} ranks, SyncBN",
    "local_bn": "{ranks} ranks, local BN",
}

DEFAULT_SHARDS = (3, 5, 0, 8)
"""Per-rank samples of each global batch of 16: uneven, one rank empty. No
shard holds exactly one sample, so the ``local_bn`` run, where each rank
normalizes with its own shard's statistics, is defined on every rank (one
sample has no variance; an empty shard has nothing to normalize)."""

TOLERANCE = {"float64": 1e-5, "float32": 1e-4}
"""Largest relative difference per step allowed between ``syncbn`` and
``whole_batch``. The two runs do the same arithmetic in a different order
(per-shard sums merged across ranks instead of one sum over the batch), so
they differ by rounding, which SGD carries from step to step. Measured here
over hundreds of steps and several seeds: ~1e-14 in float64 and ~6e-7 in
float32 (where each operation rounds at ~6e-8); the bounds leave a margin of
a hundred and more for other models, seeds and BLAS libraries."""

VISIBLE = 1e-2
"""Smallest largest-relative-difference (over the steps) between ``local_bn``
and ``whole_batch`` that counts as a visible difference: a thousand times
the float64 bound and a hundred times the float32 one. (Local BN on shards
of 2 to 8 samples differs by tens of percent from the first step on.)"""


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (mpiexec or torchrun), else 0.

    Read from the environment, so help and argument errors can be printed
    once, before any communication exists.
    """
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


class RankZeroParser(argparse.ArgumentParser):
    """An ArgumentParser that prints help, usage and errors on rank 0 only.

    Every rank parses the same command line and exits alike (0 for
    ``--help``, 2 for an error); the message appears once instead of once
    per rank.
    """

    def _print_message(self, message: str, file: Any = None) -> None:
        if launcher_rank() == 0:
            super()._print_message(message, file)


def parse_shards(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated per-rank shard sizes, e.g. ``3,5,0,8``."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sample counts like 3,5,0,8, got {text!r}"
        ) from None
    if any(n < 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"shard sizes must be >= 0, got {text!r}")
    if 1 in sizes:
        raise argparse.ArgumentTypeError(
            f"no shard may hold exactly 1 sample, got {text!r}: the local-BN run "
            "normalizes each shard with its own statistics, and one sample has no variance"
        )
    if sum(sizes) < 2:
        raise argparse.ArgumentTypeError(
            f"the global batch needs at least 2 samples for batch statistics, got {text!r}"
        )
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (numpy's generators), got {value}")
    return value


def build_parser(
    script: str, doc: str, default_steps: int, faults: Sequence[str]
) -> argparse.ArgumentParser:
    """The options both demos take; ``faults`` are the ``--fault`` choices.

    ``script`` is the demo's file name, the program name in usage and
    errors: true however it was launched (``mpiexec -n K``, ``torchrun``,
    ``python``), where a full command such as ``mpiexec -n 4 python ...``
    would misquote every other launch. ``doc`` is its docstring: the first
    two paragraphs (what it does, how to launch it) are the description,
    the rest the epilog.
    """
    paragraphs = doc.split("\n\n")
    parser = RankZeroParser(
        prog=script,
        description="\n\n".join(paragraphs[:2]),
        epilog="\n\n".join(paragraphs[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=default_steps,
        help=f"SGD steps of each run (default: {default_steps})",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=_seed, default=0,
        help="seed of the data, the task and the initial weights (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default="float64",
        help=(
            "dtype of data, weights and arithmetic (default: float64, where the "
            f"agreement bound is {TOLERANCE['float64']:g}; float32: {TOLERANCE['float32']:g})"
        ),
    )  # fmt: skip
    parser.add_argument(
        "--shards", type=parse_shards, default=DEFAULT_SHARDS, metavar="N0,N1,...",
        help=(
            "samples per rank in each global batch, one number per rank "
            f"(default: {','.join(map(str, DEFAULT_SHARDS))}; 0 is allowed, 1 is not)"
        ),
    )  # fmt: skip
    parser.add_argument(
        "--csv", type=Path, default=None, metavar="PATH",
        help=f"where to write the per-step losses (default: {Path(script).stem}.csv "
        "in the current directory; - for stdout)",
    )  # fmt: skip
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PATH",
        help="also draw the three loss curves into this PNG (needs matplotlib)",
    )  # fmt: skip
    parser.add_argument(
        "--fault", choices=tuple(faults), default=None,
        help=(
            "plant a bug in the syncbn run, to see the check fail (exit 1): "
            "local-bn gives it local batch norm"
            + ("; equal-weights weights every rank's mean loss alike, ignoring shard sizes"
               if "equal-weights" in faults else "")
        ),
    )  # fmt: skip
    return parser


def check_plot_support(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail now, on every rank alike, if ``--plot`` cannot be honoured at the end."""
    if args.plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("--plot needs matplotlib (pip install matplotlib)")


def check_rank_count(
    parser: argparse.ArgumentParser, shards: Sequence[int], ranks: int, remedy: str
) -> None:
    """Fail (exit 2, said once) unless ``--shards`` gives one size per rank of the job.

    ``remedy`` says how to start as many ranks as there are shards, e.g.
    ``run mpiexec -n 4``.
    """
    if len(shards) != ranks:
        parser.error(
            f"--shards gives {len(shards)} shard sizes but the job has {ranks} ranks; "
            f"{remedy} or pass one size per rank"
        )


def offsets(shards: Sequence[int]) -> list[int]:
    """Where each rank's shard starts in the global batch, and the end."""
    return [int(v) for v in np.cumsum([0, *shards])]


@dataclass
class Curves:
    """The per-step training losses of the three runs, and what they show."""

    losses: dict[str, np.ndarray]
    ranks: int
    dtype: str
    extra: dict[str, float] = field(default_factory=dict)

    def relative(self, run: str) -> np.ndarray:
        """|loss(run) − loss(whole_batch)| / |loss(whole_batch)| per step."""
        ref = self.losses["whole_batch"]
        return np.abs(self.losses[run] - ref) / np.abs(ref)

    @property
    def steps(self) -> int:
        return len(self.losses["whole_batch"])


def verdict(curves: Curves, out: TextIO = sys.stdout, fault: str | None = None) -> int:
    """Print the agreement numbers; return 0 if SyncBN agrees and local BN differs."""
    tol = TOLERANCE[curves.dtype]
    sync = float(np.max(curves.relative("syncbn")))
    local = float(np.max(curves.relative("local_bn")))
    agrees = math.isfinite(sync) and sync <= tol
    differs = math.isfinite(local) and local >= VISIBLE
    final = {run: float(curves.losses[run][-1]) for run in RUNS}
    print(
        f"final loss: whole batch {final['whole_batch']:.6f}, SyncBN {final['syncbn']:.6f}, "
        f"local BN {final['local_bn']:.6f}",
        file=out,
    )
    for key, value in curves.extra.items():
        print(f"{key}: {value:.6g}", file=out)
    planted = f" [planted fault: {fault}]" if fault else ""
    print(
        f"SyncBN vs whole batch: max relative difference per step {sync:.3e} "
        f"(bound {tol:g}, {curves.dtype}): {'OK' if agrees else 'FAIL'}{planted}",
        file=out,
    )
    print(
        f"local BN vs whole batch: max relative difference per step {local:.3e} "
        f"(visible: >= {VISIBLE:g}): {'OK' if differs else 'FAIL'}",
        file=out,
    )
    return 0 if agrees and differs else 1


def print_progress(curves: Curves, out: TextIO) -> None:
    """The three losses every tenth of the run, and at the last step."""
    every = max(1, curves.steps // 10)
    for step in range(curves.steps):
        if step % every == 0 or step == curves.steps - 1:
            losses = "  ".join(f"{run} {curves.losses[run][step]:.6f}" for run in RUNS)
            print(f"step {step:4d}  {losses}", file=out)


def write_csv(curves: Curves, path: Path | None, default: str) -> str:
    """Write one row per step; return where it went (``-``: stdout)."""
    target = str(path) if path is not None else default
    header = [
        "step",
        *RUNS,
        "rel_diff_syncbn",
        "rel_diff_local_bn",
    ]
    sync, local = curves.relative("syncbn"), curves.relative("local_bn")

    def rows() -> list[list[str]]:
        return [
            [str(s), *(repr(float(curves.losses[r][s])) for r in RUNS),
             repr(float(sync[s])), repr(float(local[s]))]
            for s in range(curves.steps)
        ]  # fmt: skip

    if target == "-":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(rows())
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows())
    return target


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """The columns of a CSV written by :func:`write_csv` (for the tests)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}


def exit_status(
    curves: Curves,
    args: argparse.Namespace,
    rank: int,
    *,
    header: str,
    default_csv: str,
    plot_title: str,
) -> int:
    """Return the demo's exit status; on rank 0 also report, write the CSV and plot.

    Every rank judges the same curves, so every rank returns the same
    status; only rank 0 prints (``header`` first, on stderr when ``--csv -``
    sends the CSV to stdout) and writes files.
    """
    if rank != 0:
        return verdict(curves, out=io.StringIO(), fault=args.fault)  # same status, unprinted
    report = sys.stderr if str(args.csv) == "-" else sys.stdout
    print(header, file=report)
    print_progress(curves, report)
    status = verdict(curves, out=report, fault=args.fault)
    where = write_csv(curves, args.csv, default_csv)
    if where != "-":
        print(f"losses written to {where}", file=report)
    if args.plot is not None:
        plot(curves, args.plot, plot_title)
        print(f"plot written to {args.plot}", file=report)
    return status


def plot(curves: Curves, path: Path, title: str) -> None:
    """Draw the three loss curves, and their distance to the whole batch, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display under mpiexec
    import matplotlib.pyplot as plt

    steps = np.arange(curves.steps)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    styles = {
        "whole_batch": {"color": "black", "linewidth": 3.0, "alpha": 0.35},
        "syncbn": {"color": "tab:blue", "linewidth": 1.2, "linestyle": "--"},
        "local_bn": {"color": "tab:red", "linewidth": 1.2},
    }
    for run in RUNS:
        top.plot(steps, curves.losses[run], label=LABELS[run].format(ranks=curves.ranks),
                 **styles[run])  # fmt: skip
    top.set_ylabel("training loss")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8)
    # Steps where the runs agree bit for bit (a difference of 0) are drawn at
    # a tenth of the dtype's epsilon: the log scale has no 0.
    floor = float(np.finfo(curves.dtype).eps) / 10
    for run in ("syncbn", "local_bn"):
        bottom.semilogy(steps, np.maximum(curves.relative(run), floor),
                        label=LABELS[run].format(ranks=curves.ranks), **styles[run])  # fmt: skip
    bottom.axhline(TOLERANCE[curves.dtype], color="gray", linewidth=0.8, linestyle=":")
    bottom.text(0, TOLERANCE[curves.dtype], f" bound {TOLERANCE[curves.dtype]:g}",
                fontsize=7, color="gray", va="bottom")  # fmt: skip
    bottom.set_ylabel("relative difference\nto the whole batch")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    # A 64-colour palette keeps the PNG a third of its size, with no visible
    # loss (Pillow comes with matplotlib).
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(64).save(path, format="PNG", optimize=True)
