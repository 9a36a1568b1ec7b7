"""Second-order MAML on a Conv-4 trunk: the grouped-convolution path against ``vmap(functional_call)``.

One meta-step (one inner step, query loss, outer backward, Adam) on 5-way 1-shot 28×28 episodes with 15 query
examples per class, for several meta-batch sizes. Both paths start from the same weights and see the same
episode; they run in interleaved rounds and the median ms per meta-step of each is printed with their ratio.
The vmap path is forced by wrapping the trunk in a module that the grouped path does not recognise.

    .venv/bin/python benchmarks/conv_maml.py --tasks 8 16 32 --iterations 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import Tensor, nn

from mtml.meta import ALGORITHMS, Episode, meta_step
from mtml.nn import MultiTaskModel
from mtml.nn._backbones import build_backbone, feature_dim
from mtml.tasks import Split


class Opaque(nn.Module):
    """The same trunk behind a ``forward`` the grouped path cannot see through: it runs under ``vmap``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def episode(tasks: int, ways: int, query: int, generator: torch.Generator) -> Episode:
    xs = torch.randn(tasks, ways, 1, 28, 28, generator=generator)
    xq = torch.randn(tasks, ways * query, 1, 28, 28, generator=generator)
    ys = torch.arange(ways).repeat(tasks, 1)
    yq = torch.arange(ways).repeat_interleave(query).repeat(tasks, 1)
    return Episode(Split(xs, ys), Split(xq, yq), ways=ways)


def timed(model: nn.Module, ep: Episode, iterations: int) -> list[float]:
    algorithm = ALGORITHMS.create("maml", model, inner_lr=0.4, inner_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_step(algorithm, model, ep, optimizer)  # warm-up
    out = []
    for _ in range(iterations):
        start = time.perf_counter()
        meta_step(algorithm, model, ep, optimizer)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--norm", default="group")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"MAML 1 inner step, 5-way 1-shot, 15 query/class, 1×28×28, Conv-4 width {args.width} norm {args.norm}, "
          f"{args.threads} thread(s); median ms per meta-step over {args.rounds}×{args.iterations} iterations")
    print(f"{'tasks':>5} {'vmap ms':>9} {'grouped ms':>11} {'vmap/grouped':>13}")
    for tasks in args.tasks:
        torch.manual_seed(0)
        trunk = build_backbone("conv4", (1, 28, 28), {"width": args.width, "norm": args.norm})
        base = MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), 5)})
        ep = episode(tasks, 5, 15, torch.Generator().manual_seed(tasks))
        times: dict[str, list[float]] = {"vmap": [], "grouped": []}
        for _ in range(args.rounds):
            grouped = copy.deepcopy(base)
            vmapped = MultiTaskModel(Opaque(copy.deepcopy(base.trunk)), {"task": copy.deepcopy(base.heads["task"])})
            times["vmap"] += timed(vmapped, ep, args.iterations)
            times["grouped"] += timed(grouped, ep, args.iterations)
        v, g = statistics.median(times["vmap"]), statistics.median(times["grouped"])
        print(f"{tasks:>5} {v:>9.1f} {g:>11.1f} {v / g:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
