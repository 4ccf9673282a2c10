"""The CUDA route in numba's CUDA simulator, on the CPU: ``python tests/cuda_sim_check.py N``.

Run by ``tests/test_cuda_route.py`` in a fresh process (the simulator must
be chosen before numba.cuda is imported). Float32/float64 numpy arrays take
the CUDA route here (``ARRAYSYNCBN_CUDA_KERNELS=sim``, host route off), and
the property harness checks forward, running statistics and backward
against the float64 reference on 1 to 4 thread ranks, training and eval;
then channels-last memory and a mixed layout of dy. Prints ``OK cuda-sim``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # not when pytest imports this file for doctests
    # Before numba is imported: the simulator is chosen at import.
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    os.environ["ARRAYSYNCBN_CUDA_KERNELS"] = "sim"
    os.environ["ARRAYSYNCBN_FAST"] = "0"

import array_api_compat.numpy as xp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraysyncbn as sbn
from arraysyncbn.testing import (
    assert_close_to_reference,
    backward_bounds,
    channel_bound,
    forward_bounds,
    reference_backward,
    reference_forward,
)
from arraysyncbn.testing.strategies import sharded_batches

sys.path.insert(0, os.path.dirname(__file__))
from backends import Backend
from harness import check_functional

SIM = Backend(
    "numpy-cudasim",
    xp,
    "cpu",
    ("float32", "float64"),
    lambda a, dt: a.astype(getattr(np, dt)),
    route="cuda",
    env=(),
)


def properties(examples: int) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(batch=sharded_batches(dtypes=st.sampled_from(SIM.dtypes)), training=st.booleans())
    def prop(batch, training: bool) -> None:
        check_functional(SIM, batch, training=training)

    prop()


def channels_last() -> None:
    """NHWC memory seen as NCHW (the kernels' (N·H·W, C, 1) walk), dy in the
    other layout (copied into x's)."""
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((3, 4, 5, 6)) * 2 + 50).astype(np.float32)
    x = np.moveaxis(base, 3, 1)  # shape (3, 6, 4, 5), channels last in memory
    assert not x.flags.c_contiguous
    w = (rng.random(6) + 0.5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)  # C-contiguous: unlike x
    y, _, _, saved = sbn.sync_batch_norm_forward(x, w, None, None, None)
    assert saved.route == "cuda", saved.route
    assert np.moveaxis(y, 1, -1).flags.c_contiguous, "y must keep x's memory layout"
    dx, dw, db = sbn.sync_batch_norm_backward(dy, saved)
    ref = reference_forward([x], w)
    grads = reference_backward(ref, [dy], w)
    fb = forward_bounds(ref, "float32", weight=w, param_dtype="float32")
    bb = backward_bounds(ref, grads, [dy], "float32", weight=w, param_dtype="float32")
    assert_close_to_reference(y, ref.ys[0], channel_bound(fb.y, 4, 1), name="y")
    assert_close_to_reference(dx, grads.dxs[0], channel_bound(bb.dx, 4, 1), name="dx")
    assert_close_to_reference(dw, grads.dweights[0], bb.dweight, name="dweight")
    assert db is None


def several_blocks() -> None:
    """Per-channel counts that take several reduction blocks (their partials
    merged in order), on two thread ranks with uneven shards, far from zero."""
    from arraysyncbn._fast import cuda_jit

    rng = np.random.default_rng(4)
    shards = [(rng.standard_normal((n, 3, 700)) * 0.5 + 1e3).astype(np.float32) for n in (3, 1)]
    assert cuda_jit.partial_blocks(3 * 700, 32) > 1
    dys = [rng.standard_normal(s.shape).astype(np.float32) for s in shards]
    w = np.array([1.5, -0.5, 2.0], np.float32)

    def rank(comm):
        x = shards[comm.rank]
        y, _, _, saved = sbn.sync_batch_norm_forward(x, w, None, None, None, comm=comm)
        assert saved.route == "cuda", saved.route
        return y, *sbn.sync_batch_norm_backward(dys[comm.rank], saved)

    out = sbn.run_ranks(rank, sbn.thread_group(2, timeout=120))
    ref = reference_forward(shards, w)
    grads = reference_backward(ref, dys, w)
    fb = forward_bounds(ref, "float32", weight=w, param_dtype="float32")
    bb = backward_bounds(ref, grads, dys, "float32", weight=w, param_dtype="float32")
    for r, (y, dx, dw, _) in enumerate(out):
        assert_close_to_reference(y, ref.ys[r], channel_bound(fb.y, 3, 1), name="y")
        assert_close_to_reference(dx, grads.dxs[r], channel_bound(bb.dx, 3, 1), name="dx")
        assert_close_to_reference(dw, grads.dweights[r], bb.dweight, name="dweight")


def main() -> None:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    channels_last()
    several_blocks()
    properties(examples)
    print("OK cuda-sim")


if __name__ == "__main__":
    main()
