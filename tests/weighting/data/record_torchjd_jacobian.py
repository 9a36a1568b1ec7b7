"""Record TorchJD's Jacobian aggregators on fixed matrices, so mtml's Jacobian methods are compared without
TorchJD installed.

Run with the peers' environment (``bash benchmarks/setup_mtl_peers.sh``)::

    build/venv-mtl/bin/python tests/weighting/data/record_torchjd_jacobian.py

It writes ``torchjd_jacobian.json`` next to this file:

* ``trimmed_mean`` — ``TrimmedMean(trim_number=t)(J)`` on random ``J [m, n]``;
* ``graddrop`` — ``GradDrop(leak=…)(J)`` on ``J`` whose every column has one sign (then no draw matters: a
  positive column has purity 1 and keeps everything, a negative one purity 0);
* ``excess_mtl`` — a sequence of ``J``'s through one stateful ``ExcessMTL(robust_step_size, n_warmup_steps)``:
  its weights and aggregate after each call.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from torchjd import aggregation as agg


def _jac(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=g, dtype=torch.float64)
    jac[0] *= 3.0
    return jac


def main() -> None:
    trimmed = []
    for m, n, trim, seed in [(3, 6, 1, 0), (5, 8, 1, 1), (5, 8, 2, 2), (7, 11, 2, 3), (4, 5, 0, 4), (6, 9, 2, 5)]:
        jac = _jac(m, n, seed)
        trimmed.append({"trim": trim, "jacobian": jac.tolist(), "update": agg.TrimmedMean(trim)(jac).tolist()})
    graddrop = []
    for m, n, seed, leak in [(2, 5, 0, None), (3, 7, 1, None), (4, 6, 2, [0.0, 0.3, 1.0, 0.5]), (5, 9, 3, None)]:
        g = torch.Generator().manual_seed(100 + seed)
        signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        jac = _jac(m, n, seed).abs() * signs  # one sign per column
        leak_t = None if leak is None else torch.tensor(leak, dtype=torch.float64)
        graddrop.append({"leak": leak, "jacobian": jac.tolist(), "update": agg.GradDrop(leak=leak_t)(jac).tolist()})
    excess = []
    for m, n, steps, step_size, warmup, seed in [(3, 6, 6, 1.0, 1, 10), (4, 10, 8, 0.5, 3, 11), (2, 4, 5, 2.0, 2, 12)]:
        method = agg.ExcessMTL(robust_step_size=step_size, n_warmup_steps=warmup)
        jacs, updates, weights = [], [], []
        for t in range(steps):
            jac = _jac(m, n, seed * 100 + t) * (1.0 + 0.5 * t) ** -1  # shrinking gradients: risks fall
            jacs.append(jac.tolist())
            updates.append(method(jac).tolist())
            weights.append(method.weighting._weights.tolist())
        excess.append({"step_size": step_size, "warmup": warmup, "jacobians": jacs, "updates": updates,
                       "weights": weights})
    record = {"torchjd": version("torchjd"), "trimmed_mean": trimmed, "graddrop": graddrop, "excess_mtl": excess}
    path = Path(__file__).with_name("torchjd_jacobian.json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
