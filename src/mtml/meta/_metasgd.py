"""Meta-SGD: MAML with a learned inner step size for every parameter element.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv:1707.09835, 2017.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtml.meta._functional import ParameterFilter
from mtml.meta._maml import MAML

__all__ = ["MetaSGD"]


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): ``φ ← φ − α ⊙ ∇L(φ)``, meta-learning ``α``, one rate per element.

    The rates are ``nn.Parameter`` s of this module (``rates.<name with . replaced by __>``), so the optimiser
    must include :meth:`parameters` of the algorithm as well as the model's, and checkpoints carry them. They
    start at ``inner_lr`` and are used at meta-test time as well (there is no separate test rate).

    Args:
        model: the meta-learner, whose adapted parameters' shapes fix the rates' shapes.
        inner_lr: initial value of every rate.
        inner_steps, test_inner_steps, first_order, adapt, checkpoint_inner, zero_head, compiled: as for
            :class:`~mtml.meta.MAML`.
    """

    def __init__(
        self,
        model: nn.Module,
        /,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        adapt: str | ParameterFilter = "all",
        checkpoint_inner: bool = False,
        zero_head: bool = False,
        compiled: bool = False,
    ) -> None:
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         first_order=first_order, adapt=adapt, checkpoint_inner=checkpoint_inner,
                         zero_head=zero_head, compiled=compiled)
        params = dict(model.named_parameters())
        self.rates = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full_like(params[n].detach(), self.inner_lr))
            for n in self.fast_names(model)
        })

    def rate(self, name: str, train: bool) -> Tensor:
        rate = self.rates[_key(name)]
        return rate if train else rate.detach()
