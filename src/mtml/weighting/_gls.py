"""GLS: the geometric loss strategy.

Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
Strategy for Multi-Task Learning", CVPR Workshops 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.weighting._base import Weighting
from mtml.weighting._si import check_log_options, shifted_losses


class GLS(Weighting):
    """Minimises the geometric mean of the task losses, ``(Πᵢ Dᵢ)^(1/m)`` with ``Dᵢ = Lᵢ − min_loss + ε``.

    As weights on ``Σ wᵢLᵢ``, its gradient: ``wᵢ = (Πⱼ Dⱼ)^(1/m) / (m·Dᵢ)`` (detached), computed in log space
    (``exp(mean log D − log Dᵢ)/m``) so that many small or large losses neither underflow nor overflow. The update
    therefore equals, at this step, that of the geometric mean itself — what LibMTL's ``GLS`` backpropagates —
    and the weights are the actual multipliers of the losses (LibMTL 1.1.5 *reports* ``Lᵢ/(m·ΠL)`` instead).
    ``ε`` keeps a zero loss finite; a loss below ``min_loss`` raises :class:`~mtml.errors.ConfigError`.

    Args:
        min_loss: lower bound of the losses (0 for non-negative losses).
        eps: ε > 0 added to every loss.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, min_loss: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(task_names)
        self.min_loss, self.eps = check_log_options(min_loss, eps)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        log_d = shifted_losses("gls", self.task_names, losses, self.min_loss, self.eps).log()
        return (torch.exp(log_d.mean() - log_d) / self.num_tasks).to(losses)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, min_loss={self.min_loss:g}, eps={self.eps:g}"
