"""Run SyncBN on K ranks that are threads of one process, and compare every
rank's results with the single-rank float64 reference.

    python scripts/thread_ranks.py [--ranks 4] [--dtype float32] [--seed 0]

Each rank holds a shard of a different size (one of them empty); the script
prints the largest error of y, dx, grad_weight, grad_bias and the running
statistics and its largest ratio to the documented per-channel bound, and
exits 1 if any exceeds it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import arraysyncbn as sbn
from arraysyncbn.testing import (
    backward_bounds,
    channel_bound,
    forward_bounds,
    reference_backward,
    reference_forward,
)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 ranks or channels would mean nothing to run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ranks", type=_positive_int, default=4, help="number of thread ranks (default 4)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float16", "float32", "float64"],
        help="input dtype (default float32)",
    )  # fmt: skip
    parser.add_argument("--channels", type=_positive_int, default=8, help="channels C (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: must be >= 0 (numpy's generators), got {args.seed}")

    rng = np.random.default_rng(args.seed)
    c = args.channels
    sizes = [(2 * r + 1) % 5 for r in range(args.ranks)]  # uneven; rank 2 of 3+ is empty
    if sum(sizes) < 2:
        sizes[0] += 2
    loc = rng.uniform(-100, 100, (1, c, 1, 1))
    shards = [(loc + rng.normal(0, 2, (n, c, 6, 6))).astype(args.dtype) for n in sizes]
    dys = [rng.normal(0, 1, s.shape).astype(args.dtype) for s in shards]
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(0, 1, c).astype(np.float32)
    state = {
        "weight": weight,
        "bias": bias,
        "running_mean": np.zeros(c, np.float32),
        "running_var": np.ones(c, np.float32),
        "num_batches_tracked": 0,
    }

    def rank(comm: sbn.ThreadCommunicator):
        bn = sbn.SyncBatchNorm(c, comm=comm)
        bn.load_state_dict(state)
        y = bn(shards[comm.rank])
        dx = bn.backward(dys[comm.rank])
        return y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var

    results = sbn.run_ranks(rank, sbn.thread_group(args.ranks))
    ref = reference_forward(shards, weight, bias, state["running_mean"], state["running_var"])
    grads = reference_backward(ref, dys, weight)
    fb = forward_bounds(ref, args.dtype, weight=weight, bias=bias, param_dtype="float32")
    bb = backward_bounds(ref, grads, dys, args.dtype, weight=weight, param_dtype="float32")

    def worst(got, want, bound) -> tuple[float, float]:
        """Largest error, and the largest ratio of error to its channel's bound."""
        err = ratio = 0.0
        for g, w in zip(got, want, strict=True):
            if g.size:
                e = np.abs(g.astype(np.float64) - w)
                err = max(err, float(np.max(e)))
                axis = 1 if e.ndim > 1 else 0  # (N, C, ...) batches; (C,) parameters and stats
                ratio = max(ratio, float(np.max(e / channel_bound(bound, e.ndim, axis))))
        return err, ratio

    rows = [
        ("y", *worst([r[0] for r in results], ref.ys, fb.y)),
        ("dx", *worst([r[1] for r in results], grads.dxs, bb.dx)),
        ("grad_weight", *worst([r[2] for r in results], grads.dweights, bb.dweight)),
        ("grad_bias", *worst([r[3] for r in results], grads.dbiases, bb.dbias)),
        ("running_mean", *worst([r[4] for r in results], [ref.running_mean] * args.ranks,
                                fb.running_mean)),
        ("running_var", *worst([r[5] for r in results], [ref.running_var] * args.ranks,
                               fb.running_var)),
    ]  # fmt: skip
    print(f"arraysyncbn {sbn.__version__}: {args.ranks} thread ranks, dtype {args.dtype}, C={c}")
    print(f"per-rank shapes: {[tuple(s.shape) for s in shards]}, global N={ref.count}")
    print(f"{'quantity':<14}{'max error':>12}{'error/bound':>13}  verdict")
    ok = True
    for name, err, ratio in rows:
        good = ratio <= 1.0
        ok &= good
        print(f"{name:<14}{err:>12.3e}{ratio:>13.2e}  {'ok' if good else 'FAIL'}")
    print("all within bounds" if ok else "SOME RESULTS EXCEED THEIR BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
