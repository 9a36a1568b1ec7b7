"""StochNorm against fine-tuning on a source whose trunk has BatchNorm (mtml's own trunks have none).

Usage:  .venv/bin/python benchmarks/stochnorm_batchnorm.py [--draws 10] [--sizes 10 40]

Source: an MLP trunk 100→64→BatchNorm→ReLU→32→BatchNorm→ReLU with a linear head per task, trained jointly (Adam,
lr 0.01, 4000 steps, best validation checkpoint)
(``mtml.engine.train_multitask``) on 8 tasks of :func:`mtml.datasets.synthetic_linear` (tasks sharing a 100→10
projection, 200 training rows each). Target: 8 other tasks of the same family (same projection), each subsampled to
``size`` training rows per draw; validation and test rows as generated (100 / 500). For each size, strategy and
draw: test MSE of the fitted predictor; the table gives the mean over the 8 target tasks and the draws, with the
95% interval of the paired difference to ``finetune_all`` over tasks × draws.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from mtml.datasets import synthetic_linear
from mtml.engine import StopRule, train_multitask
from mtml.nn import MultiTaskModel
from mtml.tasks import Split, Task
from mtml.transfer import STRATEGIES, Source
from mtml.workflows import t_critical

STRATEGY_NAMES = ("scratch", "finetune_all", "l2sp", "stochnorm")


def bn_trunk() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.BatchNorm1d(32),
                         nn.ReLU())


def family() -> list[Task]:
    """16 tasks sharing one 100→10 projection: the first 8 are the source's, the last 8 the targets."""
    return synthetic_linear(num_tasks=16, n_train=200, n_val=100, n_test=500, seed=0)


def source_model() -> Source:
    tasks = family()[:8]
    torch.manual_seed(0)
    model = MultiTaskModel(bn_trunk(), {t.name: nn.Linear(32, 1) for t in tasks})
    train_multitask(model, tasks, lr=1e-2, batch_size=64, seed=0, stop=StopRule(max_steps=4000, eval_every=200,
                                                                               patience=0))
    return Source(model.eval(), kinds={t.name: "regression" for t in tasks}, label="the BatchNorm source")


def subsample(task: Task, size: int, g: torch.Generator) -> Task:
    rows = torch.randperm(task.train.x.shape[0], generator=g)[:size]
    return Task(task.name, task.kind, Split(task.train.x[rows], task.train.y[rows]), val=task.val, test=task.test)


def test_mse(module: nn.Module, task: Task) -> float:
    assert task.test is not None
    module.eval()
    with torch.no_grad():
        return float((module(task.test.x) - task.test.y).square().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 40])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    source = source_model()
    targets = family()[8:]
    print(f"source trained in {time.perf_counter() - start:.1f} s")
    print("| rows | " + " | ".join(STRATEGY_NAMES) + " | stochnorm − finetune_all |")
    print("|---|" + "---|" * (len(STRATEGY_NAMES) + 1))
    for size in args.sizes:
        scores: dict[str, list[float]] = {name: [] for name in STRATEGY_NAMES}
        for draw in range(args.draws):
            for i, task in enumerate(targets):
                small = subsample(task, size, torch.Generator().manual_seed(1000 * draw + i))
                for name in STRATEGY_NAMES:
                    fitted = STRATEGIES.create(name).fit(source, small, generator=torch.Generator().manual_seed(
                        draw))
                    scores[name].append(test_mse(fitted, small))
        diff = torch.tensor(scores["stochnorm"]) - torch.tensor(scores["finetune_all"])
        half = t_critical(len(diff) - 1) * float(diff.std()) / math.sqrt(len(diff))
        means = " | ".join(f"{sum(v) / len(v):.4f}" for v in scores.values())
        print(f"| {size} | {means} | {float(diff.mean()):+.4f} ± {half:.4f} |")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
