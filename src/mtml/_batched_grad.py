"""``autograd.grad`` with a batch of cotangents, falling back to one backward per cotangent where ``vmap``
cannot batch the graph's backward.

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under ``vmap``. Some backward kernels
have no batching rule for some inputs: mtml's Conv-4 / ResNet-12 keep channels-last activations on the CPU, and
``vmap`` refuses group norm's backward on those ("querying is_contiguous inside of vmap for memory_format other
than torch.contiguous_format"). The per-task gradients of the Gramian weightings, affinities and task Jacobians
then come from one backward per row instead: the same numbers, without the batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batched_grad"]

_UNBATCHABLE = ("inside of vmap", "Batching rule not implemented", "vmap: ")


def _unbatchable(exc: RuntimeError) -> bool:
    return any(s in str(exc) for s in _UNBATCHABLE)


def batched_grad(outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Tensor | Sequence[Tensor],
                 *, allow_unused: bool = False) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, retain_graph=True)``: each
    gradient ``[k, *input.shape]`` for the ``k`` cotangents stacked in ``grad_outputs``; ``None`` for an input
    the outputs do not reach (with ``allow_unused``; typed as torch types ``autograd.grad``). The graph is
    kept."""
    inputs = list(inputs)
    try:
        return tuple(torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                         retain_graph=True, allow_unused=allow_unused))
    except RuntimeError as exc:
        if not _unbatchable(exc):
            raise
    single = isinstance(grad_outputs, Tensor)
    k = grad_outputs.shape[0] if isinstance(grad_outputs, Tensor) else grad_outputs[0].shape[0]
    rows = [torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs[i] if single else
                                [g[i] for g in grad_outputs], retain_graph=True, allow_unused=allow_unused)
            for i in range(k)]
    stacked: list[Tensor | None] = [None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                                    for j in range(len(inputs))]
    return tuple(stacked)  # type: ignore[arg-type]
