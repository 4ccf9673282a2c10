"""Run a command (an MPI or torchrun job) for a test, never hanging the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def run_job(
    cmd: list[str], *, timeout: float, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session and return its result (``.seconds`` added).

    On ``timeout`` the whole process group is killed (launchers leave their
    ranks behind otherwise) and the test fails with what the job printed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung: killed after {timeout} s\n{out}\n{err}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    result.seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return result
