"""Whole-model cost of arraysyncbn's torch module: one training step of a
ResNet-like CNN with torch's BatchNorm2d, and the same model converted with
``arraysyncbn.torch.convert_sync_batchnorm`` (a world of one), timed side by
side.

The layer benchmark (``python -m arraysyncbn bench``) times batch norm
alone; in a model the layer runs between convolutions, whose outputs and
allocations it shares the caches and the allocator with. This script
measures what a user sees: the step. The CNN has five stages of 3×3
convolution, batch norm and ReLU (9 batch-norm layers), a pooled linear
head and cross-entropy; each repeat times one step of each model, in
alternating order, and the medians are printed with their ratio
(BatchNorm2d time / ours: above 1 we are faster).

Run: ``python scripts/model_step.py [--batch 2] [--size 224] [--repeats 9]
[--threads 1]``. Needs torch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model(torch: object) -> object:
    nn = torch.nn  # type: ignore[attr-defined]

    def block(cin: int, cout: int, stride: int) -> object:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    layers = [block(3, 64, 2)]
    for cin, cout in ((64, 64), (64, 128), (128, 256), (256, 512)):
        layers += [block(cin, cout, 2), block(cout, cout, 1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=_positive, default=2, help="images per step (2)")
    parser.add_argument("--size", type=_positive, default=224, help="image height and width (224)")
    parser.add_argument("--repeats", type=_positive, default=9, help="timed steps per model (9)")
    parser.add_argument("--threads", type=_positive, default=1, help="torch threads (1)")
    args = parser.parse_args(argv)
    try:
        import torch

        from arraysyncbn.torch import SyncBatchNorm, convert_sync_batchnorm
    except ImportError as exc:
        print(f"model_step.py: needs torch ({exc})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = _model(torch)
    ours = convert_sync_batchnorm(copy.deepcopy(ref))
    layers = sum(isinstance(m, SyncBatchNorm) for m in ours.modules())
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))

    def step(model: object) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
            torch.nn.functional.cross_entropy(model(x), target).backward()

        return run

    steps = {"BatchNorm2d": step(ref), "arraysyncbn": step(ours)}
    for run in steps.values():  # warm-up: compile, allocate
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    theirs, mine = (statistics.median(times[n]) for n in ("BatchNorm2d", "arraysyncbn"))
    print(
        f"{layers} batch-norm layers, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.threads} thread(s), median of {args.repeats} steps: "
        f"BatchNorm2d {theirs * 1e3:.2f} ms, arraysyncbn {mine * 1e3:.2f} ms, "
        f"ratio {theirs / mine:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
