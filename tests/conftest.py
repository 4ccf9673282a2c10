"""Fixtures over the array backends present, and hypothesis profiles.

Profiles: ``ci`` (200 examples per property, no deadline, derandomized so
a CI failure reproduces), ``dev`` (50 examples), ``gpu`` (50, derandomized:
``scripts/gpu_check.sh``) and ``thorough`` (2000, for bug hunts).
``HYPOTHESIS_PROFILE`` picks one; the default is ``ci`` when ``CI`` is set,
else ``dev``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Thread groups built without timeout= read ARRAYSYNCBN_TIMEOUT (default 600 s):
# a test that hangs should fail within a minute, not ten. (MPI jobs started by
# test_mpi.py get their own environment.)
os.environ.setdefault("ARRAYSYNCBN_TIMEOUT", "60")

from backends import backend_params

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="session", params=backend_params())
def backend(request: pytest.FixtureRequest):
    """Each available array backend (numpy, array-api-strict devices, torch, cupy),
    numpy and torch once per route (host kernels, threaded, portable)."""
    return request.param


@pytest.fixture(autouse=True)
def _backend_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the route the test's backend stands for (environment and threshold)."""
    if "backend" not in request.fixturenames:
        return
    b = request.getfixturevalue("backend")
    for name, value in b.env:
        monkeypatch.setenv(name, value)
    if b.parallel:
        from arraysyncbn._fast import host

        monkeypatch.setattr(host, "PARALLEL_MIN_BYTES", 0)


settings.register_profile(
    "gpu",  # scripts/gpu_check.sh: few examples, derandomized so a failure reproduces
    max_examples=50,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
