"""Per-call Python work on the host route, counted in lines, not timed.

At small per-rank batches a step's cost around its kernels is its Python:
after a kernel has streamed its data through the caches, each line costs
about 0.3 µs on the development machine (docs/benchmarks.md, "Two images
per rank"). Timings there scatter by more than a change of tens of lines
moves them; the number of lines of this package that a step runs does not
scatter at all. These tests count them with ``sys.settrace`` and hold each
path to a budget a little above what it runs today, so that added per-call
work is a decision (raise the budget, say why in the commit) rather than
an accident. They time nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import arraysyncbn
from arraysyncbn import functional as F

pytest.importorskip("numba")

_ROOT = os.path.dirname(arraysyncbn.__file__)

# Lines of this package per call, measured when the budgets were set, with
# about 10 % headroom (Python versions trace multi-line expressions a little
# differently).
BUDGET = {
    "functional forward + backward": 385,  # 349 lines
    "module forward + backward": 580,  # 528 lines
    "module eval forward + backward": 425,  # 386 lines
}


def _lines(fn) -> int:
    """Lines of arraysyncbn that ``fn()`` runs."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if event == "line" and frame.f_code.co_filename.startswith(_ROOT):
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def _steady(fn) -> int:
    """The count of a warmed-up call (first calls compile and cache), checked
    to repeat exactly."""
    for _ in range(3):
        fn()
    first, second = _lines(fn), _lines(fn)
    assert first == second, f"the line count changes between calls: {first} then {second}"
    return first


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    """The default configuration: fast route on, no check on every call."""
    for name in ("ARRAYSYNCBN_FAST", "ARRAYSYNCBN_CHECK", "ARRAYSYNCBN_THREADS"):
        monkeypatch.delenv(name, raising=False)


def _within(what: str, lines: int) -> None:
    assert lines > 50, f"{what}: {lines} lines, the tracer saw too little"
    assert lines <= BUDGET[what], (
        f"{what} runs {lines} lines of arraysyncbn per call, over its budget of "
        f"{BUDGET[what]}: per-call Python costs ~0.3 µs a line at small batches"
    )


def test_functional_step_stays_within_its_line_budget() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 3, 3)).astype(np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)

    def step() -> None:
        y, _, _, saved = F.sync_batch_norm_forward(x, w, b, rm, rv)
        assert saved.route == "host"
        F.sync_batch_norm_backward(y, saved)

    _within("functional forward + backward", _steady(step))


@pytest.mark.parametrize("training", [True, False])
def test_module_step_stays_within_its_line_budget(training) -> None:
    torch = pytest.importorskip("torch")
    from arraysyncbn.torch import SyncBatchNorm

    layer = SyncBatchNorm(8).train(training)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    dy = torch.randn(2, 8, 3, 3)  # contiguous, as a layer's gradient usually is

    def step() -> None:
        layer(x).backward(dy)

    what = "module forward + backward" if training else "module eval forward + backward"
    _within(what, _steady(step))
