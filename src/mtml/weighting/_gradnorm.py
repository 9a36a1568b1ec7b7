"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._adam import BufferAdam
from mtml.weighting._base import GramianWeighting


class GradNorm(GramianWeighting):
    """Weights ``w = m·softmax(s)`` pulled so that each weighted gradient norm ``wᵢ‖gᵢ‖`` tracks
    ``mean_j(wⱼ‖gⱼ‖)·rᵢ^α``, with ``rᵢ`` task i's loss ratio ``Lᵢ/Lᵢ(0)`` relative to the mean ratio.

    The norms are ``√Gᵢᵢ`` (the paper uses the last shared layer; ``gramian: representation`` is the cheap
    analogue). Design within the weighting interface: in training mode :meth:`weights` returns the current
    weights and then takes one step of its own Adam (buffers) on ``s`` with the gradient of the GradNorm loss
    ``Σᵢ |wᵢ‖gᵢ‖ − target_i|`` (targets held constant, as in the paper). Weights are detached.

    Args:
        alpha: asymmetry α (paper: 0.12 – 3; LibMTL default 1.5).
        lr: learning rate of the internal Adam on the logits s.
        gramian: Gramian backend.
    """

    logits: Tensor
    initial: Tensor

    def __init__(self, task_names: Sequence[str], /, *, alpha: float = 1.5, lr: float = 0.025,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < float("inf")):
            raise ConfigError(f"`alpha` must be a finite number >= 0. Got {alpha!r}.")
        if not (isinstance(lr, (int, float)) and 0.0 < lr < float("inf")):
            raise ConfigError(f"`lr` must be > 0. Got {lr!r}.")
        self.alpha = float(alpha)
        m = self.num_tasks
        self.register_buffer("logits", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(m, dtype=torch.float64))  # 0: no step yet; not NaN, which a
        # checkpoint refuses as diverged
        self.adam = BufferAdam(m, lr=float(lr))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        m = self.num_tasks
        w = m * torch.softmax(self.logits, 0)
        if self.training:
            self._update(w, losses.detach().to(w), gramian.detach().to(w))
        return w.to(losses)

    def _update(self, w: Tensor, losses: Tensor, gramian: Tensor) -> None:
        if not bool(self.initial.all()):
            self.initial.copy_(losses)
        ratio = losses / self.initial.clamp_min(1e-12)
        rel = ratio / ratio.mean().clamp_min(1e-12)
        norms = gramian.diagonal().clamp_min(0.0).sqrt()
        weighted = w * norms
        target = weighted.mean() * rel.pow(self.alpha)
        sign = torch.sign(weighted - target) * norms  # d loss / d w
        grad = w * (sign - (sign * w).sum() / self.num_tasks)  # chain rule through w = m·softmax(s)
        self.adam.step(self.logits, grad)
