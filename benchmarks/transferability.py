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
- per split, the Spearman correlation and the weighted Kendall τ (Vigna 2015, as ``scipy.stats.weightedtau``:
  agreement on the best sources counts most) across sources between each estimator and the actual accuracy;
  each reported as mean with a 95% percentile-bootstrap CI over splits.

``--setup movies`` swaps in real data: the target is one IMDb genre flag (``--target-task``) and the six
sources are models trained on one other genre each.

Run: ``.venv/bin/python benchmarks/transferability.py [--setup movies]`` (15-35 s on one CPU thread).
"""

from __future__ import annotations

import argparse
import time

import torch

from mtml import MultiTaskModel, Split, StopRule, Task, TaskKind, build_multitask_model, train_multitask
from mtml.transfer import estimate_all, head_probs, spearman, weighted_tau

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


def _probe_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                    classes: int) -> float:
    """Test accuracy of a softmax head fitted (L-BFGS, small L2) on frozen features."""
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a, b = (f_train - mean) / std, (f_test - mean) / std
    head = torch.nn.Linear(a.shape[1], classes).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(a), y_train) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((head(b).argmax(1) == y_test).double().mean())


def _bootstrap_ci(values: torch.Tensor, seed: int, reps: int = 10000) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (reps, len(values)), generator=g)
    means = values[idx].mean(1).sort().values
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


NAMES = ("logme", "leep", "nce", "hscore", "transrate")
Source = tuple[str, MultiTaskModel, str, str]  # label, model, head giving the source probabilities, its kind


def study(sources: list[Source], pool: Split, test: Split, *, splits: int, n_target: int, seed: int) -> None:
    """Estimators vs linear-probe accuracy on ``splits`` resampled target training sets; prints the table."""
    g = torch.Generator().manual_seed(seed)
    classes = int(pool.y.max()) + 1
    corr: dict[str, list[float]] = {n: [] for n in NAMES}
    tau: dict[str, list[float]] = {n: [] for n in NAMES}
    accs = []
    with torch.no_grad():
        test_feats = [m.features(test.x).double() for _, m, _, _ in sources]
    for _ in range(splits):
        idx = torch.randperm(len(pool), generator=g)[:n_target]
        x, y = pool.x[idx], pool.y[idx]
        scores: dict[str, list[float]] = {n: [] for n in NAMES}
        actual = []
        for (_, model, head, kind), f_test in zip(sources, test_feats, strict=True):
            with torch.no_grad():
                feats = model.features(x).double()
                probs = head_probs(model.heads[head](feats.float()), kind)
            est = estimate_all(feats, probs, y, "multiclass")
            for n in NAMES:
                scores[n].append(float(est[n]))  # type: ignore[arg-type]
            actual.append(_probe_accuracy(feats, y, f_test, test.y, classes))
        accs.append(actual)
        for n in NAMES:
            corr[n].append(spearman(torch.tensor(scores[n]), torch.tensor(actual)))
            tau[n].append(weighted_tau(torch.tensor(scores[n]), torch.tensor(actual)))
    acc = torch.tensor(accs).mean(0).tolist()
    print(f"\nlinear-probe test accuracy per source (mean over {splits} splits of {n_target} examples):")
    print("  " + "  ".join(f"{s[0]}: {a:.3f}" for s, a in zip(sources, acc, strict=True)))
    print(f"\nSpearman ρ and weighted Kendall τ with the probe accuracy across {len(sources)} sources, over {splits} "
          "splits (95% CI: bootstrap over splits)")
    print("| estimator | mean Spearman | 95% CI | splits with Spearman > 0 | mean weighted τ | 95% CI |")
    print("|---|---|---|---|---|---|")
    for i, n in enumerate(NAMES):
        v = torch.tensor(corr[n], dtype=torch.float64)
        w = torch.tensor(tau[n], dtype=torch.float64)
        lo, hi = _bootstrap_ci(v, seed + i)
        wlo, whi = _bootstrap_ci(w, seed + 100 + i)
        print(f"| {n} | {float(v.mean()):+.3f} | [{lo:+.3f}, {hi:+.3f}] | {int((v > 0).sum())}/{len(v)} | "
              f"{float(w.mean()):+.3f} | [{wlo:+.3f}, {whi:+.3f}] |")


def synthetic_setup(args: argparse.Namespace) -> tuple[list[Source], Split, Split]:
    g = torch.Generator().manual_seed(args.seed)
    p_target = torch.randn(CLASSES, D, generator=g)
    x = torch.randn(6000, D, generator=g)
    y = _labels(p_target, x, g)
    rhos = torch.linspace(args.r_min, args.r_max, args.sources).tolist()
    sources = [(f"r={rho:.2f}", _source(rho, p_target, args.seed * 100 + i, args.steps), "s0", "multiclass")
               for i, rho in enumerate(rhos)]
    return sources, Split(x[2000:], y[2000:]), Split(x[:2000], y[:2000])


def movies_setup(args: argparse.Namespace) -> tuple[list[Source], Split, Split]:
    """Real data: IMDb films. Target = one genre flag; sources = models trained on one other genre each
    (trunk ``d → 32 → 4``), so each source keeps what its own genre needed."""
    from mtml.datasets import movies

    tasks = {t.name: t for t in movies(seed=args.seed, n=8000)}
    target = tasks.pop(args.target_task)
    sources = []
    for i, (name, task) in enumerate(tasks.items()):
        if task.kind is not TaskKind.BINARY:
            continue
        torch.manual_seed(args.seed * 100 + i)
        model = build_multitask_model([task], trunk_hidden=[32, 4])
        train_multitask(model, [task], lr=3e-3, batch_size=128, seed=args.seed,
                        stop=StopRule(max_steps=args.steps, eval_every=100, patience=0))
        sources.append((name.removeprefix("genre_"), model.eval(), name, "binary"))
    pool = Split(target.train.x, target.train.y.long())
    assert target.test is not None
    return sources, pool, Split(target.test.x, target.test.y.long())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", choices=["synthetic", "movies"], default="synthetic")
    ap.add_argument("--sources", type=int, default=8, help="synthetic: number of sources")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--n-target", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400, help="training steps of each source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r-min", type=float, default=0.0, help="synthetic: relatedness of the least related source")
    ap.add_argument("--r-max", type=float, default=1.0, help="synthetic: relatedness of the most related source")
    ap.add_argument("--target-task", default="genre_drama", help="movies: the target genre")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    sources, pool, test = (synthetic_setup if args.setup == "synthetic" else movies_setup)(args)
    print(f"trained {len(sources)} sources ({', '.join(s[0] for s in sources)}) in "
          f"{time.perf_counter() - start:.0f} s; target pool {len(pool)}, test {len(test)} examples")
    study(sources, pool, test, splits=args.splits, n_target=args.n_target, seed=args.seed + 1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
