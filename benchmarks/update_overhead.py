"""What the training-loop options cost: ms per update of a whole `mtml train` run, with each option against the
plain run in the same process (schedule, clipping, accumulation; the TensorBoard and MLflow trackers).

    python benchmarks/update_overhead.py [--config examples/configs/penguins.yaml] [--steps 300] [--repeats 3]

Each variant runs N and 2N updates; the difference over N is the cost of one update without the run's fixed
costs (build, tracker set-up, final evaluation). Accumulation is reported per micro-batch (an update with
accumulate: k draws k batches).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mtml.config import load_config
from mtml.workflows import train

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "scheduler: cosine, warmup 30": ["training.scheduler={name: cosine, warmup: 30}"],
    "grad_clip: 1.0": ["training.grad_clip=1.0"],
    "accumulate: 4 (per micro-batch)": ["training.accumulate=4"],
    "logging.tensorboard": ["logging.tensorboard=true"],
    "logging.mlflow": ["logging.mlflow=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/configs/penguins.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fastest: dict[tuple[str, int], float] = {}
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        train(load_config(args.config, ["training.max_steps=20", "threads=1"]), Path(tmp) / "warm-up")
        for rep in range(args.repeats):
            for i, (name, extra) in enumerate(VARIANTS.items()):
                for steps in (n, 2 * n):
                    base = [f"training.max_steps={steps}", f"training.eval_every={n}", "training.patience=0",
                            "threads=1"]
                    cfg = load_config(args.config, base + extra)
                    t0 = time.perf_counter()
                    train(cfg, Path(tmp) / f"{rep}-{i}-{steps}")
                    key = (name, steps)
                    fastest[key] = min(fastest.get(key, float("inf")), time.perf_counter() - t0)
    best = {name: (fastest[name, 2 * n] - fastest[name, n]) * 1000 / n / (4 if "accumulate" in name else 1)
            for name in VARIANTS}
    plain = best["plain"]
    print(f"{args.config}: ms per update from runs of {n} and {2 * n} updates, best of {args.repeats}, 1 thread")
    print(f"{'variant':36s} {'ms/update':>10s} {'vs plain':>9s}")
    for name, ms in best.items():
        print(f"{name:36s} {ms:10.2f} {ms / plain:8.2f}×")


if __name__ == "__main__":
    main()
