"""Record TorchJD's weights on fixed random Jacobians, so mtml's tests can compare without TorchJD installed.

Run with the peers' environment (``bash benchmarks/setup_mtl_peers.sh``)::

    build/venv-mtl/bin/python tests/weighting/data/record_torchjd.py

It writes ``torchjd_weights.json`` next to this file: for each case the Jacobian ``J [m, n]`` (float64) and the
weights ``w`` TorchJD's weighting gives for ``G = J Jᵀ`` (Nash-MTL: recovered from TorchJD's aggregate by least
squares, as TorchJD exposes no weighting for it). ConFIG has no weighting in TorchJD either: its aggregate ``Jᵀw``
itself is stored under ``updates``. The stateful SDMGrad and MoDo weightings are called ``STATEFUL_CALLS`` times on
the same ``G`` from a fresh state, and the last call's weights are stored (the paper's two-batch product
``J₁J₂ᵀ`` is replaced by ``G``, as mtml does). Krum needs ``m ≥ n_byzantine + 3``.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from torchjd import aggregation as agg

CASES = [(2, 5, 0), (2, 5, 1), (3, 2, 2), (3, 6, 3), (5, 8, 4), (5, 3, 5), (8, 12, 6), (8, 20, 7)]
#: Calls of the stateful weightings (SDMGrad, MoDo) on one Gramian before their weights are recorded.
STATEFUL_CALLS = 3


def stateful(weighting: torch.nn.Module, gram: torch.Tensor) -> list[float]:
    for _ in range(STATEFUL_CALLS - 1):
        weighting(gram)
    return weighting(gram).tolist()


def main() -> None:
    out = []
    for m, n, seed in CASES:
        g = torch.Generator().manual_seed(seed)
        jac = torch.randn(m, n, generator=g, dtype=torch.float64)
        jac[0] *= 3.0  # unequal norms make the methods differ
        if seed % 2:
            jac[1] = -0.5 * jac[0] + 0.1 * jac[1]  # a strong conflict
        gram = jac @ jac.T
        case = {"m": m, "n": n, "seed": seed, "jacobian": jac.tolist(), "weights": {}, "updates": {}}
        w = case["weights"]
        w["upgrad"] = agg.UPGradWeighting()(gram).tolist()
        w["mgda"] = agg.MGDAWeighting(epsilon=1e-12, max_iters=100_000)(gram).tolist()
        w["imtl_g"] = agg.IMTLGWeighting()(gram).tolist()
        w["aligned_mtl"] = agg.AlignedMTLWeighting()(gram).tolist()
        w["cagrad"] = agg.CAGradWeighting(c=0.5)(gram).tolist()
        if m == 2:
            w["pcgrad"] = agg.PCGradWeighting()(gram).tolist()
        if n >= m:
            combined = agg.NashMTL(n_tasks=m, max_norm=0.0)(jac.float()).double()
            w["nash_mtl"] = torch.linalg.lstsq(jac.T, combined.unsqueeze(1)).solution.squeeze(1).tolist()
        w["dualproj"] = agg.DualProjWeighting()(gram).tolist()
        w["sdmgrad"] = stateful(agg.SDMGradWeighting(lr=5.0, momentum=0.5, n_iter=20, lambda_=0.3), gram)
        w["sdmgrad_lr10_lam1"] = stateful(agg.SDMGradWeighting(lr=10.0, n_iter=5, lambda_=1.0), gram)
        w["modo"] = stateful(agg.MoDoWeighting(gamma=0.01, rho=0.1), gram)
        if m >= 3:
            w["krum"] = agg.KrumWeighting(n_byzantine=0, n_selected=1)(gram).tolist()
        if m >= 4:
            w["krum_f1_s2"] = agg.KrumWeighting(n_byzantine=1, n_selected=2)(gram).tolist()
        case["updates"]["config_grad"] = agg.ConFIG()(jac).tolist()
        out.append(case)
    path = Path(__file__).with_name("torchjd_weights.json")
    path.write_text(json.dumps({"torchjd": version("torchjd"), "cases": out}, indent=1) + "\n")
    print(f"wrote {path} ({len(out)} cases, torchjd {version('torchjd')})")


if __name__ == "__main__":
    main()
