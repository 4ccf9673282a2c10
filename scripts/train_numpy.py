"""Data-parallel training in numpy with SyncBatchNorm: one rank vs four, SyncBN vs local BN.

    mpiexec -n 4 python scripts/train_numpy.py [--steps 150] [--dtype float64]
                                                [--csv PATH] [--plot PATH]

A small multilayer perceptron, written out in numpy with its backward pass by
hand, learns to classify synthetic data (generated from ``--seed``: features
with very different offsets and scales, labels from a random linear
teacher, so batch norm matters):

    x → BN → Linear(16→32) → BN → ReLU → Linear(32→32) → BN → ReLU → Linear(32→4) → softmax

It is trained three ways, for the same steps, from the same initial weights,
on the same sequence of global batches of 16 samples, with SGD (momentum
0.9):

1. ``whole_batch``: the whole global batch on one rank, batch norm with
   ``comm=None``. Every rank computes it redundantly (no communication), so
   no rank waits while another works alone.
2. ``syncbn``: each rank holds a shard of the global batch (3, 5, 0 and 8
   samples by default: uneven, one empty) and the BN layers are
   ``SyncBatchNorm(comm=MPICommunicator())``.
3. ``local_bn``: the same shards, BN with ``comm=None``: each rank normalizes
   with its own shard's statistics.

In runs 2 and 3 the parameter gradients (and the loss) are packed into one
flat buffer and summed with **one allreduce per step**. Each rank's loss is
the sum of its samples' losses divided by the *global* batch size, so the
summed gradient is the gradient of the mean loss over the global batch, as
in run 1, whatever the shard sizes. (Averaging the ranks' own mean losses,
the usual data-parallel default, would weight a sample of the 3-sample shard
more than one of the 8-sample shard: ``--fault equal-weights`` shows the
check catch that.)

With SyncBN, run 2 computes what run 1 computes, in another order: its loss
curve must agree with run 1's to a relative 1e-5 per step in float64 (1e-4
in float32). Run 3 must visibly differ. Rank 0 prints the comparison (to
stderr when ``--csv -`` sends the CSV to stdout), writes the per-step losses
as CSV and, with ``--plot``, a PNG of the three curves.
Exit status (the same on every rank): 0 when both hold, 1 when not, 2 for a
usage error. ``--fault local-bn`` gives run 2 local batch norm: the check
then fails, which shows it can.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import training_common as tc

import arraysyncbn as sbn
from arraysyncbn.cli import run_aborting

FEATURES, HIDDEN, CLASSES = 16, 32, 4
LEARNING_RATE, MOMENTUM = 0.05, 0.9
EVAL_SAMPLES = 512


# -- the task --------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A synthetic classification task, fixed by the seed.

    Features are ``offset + scale * z`` with offsets up to ±5 and scales
    from 0.1 to 10: without normalization the first layer would see mostly
    offsets and large-scale features (hence a BN on the input, too). Labels
    are the argmax of a random linear teacher applied to ``z``.
    """

    offset: np.ndarray
    scale: np.ndarray
    teacher: np.ndarray
    seed: int

    @classmethod
    def from_seed(cls, seed: int) -> Task:
        rng = np.random.default_rng([seed, 0])
        return cls(
            offset=rng.uniform(-5, 5, FEATURES),
            scale=np.exp(rng.uniform(np.log(0.1), np.log(10), FEATURES)),
            teacher=rng.normal(0, 1, (FEATURES, CLASSES)),
            seed=seed,
        )

    def samples(self, n: int, stream: int, index: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples and labels; the same (stream, index) gives the same draw."""
        z = np.random.default_rng([self.seed, stream, index]).normal(0, 1, (n, FEATURES))
        labels = np.argmax(z @ self.teacher, axis=1)
        return (self.offset + self.scale * z).astype(dtype), labels

    def global_batch(self, step: int, size: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of ``step``: the same in all three runs."""
        return self.samples(size, 1, step, dtype)

    def eval_set(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        return self.samples(EVAL_SAMPLES, 2, 0, dtype)


# -- the network -----------------------------------------------------------------
class Net:
    """The MLP: linear layers as numpy arrays, BN layers as ``SyncBatchNorm``.

    ``comm`` is the BN layers' communicator (None: each rank's own batch).
    The linear layers before BN have no bias: BN's shift would cancel it.
    """

    def __init__(self, seed: int, dtype: str, comm: sbn.Communicator | None) -> None:
        rng = np.random.default_rng([seed, 3])  # the same weights in every run

        def he(fan_in: int, fan_out: int) -> np.ndarray:
            return rng.normal(0, np.sqrt(2 / fan_in), (fan_in, fan_out)).astype(dtype)

        self.w1, self.w2, self.w3 = he(FEATURES, HIDDEN), he(HIDDEN, HIDDEN), he(HIDDEN, CLASSES)
        self.c3 = np.zeros(CLASSES, dtype)
        self.bn0 = sbn.SyncBatchNorm(FEATURES, comm=comm, xp=np, dtype=dtype)
        self.bn1 = sbn.SyncBatchNorm(HIDDEN, comm=comm, xp=np, dtype=dtype)
        self.bn2 = sbn.SyncBatchNorm(HIDDEN, comm=comm, xp=np, dtype=dtype)
        self._cache: tuple[np.ndarray, ...] = ()

    def parameters(self) -> list[np.ndarray]:
        """Every trained array, in the order of :meth:`backward`'s gradients."""
        return [self.bn0.weight, self.bn0.bias,
                self.w1, self.bn1.weight, self.bn1.bias,
                self.w2, self.bn2.weight, self.bn2.bias, self.w3, self.c3]  # fmt: skip

    def set_parameters(self, values: Sequence[np.ndarray]) -> None:
        (self.bn0.weight, self.bn0.bias,
         self.w1, self.bn1.weight, self.bn1.bias,
         self.w2, self.bn2.weight, self.bn2.bias, self.w3, self.c3) = values  # fmt: skip

    def train(self, mode: bool = True) -> None:
        for bn in (self.bn0, self.bn1, self.bn2):
            bn.train(mode)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits; keeps what :meth:`backward` needs."""
        x0 = self.bn0(x)
        b1 = self.bn1(x0 @ self.w1)
        a1 = np.maximum(b1, 0)
        b2 = self.bn2(a1 @ self.w2)
        a2 = np.maximum(b2, 0)
        self._cache = (x0, b1, a1, b2, a2)
        return a2 @ self.w3 + self.c3

    def backward(self, dlogits: np.ndarray) -> list[np.ndarray]:
        """This rank's gradients of the loss whose d/dlogits is ``dlogits``.

        The BN layers' backward uses the global sums of dy (SyncBN: one
        allreduce each), so dx is exact; their weight and bias gradients,
        like the linear layers', are this rank's share, summed later.
        """
        x0, b1, a1, b2, a2 = self._cache
        dw3 = a2.T @ dlogits
        dc3 = dlogits.sum(axis=0)
        db2 = (dlogits @ self.w3.T) * (b2 > 0)
        dz2 = self.bn2.backward(db2)
        dw2 = a1.T @ dz2
        db1 = (dz2 @ self.w2.T) * (b1 > 0)
        dz1 = self.bn1.backward(db1)
        dw1 = x0.T @ dz1
        self.bn0.backward(dz1 @ self.w1.T)  # for the input BN's weight and bias gradients
        return [self.bn0.grad_weight, self.bn0.grad_bias,
                dw1, self.bn1.grad_weight, self.bn1.grad_bias,
                dw2, self.bn2.grad_weight, self.bn2.grad_bias, dw3, dc3]  # fmt: skip


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The *sum* over samples of the softmax cross-entropy, and its gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True, initial=-np.inf)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_p)
    grad[rows, labels] -= 1
    return float(-log_p[rows, labels].sum()), grad


# -- one run ---------------------------------------------------------------------
@dataclass
class RunPlan:
    """How one of the three runs splits the work."""

    name: str
    bn_comm: sbn.Communicator | None  # whose statistics BN uses
    grad_comm: sbn.Communicator  # who sums the gradients
    lo: int  # this rank's slice of the global batch
    hi: int
    equal_weights: bool = False  # the planted fault of --fault equal-weights


def train(plan: RunPlan, task: Task, args: argparse.Namespace, log: list[float]) -> Net:
    """Train one model; append each step's global mean loss to ``log``."""
    net = Net(args.seed, args.dtype, plan.bn_comm)
    batch = sum(args.shards)
    velocity = [np.zeros_like(p) for p in net.parameters()]
    shapes = [p.shape for p in net.parameters()]
    n = plan.hi - plan.lo
    if plan.equal_weights:  # mean of each rank's own mean loss
        weight = 1.0 / (n * plan.grad_comm.size) if n else 0.0
    else:  # this rank's share of the global batch's mean loss
        weight = 1.0 / batch
    for step in range(args.steps):
        x, labels = task.global_batch(step, batch, args.dtype)
        # A view of the global batch; an empty shard is a zero-size view.
        shard = x[plan.lo : plan.hi]
        loss_sum, dlogits = cross_entropy(net.forward(shard), labels[plan.lo : plan.hi])
        grads = net.backward((dlogits * weight).astype(args.dtype))
        # The one allreduce of the step: every gradient and the loss, packed.
        packed = np.concatenate([*(g.ravel() for g in grads), [loss_sum * weight]])
        total = plan.grad_comm.allreduce(packed.astype(args.dtype))
        log.append(float(total[-1]))
        cuts = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
        summed = [g.reshape(s) for g, s in zip(np.split(total[:-1], cuts), shapes, strict=True)]
        params = net.parameters()
        for i, g in enumerate(summed):
            velocity[i] = MOMENTUM * velocity[i] + g
            params[i] = params[i] - LEARNING_RATE * velocity[i]
        net.set_parameters(params)
    return net


def eval_loss(net: Net, task: Task, dtype: str) -> float:
    """Mean loss on held-out data with the running statistics (no communication)."""
    net.train(False)
    x, labels = task.eval_set(dtype)
    loss_sum, _ = cross_entropy(net.forward(x), labels)
    return loss_sum / len(labels)


# -- main ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    return tc.build_parser(
        script=Path(__file__).name,
        doc=__doc__ or "",
        default_steps=150,
        faults=("local-bn", "equal-weights"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tc.check_plot_support(parser, args)
    comm = sbn.MPICommunicator()
    tc.check_rank_count(parser, args.shards, comm.size, f"run mpiexec -n {len(args.shards)}")
    task = Task.from_seed(args.seed)
    cut = tc.offsets(args.shards)
    lo, hi = cut[comm.rank], cut[comm.rank + 1]
    whole = sbn.SelfCommunicator()
    plans = [
        RunPlan("whole_batch", None, whole, 0, cut[-1]),
        RunPlan("syncbn", None if args.fault == "local-bn" else comm, comm, lo, hi,
                equal_weights=args.fault == "equal-weights"),
        RunPlan("local_bn", None, comm, lo, hi),
    ]  # fmt: skip
    logs: dict[str, list[float]] = {}
    evals: dict[str, float] = {}
    for plan in plans:
        logs[plan.name] = []
        net = train(plan, task, args, logs[plan.name])
        evals[plan.name] = eval_loss(net, task, args.dtype)
    curves = tc.Curves({k: np.array(v) for k, v in logs.items()}, comm.size, args.dtype)
    ref = evals["whole_batch"]
    # Eval mode uses the running statistics: SyncBN's are the whole batch's,
    # local BN's are rank 0's shard's own (and an empty shard's never move).
    curves.extra = {
        "held-out loss, whole batch (running statistics)": ref,
        "held-out loss, SyncBN: relative difference": abs(evals["syncbn"] - ref) / ref,
        "held-out loss, local BN (rank 0's statistics): relative difference": (
            abs(evals["local_bn"] - ref) / ref
        ),
    }
    return tc.exit_status(
        curves,
        args,
        comm.rank,
        header=(
            f"train_numpy: {comm.size} ranks, shards {list(args.shards)} of a global batch of "
            f"{cut[-1]}, {args.steps} steps, {args.dtype}, seed {args.seed}"
        ),
        default_csv="train_numpy.csv",
        plot_title=f"numpy MLP, global batch {cut[-1]}, shards {list(args.shards)}",
    )


if __name__ == "__main__":
    sys.exit(run_aborting(main))
