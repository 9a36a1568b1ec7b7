"""The Gramian of per-task gradients over a set of (shared) parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["task_gramian"]


def task_gramian(losses: Tensor, params: Sequence[torch.Tensor]) -> Tensor:
    """``G[i, j] = ⟨∇_θ Lᵢ, ∇_θ Lⱼ⟩`` for ``losses: [m]`` over ``params`` → ``[m, m]``.

    One batched backward (``is_grads_batched``) through the graph of ``losses``, which stays alive for the
    weighted backward that follows. Parameters a loss does not reach contribute zero.
    """
    m = losses.shape[0]
    params = list(params)
    if not params:  # e.g. no shared parameters (one trunk per task): no gradient to share
        return torch.zeros(m, m, dtype=losses.dtype, device=losses.device)
    eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    reached = [g.reshape(m, -1) for g in grads if g is not None]
    if not reached:
        return torch.zeros(m, m, dtype=losses.dtype, device=losses.device)
    jac = torch.cat(reached, dim=1)
    return jac @ jac.T
