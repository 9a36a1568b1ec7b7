"""R2D2: a closed-form ridge-regression head on meta-learned features.

Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers", ICLR 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml._checks import check_positive
from mtml.errors import ConfigError
from mtml.meta._base import MetaAlgorithm
from mtml.meta._functional import embed
from mtml.tasks import Split

__all__ = ["R2D2", "RidgeHead", "ridge_solve"]


@dataclass(frozen=True)
class RidgeHead:
    """Per-task ridge weights ``[tasks, dim + 1, outputs]`` (last row: bias); are the outputs logits?"""

    weights: Tensor
    classification: bool


def _with_bias(features: Tensor) -> Tensor:
    return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)


def ridge_solve(x: Tensor, y: Tensor, l2: Tensor) -> Tensor:
    """Per-task ridge regression ``argmin_W ‖xW − y‖² + l2‖W‖²``.

    ``x: [tasks, n, d]``, ``y: [tasks, n, o]``, ``l2`` a scalar tensor → ``W: [tasks, d, o]``.
    Solves the ``n × n`` system ``W = xᵀ(xxᵀ + l2·I)⁻¹y`` (Woodbury) when there are fewer examples than
    features, the ``d × d`` system ``(xᵀx + l2·I)⁻¹xᵀy`` otherwise; both are differentiable.
    """
    n, d = x.shape[1], x.shape[2]
    xt = x.transpose(1, 2)
    if n <= d:
        gram = x @ xt + l2 * torch.eye(n, dtype=x.dtype, device=x.device)
        return xt @ torch.linalg.solve(gram, y)
    gram = xt @ x + l2 * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, xt @ y)


class R2D2(MetaAlgorithm):
    """Ridge Regression Differentiable Discriminator (Bertinetto et al., ICLR 2019).

    Each task's head is the exact ridge-regression solution on the support embeddings (with a bias column):
    targets are the regression values, or one-hot labels for classification, whose logits are then
    ``scale · xW + offset``. The embedding is ``model.features(x)`` for a :class:`~mtml.nn.MultiTaskModel` and
    ``model(x)`` otherwise. The regulariser, scale and offset are parameters of this module (meta-learned
    unless ``learn_l2`` / ``learn_scale`` is false), so the optimiser must include :meth:`parameters`.

    Args:
        model: the feature extractor (its first parameter fixes dtype and device of this module's parameters).
        l2: initial ridge regulariser λ > 0 (learned as log λ).
        learn_l2: meta-learn λ.
        scale: initial logit scale for classification.
        learn_scale: meta-learn the logit scale and offset.
    """

    def __init__(self, model: nn.Module, /, *, l2: float = 1.0, learn_l2: bool = True, scale: float = 1.0,
                 learn_scale: bool = True) -> None:
        super().__init__()
        check_positive("l2", l2, "The ridge regulariser must be positive; try 1.0.")
        check_positive("scale", scale, "The logit scale must be positive; try 1.0.")
        like = next(iter(model.parameters()), None)
        dtype = like.dtype if like is not None else None
        device = like.device if like is not None else None

        def scalar(value: float, learn: bool) -> nn.Parameter:
            return nn.Parameter(torch.tensor(value, dtype=dtype, device=device), requires_grad=bool(learn))

        self.log_l2 = scalar(math.log(l2), learn_l2)
        self.scale = scalar(float(scale), learn_scale)
        self.offset = scalar(0.0, learn_scale)

    def adapt(self, model: nn.Module, support: Split, *, ways: int = 0, train: bool = True) -> RidgeHead:
        features = _with_bias(embed(model, support.x))
        classification = not support.y.is_floating_point()
        if classification and ways <= 0:
            raise ConfigError(f"R2D2 classification needs the number of ways (> 0). Got ways={ways}.")
        targets = F.one_hot(support.y, ways).to(features.dtype) if classification else support.y
        return RidgeHead(ridge_solve(features, targets, self.log_l2.exp()), classification)

    def predict(self, model: nn.Module, adapted: RidgeHead, x: Tensor) -> Tensor:
        out = _with_bias(embed(model, x)) @ adapted.weights
        return self.scale * out + self.offset if adapted.classification else out
