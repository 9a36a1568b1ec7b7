"""Shared-input check: 16 linear heads on one batch of rows — one trunk pass, and a step near the floor.

Builds ``MultiTaskModel(mlp(64 → 512 → 512), 16 × Linear(512, 1))``, gives :func:`mtml.joint_step` the SAME
``x`` tensor (256 rows) for every task, counts trunk forwards with a hook and times the step against the
summed-loss floor (one trunk pass, every head, one backward of Σ Lᵢ), interleaved, median of ``--reps``.
Exits 1 if the trunk ran more than once per step or ``equal`` is over ``--limit`` × the floor.

    .venv/bin/python benchmarks/shared_inputs_check.py --tasks 16 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from mtml.engine._joint import joint_step
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task
from mtml.weighting import WEIGHTINGS


class _NoStep(torch.optim.SGD):
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        return None


def check(m: int, reps: int, methods: list[str]) -> tuple[dict[str, float], int]:
    torch.manual_seed(0)
    trunk = mlp(64, (512, 512))
    model = MultiTaskModel(trunk, {f"t{i}": nn.Linear(512, 1) for i in range(m)})
    x = torch.randn(256, 64)
    ys = {f"t{i}": torch.randn(256, 1) for i in range(m)}
    batch = {n: (x, y) for n, y in ys.items()}
    tasks = {n: Task(n, "regression", Split(x, y)) for n, y in ys.items()}
    calls = [0]
    trunk.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    opt = _NoStep(model.parameters(), lr=0.0)
    names = list(ys)

    def floor() -> None:
        opt.zero_grad()
        feats = trunk(x)
        out = torch.cat(list(model._heads_on(names, feats).values()), 1)  # every head in one matmul
        ((out - torch.cat([ys[n] for n in names], 1)) ** 2).mean(0).sum().backward()

    steps = {"floor": floor}
    for name in methods:
        w = WEIGHTINGS.create(name, names)
        steps[name] = lambda w=w: joint_step(model, tasks, batch, w, opt)  # type: ignore[misc]
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()
    calls[0] = 0
    for _ in range(reps):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    per_step = calls[0] / (reps * len(steps))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, round(per_step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[16])
    p.add_argument("--methods", nargs="+", default=["equal", "mgda", "pcgrad"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--limit", type=float, default=1.15, help="allowed equal / floor ratio")
    args = p.parse_args()
    torch.set_num_threads(1)
    ok = True
    for m in args.tasks:
        ms, per_step = check(m, args.reps, args.methods)
        floor = ms["floor"]
        cells = ", ".join(f"{k} {v:.1f} ms ({v / floor:.2f}×)" for k, v in ms.items() if k != "floor")
        print(f"T={m}: trunk forwards per step {per_step}; floor {floor:.1f} ms; {cells}")
        ok &= per_step == 1 and ms.get("equal", 0.0) <= args.limit * floor
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
