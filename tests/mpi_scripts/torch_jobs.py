"""Rank script for ``tests/test_torch_distributed.py``: arraysyncbn.torch in real processes.

Launched by ``torchrun --standalone --nproc-per-node K`` (its environment
names rank and world) or by ``mpiexec -n K python -m mpi4py`` (mpi4py does;
rank 0 picks a free port for the gloo process group DDP needs). Each case
prints ``OK <case> rank r/K`` when its assertions passed; a failed assertion
ends the process with an error, which fails the job.

Cases:

``ddp torch|mpi|none``
    A small CNN, converted with ``comm=TorchDistributedCommunicator()`` or
    ``MPICommunicator()``, wrapped in ``DistributedDataParallel`` (gloo,
    CPU), trained 3 SGD steps on uneven shards of one global batch; every
    rank also trains the unconverted model on the whole batch alone, and
    parameters and buffers must match it, and be bitwise equal across ranks.
``comm``
    ``TorchDistributedCommunicator``: sums bitwise identical on every rank,
    op max, numpy buffers.
``timeout``
    Rank 0 waits in a forward that rank 1 skips: the watchdog must end it.
``cuda nccl|gloo|mixed``
    The ``ddp torch`` comparison on CUDA tensors (float64 and channels_last
    float32, TF32 off), over a process group of that backend (``mixed`` is
    ``cpu:gloo,cuda:nccl``); NCCL wants one process per GPU. Also checks
    that a CUDA buffer's sum comes back on its device.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import arraysyncbn as sbn
from arraysyncbn.torch import SyncBatchNorm, convert_sync_batchnorm


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


BACKENDS = {"nccl": "nccl", "gloo": "gloo", "mixed": "cpu:gloo,cuda:nccl"}


def init(backend: str = "gloo") -> tuple[int, int]:
    """Initialize the process group under torchrun or mpiexec; return (rank, size)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        if torch.cuda.is_available():  # one GPU per local rank, shared if too few
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend)
    else:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        port = None
        if world.rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        port = world.bcast(port, root=0)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world.rank, world_size=world.size
        )
    return dist.get_rank(), dist.get_world_size()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, momentum=None)),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 2),
        torch.nn.BatchNorm1d(2),
    ).double()


def case_ddp(rank: int, size: int, which: str) -> None:
    comms = {"torch": sbn.TorchDistributedCommunicator, "mpi": sbn.MPICommunicator}
    comm = comms[which]() if which in comms else None  # "none": the test must fail
    _train_and_compare(rank, size, comm, torch.device("cpu"), torch.float64, f"ddp[{which}]")


def _train_and_compare(
    rank: int,
    size: int,
    comm: sbn.Communicator | None,
    device: torch.device,
    dtype: torch.dtype,
    what: str,
    channels_last: bool = False,
) -> None:
    """DDP with converted layers on uneven shards against one process on the whole batch."""
    net = model().to(device, dtype)
    ref = model().to(device, dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    ids = [device.index] if device.type == "cuda" else None
    ours = torch.nn.parallel.DistributedDataParallel(
        convert_sync_batchnorm(net, comm=comm), device_ids=ids
    )
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    sizes = [3 + 2 * r for r in range(size)]  # uneven shards
    total = sum(sizes)
    gen = torch.Generator().manual_seed(1)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for _ in range(3):
        x = torch.randn(total, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
        x = x.to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mine = torch.split(x, sizes)[rank]
        # DDP averages gradients over ranks; scaled so the average is the
        # gradient of the whole batch's mean loss.
        loss = ours(mine).square().sum() * (size / total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_ref = ref(x).square().sum() / total
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
    state, state_ref = ours.module.state_dict(), ref.state_dict()
    assert sorted(state) == sorted(state_ref)
    for key, value in state_ref.items():
        assert state[key].device == value.device, key
        err = float((state[key].double() - value.double()).abs().max())
        assert err < tol, f"{key}: {err}"
    gathered: list = [None] * size
    dist.all_gather_object(gathered, {k: v.cpu().numpy().tobytes() for k, v in state.items()})
    assert all(g == gathered[0] for g in gathered), "ranks differ"
    say(f"OK {what} rank {rank}/{size}")


def case_cuda(rank: int, size: int, backend: str) -> None:
    # TF32 convolutions would differ between a shard and the whole batch.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", torch.cuda.current_device())
    comm = sbn.TorchDistributedCommunicator()
    buf = torch.arange(5, dtype=torch.float64, device=device)
    out = comm.allreduce(buf)
    assert out.device == device and torch.equal(out.cpu(), torch.arange(5.0) * size), out
    _train_and_compare(rank, size, comm, device, torch.float64, f"cuda[{backend}]")
    _train_and_compare(
        rank, size, comm, device, torch.float32, f"cuda[{backend}] channels_last", True
    )


def case_comm(rank: int, size: int) -> None:
    comm = sbn.TorchDistributedCommunicator()
    assert (comm.rank, comm.size) == (rank, size)
    rng = np.random.default_rng(rank)
    # Magnitudes spread over many decades: a different summation order on
    # some rank would change low bits.
    buf = rng.standard_normal(4099) * 10.0 ** rng.integers(-8, 9, 4099)
    inputs: list = [None] * size
    dist.all_gather_object(inputs, buf)
    for op in ("sum", "max"):
        out = comm.allreduce(torch.from_numpy(buf), op)
        assert out.dtype == torch.float64 and out.shape == (4099,)
        results: list = [None] * size
        dist.all_gather_object(results, out.numpy().tobytes())
        assert all(r == results[0] for r in results), f"{op}: ranks got different bits"
        want = np.sum(inputs, axis=0) if op == "sum" else np.max(inputs, axis=0)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=0)
    out = comm.allreduce(buf.astype(np.float32), "max")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.max(inputs, axis=0).astype(np.float32))
    say(f"OK comm rank {rank}/{size}")


def case_timeout(rank: int, size: int) -> None:
    comm = sbn.TorchDistributedCommunicator(timeout=2)
    bn = SyncBatchNorm(3, comm=comm)
    bn(torch.randn(4, 3))  # every rank: the first call, with its check
    if rank == 0:
        say(f"waiting rank {rank}/{size}")
        bn(torch.randn(4, 3))  # rank 1 skips it: the watchdog must end this process
        say(f"NOT ENDED rank {rank}/{size}")
    else:
        time.sleep(60)


def main() -> None:
    case, *args = sys.argv[1:]
    rank, size = init(BACKENDS[args[0]] if case == "cuda" else "gloo")
    cases = {"ddp": case_ddp, "comm": case_comm, "timeout": case_timeout, "cuda": case_cuda}
    cases[case](rank, size, *args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
