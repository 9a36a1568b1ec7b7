"""Per-layer Gramian kernels for :class:`~mtml.weighting._gramian.GramianTape` (one shared ``nn.Linear`` each).

A layer with input rows ``a [N, i]`` (a column of ones appended for the bias) and output gradients ``δ`` gives task
t the weight gradient ``δ_tᵀa``; these functions form ``⟨δ_sᵀa, δ_tᵀa⟩`` without a per-task backward, and the
weighted gradient ``Σ_t w_t δ_tᵀa`` from the same ``δ`` (so the step needs no second backward through the trunk).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batched_gram", "combined_delta", "rows_gram", "task_chunks"]

_CHUNK = 1 << 22  # elements of per-task gradients held in one tensor (16 MB in float32)


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


def batched_gram(a: Tensor, chunks: Sequence[Tensor]) -> Tensor:
    """Shared rows: ``a [N, i]`` and the per-task ``δ`` in consecutive task chunks ``[m_c, N, o]`` → the ``[m, m]``
    Gramian of ``δ_tᵀa``.

    Kernel identity ``⟨δ_s, (aaᵀ)δ_t⟩`` (batched matmuls, no per-task gradient formed) or explicit per-task
    gradients ``δ_tᵀa`` in chunks of output columns, whichever costs fewer multiply-adds. Chunks keep every
    temporary small (large CPU allocations are fresh pages each time, which costs more than the arithmetic).
    """
    m = sum(c.shape[0] for c in chunks)
    n, o = chunks[0].shape[1], chunks[0].shape[2]
    i = a.shape[1]
    if n * n * i + m * n * n * o + m * m * n * o < m * n * i * o + m * m * i * o:
        kernel = a @ a.T
        flat = [c.reshape(c.shape[0], -1) for c in chunks]
        kd = [torch.matmul(kernel, c).reshape(c.shape[0], -1) for c in chunks]  # (aaᵀ)·δ_t
        return _blocks(flat, kd)
    gram = a.new_zeros(m, m)
    step = max(1, _CHUNK // max(1, m * i))
    for lo in range(0, o, step):
        jac = [torch.matmul(a.T, c[:, :, lo : lo + step]).reshape(c.shape[0], -1) for c in chunks]  # (δ_tᵀa)ᵀ
        gram = gram + _blocks(jac, jac)
    return gram


def _blocks(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """``[Σ rows, Σ rows]`` matrix of inner products ``left[c] @ right[c']ᵀ``, block by block."""
    if len(left) == 1:
        return left[0] @ right[0].T
    return torch.cat([torch.cat([p @ q.T for q in right], 1) for p in left], 0)


def task_chunks(m: int, per_task: int) -> list[slice]:
    """Consecutive ranges of the m tasks whose per-task tensors of ``per_task`` elements fit one chunk."""
    size = max(1, _CHUNK // max(1, per_task))
    return [slice(lo, min(m, lo + size)) for lo in range(0, m, size)]


def combined_delta(d: Tensor | Sequence[Tensor], weights: Tensor, owner: Tensor | None) -> Tensor:
    """``Σ_t w_t δ_t`` per row: from per-task ``δ`` chunks ``[m_c, N, o]`` (``owner`` None), or from the
    row-owned ``δ [N, o]`` of one backward of ``Σ L_t`` (row r belongs to task ``owner[r]``: weight
    ``w[owner[r]]``)."""
    if owner is None:
        assert not isinstance(d, Tensor)
        out, lo = None, 0
        for c in d:
            part = torch.tensordot(weights[lo : lo + c.shape[0]].to(c.dtype), c, dims=1)
            out, lo = (part if out is None else out + part), lo + c.shape[0]
        assert out is not None
        return out
    assert isinstance(d, Tensor)
    return d * weights.to(d.dtype)[owner].reshape(-1, *([1] * (d.dim() - 1)))
