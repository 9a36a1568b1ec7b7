"""Peak memory of a Conv-4 second-order MAML meta-step: one backward per task (the default) or per episode.

Runs two meta-steps in this process (fresh, so its peak RSS is the step's) and prints the peak resident set and
the resident set before the model was built. Run once per setting:

    .venv/bin/python benchmarks/conv_memory.py --ways 20 --tasks 16 --backward task
    .venv/bin/python benchmarks/conv_memory.py --ways 20 --tasks 16 --backward episode
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_maml import build_mtml, episode

from mtml._allocator import keep_freed_memory
from mtml.nn import MultiTaskModel, build_backbone, feature_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--backward", choices=["task", "episode"], default="task")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    trunk = build_backbone("conv4", (1, 28, 28), {"width": 64, "norm": "group"})
    model = MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), args.ways)})
    ep = episode(args.tasks, args.ways, 1, 15 if args.ways == 5 else 5, torch.Generator().manual_seed(1))
    options = argparse.Namespace(algorithm="maml", inner_lr=0.4, steps=1)
    step = build_mtml(model, options, {} if args.backward == "task" else {"task_backward": False}, "fp32")
    for _ in range(2):
        step(ep)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.ways}-way, {args.tasks} tasks, one backward per {args.backward}: peak RSS {peak:.0f} MB "
          f"(before the model: {before:.0f} MB)")


if __name__ == "__main__":
    main()
