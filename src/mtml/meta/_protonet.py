"""Prototypical Networks: classify queries by their distance to class means of support embeddings.

Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.meta._base import MetaAlgorithm
from mtml.meta._episode import Episode
from mtml.meta._functional import embed
from mtml.tasks import Split

__all__ = ["ProtoNet", "class_means"]


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-task class means ``[tasks, ways, dim]`` of ``features: [tasks, shots, dim]``.

    ``labels: [tasks, shots]`` lie in ``[0, ways)``; a class without support examples gets a zero mean.
    """
    onehot = F.one_hot(labels, ways).to(features.dtype)  # [tasks, shots, ways]
    sums = onehot.transpose(1, 2) @ features
    return sums / onehot.sum(1).clamp_min(1.0).unsqueeze(-1)


class ProtoNet(MetaAlgorithm):
    """Prototypical Networks (Snell et al., NeurIPS 2017).

    Each class's prototype is the mean embedding of its support examples; a query's logits are its negative
    squared Euclidean distances to the prototypes. The embedding is ``model.features(x)`` for a
    :class:`~mtml.nn.MultiTaskModel` and ``model(x)`` otherwise; there is no inner loop, so every parameter is
    meta-learned through the query cross-entropy. Classification episodes only.
    """

    def __init__(self, model: nn.Module, /) -> None:
        super().__init__()

    def check_episode(self, episode: Episode) -> None:
        if not episode.is_classification:
            raise ConfigError("ProtoNet classifies by distance to class prototypes, so it needs a "
                              "classification episode (integer labels); for regression use 'ridge' or MAML.")

    def adapt(self, model: nn.Module, support: Split, *, ways: int = 0, train: bool = True) -> Tensor:
        """Prototypes ``[tasks, ways, dim]``."""
        return class_means(embed(model, support.x), support.y, ways)

    def predict(self, model: nn.Module, adapted: Tensor, x: Tensor) -> Tensor:
        """Logits ``[tasks, n, ways]``: ``−‖f(x) − cₖ‖²``."""
        q = embed(model, x)
        cross = q @ adapted.transpose(1, 2)
        return 2 * cross - q.square().sum(-1, keepdim=True) - adapted.square().sum(-1).unsqueeze(1)
