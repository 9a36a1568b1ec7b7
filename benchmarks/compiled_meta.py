"""Eager against ``compiled=True`` for the algorithms that offer it, on the sinusoid MLP (1-40-40-1, meta-batch 25).

Both variants of an algorithm start from the same weights, see the same episodes and run in interleaved rounds
in this process; the compile happens in the untimed warm-up (its seconds are printed). Prints ms per meta-step
(`meta_step` with fused Adam over the model's and the algorithm's parameters) and the speed-up.

    .venv/bin/python benchmarks/compiled_meta.py --algorithms maml fomaml anil metasgd --shots 10 --steps 1 5
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mtml.meta import ALGORITHMS, meta_parameters, meta_step
from mtml.sampling import SinusoidTasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "metasgd"],
                        choices=["maml", "fomaml", "anil", "boil", "metasgd"])
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--iterations", type=int, default=100, help="timed meta-steps per round and variant")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sampler = SinusoidTasks(shots=args.shots, meta_batch=25)
    gen = torch.Generator().manual_seed(0)
    episodes = [sampler.sample(gen) for _ in range(args.iterations + 20)]
    print(f"{'algorithm':<10}{'steps':>6}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}{'compile s':>11}")
    for name in args.algorithms:
        for steps in args.steps:
            runs = {}
            for compiled in (False, True):
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
                algorithm = ALGORITHMS.create(name, model, inner_lr=0.01, inner_steps=steps, compiled=compiled)
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
