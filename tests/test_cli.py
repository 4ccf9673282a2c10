"""``python -m arraysyncbn`` as a single process (no mpiexec): help, a world of
one with and without mpi4py, and setup errors. The MPI runs are in
``tests/test_mpi.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arraysyncbn import cli
from arraysyncbn.testing import dtype_eps

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str, code: str | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "arraysyncbn"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_option() -> None:
    out = run("--help")
    assert out.returncode == 0
    for option in ("--backend", "--shape", "--dtype", "--channels-last", "--steps", "--seed",
                   "--json", "ARRAYSYNCBN_CUDA_AWARE"):  # fmt: skip
        assert option in out.stdout, option


def test_world_of_one_json() -> None:
    out = run("--json", "--steps", "2", "--shape", "4,3,5", "--channels-last")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["world_size"] == 1
    assert result["shapes"][0][-1] == 3 and result["channels_last"] is True


def test_world_of_one_without_mpi4py() -> None:
    hide = (
        "import sys, runpy; sys.modules['mpi4py'] = None; "
        "sys.argv = ['arraysyncbn', '--json', '--steps', '1']; "
        "runpy.run_module('arraysyncbn', run_name='__main__')"
    )
    out = run(code=hide)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mpi_library"] == "none" and result["ok"] is True
    assert result["world_size"] == 1 and result["cuda_aware"] is None


def test_table_says_none_for_the_mpi_library_without_mpi() -> None:
    result = {key: 0.0 for _, key in cli._ROWS}
    result.update(
        mpi_library="none", mpi_standard="", shapes=[[2, 3]], running_mean_max_error=0.0,
        running_var_max_error=0.0, forward_gbps=None, backward_gbps=None, ok=True,
    )  # fmt: skip
    assert cli._cell("mpi_library", result) == "none"


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_cupy_backend_without_cupy_is_a_clear_setup_error() -> None:
    out = run("--backend", "cupy")
    assert out.returncode == 2
    assert "--backend cupy needs cupy" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("shape", ["8", "8,x", "8,0,3", "-1,2"])
def test_bad_shapes_are_rejected_by_the_parser(shape: str) -> None:
    out = run("--shape", shape)
    assert out.returncode == 2 and "--shape" in out.stderr


def test_too_small_a_global_batch_is_a_setup_error() -> None:
    out = run("--shape", "1,3,1")
    assert out.returncode == 2 and "at least 2" in out.stderr


def test_bad_cuda_aware_setting_is_a_setup_error() -> None:
    pytest.importorskip("mpi4py")
    out = run("--steps", "0", extra_env={"ARRAYSYNCBN_CUDA_AWARE": "maybe"})
    assert out.returncode == 2, out.stderr
    assert "ARRAYSYNCBN_CUDA_AWARE='maybe' is not understood" in out.stderr


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("ARRAYSYNCBN_THREADS", "abc", "ARRAYSYNCBN_THREADS must be a positive integer, got 'abc'"),
        ("ARRAYSYNCBN_THREADS", "0", "ARRAYSYNCBN_THREADS must be a positive integer, got '0'"),
        (
            "ARRAYSYNCBN_FAST",
            "foo",
            "ARRAYSYNCBN_FAST must be 0, 1, true, false, yes, no, on or off",
        ),
    ],
)
def test_bad_fast_route_settings_are_a_one_line_setup_error(
    variable: str, value: str, message: str
) -> None:
    """As a bad ARRAYSYNCBN_TIMEOUT: one line and exit 2, not a traceback and 1."""
    out = run("--steps", "0", extra_env={variable: value})
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr


def test_bench_refuses_a_bad_fast_switch_in_one_line() -> None:
    out = run("bench", "--quick", "--repeats", "3", extra_env={"ARRAYSYNCBN_FAST": "foo"})
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.splitlines()) == 1 and "ARRAYSYNCBN_FAST must be" in out.stderr


def test_unloadable_mpi_outside_a_launcher_runs_as_a_world_of_one() -> None:
    pytest.importorskip("mpi4py")
    out = run("--json", "--steps", "0", extra_env={"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["mpi_library"] == "none"


@pytest.mark.parametrize("batch", [2, 4, 6, 8])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_batch_sizes_are_always_uneven(batch: int, world: int) -> None:
    for seed in range(5):
        sizes = cli._batch_sizes(seed, batch, world)
        assert len(set(sizes)) > 1, (seed, sizes)
        assert all(batch // 2 <= n <= batch for n in sizes)


# -- argument errors, printed once (issue 7, items 10 and 11) -------------------------
def test_negative_seed_is_an_argument_error() -> None:
    out = run("--seed", "-1", "--steps", "0")
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("--seed must be >= 0, got -1") == 1, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "status"), [(("--help",), 0), (("--seed", "-1"), 2), (("--shape", "8"), 2)]
)
def test_help_and_argument_errors_are_printed_by_rank_zero_only(args, status: int) -> None:
    """A rank that the launcher numbered 1 exits like rank 0, silently."""
    zero = run(*args, extra_env={"PMI_RANK": "0"})
    assert zero.returncode == status and (zero.stdout + zero.stderr).strip()
    other = run(*args, extra_env={"PMI_RANK": "1"})
    assert other.returncode == status
    assert other.stdout == "" and other.stderr == "", other


def test_launcher_rank_reads_the_launchers_environment(monkeypatch) -> None:
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert cli.launcher_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert cli.launcher_rank() == 3


# -- the progress bar only on a terminal (issue 7, item 12) ---------------------------
def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch, tmp_path) -> None:
    """Even under mpiexec with TERM set (rank 0 of 2), as a redirected log would be."""
    from comms import ForbiddenComm

    monkeypatch.setenv("TERM", "xterm-256color")
    world = cli.World(ForbiddenComm(), None, "fake", "")
    assert world.size == 2 and world.rank == 0
    with open(tmp_path / "stderr.log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert cli._progress(cli.build_parser().parse_args([]), world).disable
        on = cli.build_parser().parse_args(["--progress", "on"])
        assert not cli._progress(on, world).disable


@pytest.mark.parametrize("fast, route", [("1", "host (numba"), ("0", "portable (array API)")])
def test_the_job_says_which_kernels_ran(fast: str, route: str) -> None:
    out = run("--json", "--steps", "0", extra_env={"ARRAYSYNCBN_FAST": fast})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["route"].startswith(route)


def test_bench_quick_json_reports_every_contender() -> None:
    out = run("bench", "--quick", "--repeats", "3", "--default-allocator-only", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "tuned" not in result and result["machine"]["route"].startswith("host")
    run_ = result["default"]
    assert run_["copy_gbps"] > 0
    names = [r["case"] for r in run_["rows"]]
    assert any("tiny" in n for n in names) and any("channels-last" in n for n in names)
    for row in run_["rows"]:
        assert row["route"] == "host", row["case"]
        for what in ("fwd", "fwd_bwd"):
            contenders = set(row[what])
            assert {"host", "portable"} <= contenders, (row["case"], what)
            assert all(t > 0 for t in row[what].values())
        # Errors against float64 are measured, finite and small for our routes:
        # a few dozen ulps of the output dtype (y is in units of std).
        bound = 64 * dtype_eps(row["dtype"])
        assert 0 <= row["error"]["host"] < bound and 0 <= row["error"]["portable"] < bound
        if importlib.util.find_spec("torch") is not None:
            assert "torch" in row["fwd"] and row["fwd_ratio"]["host"] > 0
            # The modules (arraysyncbn.torch vs BatchNorm2d) on NCHW cases only.
            nchw = "NCHW" in row["case"]
            assert ("torch_module" in row) == nchw, row["case"]
            if nchw:
                m = row["torch_module"]
                assert m["ratio"] > 0 and set(m["fwd_bwd"]) == {"ours", "torch"}
                assert m["eval_ratio"] > 0 and set(m["eval"]) == {"ours", "torch"}
    # The same result as terminal tables, printed to a pipe (a log): no figure
    # wraps inside its cell ("318.4" on one line, "µs" on the next).
    import contextlib
    import io

    from arraysyncbn import bench_report

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_report.print_tables(result)
    text = printed.getvalue()
    assert "µs" in text or "ms" in text, text
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert not any(c in ("µs", "ms", "s") or c.startswith(("µs", "ms")) for c in cells), line
    # On a terminal of 150 columns the figures may wrap, but every case
    # keeps its name (the case column is never squeezed to nothing).
    from rich.console import Console

    narrow = Console(width=150, force_terminal=True, record=True, file=io.StringIO())
    for table in (
        bench_report.rows_table(run_, "t", wide=False),
        bench_report.modules_table(run_, "m", wide=False),
    ):
        if table is not None:
            narrow.print(table)
    shown = narrow.export_text()
    for row in run_["rows"]:
        assert row["case"].split()[0] in shown, (row["case"], shown)


def test_bench_markdown_has_the_module_table() -> None:
    """--markdown gives the same figures as the terminal tables, modules included."""
    pytest.importorskip("torch")
    out = run("bench", "--quick", "--repeats", "3", "--default-allocator-only", "--markdown")
    assert out.returncode == 0, out.stderr
    assert (
        "| case | arraysyncbn.torch.SyncBatchNorm fwd+bwd | torch.nn.BatchNorm2d fwd+bwd | ratio "
        "| ours eval | BatchNorm2d eval | eval ratio |"
    ) in out.stdout
    assert "| (4,64,28,28) NCHW |" in out.stdout.split("Modules (default allocator)")[1]


def test_bench_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "ratios.png"
    out = run("bench", "--quick", "--repeats", "3", "--default-allocator-only", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "default allocator" in out.stdout


def test_bench_help_counts_the_quick_cases() -> None:
    """It said "four small cases" after a fifth was added."""
    from arraysyncbn import bench

    text = " ".join(bench._parser().format_help().split())
    assert f"--quick {len(bench.QUICK_CASES)} small cases" in text, text


def test_a_closed_stdout_ends_the_run_quietly() -> None:
    """``python -m arraysyncbn --json | head -c 300``: the reader goes away
    before the job writes; status 1 and no BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "arraysyncbn", "--json", "--steps", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=120)
    text = err.decode()
    assert "BrokenPipeError" not in text and "Traceback" not in text, text
    assert proc.returncode == 1, (proc.returncode, text)


def test_a_broken_pipe_elsewhere_is_an_error(capfd) -> None:
    """Only a closed stdout ends the run quietly: a BrokenPipeError from any
    other pipe propagates (with its traceback), stdout left as it was."""

    def broken() -> int:
        raise BrokenPipeError(32, "a pipe to a child closed")

    with pytest.raises(BrokenPipeError):
        cli.run_aborting(broken)
    print("stdout still works")  # not pointed at devnull
    assert "stdout still works" in capfd.readouterr().out


def test_bench_rejects_bad_arguments() -> None:
    """Each bad option is named alone, with the value given."""
    out = run("bench", "--repeats", "1")
    assert out.returncode == 2 and "--repeats must be at least 3" in out.stderr
    assert "--threads" not in out.stderr.splitlines()[-1], out.stderr
    out = run("bench", "--threads", "0")
    assert out.returncode == 2 and "--threads must be at least 1, got 0" in out.stderr


def test_without_numba_the_job_runs_the_portable_route_and_says_why() -> None:
    code = (
        "import sys, runpy; sys.modules['numba'] = None; "  # import numba now fails
        "sys.argv = ['arraysyncbn', '--json', '--steps', '0']; "
        "runpy.run_module('arraysyncbn', run_name='__main__')"
    )
    out = run(code=code)
    assert out.returncode == 0, out.stderr
    route = json.loads(out.stdout)["route"]
    assert route.startswith("portable (array API): numba cannot be imported"), route


def test_bench_with_threads_runs_every_dtype() -> None:
    """The copy floor and the threaded kernels on every case's dtype (float16
    broke the threaded copy once: numba has no float16)."""
    out = run("bench", "--quick", "--repeats", "3", "--default-allocator-only", "--json",
              "--threads", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["default"]["rows"]
    assert all(r["copy_gbps"] > 0 for r in rows)
