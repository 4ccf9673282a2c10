"""``arraysyncbn.torch`` in real processes: DDP under torchrun and under mpiexec.

Each test launches ``tests/mpi_scripts/torch_jobs.py`` on 2 processes through
subprocess with a timeout (the whole process group is killed when it
expires) and checks the exit status and the ``OK`` line of every rank.
torchrun jobs are skipped with the reason when torchrun cannot start a gloo
job here. Every test starts processes, so the whole module is marked ``mpi``
(the marker of multi-process jobs, mpiexec or torchrun): ``pytest -m "not mpi"``
leaves it out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import run_job

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this PyTorch has no torch.distributed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "mpi_scripts" / "torch_jobs.py")
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.mpi


def _tool(name: str) -> str | None:
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return run_job(cmd, timeout=timeout, env=env, cwd=ROOT)


_torchrun_ok: bool | None = None


def torchrun(*args: str, timeout: float = 120, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 torch_jobs.py args``; skip if it cannot start."""
    global _torchrun_ok
    exe = _tool("torchrun")
    if exe is None:
        pytest.skip("torchrun not found")
    if _torchrun_ok is None:
        probe = _run([exe, "--standalone", "--nproc-per-node", "2", SCRIPT, "comm"], timeout)
        _torchrun_ok = probe.returncode == 0 or "OK comm rank" in probe.stdout
        if not _torchrun_ok:
            pytest.skip(f"torchrun cannot start a gloo job here:\n{probe.stderr[-2000:]}")
        if args == ("comm",):
            return probe
    elif not _torchrun_ok:
        pytest.skip("torchrun cannot start a gloo job here")
    return _run([exe, "--standalone", "--nproc-per-node", str(nproc), SCRIPT, *args], timeout)


def _ok(job: subprocess.CompletedProcess, what: str, k: int = 2) -> None:
    text = f"exit {job.returncode}\n{job.stdout}\n{job.stderr[-4000:]}"
    assert job.returncode == 0, text
    assert job.stdout.count(f"OK {what} rank ") == k, text


def test_torch_distributed_communicator_is_bitwise_identical_and_takes_max() -> None:
    _ok(torchrun("comm"), "comm")


def test_ddp_with_torch_distributed_communicator_matches_one_process() -> None:
    _ok(torchrun("ddp", "torch"), "ddp[torch]")


def test_ddp_check_fails_without_synchronization() -> None:
    """The DDP comparison is strict enough to see local statistics."""
    job = torchrun("ddp", "none")
    assert job.returncode != 0 and "OK ddp" not in job.stdout, job.stdout


def test_watchdog_ends_a_rank_waiting_for_a_skipped_call() -> None:
    job = torchrun("timeout", timeout=90)
    assert job.returncode != 0, job.stdout
    assert "waiting rank 0/2" in job.stdout and "NOT ENDED" not in job.stdout, job.stdout
    assert "waited 2.0 s in SyncBatchNorm layer 1, call 2, forward" in job.stderr, job.stderr[
        -4000:
    ]


def test_ddp_with_mpi_communicator_under_mpiexec() -> None:
    pytest.importorskip("mpi4py")
    exe = _tool("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found (pip install '.[mpi]' brings one)")
    job = _run([exe, "-n", "2", sys.executable, "-m", "mpi4py", SCRIPT, "ddp", "mpi"], 120)
    _ok(job, "ddp[mpi]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("group_backend", "nproc"),
    # NCCL refuses two processes on one GPU: NCCL groups get one per GPU.
    [("nccl", None), ("mixed", None), ("gloo", 2)],
)
def test_ddp_on_cuda_tensors_over_each_backend(group_backend: str, nproc: int | None) -> None:
    # Not "backend": that name is conftest's array-backend fixture.
    k = nproc or torch.cuda.device_count()
    job = torchrun("cuda", group_backend, nproc=k, timeout=240)
    _ok(job, f"cuda[{group_backend}]", k)
    _ok(job, f"cuda[{group_backend}] channels_last", k)
