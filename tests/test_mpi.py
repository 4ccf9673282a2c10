"""SyncBN on real MPI ranks: ``mpiexec -n K python -m mpi4py tests/mpi_scripts/...``.

Each test launches K = 1..4 ranks through subprocess with a timeout (the
whole process group is killed when it expires, so a hang fails the test
instead of stalling the suite) and checks the exit status and the ``OK``
line each rank prints when its assertions passed. The rank scripts are
described in ``tests/mpi_scripts/cases.py`` and ``properties.py``.

Skipped when mpi4py or mpiexec is missing (``pip install ".[mpi]"``).
``ARRAYSYNCBN_MPI_EXAMPLES`` sets the hypothesis examples per backend and
mode of the MPI property test (default 20).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import BACKENDS, cupy_usable
from jobs import run_job

pytest.importorskip("mpi4py")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


def _find_mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()
if MPIEXEC is None:
    pytest.skip("mpiexec not found (pip install '.[mpi]' brings one)", allow_module_level=True)

pytestmark = pytest.mark.mpi
RANKS = [1, 2, 3, 4]
EXAMPLES = int(os.environ.get("ARRAYSYNCBN_MPI_EXAMPLES", "20"))


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    ended_at: float

    def oks(self, what: str) -> int:
        """How many ranks reported ``OK what``."""
        return self.stdout.count(f"OK {what} rank ")

    def __str__(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f} s\n{self.stdout}\n{self.stderr}"


def mpirun(
    k: int, *args: str, timeout: float = 60, env: dict[str, str] | None = None, mpi4py: bool = True
) -> Job:
    """Run ``mpiexec -n k python [-m mpi4py] args``; kill the whole job on timeout."""
    full_env = {key: v for key, v in os.environ.items() if not key.startswith("ARRAYSYNCBN_")}
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")])
    full_env.update(PYTHONPATH=path, **(env or {}))
    launcher = [sys.executable, "-m", "mpi4py"] if mpi4py else [sys.executable]
    cmd = [MPIEXEC, "-n", str(k), *launcher, *args]
    done = run_job(cmd, timeout=timeout, env=full_env, cwd=ROOT)
    return Job(done.returncode, done.stdout, done.stderr, done.seconds, time.time())  # type: ignore[attr-defined]


def script(name: str) -> str:
    return str(SCRIPTS / name)


def assert_every_rank_ok(job: Job, k: int, what: str) -> None:
    assert job.returncode == 0, str(job)
    assert job.oks(what) == k, str(job)


# -- SyncBN across ranks -------------------------------------------------------------
@pytest.mark.parametrize("k", RANKS)
def test_properties_match_reference_on_every_backend(k: int) -> None:
    """Hypothesis over MPI: derandomized, same example on every rank, shared verdict."""
    job = mpirun(k, script("properties.py"), str(EXAMPLES), timeout=240)
    assert job.returncode == 0, str(job)
    present = [b.name for b in BACKENDS if not b.name.startswith("cupy") or cupy_usable()]
    assert "strict-device1" in present, "array-api-strict (the test extra) is needed"
    for backend in present:
        assert job.oks(f"properties[{backend}]") == k, str(job)


@pytest.mark.parametrize("k", RANKS)
def test_uneven_empty_and_ragged_shards_match_reference(k: int) -> None:
    assert_every_rank_ok(mpirun(k, script("cases.py"), "shards"), k, "shards")


@pytest.mark.parametrize("k", RANKS)
def test_pytorch_distributed_running_statistics(k: int) -> None:
    """Rank i holds (2, 2, 2**(i+1)); 100 steps at momentum 0.99; bitwise-equal state."""
    assert_every_rank_ok(mpirun(k, script("cases.py"), "pytorch"), k, "pytorch")


@pytest.mark.parametrize("k", RANKS)
def test_subgroups_from_split_normalize_independently(k: int) -> None:
    assert_every_rank_ok(mpirun(k, script("cases.py"), "subgroups"), k, "subgroups")


# -- never hang ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("what", ["channels", "dtype"])
def test_mismatch_raises_on_every_rank(k: int, what: str) -> None:
    job = mpirun(k, script("cases.py"), "mismatch", what, timeout=30)
    assert_every_rank_ok(job, k, f"mismatch[{what}]")
    assert job.stdout.count("mismatch seen: ranks disagree") == k, str(job)


def test_mismatch_on_a_later_call_with_check_every_call() -> None:
    job = mpirun(3, script("cases.py"), "mismatch_later", env={"ARRAYSYNCBN_CHECK": "1"})
    assert_every_rank_ok(job, 3, "mismatch_later")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_first_step_and_a_nan_batch(k: int) -> None:
    """Two statistics allreduces on the first step far from zero, one after;
    a NaN on the last rank warns on every rank and poisons nothing."""
    assert_every_rank_ok(mpirun(k, script("cases.py"), "exact"), k, "exact")


@pytest.mark.parametrize("what", ["swapped", "skipped", "ahead", "eval_alone"])
def test_calls_out_of_step_raise_on_every_rank_naming_the_calls(what: str) -> None:
    """Swapped layers, a skipped backward, a rank one forward ahead: the
    signature in the buffer makes every rank raise, naming its call (and the
    other's); one rank's eval forwards and evaluation copy change nothing."""
    job = mpirun(2, script("cases.py"), "signature", what, timeout=60)
    assert_every_rank_ok(job, 2, f"signature[{what}]")
    if what != "eval_alone":
        assert job.stdout.count("mismatch seen: ranks are in different SyncBN calls") == 2


def _raise_time(job: Job) -> float:
    stamps = re.findall(r"raising at ([0-9.]+)", job.stdout)
    assert len(stamps) == 1, str(job)
    return float(stamps[0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rank_raising_mid_step_ends_job_under_python_m_mpi4py(k: int) -> None:
    job = mpirun(k, script("cases.py"), "raise", timeout=60)
    assert job.returncode != 0, str(job)
    assert "planted failure" in job.stderr, str(job)
    assert "went past the failure" not in job.stdout, str(job)
    assert job.ended_at - _raise_time(job) < 10, str(job)


@pytest.mark.parametrize("k", [2, 4])
def test_rank_raising_mid_step_ends_job_under_cli_run_aborting(k: int) -> None:
    """The CLI's own abort wrapper, in a plain ``python`` run (no ``-m mpi4py``)."""
    job = mpirun(k, script("cases.py"), "raise_cli", timeout=60, mpi4py=False)
    assert job.returncode != 0, str(job)
    assert "planted failure" in job.stderr and "aborting the MPI job" in job.stderr, str(job)
    assert job.ended_at - _raise_time(job) < 10, str(job)


# -- the watchdog: ARRAYSYNCBN_TIMEOUT ---------------------------------------------------
def _skip_time(job: Job) -> float:
    stamps = re.findall(r"skipped at ([0-9.]+)", job.stdout)
    assert len(stamps) == 1, str(job)
    return float(stamps[0])


@pytest.mark.parametrize(("k", "skipped"), [(2, "forward"), (3, "forward"), (2, "backward")])
def test_a_skipped_call_aborts_the_job_naming_the_call(k: int, skipped: str) -> None:
    """The last rank skips step 3's collective and stays away for 120 s; the
    others give up after ARRAYSYNCBN_TIMEOUT=2 s and abort the whole job."""
    job = mpirun(k, script("cases.py"), "skip", skipped, timeout=40,
                 env={"ARRAYSYNCBN_TIMEOUT": "2"})  # fmt: skip
    assert job.returncode != 0, str(job)
    assert "went past the skipped call" not in job.stdout, str(job)
    assert job.ended_at - _skip_time(job) < 12, str(job)
    lines = [line for line in job.stderr.splitlines() if line.startswith("arraysyncbn: rank ")]
    assert lines, str(job)
    for line in lines:  # every waiting rank that got to say it names the same call
        assert f"SyncBatchNorm layer 1, call 3, {skipped}" in line, line
        assert "aborting the MPI job" in line and "ARRAYSYNCBN_TIMEOUT" in line, line
        waited = float(re.search(r"waited ([0-9.]+) s", line).group(1))  # type: ignore[union-attr]
        assert 2.0 <= waited < 6.0, line


@pytest.mark.parametrize("k", [2, 3])
def test_a_late_rank_within_the_timeout_completes(k: int) -> None:
    """0.3 s late to every call: longer than the spin, shorter than the limit."""
    job = mpirun(k, script("cases.py"), "straggler", env={"ARRAYSYNCBN_TIMEOUT": "5"})
    assert_every_rank_ok(job, k, "straggler")


def test_timeout_zero_waits_in_the_blocking_allreduce() -> None:
    job = mpirun(3, script("cases.py"), "shards", env={"ARRAYSYNCBN_TIMEOUT": "0"})
    assert_every_rank_ok(job, 3, "shards")


def test_bad_timeout_setting_fails_clearly() -> None:
    job = mpirun(2, script("cases.py"), "shards", env={"ARRAYSYNCBN_TIMEOUT": "soon"})
    assert job.returncode != 0, str(job)
    assert "ARRAYSYNCBN_TIMEOUT='soon' is not understood" in job.stderr, str(job)


# -- host, staged and CUDA-aware transfer ----------------------------------------------
@pytest.mark.parametrize("k", RANKS)
def test_strict_torch_and_staged_device_arrays_through_mpi(k: int) -> None:
    job = mpirun(k, script("cases.py"), "transfer", "auto")
    assert_every_rank_ok(job, k, "transfer[auto]")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_forcing_cuda_aware(forced: str) -> None:
    """Forced either way: ``cuda_aware`` follows, CUDA memory would take the
    matching path, and host and staged arrays still give the reference."""
    job = mpirun(2, script("cases.py"), "transfer", forced,
                 env={"ARRAYSYNCBN_CUDA_AWARE": forced})  # fmt: skip
    assert_every_rank_ok(job, 2, f"transfer[{forced}]")


def test_bad_cuda_aware_setting_fails_clearly() -> None:
    job = mpirun(2, script("cases.py"), "transfer", "auto",
                 env={"ARRAYSYNCBN_CUDA_AWARE": "maybe"})  # fmt: skip
    assert job.returncode != 0, str(job)
    assert "ARRAYSYNCBN_CUDA_AWARE='maybe' is not understood" in job.stderr, str(job)


# -- the job: mpiexec -n K python -m arraysyncbn -----------------------------------------
@pytest.mark.parametrize("k", RANKS)
def test_cli_json_passes_on_k_ranks(k: int) -> None:
    job = mpirun(k, "-m", "arraysyncbn", "--json", "--steps", "3", mpi4py=False)
    assert job.returncode == 0, str(job)
    result = json.loads(job.stdout)  # one object, from rank 0 only
    assert result["ok"] is True and result["world_size"] == k
    assert result["backend"] == "numpy" and result["mpi_library"] != "none"
    assert len(result["shapes"]) == k
    for key in ("forward_max_error", "backward_max_error", "forward_ms", "allreduce_us"):
        assert isinstance(result[key], float), key


def test_cli_default_job_on_four_ranks_prints_the_table() -> None:
    """With TERM set, as in a terminal, but stderr a pipe: no progress bar codes."""
    job = mpirun(4, "-m", "arraysyncbn", mpi4py=False, timeout=60,
                 env={"TERM": "xterm-256color"})  # fmt: skip
    assert job.returncode == 0, str(job)
    assert "world size" in job.stdout and "passed" in job.stdout, str(job)
    assert job.stdout.count("world size") == 1, "only rank 0 prints"
    assert "\x1b[" not in job.stderr, repr(job.stderr)


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (("--help",), 0, "usage:"),
        (("--seed", "-1"), 2, "--seed must be >= 0"),
        (("--shape", "8"), 2, "--shape needs at least 2"),
    ],
)
def test_cli_help_and_argument_errors_print_once(args, status: int, text: str) -> None:
    job = mpirun(2, "-m", "arraysyncbn", *args, mpi4py=False, timeout=60)
    assert job.returncode == status, str(job)
    assert (job.stdout + job.stderr).count(text) == 1, str(job)
    assert (job.stdout + job.stderr).count("usage:") == 1, str(job)
    assert "Traceback" not in job.stderr, str(job)


@pytest.mark.parametrize(
    "variable, value", [("ARRAYSYNCBN_THREADS", "abc"), ("ARRAYSYNCBN_FAST", "foo")]
)
def test_cli_bad_fast_route_setting_is_one_line_and_exit_2(variable: str, value: str) -> None:
    """Not a traceback per rank and exit 1: the default shape put some ranks'
    inputs over the threading size, and only those read ARRAYSYNCBN_THREADS."""
    job = mpirun(2, "-m", "arraysyncbn", "--steps", "0", mpi4py=False, timeout=60,
                 env={variable: value})  # fmt: skip
    assert job.returncode == 2, str(job)
    assert job.stderr.count(f"{variable} must be") == 1, str(job)
    assert "Traceback" not in job.stderr, str(job)


def test_cli_fails_when_the_check_fails() -> None:
    """A planted error in the kernels must turn into exit status 1 on the job."""
    plant = (
        "import os, sys, runpy, arraysyncbn.kernels as k; f = k.invstd_of; "
        "os.environ['ARRAYSYNCBN_FAST'] = '0'; "
        "k.invstd_of = lambda *a, **kw: f(*a, **kw) * 1.001; "
        "sys.argv = ['arraysyncbn', '--json', '--steps', '0']; "
        "runpy.run_module('arraysyncbn', run_name='__main__')"
    )
    job = mpirun(2, "-c", plant, mpi4py=False)
    assert job.returncode == 1, str(job)
    result = json.loads(job.stdout)
    assert result["ok"] is False and result["forward_max_error"] > 1e-4, result


def test_bench_under_mpiexec_times_the_synchronized_step() -> None:
    job = mpirun(2, "-m", "arraysyncbn", "bench", "--quick", "--repeats", "3", "--json",
                 mpi4py=False, timeout=120)  # fmt: skip
    assert job.returncode == 0, str(job)
    result = json.loads(job.stdout)  # rank 0 alone prints
    mpi = result["mpi"]
    assert mpi["ranks"] == 2 and mpi["seconds"]["synchronized"] > 0 and mpi["ratio"] > 0
