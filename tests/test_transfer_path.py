"""The MPI transfer decisions as pure functions: no MPI, no GPU needed.

:func:`~arraysyncbn.comm.mpi.transfer_path` decides whether a buffer goes to
MPI directly or through a host copy; the CUDA cases use stand-ins from
``fake_arrays`` that only claim a library and a DLPack device.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_arrays import FakeCudaArray, FakeRocmArray, FakeUnknownCudaArray

from arraysyncbn.comm.mpi import (
    cuda_aware_from_info,
    memory_kind,
    resolve_cuda_aware,
    transfer_path,
)

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def host_arrays() -> list[object]:
    arrays: list[object] = [np.zeros(3), np.zeros(4, dtype=np.float32)[::2]]
    if importlib.util.find_spec("array_api_strict"):
        import array_api_strict as xs

        arrays.append(xs.zeros(3))
    if importlib.util.find_spec("torch"):
        import torch

        arrays.append(torch.zeros(3))
    return arrays


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_host_memory_goes_direct(cuda_aware: bool) -> None:
    for a in host_arrays():
        assert memory_kind(a) == "host", type(a)
        assert transfer_path(a, cuda_aware) == "direct", type(a)


@pytest.mark.parametrize("cuda_aware", [False, True])
@pytest.mark.parametrize("device", ["device1", "no_float64"])
def test_strict_non_default_devices_are_staged(device: str, cuda_aware: bool) -> None:
    xs = pytest.importorskip("array_api_strict")
    a = xs.zeros(3, device=xs.Device(device))
    assert memory_kind(a) == "device"
    assert transfer_path(a, cuda_aware) == "staged"


def test_cuda_memory_goes_direct_only_to_cuda_aware_mpi() -> None:
    assert memory_kind(FakeCudaArray()) == "cuda"
    assert transfer_path(FakeCudaArray(), cuda_aware=True) == "direct"
    assert transfer_path(FakeCudaArray(), cuda_aware=False) == "staged"


def test_cuda_memory_of_a_library_we_cannot_synchronize_is_staged() -> None:
    assert memory_kind(FakeUnknownCudaArray()) == "cuda"
    assert transfer_path(FakeUnknownCudaArray(), cuda_aware=True) == "staged"


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_other_devices_are_staged(cuda_aware: bool) -> None:
    assert memory_kind(FakeRocmArray()) == "device"
    assert memory_kind(object()) == "device"
    assert transfer_path(FakeRocmArray(), cuda_aware) == "staged"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("mpi,system", False),
        ("mpi,system,cuda", True),
        ("mpi, system, cuda:device, cuda:managed", True),
        ("mpi,system,rocm:device", False),
        ("mpi,cudax", False),
    ],
)
def test_cuda_aware_from_info(value: str | None, expected: bool) -> None:
    assert cuda_aware_from_info(value) is expected


@pytest.mark.parametrize(
    ("setting", "detected", "expected"),
    [
        (None, True, True),
        ("auto", False, False),
        (" AUTO ", True, True),
        ("1", False, True),
        ("true", False, True),
        ("0", True, False),
        ("no", True, False),
    ],
)
def test_resolve_cuda_aware(setting: str | None, detected: bool, expected: bool) -> None:
    assert resolve_cuda_aware(setting, detected) is expected


@pytest.mark.parametrize("setting", ["2", "maybe", "cuda"])
def test_resolve_cuda_aware_rejects_other_values(setting: str) -> None:
    with pytest.raises(ValueError, match="ARRAYSYNCBN_CUDA_AWARE"):
        resolve_cuda_aware(setting, detected=False)


def test_import_arraysyncbn_does_not_import_mpi4py() -> None:
    code = "import sys, arraysyncbn; print('mpi4py' in sys.modules)"
    assert python(code).strip() == "False"


def test_mpi_communicator_without_mpi4py_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import arraysyncbn\n"
        "try:\n    arraysyncbn.MPICommunicator()\n"
        "except ImportError as e:\n    print(e)\n"
    )
    assert "pip install 'arraysyncbn[mpi]'" in python(code)


def test_mpi_communicator_in_a_world_of_one() -> None:
    """The communicator's own checks, in this process (MPI as a singleton)."""
    code = """
import numpy as np
import arraysyncbn as sbn
comm = sbn.MPICommunicator()
assert (comm.rank, comm.size) == (0, 1)
buf = np.array([1.0, -2.0], dtype=np.float32)
out = comm.allreduce(buf, "max")
assert out is not buf and out.dtype == np.float32 and out.tolist() == [1.0, -2.0]
for bad, exc in [((np.zeros(2, np.float16), "sum"), TypeError),
                 ((np.zeros((2, 2)), "sum"), ValueError),
                 ((np.zeros(2), "min"), ValueError)]:
    try:
        comm.allreduce(*bad)
    except exc as e:
        print(type(e).__name__, e)
    else:
        raise AssertionError(bad)
try:
    sbn.MPICommunicator("COMM_WORLD")
except TypeError as e:
    print("TypeError", e)
"""
    pytest.importorskip("mpi4py")
    lines = python(code).splitlines()
    assert [line.split()[0] for line in lines] == [
        "TypeError",
        "ValueError",
        "ValueError",
        "TypeError",
    ]
    assert "float32 or float64" in lines[0] and "intracommunicator" in lines[-1]


def test_syncbn_uses_buffer_allreduce_with_the_buffer_datatype() -> None:
    """Every SyncBN collective is a buffer ``Allreduce`` whose MPI datatype
    matches the buffer; the pickling ``allreduce`` is never called."""
    code = """
import numpy as np
from mpi4py import MPI
import arraysyncbn as sbn

class Spy:
    def __init__(self, real):
        self.real, self.calls = real, []
    def Allreduce(self, send, recv, op):
        self.calls.append((send[0].dtype.name, send[1], op))
        return self.real.Allreduce(send, recv, op=op)
    def Iallreduce(self, send, recv, op):  # the watchdog's deadline-polled form
        self.calls.append((send[0].dtype.name, send[1], op))
        return self.real.Iallreduce(send, recv, op=op)
    def allreduce(self, *args, **kwargs):
        raise AssertionError("the pickling allreduce was called")
    def __getattr__(self, name):
        return getattr(self.real, name)

comm = sbn.MPICommunicator()
spy = comm.comm = Spy(comm.comm)
bn = sbn.SyncBatchNorm(3, comm=comm)
y = bn(np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32))
bn.backward(y)
comm.allreduce(np.ones(2, np.float32))
def name(handle, known):
    return next(label for label, h in known if h == handle)

for dtype, mpi_type, op in spy.calls:
    print(dtype, name(mpi_type, [("DOUBLE", MPI.DOUBLE), ("FLOAT", MPI.FLOAT)]),
          name(op, [("MAX", MPI.MAX), ("SUM", MPI.SUM)]))
"""
    pytest.importorskip("mpi4py")
    assert python(code).splitlines() == [
        "float64 DOUBLE MAX",  # the first forward's consistency check
        "float64 DOUBLE SUM",  # the statistics
        "float64 DOUBLE SUM",  # the backward sums
        "float32 FLOAT SUM",
    ]
