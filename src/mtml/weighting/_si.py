"""SI: the scale-invariant baseline, minimising the sum of log-losses.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a Bargaining Game",
ICML 2022 — the "SI" baseline of its experiments (code name ``scaleinvls`` in the authors' repository).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import Weighting

__all__ = ["SI", "check_log_options", "shifted_losses"]


def check_log_options(min_loss: float, eps: float) -> tuple[float, float]:
    """Validate the ``min_loss`` and ``eps`` options shared by the log-loss weightings (SI, GLS, STCH)."""
    if isinstance(min_loss, bool) or not isinstance(min_loss, (int, float)) or not math.isfinite(min_loss):
        raise ConfigError(f"`min_loss` must be a finite number (a lower bound of the losses). Got {min_loss!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
        raise ConfigError(f"`eps` must be a finite number > 0. Got {eps!r}.")
    return float(min_loss), float(eps)


def shifted_losses(owner: str, task_names: Sequence[str], losses: Tensor, min_loss: float, eps: float) -> Tensor:
    """``Dᵢ = Lᵢ − min_loss + ε`` in float64, detached: the argument of every logarithm of the log-loss methods.

    A loss below ``min_loss`` (``Dᵢ ≤ 0``, where the logarithm is undefined) is a :class:`ConfigError` naming the
    task; NaN passes through (the training loop reports a diverged run). Costs one device synchronisation.
    """
    d = losses.detach().to(torch.float64) - min_loss + eps
    bad = d <= 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(f"{owner}: the loss of task {task_names[i]!r} is {float(losses[i]):.6g}, below "
                          f"`min_loss` = {min_loss:g}, so its logarithm is undefined; set `min_loss` to a lower "
                          "bound of the losses (e.g. a negative log-likelihood's minimum).")
    return d


class SI(Weighting):
    """``wᵢ = 1/(Lᵢ − min_loss + ε)``: the gradient of ``Σᵢ log(Lᵢ − min_loss + ε)`` with respect to the losses.

    Minimising the sum of log-losses is invariant to rescaling any task's loss by a constant (``log cL = log c +
    log L``), hence the name; the authors' code minimises ``Σ log Lᵢ`` with neither shift nor ε. Here ``ε`` keeps
    a zero loss finite (weight ``1/ε``) and ``min_loss`` admits losses that may be negative (a Gaussian negative
    log-likelihood): a loss below ``min_loss`` raises :class:`~mtml.errors.ConfigError`. Weights are detached.

    Args:
        min_loss: lower bound of the losses (0 for non-negative losses).
        eps: ε > 0 added inside the logarithm.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, min_loss: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(task_names)
        self.min_loss, self.eps = check_log_options(min_loss, eps)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        d = shifted_losses("si", self.task_names, losses, self.min_loss, self.eps)
        return (1.0 / d).to(losses)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, min_loss={self.min_loss:g}, eps={self.eps:g}"
