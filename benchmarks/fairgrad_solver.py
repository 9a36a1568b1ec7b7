"""FairGrad's solver on random Gramians: how well ``(Gw)ᵢ = wᵢ^(−1/α)`` holds, and how long one solve takes.

Draws ``--cases`` random Jacobians (2–40 tasks, as many parameters as tasks up to 3× that, task gradient norms
spread by ``exp(U(−s, s))``), solves each with :func:`mtml.weighting._fairgrad.alpha_fair` for several α, and
prints per α the median and worst relative residual ``|Gw − w^(−1/α)| / (|G|·w + w^(−1/α))`` (against the
ridged Gramian actually solved), the share of cases above 1e-8, and the median and worst ms per solve. Two
buckets: well-conditioned Gramians (condition number < 1e6) and the rest (near-conflicting or rank-deficient
gradients, where only the ridge makes a solution exist).

    .venv/bin/python benchmarks/fairgrad_solver.py --cases 300 --spread 1.5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mtml.weighting._fairgrad import alpha_fair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--spread", type=float, default=1.5, help="log-spread s of the task gradient norms")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0, 10.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows: dict[tuple[float, bool], list[tuple[float, float]]] = {}
    for _ in range(args.cases):
        m = int(rng.integers(2, 41))
        n = int(rng.integers(1, 3 * m + 2))
        jac = rng.standard_normal((m, n)) * np.exp(rng.uniform(-args.spread, args.spread, (m, 1)))
        gram = jac @ jac.T
        well = bool(np.linalg.cond(gram) < 1e6)
        ridged = gram + 1e-10 * np.diag(np.diag(gram))
        for alpha in args.alphas:
            start = time.perf_counter()
            w = alpha_fair(gram, alpha)
            ms = (time.perf_counter() - start) * 1e3
            rhs = w ** (-1.0 / alpha)
            residual = float((np.abs(ridged @ w - rhs) / (np.abs(ridged) @ w + rhs)).max())
            rows.setdefault((alpha, well), []).append((residual, ms))
    print("| α | Gramians | cases | median residual | worst residual | > 1e-8 | median ms | worst ms |")
    print("|---|---|---|---|---|---|---|---|")
    for (alpha, well), found in sorted(rows.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        res = [r for r, _ in found]
        ms = [t for _, t in found]
        share = sum(r > 1e-8 for r in res) / len(res)
        print(f"| {alpha:g} | {'cond < 1e6' if well else 'cond ≥ 1e6'} | {len(found)} | {statistics.median(res):.1e} | "
              f"{max(res):.1e} | {100 * share:.0f}% | {statistics.median(ms):.2f} | {max(ms):.1f} |")


if __name__ == "__main__":
    main()
