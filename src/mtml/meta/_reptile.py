"""Reptile: first-order meta-learning by moving the initialisation towards adapted parameters.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018.
"""

from __future__ import annotations

import torch
from torch import nn

from mtml.meta._base import MetaOutput
from mtml.meta._episode import Episode, episode_losses, way_logits
from mtml.meta._functional import ParameterFilter, batched_forward
from mtml.meta._maml import MAML

__all__ = ["Reptile"]


class Reptile(MAML):
    """Reptile (Nichol et al., 2018): after ``inner_steps`` plain SGD steps on each task's support set,
    move ``θ`` towards the mean adapted parameters ``φ̄``.

    :meth:`meta_objective` returns ``½‖θ − φ̄‖²`` (with ``φ̄`` held constant), whose gradient is ``θ − φ̄``; an
    outer ``torch.optim.SGD(lr=ε)`` step is then exactly Reptile's ``θ ← θ + ε(φ̄ − θ)``, and Adam gives the
    Adam variant the paper also uses. The reported loss is the query loss after adaptation.

    Args:
        model: the meta-learner.
        inner_lr, inner_steps, test_inner_lr, test_inner_steps, adapt: as for :class:`~mtml.meta.MAML`
            (Reptile needs several inner steps to differ from joint training; the default is 5).
    """

    def __init__(
        self,
        model: nn.Module,
        /,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        test_inner_lr: float | None = None,
        test_inner_steps: int | None = None,
        adapt: str | ParameterFilter = "all",
    ) -> None:
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_lr=test_inner_lr,
                         test_inner_steps=test_inner_steps, first_order=True, adapt=adapt)

    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        self.check_episode(episode)
        shared, fast, chain = self._inner(model, episode.support, self.inner_steps, True, False, episode.ways)
        with torch.no_grad():
            pred = way_logits(batched_forward(model, shared, fast, episode.query.x, chain=chain), episode.query.y,
                              episode.ways)
            losses = episode_losses(pred, episode.query.y)
        params = dict(model.named_parameters())
        objective = sum((0.5 * (params[n] - w.mean(0).detach()).square().sum() for n, w in fast.items()),
                        start=torch.zeros((), dtype=pred.dtype, device=pred.device))
        return MetaOutput(objective, losses, self._accuracy(pred, episode))
