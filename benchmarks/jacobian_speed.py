"""Step time of the Jacobian weightings (GradDrop, MoCo, ExcessMTL, trimmed mean) next to ``equal`` and PCGrad.

Model: an MLP trunk ``--in-dim`` → ``--width`` × ``--depth`` (ReLU, default 32 → 128 → 128) with one linear
regression head per task; every task reads the same ``--batch`` rows (one trunk pass). One step is
:func:`mtml.engine.joint_step` with SGD: forward, per-task gradient information, the method, the update. PCGrad
runs with ``gramian: auto`` (here ``layerwise/batched``: no parameter Jacobian) and with ``gramian: loop`` (the
same m backwards the Jacobian methods take); the Jacobian methods use ``jacobian: loop`` (the CPU default).
All candidates run interleaved round by round; the numbers are medians over ``--reps`` rounds after a warm-up.
``--device cuda`` times on a GPU (synchronised; the Jacobian's ``auto`` backend is then ``batched``).

    .venv/bin/python benchmarks/jacobian_speed.py --tasks 4 16 --reps 30
    python benchmarks/jacobian_speed.py --tasks 4 16 --reps 30 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtml.engine import joint_step
from mtml.nn import build_multitask_model
from mtml.tasks import Split, Task
from mtml.weighting import WEIGHTINGS

CANDIDATES = [("equal", {}), ("pcgrad", {"gramian": "auto"}), ("pcgrad", {"gramian": "loop"}), ("graddrop", {}),
              ("trimmed_mean", {}), ("moco", {}), ("excess_mtl", {})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--in-dim", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{device}: MLP {args.in_dim}→{'→'.join([str(args.width)] * args.depth)}, batch {args.batch} shared rows, "
          f"{args.threads} thread(s), median of {args.reps} rounds, ms per step")
    for m in args.tasks:
        g = torch.Generator().manual_seed(m)
        x = torch.randn(args.batch, args.in_dim, generator=g).to(device)
        tasks = [Task(f"t{i}", "regression", Split(x, torch.randn(args.batch, 1, generator=g).to(device)))
                 for i in range(m)]
        names = [t.name for t in tasks]
        batch = {t.name: (x, t.train.y) for t in tasks}
        by_name = {t.name: t for t in tasks}
        runs = []
        for name, options in CANDIDATES:
            torch.manual_seed(0)
            model = build_multitask_model(tasks, trunk_hidden=(args.width,) * args.depth, activation="relu").to(device)
            weighting = WEIGHTINGS.create(name, names, **options).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            joint_step(model, by_name, batch, weighting, opt)  # warm-up (and MoCo/ExcessMTL buffers)
            runs.append((f"{name} {options.get('gramian', '')}".strip(), model, weighting, opt, []))
        for _ in range(args.reps):
            for _, model, weighting, opt, times in runs:
                sync()
                t0 = time.perf_counter()
                joint_step(model, by_name, batch, weighting, opt)
                sync()
                times.append(time.perf_counter() - t0)
        d = sum(p.numel() for p in runs[0][1].shared_parameters())
        print(f"\nT = {m} tasks, d = {d} shared parameters (J: {m * d * 4 / 2**20:.1f} MiB in float32)")
        for label, _, _, _, times in runs:
            print(f"  {label:<16} {1e3 * statistics.median(times):8.2f}")


if __name__ == "__main__":
    main()
