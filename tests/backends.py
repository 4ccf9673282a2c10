"""One registry of array backends; every test that touches arrays loops over it.

A backend turns a numpy array into an array of its library on its device,
in a dtype named by string, and says which dtypes it supports and whether
its device has float64 (which decides the accumulation precision).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class Backend:
    name: str
    xp: Any
    device: Any
    dtypes: tuple[str, ...]
    convert: Callable[[np.ndarray, str], Any]
    has_float64: bool = True
    marks: tuple[Any, ...] = field(default_factory=tuple)
    # The route every dtype of the backend must take ("host": fused numba
    # kernels, half precision included; "portable": the array-API kernels),
    # and what forces it.
    route: str = "portable"
    env: tuple[tuple[str, str], ...] = (("ARRAYSYNCBN_FAST", "1"),)
    parallel: bool = False

    def expected_route(self, dtype: str) -> str:
        return self.route

    def asarray(self, a: np.ndarray | None, dtype: str) -> Any:
        return None if a is None else self.convert(np.asarray(a), dtype)

    def param_dtype(self, dtype: str) -> str:
        return dtype if dtype in ("float32", "float64") else "float32"

    def __repr__(self) -> str:
        return self.name


CUDA_ENV = "ARRAYSYNCBN_CUDA_KERNELS"
PORTABLE = (("ARRAYSYNCBN_FAST", "0"),)
THREADED = (("ARRAYSYNCBN_FAST", "1"), ("ARRAYSYNCBN_THREADS", "2"))


def _numpy_backends() -> list[Backend]:
    import array_api_compat.numpy as xp

    def convert(a: np.ndarray, dt: str) -> Any:
        return a.astype(getattr(np, dt))

    dtypes = ("float16", "float32", "float64")
    return [
        Backend("numpy", xp, "cpu", dtypes, convert, route="host"),
        # Every input split over 2 threads, however small (the threshold
        # that keeps small inputs serial is lifted).
        Backend(
            "numpy-threads", xp, "cpu", dtypes, convert, route="host", env=THREADED, parallel=True
        ),
        Backend("numpy-portable", xp, "cpu", dtypes, convert, env=PORTABLE),
    ]


def _strict_backends() -> list[Backend]:
    import array_api_strict as xp

    def on(device: Any) -> Callable[[np.ndarray, str], Any]:
        return lambda a, dt: xp.asarray(a.astype(getattr(np, dt)), device=device)

    d1 = xp.Device("device1")
    no64 = xp.Device("no_float64")
    return [
        Backend("strict", xp, xp.Device("CPU_DEVICE"), ("float32", "float64"), on(None)),
        Backend("strict-device1", xp, d1, ("float32", "float64"), on(d1)),
        Backend("strict-no_float64", xp, no64, ("float32",), on(no64), has_float64=False),
    ]


def _torch_backends() -> list[Backend]:
    import torch

    def convert(a: np.ndarray, dt: str) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(getattr(torch, dt))

    import array_api_compat.torch as xp

    dtypes = ("float16", "bfloat16", "float32", "float64")
    cpu = torch.device("cpu")
    return [
        Backend("torch", xp, cpu, dtypes, convert, route="host"),
        Backend("torch-portable", xp, cpu, dtypes, convert, env=PORTABLE),
    ]


def _cupy_backends() -> list[Backend]:
    def convert(a: np.ndarray, dt: str) -> Any:
        import cupy

        return cupy.asarray(a.astype(getattr(np, dt)))

    xp = None
    if importlib.util.find_spec("cupy") is not None:
        try:
            import array_api_compat.cupy as xp
        except Exception:
            xp = None
    return [
        Backend(
            "cupy",
            xp,
            None,
            ("float16", "float32", "float64"),
            convert,
            marks=(pytest.mark.gpu,),
            env=(("ARRAYSYNCBN_FAST", "1"), (CUDA_ENV, "0")),
        ),
        # The experimental CUDA route (numba.cuda kernels), opt-in.
        Backend(
            "cupy-cuda",
            xp,
            None,
            ("float32", "float64"),
            convert,
            marks=(pytest.mark.gpu,),
            route="cuda",
            env=((CUDA_ENV, "1"),),
        ),
    ]


def cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> list[Backend]:
    backends = _numpy_backends()
    if importlib.util.find_spec("array_api_strict") is not None:
        backends += _strict_backends()
    if importlib.util.find_spec("torch") is not None:
        backends += _torch_backends()
    backends += _cupy_backends()
    return backends


BACKENDS = available_backends()


def backend_params() -> list[Any]:
    """pytest params over BACKENDS; cupy is skipped (not failed) without a GPU."""
    params = []
    for b in BACKENDS:
        marks = list(b.marks)
        if b.name.startswith("cupy") and not cupy_usable():
            marks.append(pytest.mark.skip(reason="cupy with a CUDA GPU is not available"))
        params.append(pytest.param(b, id=b.name, marks=marks))
    return params


@contextmanager
def routed(backend: Backend) -> Iterator[None]:
    """Force ``backend``'s route (environment and parallel threshold) inside."""
    from arraysyncbn._fast import host

    saved_env = {name: os.environ.get(name) for name, _ in backend.env}
    saved_min = host.PARALLEL_MIN_BYTES
    os.environ.update(dict(backend.env))
    if backend.parallel:
        host.PARALLEL_MIN_BYTES = 0
    try:
        yield
    finally:
        host.PARALLEL_MIN_BYTES = saved_min
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
