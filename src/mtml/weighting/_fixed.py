"""Fixed, user-chosen task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import Weighting


class Fixed(Weighting):
    """Constant weights given per task name (or as a list in task order).

    Args:
        weights: ``{task: weight}`` (tasks not named get ``default``) or one weight per task. Weights must be
            finite and ≥ 0.
        default: weight of tasks missing from a mapping.
    """

    fixed: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        /,
        *,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        default: float = 1.0,
    ) -> None:
        super().__init__(task_names)
        if weights is None:
            values = [default] * self.num_tasks
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.task_names))
            if unknown:
                raise ConfigError(f"fixed weighting: weights given for unknown tasks {unknown}; "
                                  f"tasks are {', '.join(self.task_names)}.")
            values = [float(weights.get(t, default)) for t in self.task_names]
        else:
            values = [float(w) for w in weights]
            if len(values) != self.num_tasks:
                raise ConfigError(f"fixed weighting: got {len(values)} weights for {self.num_tasks} tasks; give "
                                  "one per task or a mapping from task name to weight.")
        bad = [v for v in values if not (v >= 0 and v < float("inf"))]
        if bad:
            raise ConfigError(f"fixed weighting: weights must be finite and >= 0. Got {bad[0]}.")
        self.register_buffer("fixed", torch.tensor(values))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        return self.fixed.to(losses)
