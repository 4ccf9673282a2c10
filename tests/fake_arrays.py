"""Stand-ins for device arrays, for testing transfer decisions without a GPU.

Only what :func:`arraysyncbn.comm.mpi.transfer_path` looks at is faked: the
library the array's type comes from and its DLPack device. Never hand these
to MPI.
"""

from __future__ import annotations


class FakeCudaArray:
    """Claims to be a cupy array in CUDA memory (DLPack device kDLCUDA)."""

    __module__ = "cupy._core.core"

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)


class FakeRocmArray:
    """Claims to be an array in ROCm memory (kDLROCM), which is always staged."""

    __module__ = "somelib"

    def __dlpack_device__(self) -> tuple[int, int]:
        return (10, 0)


class FakeUnknownCudaArray:
    """CUDA memory from a library whose stream arraysyncbn cannot synchronize."""

    __module__ = "otherlib"

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)
