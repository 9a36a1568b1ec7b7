"""Eager against ``compiled=True`` for the algorithms that offer it, on MLP meta-learning workloads.

``--workload sinusoid`` (default): the sinusoid MLP (1-40-40-1, meta-batch 25, K-shot regression).
``--workload classification``: N-way K-shot classification of 64-feature vectors (each task's classes are Gaussian
clusters around random means) with a 64-W-W-N ReLU MLP (``--width``, default 256), ``--query`` examples per class
and ``--meta-batch`` tasks: the wider, cross-entropy workload of a user's tabular or embedding few-shot task.

Both variants of an algorithm start from the same weights, see the same episodes and run in interleaved rounds
in this process; the compile happens in the untimed warm-up (its seconds are printed). Prints ms per meta-step
(`meta_step` with fused Adam over the model's and the algorithm's parameters) and the speed-up.

    .venv/bin/python benchmarks/compiled_meta.py --algorithms maml fomaml anil metasgd --shots 10 --steps 1 5
    .venv/bin/python benchmarks/compiled_meta.py --workload classification --ways 5 --shots 5 --width 256
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mtml.meta import ALGORITHMS, Episode, meta_parameters, meta_step
from mtml.sampling import SinusoidTasks
from mtml.tasks import Split

FEATURES = 64


def classification_episode(args: argparse.Namespace, gen: torch.Generator) -> Episode:
    means = torch.randn(args.meta_batch, args.ways, FEATURES, generator=gen)

    def split(per_class: int) -> Split:
        y = torch.arange(args.ways).repeat_interleave(per_class).repeat(args.meta_batch, 1)
        x = means.gather(1, y[..., None].expand(-1, -1, FEATURES))
        return Split(x + 0.8 * torch.randn(x.shape, generator=gen), y)

    return Episode(split(args.shots), split(args.query), ways=args.ways)


def build_model(args: argparse.Namespace) -> nn.Module:
    if args.workload == "sinusoid":
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    return nn.Sequential(nn.Linear(FEATURES, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                         nn.Linear(args.width, args.ways))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "metasgd"],
                        choices=["maml", "fomaml", "anil", "boil", "metasgd"])
    parser.add_argument("--workload", choices=["sinusoid", "classification"], default="sinusoid")
    parser.add_argument("--shots", type=int, default=10, help="support examples per task (sinusoid) or per class")
    parser.add_argument("--ways", type=int, default=5, help="classification: classes per task")
    parser.add_argument("--query", type=int, default=15, help="classification: query examples per class")
    parser.add_argument("--width", type=int, default=256, help="classification: hidden width")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per episode (default 25 sinusoid, 16 "
                        "classification)")
    parser.add_argument("--inner-lr", type=float, default=None, help="default 0.01 sinusoid, 0.1 classification")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--iterations", type=int, default=100, help="timed meta-steps per round and variant")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    classify = args.workload == "classification"
    args.meta_batch = args.meta_batch or (16 if classify else 25)
    inner_lr = args.inner_lr or (0.1 if classify else 0.01)
    gen = torch.Generator().manual_seed(0)
    if classify:
        episodes = [classification_episode(args, gen) for _ in range(args.iterations + 20)]
        print(f"{args.ways}-way {args.shots}-shot, {args.query} query/class, {args.meta_batch} tasks, MLP "
              f"{FEATURES}-{args.width}-{args.width}-{args.ways}, inner lr {inner_lr}")
    else:
        sampler = SinusoidTasks(shots=args.shots, meta_batch=args.meta_batch)
        episodes = [sampler.sample(gen) for _ in range(args.iterations + 20)]
        print(f"sinusoid, K = {args.shots}, {args.meta_batch} tasks, MLP 1-40-40-1, inner lr {inner_lr}")
    print(f"{'algorithm':<10}{'steps':>6}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}{'compile s':>11}")
    for name in args.algorithms:
        for steps in args.steps:
            runs = {}
            for compiled in (False, True):
                torch.manual_seed(0)
                model = build_model(args)
                algorithm = ALGORITHMS.create(name, model, inner_lr=inner_lr, inner_steps=steps, compiled=compiled)
                optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=1e-3, fused=True)
                start = time.perf_counter()
                for episode in episodes[:20]:
                    meta_step(algorithm, model, episode, optimizer)
                runs[compiled] = (algorithm, model, optimizer, time.perf_counter() - start)
            seconds = {False: 0.0, True: 0.0}
            for _ in range(args.rounds):
                for compiled, (algorithm, model, optimizer, _) in runs.items():
                    start = time.perf_counter()
                    for episode in episodes[20:]:
                        meta_step(algorithm, model, episode, optimizer)
                    seconds[compiled] += time.perf_counter() - start
            n = args.rounds * args.iterations
            eager, fast = seconds[False] / n * 1e3, seconds[True] / n * 1e3
            print(f"{name:<10}{steps:>6}{eager:>10.3f}{fast:>13.3f}{eager / fast:>9.2f}x{runs[True][3]:>11.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
