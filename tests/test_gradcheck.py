"""Finite-difference check of the backward in float64, across two thread ranks."""

from __future__ import annotations

import numpy as np

import arraysyncbn as sbn


def _loss_and_grads(xs, weight, bias, gs):
    comms = sbn.thread_group(len(xs))

    def rank(comm):
        bn = sbn.SyncBatchNorm(xs[0].shape[1], eps=1e-3, comm=comm)
        bn.load_state_dict(
            {
                "weight": weight,
                "bias": bias,
                "running_mean": np.zeros_like(weight),
                "running_var": np.ones_like(weight),
                "num_batches_tracked": 0,
            }
        )
        y = bn(xs[comm.rank])
        dx = bn.backward(gs[comm.rank])
        return float(np.sum(y * gs[comm.rank])), dx, bn.grad_weight, bn.grad_bias

    results = sbn.run_ranks(rank, comms)
    loss = sum(r[0] for r in results)
    return loss, [r[1] for r in results], sum(r[2] for r in results), sum(r[3] for r in results)


def test_backward_matches_central_differences() -> None:
    rng = np.random.default_rng(42)
    xs = [rng.normal(1.0, 2.0, (2, 2, 3)), rng.normal(1.0, 2.0, (3, 2, 1)), np.zeros((0, 2, 5))]
    gs = [rng.normal(size=x.shape) for x in xs]
    weight, bias = rng.uniform(0.5, 2, 2), rng.normal(size=2)
    _, dxs, dw, db = _loss_and_grads(xs, weight, bias, gs)
    h = 1e-6

    def numeric(perturb):
        lp = _loss_and_grads(*perturb(+h))[0]
        lm = _loss_and_grads(*perturb(-h))[0]
        return (lp - lm) / (2 * h)

    for r, x in enumerate(xs):
        for idx in np.ndindex(x.shape):

            def perturb(d, r=r, idx=idx):
                moved = [v.copy() for v in xs]
                moved[r][idx] += d
                return moved, weight, bias, gs

            assert abs(numeric(perturb) - dxs[r][idx]) < 1e-6, (r, idx)
    for c in range(2):
        e = np.eye(2)[c]
        assert abs(numeric(lambda d, e=e: (xs, weight + d * e, bias, gs)) - dw[c]) < 1e-6
        assert abs(numeric(lambda d, e=e: (xs, weight, bias + d * e, gs)) - db[c]) < 1e-6
