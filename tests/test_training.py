"""The training demos ``scripts/train_numpy.py`` and ``scripts/train_torch.py``.

Each test runs a short version of a demo (a few SGD steps) as a real MPI job,
``mpiexec -n 4`` through subprocess with a timeout that kills the whole
process group, and checks what the demo claims from the CSV it writes: the
4-rank SyncBN loss curve equals the 1-rank whole-batch one to the stated
relative bound at every step, and the 4-rank local-BN curve visibly differs.
The check must be able to fail: with a planted fault (``--fault``) the demo
exits 1.

Skipped without mpi4py/mpiexec; the torch demo's tests also without torch or
``arraysyncbn.torch``.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs import run_job

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TOLERANCE = {"float64": 1e-5, "float32": 1e-4}  # the demos' stated bounds
VISIBLE = 1e-2  # the least relative difference local BN must show at some step


def _beside_python(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


MPIEXEC = _beside_python("mpiexec")
TORCHRUN = _beside_python("torchrun")


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install '.[mpi]')"
    if MPIEXEC is None:
        return "mpiexec not found (pip install '.[mpi]' brings one)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


@functools.cache
def _torch_demo_missing() -> str | None:
    """Why the torch demo cannot run in the jobs' environment, or None.

    Asked of a fresh interpreter with the jobs' PYTHONPATH: what this test
    process happens to import says nothing about the tree the jobs run.
    """
    probe = "import torch.distributed, arraysyncbn.torch; arraysyncbn.TorchDistributedCommunicator"
    job = subprocess.run([sys.executable, "-c", probe], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    if job.returncode == 0:
        return None
    last = (job.stderr.strip().splitlines() or ["?"])[-1]
    return f"the torch demo needs torch and arraysyncbn.torch: {last}"


def skip_without_torch_demo() -> None:
    reason = _torch_demo_missing()
    if reason is not None:
        pytest.skip(reason)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # A hung collective ends the job in a minute, before the test's own timeout.
    env["ARRAYSYNCBN_TIMEOUT"] = "60"
    env["OMP_NUM_THREADS"] = env["NUMBA_NUM_THREADS"] = "1"  # 4 ranks on few cores
    return env


def launch(cmd: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; kill its whole process group and fail if it outlasts ``timeout``."""
    return run_job(cmd, timeout=timeout, env=_env(), cwd=cwd)


def mpiexec(script: str, *args: str, ranks: int = 4, cwd: Path, timeout: float = 90):
    assert MPIEXEC is not None
    return launch([MPIEXEC, "-n", str(ranks), sys.executable, str(SCRIPTS / script), *args],
                  timeout, cwd)  # fmt: skip


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} has no rows"
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}


def assert_demo_claims(columns: dict[str, np.ndarray], steps: int, dtype: str) -> None:
    """SyncBN equals the whole batch at every step; local BN visibly differs."""
    assert list(columns["step"]) == list(range(steps))
    whole, sync, local = columns["whole_batch"], columns["syncbn"], columns["local_bn"]
    assert np.all(np.isfinite(whole)) and np.all(whole > 0)
    rel_sync = np.abs(sync - whole) / whole
    rel_local = np.abs(local - whole) / whole
    # The CSV's own difference columns say the same as the losses.
    np.testing.assert_allclose(columns["rel_diff_syncbn"], rel_sync, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(columns["rel_diff_local_bn"], rel_local, rtol=1e-6)
    assert rel_sync.max() <= TOLERANCE[dtype], rel_sync
    assert rel_local.max() >= VISIBLE, rel_local


def assert_printed_once(out: str, text: str) -> None:
    assert out.count(text) == 1, f"expected {text!r} once (rank 0 only):\n{out}"


# -- train_numpy.py --------------------------------------------------------------
@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_syncbn_curve_equals_the_whole_batch_and_local_bn_differs(
    tmp_path: Path, dtype: str
) -> None:
    steps = 12
    plot = tmp_path / "curves.png" if dtype == "float64" else None
    args = ["--steps", str(steps), "--dtype", dtype, "--csv", str(tmp_path / "losses.csv")]
    job = mpiexec("train_numpy.py", *args, *(["--plot", str(plot)] if plot else []),
                  cwd=tmp_path)  # fmt: skip
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert_demo_claims(read_csv(tmp_path / "losses.csv"), steps, dtype)
    assert_printed_once(job.stdout, "SyncBN vs whole batch: max relative difference per step")
    assert_printed_once(job.stdout, "local BN vs whole batch: max relative difference per step")
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("fault", ["local-bn", "equal-weights"])
def test_numpy_check_fails_when_a_bug_is_planted(tmp_path: Path, fault: str) -> None:
    """Local BN in the SyncBN run, or every rank's mean loss weighted alike
    whatever its shard size: the curves part and the demo exits 1."""
    job = mpiexec("train_numpy.py", "--steps", "4", "--fault", fault, "--csv", "-", cwd=tmp_path)
    assert job.returncode == 1, f"{job.stdout}\n{job.stderr}"
    assert "(bound 1e-05, float64): FAIL" in job.stderr, job.stderr  # --csv -: report on stderr
    assert job.stdout.startswith("step,whole_batch,syncbn,local_bn,"), job.stdout
    assert "Traceback" not in job.stderr, job.stderr


@needs_mpi
@pytest.mark.mpi
def test_numpy_default_csv_lands_in_the_current_directory(tmp_path: Path) -> None:
    job = mpiexec("train_numpy.py", "--steps", "2", "--shards", "6,10", ranks=2, cwd=tmp_path)
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert_demo_claims(read_csv(tmp_path / "train_numpy.csv"), 2, "float64")


@needs_mpi
@pytest.mark.mpi
def test_numpy_says_once_when_shards_and_ranks_disagree(tmp_path: Path) -> None:
    job = mpiexec("train_numpy.py", "--steps", "2", ranks=2, cwd=tmp_path)
    assert job.returncode == 2, f"{job.stdout}\n{job.stderr}"
    assert_printed_once(job.stderr, "--shards gives 4 shard sizes but the job has 2 ranks")
    # Not "usage: mpiexec -n 4 python ...", which misquoted this launch.
    assert_printed_once(job.stderr, "usage: train_numpy.py [-h]")
    assert "Traceback" not in job.stderr, job.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--shards", "3,1,4,8"], "no shard may hold exactly 1 sample"),
        (["--shards", "0,1"], "no shard may hold exactly 1 sample"),
        (["--shards", "0,0"], "the global batch needs at least 2 samples"),
        (["--shards", "3,x"], "expected comma-separated sample counts"),
        (["--steps", "0"], "argument --steps: must be at least 1"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--dtype", "float16"], "argument --dtype: invalid choice"),
    ],
)
def test_numpy_rejects_bad_arguments_clearly(args: list[str], match: str) -> None:
    """Argument errors come before MPI starts: a plain ``python`` run shows them."""
    job = launch([sys.executable, str(SCRIPTS / "train_numpy.py"), *args], 60, ROOT)
    assert job.returncode == 2, job
    assert match in job.stderr and "Traceback" not in job.stderr, job.stderr


@pytest.mark.parametrize("script", ["train_numpy.py", "train_torch.py"])
def test_help_says_how_to_run_it(script: str) -> None:
    """--help needs neither MPI nor torch."""
    job = launch([sys.executable, str(SCRIPTS / script), "--help"], 60, ROOT)
    assert job.returncode == 0, job
    for text in (f"mpiexec -n 4 python scripts/{script}", "--fault", "--plot", "--csv"):
        assert text in job.stdout, job.stdout


@pytest.mark.parametrize("script", ["train_numpy.py", "train_torch.py"])
def test_usage_and_errors_name_the_script_not_one_launch_command(script: str) -> None:
    """They said "mpiexec -n 4 python scripts/...", untrue under mpiexec -n 2
    or torchrun; the command is shown in the description instead."""
    job = launch([sys.executable, str(SCRIPTS / script), "--steps", "0"], 60, ROOT)
    assert job.returncode == 2, job
    assert job.stderr.startswith(f"usage: {script} [-h]"), job.stderr
    assert f"\n{script}: error: argument --steps: must be at least 1" in job.stderr, job.stderr
    assert "mpiexec" not in job.stderr, job.stderr


# -- train_torch.py --------------------------------------------------------------
@needs_mpi
@pytest.mark.mpi
def test_torch_syncbn_curve_equals_the_whole_batch_and_local_bn_differs(tmp_path: Path) -> None:
    """mpiexec: SyncBN over MPICommunicator, DDP over gloo, against
    torch.nn.BatchNorm2d on the whole batch."""
    skip_without_torch_demo()
    steps, plot = 16, tmp_path / "curves.png"
    job = mpiexec("train_torch.py", "--steps", str(steps), "--csv", str(tmp_path / "losses.csv"),
                  "--plot", str(plot), cwd=tmp_path)  # fmt: skip
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert_demo_claims(read_csv(tmp_path / "losses.csv"), steps, "float64")
    assert_printed_once(job.stdout, "4 ranks (mpiexec)")
    assert_printed_once(job.stdout, "SyncBN vs whole batch: max relative difference per step")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found (it comes with torch)")
def test_torch_under_torchrun_in_float32(tmp_path: Path) -> None:
    """torchrun: SyncBN over TorchDistributedCommunicator (gloo), float32 bound."""
    skip_without_torch_demo()
    assert TORCHRUN is not None
    steps = 16
    args = ["--steps", str(steps), "--dtype", "float32", "--csv", str(tmp_path / "losses.csv")]
    script = str(SCRIPTS / "train_torch.py")
    job = launch([TORCHRUN, "--standalone", "--nproc-per-node", "4", script, *args], 90, tmp_path)
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert_demo_claims(read_csv(tmp_path / "losses.csv"), steps, "float32")
    assert_printed_once(job.stdout, "4 ranks (torchrun)")


@needs_mpi
@pytest.mark.mpi
def test_torch_check_fails_when_syncbn_is_local(tmp_path: Path) -> None:
    """convert_sync_batchnorm(model, comm=None): every rank on its own; exit 1."""
    skip_without_torch_demo()
    job = mpiexec("train_torch.py", "--steps", "3", "--fault", "local-bn", "--csv", "-",
                  cwd=tmp_path)  # fmt: skip
    assert job.returncode == 1, f"{job.stdout}\n{job.stderr}"
    assert "(bound 1e-05, float64): FAIL" in job.stderr, job.stderr
    assert "Traceback" not in job.stderr, job.stderr
