"""Euclidean projection onto the probability simplex, for SDMGrad, MoDo and MoCo."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["simplex_projection"]


def simplex_projection(y: Tensor) -> Tensor:
    """``argmin_{x ≥ 0, Σx = 1} ‖x − y‖`` for ``y: [m]``, by sorting (Held, Wolfe & Crowder 1974; Duchi et al.
    2008): ``x = max(y − θ, 0)`` with ``θ = (Σ_{j ≤ ρ} u_j − 1)/ρ``, ``u`` sorted descending and ``ρ`` the largest
    ``j`` with ``u_j > (Σ_{i ≤ j} u_i − 1)/j``. Vectorised: no host synchronisation on an accelerator.
    """
    u = torch.sort(y, descending=True).values
    j = torch.arange(1, y.shape[0] + 1, dtype=y.dtype, device=y.device)
    theta = (torch.cumsum(u, 0) - 1.0) / j
    rho = (u > theta).to(torch.long).cumsum(0).argmax()  # last index where the condition holds (it holds at 0)
    return (y - theta[rho]).clamp_min(0.0)
