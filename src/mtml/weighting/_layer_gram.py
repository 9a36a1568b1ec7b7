"""Per-layer Gramian kernels for :class:`~mtml.weighting.gramian.GramianTape` (one shared ``nn.Linear`` each).

A layer with input rows ``a [N, i]`` (a column of ones appended for the bias) and output gradients ``δ`` gives task
t the weight gradient ``δ_tᵀa``; these functions form ``⟨δ_sᵀa, δ_tᵀa⟩`` without a per-task backward, and the
weighted gradient ``Σ_t w_t δ_tᵀa`` from the same ``δ`` (so the step needs no second backward through the trunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_gram", "combined_delta", "rows_gram"]

_CHUNK = 1 << 24  # elements of per-task gradients held at once


def rows_gram(a: Tensor, d: Tensor, owner: Tensor, m: int) -> Tensor:
    """Row-owned layer: ``a [N, i]``, ``δ [N, o]``, ``owner [N]`` → ``[m, m]`` Gramian of ``Σ_{rows of t} δᵀa``."""
    n, i = a.shape
    o = d.shape[1]
    if n * n * (i + o + m) < n * i * o + m * m * i * o:  # kernel identity is cheaper
        onehot = torch.zeros(n, m, dtype=a.dtype, device=a.device)
        onehot[torch.arange(n, device=a.device), owner] = 1.0
        kernel = (a @ a.T) * (d @ d.T)
        return onehot.T @ kernel @ onehot
    counts = torch.bincount(owner, minlength=m).tolist()
    order = torch.argsort(owner, stable=True)
    if not bool((order == torch.arange(n, device=order.device)).all()):
        a, d = a[order], d[order]
    gram = a.new_zeros(m, m)
    step = max(1, _CHUNK // max(1, m * i))
    for lo in range(0, o, step):
        dc = d[:, lo : lo + step]
        if len(set(counts)) == 1 and counts[0] > 0:
            k = counts[0]
            jac = torch.bmm(dc.reshape(m, k, -1).transpose(1, 2), a.reshape(m, k, i)).reshape(m, -1)
        else:
            jac = torch.stack([blk_d.T @ blk_a for blk_d, blk_a in zip(dc.split(counts), a.split(counts), strict=True)])
            jac = jac.reshape(m, -1)
        gram = gram + jac @ jac.T
    return gram


def batched_gram(a: Tensor, d: Tensor) -> Tensor:
    """Shared rows: ``a [N, i]``, per-task ``δ [m, N, o]`` → ``[m, m]`` Gramian of ``δ_tᵀa``.

    Kernel identity ``⟨δ_s, (aaᵀ)δ_t⟩`` (one batched matmul, no per-task gradient formed) or explicit per-task
    gradients ``δ_tᵀa`` in chunks of output columns, whichever costs fewer multiply-adds.
    """
    m, n, o = d.shape
    i = a.shape[1]
    if n * n * i + m * n * n * o + m * m * n * o < m * n * i * o + m * m * i * o:
        kd = torch.matmul(a @ a.T, d)  # (aaᵀ)·δ_t for every t: [m, N, o]
        return d.reshape(m, -1) @ kd.reshape(m, -1).T
    gram = a.new_zeros(m, m)
    step = max(1, _CHUNK // max(1, m * i))
    for lo in range(0, o, step):
        jac = torch.matmul(a.T, d[:, :, lo : lo + step]).reshape(m, -1)  # (δ_tᵀa)ᵀ: [m, i·o_chunk]
        gram = gram + jac @ jac.T
    return gram


def combined_delta(d: Tensor, weights: Tensor, owner: Tensor | None) -> Tensor:
    """``Σ_t w_t δ_t`` per row: from per-task ``δ [m, N, o]`` (``owner`` None), or from the row-owned ``δ [N, o]``
    of one backward of ``Σ L_t`` (row r belongs to task ``owner[r]``, so its weight is ``w[owner[r]]``)."""
    w = weights.to(d.dtype)
    if owner is None:
        return torch.tensordot(w, d, dims=1)
    return d * w[owner].reshape(-1, *([1] * (d.dim() - 1)))
