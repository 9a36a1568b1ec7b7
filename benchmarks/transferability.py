"""Do transferability estimates rank source models the way fine-tuning does?

Setup (all synthetic, so relatedness is known and graded):
- target: 4-class classification of ``x ∈ R^20``, label = argmax of ``P_t x + noise`` with ``P_t: [4, 20]``;
- sources: each trained jointly (mtml ``train_multitask``) on two 4-class tasks whose labels come from
  ``P_s = ρ·M P_t + (1−ρ)·R`` (``M`` a random mixing of the target's directions, ``R`` random), for ``ρ`` from 0
  (unrelated) to 1 (same subspace); the trunk is ``20 → 32 → 8``, so an 8-wide bottleneck keeps what the source
  needed and drops the rest;
- for each of ``--splits`` resampled target training sets (``--n-target`` examples from a pool) every estimator
  is computed from the frozen source (features / first head's probabilities) on that training set, and the
  *actual* result is the test accuracy (2000 fixed test examples) of a linear probe — a new softmax head
  fitted by L-BFGS on the frozen features of the same training set;
- per split, the Spearman correlation across sources between each estimator and the actual accuracy; reported
  as mean with a 95% percentile-bootstrap CI over splits.

Run: ``.venv/bin/python benchmarks/transferability.py`` (about a minute on one CPU thread).
"""

from __future__ import annotations

import argparse
import time

import torch

from mtml import MultiTaskModel, Split, StopRule, Task, TaskKind, build_multitask_model, train_multitask
from mtml.transfer import estimate_all, head_probs

D, CLASSES, WIDTH = 20, 4, 8


def _labels(proj: torch.Tensor, x: torch.Tensor, g: torch.Generator, noise: float = 0.3) -> torch.Tensor:
    return (x @ proj.T + noise * torch.randn(x.shape[0], proj.shape[0], generator=g)).argmax(1)


def _source(rho: float, p_target: torch.Tensor, seed: int, steps: int) -> MultiTaskModel:
    g = torch.Generator().manual_seed(1000 + seed)
    tasks = []
    for k in range(2):
        mix = torch.randn(CLASSES, CLASSES, generator=g)
        proj = rho * mix @ p_target + (1 - rho) * torch.randn(CLASSES, D, generator=g)
        x = torch.randn(3000, D, generator=g)
        y = _labels(proj, x, g)
        tasks.append(Task(f"s{k}", TaskKind.MULTICLASS, Split(x[:2000], y[:2000]), Split(x[2000:], y[2000:]),
                          num_outputs=CLASSES))
    torch.manual_seed(seed)
    model = build_multitask_model(tasks, trunk_hidden=[32, WIDTH])
    train_multitask(model, tasks, lr=3e-3, batch_size=128, seed=seed,
                    stop=StopRule(max_steps=steps, eval_every=100, patience=0))
    return model.eval()


def _probe_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test accuracy of a softmax head fitted (L-BFGS, small L2) on frozen features."""
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a, b = (f_train - mean) / std, (f_test - mean) / std
    head = torch.nn.Linear(a.shape[1], CLASSES).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(a), y_train) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(b).argmax(1) == y_test).double().mean())


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank)."""
    order = v.argsort()
    r = torch.empty_like(v)
    r[order] = torch.arange(len(v), dtype=v.dtype)
    for value in v.unique():
        tie = v == value
        r[tie] = r[tie].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def _bootstrap_ci(values: torch.Tensor, seed: int, reps: int = 10000) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (reps, len(values)), generator=g)
    means = values[idx].mean(1).sort().values
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--n-target", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400, help="training steps of each source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r-min", type=float, default=0.0, help="relatedness of the least related source")
    ap.add_argument("--r-max", type=float, default=1.0, help="relatedness of the most related source")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    p_target = torch.randn(CLASSES, D, generator=g)
    pool_x = torch.randn(6000, D, generator=g)
    pool_y = _labels(p_target, pool_x, g)
    test_x, test_y, pool_x, pool_y = pool_x[:2000], pool_y[:2000], pool_x[2000:], pool_y[2000:]
    rhos = torch.linspace(args.r_min, args.r_max, args.sources).tolist()
    sources = [_source(rho, p_target, args.seed * 100 + i, args.steps) for i, rho in enumerate(rhos)]
    print(f"trained {len(sources)} sources (relatedness r = {', '.join(f'{r:.2f}' for r in rhos)}) in "
          f"{time.perf_counter() - start:.0f} s")
    names = ["logme", "leep", "nce", "hscore"]
    corr: dict[str, list[float]] = {n: [] for n in names}
    accs = []
    with torch.no_grad():
        test_feats = [m.features(test_x).double() for m in sources]
    for _ in range(args.splits):
        idx = torch.randperm(len(pool_x), generator=g)[: args.n_target]
        x, y = pool_x[idx], pool_y[idx]
        scores: dict[str, list[float]] = {n: [] for n in names}
        actual = []
        for model, f_test in zip(sources, test_feats, strict=True):
            with torch.no_grad():
                feats = model.features(x).double()
                probs = head_probs(model.heads["s0"](feats.float()), "multiclass")
            est = estimate_all(feats, probs, y, "multiclass")
            for n in names:
                scores[n].append(float(est[n]))  # type: ignore[arg-type]
            with torch.enable_grad():
                actual.append(_probe_accuracy(feats, y, f_test, test_y))
        accs.append(actual)
        for n in names:
            corr[n].append(spearman(torch.tensor(scores[n]), torch.tensor(actual)))
    acc = torch.tensor(accs)
    print(f"\nlinear-probe test accuracy per source (mean over {args.splits} splits of {args.n_target} examples):")
    print("  " + "  ".join(f"r={r:.2f}: {a:.3f}" for r, a in zip(rhos, acc.mean(0).tolist(), strict=True)))
    print(f"\nSpearman correlation with the probe accuracy across {len(sources)} sources, over {args.splits} splits")
    print("| estimator | mean Spearman | 95% CI (bootstrap over splits) | splits with Spearman > 0 |")
    print("|---|---|---|---|")
    for i, n in enumerate(names):
        v = torch.tensor(corr[n], dtype=torch.float64)
        lo, hi = _bootstrap_ci(v, args.seed + i)
        print(f"| {n} | {float(v.mean()):+.3f} | [{lo:+.3f}, {hi:+.3f}] | {int((v > 0).sum())}/{len(v)} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
