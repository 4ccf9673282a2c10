"""Tables (rich) and the ratio plot (matplotlib) of ``python -m arraysyncbn bench``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["markdown", "plot", "print_tables"]


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


_COLUMNS = (
    "case",
    "ratio fwd host / portable",
    "ratio fwd+bwd host / portable",
    "fwd host / torch",
    "fwd+bwd host / torch",
    "floor host fwd / fwd+bwd",
    "max error host / portable / torch",
    "peak host fwd / bwd",
)


def _row_cells(r: dict[str, Any]) -> list[str]:
    """One case's cells, in the order of :data:`_COLUMNS`."""
    fwd, fb = r["fwd"], r["fwd_bwd"]
    fr, fbr = r.get("fwd_ratio", {}), r.get("fwd_bwd_ratio", {})
    err = r["error"]
    peak = r.get("peak_memory", {}).get("host")
    return [
        r["case"] + ("" if r["route"] == "host" else f" ({r['route']} route)"),
        f"{_fmt(fr.get('host'))} / {_fmt(fr.get('portable'))}",
        f"{_fmt(fbr.get('host'))} / {_fmt(fbr.get('portable'))}",
        f"{_fmt_time(fwd.get('host'))} / {_fmt_time(fwd.get('torch'))}",
        f"{_fmt_time(fb.get('host'))} / {_fmt_time(fb.get('torch'))}",
        f"{_fmt(r['fwd_floor_fraction'].get('host'))} / "
        f"{_fmt(r['fwd_bwd_floor_fraction'].get('host'))}",
        " / ".join(_fmt(err.get(n), ".1e") for n in ("host", "portable", "torch")),
        "–" if peak is None else f"{peak['fwd']:.2f} / {peak['bwd']:.2f}",
    ]


def _add_columns(t: Table, heads: Sequence[str], wide: bool) -> None:
    """The case column (never squeezed away), then right-aligned figures that
    wrap inside their cells only when the table is not ``wide``."""
    for i, head in enumerate(heads):
        if i == 0:
            t.add_column(head, justify="left", min_width=12)
        else:
            t.add_column(head, justify="right", no_wrap=wide)


def rows_table(run: dict[str, Any], title: str, wide: bool = True) -> Table:
    """One table: per case, torch/ours ratios, times, floor fractions, errors, memory.
    ``wide``: figures never wrap (a log, a terminal of 200 columns or more)."""
    t = Table(title=title, title_justify="left")
    # Two lines a header: what, then which contenders.
    _add_columns(t, [col.replace(" host", "\nhost", 1) for col in _COLUMNS], wide)
    for r in run["rows"]:
        t.add_row(*_row_cells(r))
    return t


_MODULE_COLUMNS = (
    "case",
    "arraysyncbn.torch.SyncBatchNorm fwd+bwd",
    "torch.nn.BatchNorm2d fwd+bwd",
    "ratio",
    "ours eval",
    "BatchNorm2d eval",
    "eval ratio",
)


def _module_rows(run: dict[str, Any]) -> list[tuple[str, ...]]:
    """Cells of the module contender's rows (NCHW float32 and half precision)."""
    rows = []
    for r in run["rows"]:
        if "torch_module" in r:
            m = r["torch_module"]
            rows.append(
                (
                    r["case"],
                    _fmt_time(m["fwd_bwd"]["ours"]),
                    _fmt_time(m["fwd_bwd"]["torch"]),
                    _fmt(m["ratio"]),
                    _fmt_time(m["eval"]["ours"]),
                    _fmt_time(m["eval"]["torch"]),
                    _fmt(m["eval_ratio"]),
                )
            )
    return rows


def modules_table(run: dict[str, Any], title: str, wide: bool = True) -> Table | None:
    """The module contender's table, or None where it did not run."""
    rows = _module_rows(run)
    if not rows:
        return None
    t = Table(title=title, title_justify="left")
    _add_columns(t, _MODULE_COLUMNS, wide)
    for cells in rows:
        t.add_row(*cells)
    return t


def _mpi_line(mpi: dict[str, Any]) -> str:
    """The synchronized-against-local line of a run under mpiexec."""
    s = mpi["seconds"]
    return (
        f"{mpi['ranks']} MPI ranks, {mpi['case']} per rank, forward + backward: "
        f"synchronized {_fmt_time(s['synchronized'])}, comm=None {_fmt_time(s['local'])}, "
        f"ratio {mpi['ratio']:.3f}"
    )


def print_tables(result: dict[str, Any]) -> None:
    """Print the machine line and every run's table."""
    terminal = Console()
    # A file or pipe (a log) has no width: the tables get what they need
    # there, and no figure wraps inside its cell ("318.4" then "µs"). A
    # terminal keeps its own width (at least 150); below 200 columns the
    # figures wrap rather than squeeze the case column away.
    console = Console(width=max(terminal.width, 150) if terminal.is_terminal else 240)
    wide = console.width >= 200
    m = result["machine"]
    v = m["versions"]
    console.print(
        f"{m['cpu']}, {m['cores']} cores; {m['date']}; route: {m['route']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
    )
    for key, label in (("tuned", "glibc trimming off"), ("default", "default allocator")):
        run = result.get(key)
        if run is None:
            continue
        title = (
            f"{label}, {run['threads']} thread(s), copy bandwidth alone {run['copy_gbps']:.1f} "
            "GB/s (ratio = torch time / ours; floor = fraction of the copy bandwidth measured "
            "in the case's own rotation)"
        )
        console.print(rows_table(run, title, wide))
        modules = modules_table(
            run,
            f"{label}: modules, comm=None: forward + backward through autograd, and eval "
            "forward under torch.no_grad() (ratio = BatchNorm2d time / ours)",
            wide,
        )
        if modules is not None:
            console.print(modules)
    mpi = result.get("mpi")
    if mpi is not None:
        console.print(_mpi_line(mpi))


def plot(result: dict[str, Any], path: str) -> None:
    """Write a PNG of torch/ours ratios per case (host and portable routes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # the bench extra
        raise SystemExit(
            f"--plot needs matplotlib: pip install 'arraysyncbn[bench]' ({exc})"
        ) from exc
    run = result.get("tuned") or result.get("default")
    if run is None:
        raise SystemExit("--plot: nothing to plot (no single-process run in this result)")
    rows = [r for r in run["rows"] if "fwd_ratio" in r]
    if not rows:
        raise SystemExit("--plot: the ratios need torch, the reference contender")
    names = [r["case"] for r in rows]
    series = [
        ("host forward", "fwd_ratio", "host"),
        ("host fwd+bwd", "fwd_bwd_ratio", "host"),
        ("portable forward", "fwd_ratio", "portable"),
        ("portable fwd+bwd", "fwd_bwd_ratio", "portable"),
    ]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.2
    for i, (label, key, route) in enumerate(series):
        values = [r[key].get(route, float("nan")) if key in r else float("nan") for r in rows]
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("torch time / our time (higher is faster)")
    ax.set_title(
        f"SyncBN (world of one) vs torch.nn.functional.batch_norm, CPU, {run['threads']} thread(s)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The same figures as :func:`print_tables`, as Markdown (for docs/benchmarks.md)."""
    m = result["machine"]
    v = m["versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
    ]
    for key, label in (("tuned", "glibc trimming off"), ("default", "default allocator")):
        run = result.get(key)
        if run is None:
            continue
        lines += [
            f"**{label}, {run['threads']} thread(s)**, copy bandwidth "
            f"{run['copy_gbps']:.1f} GB/s alone. Ratio = torch time / ours (higher is faster); "
            "floor = fraction of the memory floor (3 × bytes forward, 8 × forward + backward, "
            "at the bandwidth of a copy of x timed in the case's own rotation); peak = extra "
            "memory traced per pass over bytes(y) / bytes(dx).",
            "",
            "| " + " | ".join(_COLUMNS) + " |",
            "|" + "---|" * len(_COLUMNS),
        ]
        for r in run["rows"]:
            lines.append("| " + " | ".join(_row_cells(r)) + " |")
        lines.append("")
        modules = _module_rows(run)
        if modules:
            lines += [
                f"Modules ({label}), comm=None: forward + backward through autograd, and "
                "eval forward under torch.no_grad(); ratio = BatchNorm2d time / ours.",
                "",
                "| " + " | ".join(_MODULE_COLUMNS) + " |",
                "|" + "---|" * len(_MODULE_COLUMNS),
                *("| " + " | ".join(cells) + " |" for cells in modules),
                "",
            ]
    mpi = result.get("mpi")
    if mpi is not None:
        lines.append(_mpi_line(mpi))
    return "\n".join(lines)
