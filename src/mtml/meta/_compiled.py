"""The compiled speed path: MAML's whole meta-gradient on an MLP chain as one ``torch.compile``d function.

On a small MLP the eager meta-step spends its time in per-operation overhead, not arithmetic (the sinusoid MLP
runs at the speed of a hand-batched ``bmm`` reference, about 1 ms per meta-iteration of 25 tasks; see
docs/meta-learning.md). Here the inner loop (hand-derived gradients, :mod:`mtml.meta._mlp`), the query loss and
its gradient with respect to every meta-parameter are written as one pure function,
``torch.func.grad_and_value`` of the query loss, which ``torch.compile`` traces into a single graph — forward,
second-order terms and outer backward together — and compiles into fused kernels. The outer loop then sees an
ordinary objective: :class:`_GivenGradients` hands the compiled meta-gradient to ``backward()`` (scaled by the
incoming gradient, so chunk weights and loss scalers apply), and the optimiser, DDP hooks and gradient
clipping work as before.

Opt-in (``MAML(..., compiled=True)``, ``compiled: true`` in a config's algorithm options): compiling takes
seconds (10–18 s for the sinusoid MLP on this project's CPU) and needs a C++ compiler; each new episode shape
compiles again. If compiling fails the algorithm says so once and runs eagerly; the result is the same either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mtml.meta._episode import mean_task_loss, way_logits
from mtml.meta._mlp import Layer, chain_forward, chain_gradients

__all__ = ["CompiledMetaGradient"]


class _GivenGradients(torch.autograd.Function):
    """``value`` as a differentiable function of ``params`` whose gradient is the precomputed ``grads``."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, count: int, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors[:count])
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.saved_tensors
        return (None, None, *(None for _ in grads), *(g * grad_out for g in grads))


class CompiledMetaGradient:
    """MAML's meta-objective on an MLP chain with its meta-gradient computed by one compiled function.

    Args:
        chain: the model's MLP chain (:func:`~mtml.meta._mlp.linear_chain`); every activation has a hand backward.
        adapted: the parameters the inner loop adapts.
        zeroed: adapted parameters that start every inner loop at zero (``zero_head``).
        steps, lr, first_order: the training inner loop (``lr`` enters the compiled graph as an input, so trials of
            a sweep that differ only in it share one compiled function, and the on-disk compile cache).
        ways: the episode's ways (classification with a head of more outputs), else 0.
    """

    def __init__(self, chain: list[Layer], adapted: list[str], zeroed: frozenset[str], *, steps: int,
                 lr: float, first_order: bool, ways: int) -> None:
        self.chain, self.adapted, self.zeroed = chain, list(adapted), zeroed
        self.steps, self.lr, self.first_order, self.ways = steps, float(lr), first_order, ways
        self.failed: str | None = None
        self.calls = 0  # compiled meta-gradients computed (tests check the path ran)
        gradient = torch.func.grad_and_value(self._objective, has_aux=True)
        self._fn: Callable[..., Any] = torch.compile(gradient, fullgraph=True)

    def _objective(self, meta: dict[str, Tensor], frozen: dict[str, Tensor], lr: Tensor, xs: Tensor, ys: Tensor,
                   xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        params = {**frozen, **meta}
        shared = {n: p for n, p in params.items() if n not in self.adapted}
        fast = {n: torch.zeros_like(params[n]) if n in self.zeroed else params[n] for n in self.adapted}
        for _ in range(self.steps):
            grads = chain_gradients(self.chain, {**shared, **fast}, self.adapted, xs, ys, ways=self.ways)
            if self.first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = {n: w - lr * grads[n] for n, w in fast.items()}
        pred = way_logits(chain_forward(self.chain, {**shared, **fast}, xq), yq, self.ways)
        return mean_task_loss(pred, yq), pred.detach()

    def __call__(self, params: Mapping[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor,
                 yq: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(objective, query predictions)``, the objective differentiable to the trainable ``params`` with the
        compiled meta-gradient; ``None`` once compiling has failed (the caller runs the eager path)."""
        if self.failed is not None:
            return None
        # a zeroed head never reaches the objective: like the eager path, it gets no gradient (not a zero one)
        meta = {n: p.detach() for n, p in params.items() if p.requires_grad and n not in self.zeroed}
        frozen = {n: p.detach() for n, p in params.items() if n not in meta}
        try:
            lr = torch.tensor(self.lr, dtype=xs.dtype, device=xs.device)
            grads, (value, pred) = self._fn(meta, frozen, lr, xs, ys, xq, yq)
        except Exception as error:  # no C++ compiler, an unsupported op or device: the eager path gives the same
            self.failed = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            warnings.warn(f"mtml: `compiled: true` could not compile the meta-gradient ({self.failed[:300]}); "
                          "running the eager path, which computes the same result more slowly.",
                          RuntimeWarning, stacklevel=3)
            return None
        self.calls += 1
        names = list(meta)
        live = [params[n] for n in names]
        return _GivenGradients.apply(value, len(names), *(grads[n] for n in names), *live), pred
