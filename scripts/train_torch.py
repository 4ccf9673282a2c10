"""Data-parallel training in PyTorch with arraysyncbn's SyncBatchNorm and DDP, on the CPU.

    mpiexec -n 4 python scripts/train_torch.py [--steps 100] [--dtype float64]
                                                [--csv PATH] [--plot PATH]
    torchrun --standalone --nproc-per-node 4 scripts/train_torch.py [...]

A small CNN learns to tell four kinds of synthetic 3×8×8 images apart
(random patterns fixed by ``--seed``, plus noise, with very different
offsets and scales per colour channel, so batch norm matters):

    Conv(3→8) → BN → ReLU → Conv(8→16, stride 2) → BN → ReLU → mean pool → Linear(16→4)

It is trained three ways, for the same steps, from the same initial weights
(``torch.manual_seed``), on the same sequence of global batches of 16
images, with SGD (momentum 0.9):

1. ``whole_batch``: the plain model (``torch.nn.BatchNorm2d``) on the whole
   global batch, on one rank. Every rank computes it redundantly, without
   communication.
2. ``syncbn``: the model converted by
   ``arraysyncbn.torch.convert_sync_batchnorm(model, comm)`` and wrapped in
   ``DistributedDataParallel`` (gloo); each rank holds a shard of the global
   batch (3, 5, 0 and 8 images by default: uneven, one empty).
3. ``local_bn``: the plain model in DDP on the same shards: each rank's
   ``BatchNorm2d`` sees only its own shard.

Under ``mpiexec`` SyncBN communicates through
``arraysyncbn.MPICommunicator()`` and DDP through a gloo process group set
up from the MPI ranks; under ``torchrun`` both go through gloo
(``arraysyncbn.TorchDistributedCommunicator()``). DDP averages gradients
over the ranks, so each rank's loss is the sum of its images' losses times
ranks / global batch size: the average is then the gradient of the mean
loss over the global batch, as in run 1, whatever the shard sizes. (DDP's
usual per-rank mean loss would weight an image of the 3-image shard more
than one of the 8-image shard: ``--fault equal-weights``.)

Run 2's loss curve must agree with run 1's (torch's own BatchNorm2d on the
whole batch) to a relative 1e-5 per step in float64 (1e-4 in float32); run 3
must visibly differ. Rank 0 prints the comparison (to stderr when ``--csv -``
sends the CSV to stdout), writes the per-step losses as CSV and, with
``--plot``, a PNG of the three curves. Exit status (the same on every rank):
0 when both hold, 1 when not, 2 for a usage error. ``--fault local-bn``
converts the model with ``comm=None`` (each rank on its own): the check then
fails, which shows it can.

Needs ``arraysyncbn.torch`` (PyTorch ≥ 2) and, under mpiexec, mpi4py.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import training_common as tc

from arraysyncbn.cli import run_aborting

CHANNELS, SIDE, CLASSES = 3, 8, 4
LEARNING_RATE, MOMENTUM = 0.05, 0.9


# -- the task --------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """Four classes of 3×8×8 images: a random pattern per class plus pixel
    noise and a per-image brightness, seen through per-channel offsets (up
    to ±5) and scales (0.2 to 5)."""

    patterns: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    seed: int

    @classmethod
    def from_seed(cls, seed: int) -> Task:
        rng = np.random.default_rng([seed, 0])
        return cls(
            patterns=rng.normal(0, 1, (CLASSES, CHANNELS, SIDE, SIDE)),
            offset=rng.uniform(-5, 5, (1, CHANNELS, 1, 1)),
            scale=np.exp(rng.uniform(np.log(0.2), np.log(5), (1, CHANNELS, 1, 1))),
            seed=seed,
        )

    def global_batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The images (float64) and labels of ``step``: the same in all three runs."""
        rng = np.random.default_rng([self.seed, 1, step])
        labels = rng.integers(0, CLASSES, size)
        z = self.patterns[labels] + rng.normal(0, 2.0, (size, CHANNELS, SIDE, SIDE))
        # Each image's own brightness per channel, as photos have: batch
        # statistics then depend on which images share a batch, not only on
        # how many pixels it has.
        z += rng.normal(0, 2.0, (size, CHANNELS, 1, 1))
        return self.offset + self.scale * z, labels


def make_model(seed: int, dtype: Any) -> Any:
    """The plain model, with the same initial weights for every seed."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 8, 3, padding=1, bias=False),  # BN's shift replaces a bias
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    ).to(dtype)


# -- ranks -----------------------------------------------------------------------
@dataclass
class World:
    """The job's ranks: who we are, and what SyncBN communicates through."""

    rank: int
    size: int
    launcher: str  # "mpiexec" or "torchrun"
    syncbn_comm: Any  # an arraysyncbn Communicator


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ
    )


def open_world() -> World:
    """Start torch.distributed (gloo, for DDP) and SyncBN's communicator.

    Under torchrun, the environment names the rendezvous. Under mpiexec (or
    alone, as a world of one through mpi4py), rank 0 picks a free port and
    tells the others through MPI, unless MASTER_ADDR/MASTER_PORT are set.
    """
    import torch.distributed as dist

    import arraysyncbn as sbn

    if _under_torchrun():
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
        return World(dist.get_rank(), dist.get_world_size(), "torchrun",
                     sbn.TorchDistributedCommunicator())  # fmt: skip
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    address = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if address is None or port is None:
        guess = None
        if world.Get_rank() == 0:
            with socket.socket() as s:  # a port free now; gloo binds it right after
                s.bind(("", 0))
                guess = (socket.gethostname(), str(s.getsockname()[1]))
        address, port = world.bcast(guess, root=0)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=world.Get_rank(),
        world_size=world.Get_size(),
        timeout=timedelta(minutes=5),
    )
    return World(world.Get_rank(), world.Get_size(), "mpiexec", sbn.MPICommunicator())


# -- one run ---------------------------------------------------------------------
@dataclass
class RunPlan:
    """How one of the three runs wraps the model and splits the batch."""

    name: str
    wrap: Callable[[Any], Any]  # plain model → what trains
    lo: int  # this rank's slice of the global batch
    hi: int
    distributed: bool  # sum the loss over ranks (DDP runs)
    equal_weights: bool = False  # the planted fault of --fault equal-weights


def train(plan: RunPlan, task: Task, args: argparse.Namespace, world: World) -> list[float]:
    """Train one model; return each step's global mean loss."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    dtype = getattr(torch, args.dtype)
    model = plan.wrap(make_model(args.seed, dtype))
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    batch = sum(args.shards)
    n = plan.hi - plan.lo
    ranks = world.size if plan.distributed else 1
    log: list[float] = []
    for step in range(args.steps):
        images, labels = task.global_batch(step, batch)
        x = torch.tensor(images[plan.lo : plan.hi], dtype=dtype)
        target = torch.tensor(labels[plan.lo : plan.hi])
        loss_sum = F.cross_entropy(model(x), target, reduction="sum")
        if plan.equal_weights:  # DDP's usual per-rank mean (an empty shard adds 0)
            loss = loss_sum / n if n else loss_sum
        else:  # DDP divides the summed gradients by the ranks: undo that
            loss = loss_sum * (ranks / batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # The global mean loss, for the log: every rank's share, summed.
        share = (loss / ranks).detach().reshape(1)
        if plan.distributed:
            dist.all_reduce(share)
        log.append(float(share))
    return log


# -- main ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    return tc.build_parser(
        script=Path(__file__).name,
        doc=__doc__ or "",
        default_steps=100,
        faults=("local-bn", "equal-weights"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tc.check_plot_support(parser, args)
    try:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        from arraysyncbn.torch import convert_sync_batchnorm
    except ImportError as exc:
        parser.error(f"needs PyTorch and arraysyncbn.torch ({exc})")
    # Four ranks share the cores: one thread each avoids oversubscription,
    # and keeps each rank's reductions in one fixed order.
    torch.set_num_threads(1)
    world = open_world()
    tc.check_rank_count(parser, args.shards, world.size, f"start {len(args.shards)} ranks")
    task = Task.from_seed(args.seed)
    cut = tc.offsets(args.shards)
    lo, hi = cut[world.rank], cut[world.rank + 1]
    sync_comm = None if args.fault == "local-bn" else world.syncbn_comm

    def ddp(model: Any) -> Any:
        # DDP's defaults: it also copies rank 0's BN buffers to every rank at
        # each forward, which changes no training loss (training normalizes
        # with batch statistics) and no SyncBN buffer (the same everywhere).
        return DDP(model)

    plans = [
        RunPlan("whole_batch", lambda m: m, 0, cut[-1], distributed=False),
        RunPlan("syncbn", lambda m: ddp(convert_sync_batchnorm(m, sync_comm)), lo, hi,
                distributed=True, equal_weights=args.fault == "equal-weights"),
        RunPlan("local_bn", ddp, lo, hi, distributed=True),
    ]  # fmt: skip
    logs = {plan.name: train(plan, task, args, world) for plan in plans}
    curves = tc.Curves({k: np.array(v) for k, v in logs.items()}, world.size, args.dtype)
    torch.distributed.destroy_process_group()
    return tc.exit_status(
        curves,
        args,
        world.rank,
        header=(
            f"train_torch: {world.size} ranks ({world.launcher}), shards {list(args.shards)} of "
            f"a global batch of {cut[-1]}, {args.steps} steps, {args.dtype}, seed {args.seed}, "
            f"torch {torch.__version__}"
        ),
        default_csv="train_torch.csv",
        plot_title=f"torch CNN + DDP, global batch {cut[-1]}, shards {list(args.shards)}",
    )


if __name__ == "__main__":
    sys.exit(run_aborting(main))
