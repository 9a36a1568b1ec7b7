"""The synthetic regression tasks of GradNorm: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, §4 (toy example).

Task ``i`` maps ``x ∈ R^in_dim`` to ``yᵢ = σᵢ·tanh((B + εᵢ) x) ∈ R^out_dim``: ``B`` (shared by every task) and
``εᵢ`` (task-specific) are constant matrices with i.i.d. Gaussian entries (the paper: inputs of dimension 250,
outputs of dimension 100, ``B ~ N(0, 10)``, ``εᵢ ~ N(0, 3.5)``, read here as standard deviations 10 and 3.5, as
the public re-implementations do). The scales σᵢ make the tasks' squared losses differ by orders of magnitude, the
imbalance GradNorm is built to correct. The paper's ten-task run spans σᵢ over 1..100; its exact values are not
given in the text, so the default here is ``num_tasks`` values log-spaced from 1 to 100 (``scales`` sets them).
The input distribution is not stated in the paper either; here ``x ~ U(−1, 1)^in_dim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["gradnorm_scales", "gradnorm_synthetic"]


def gradnorm_scales(num_tasks: int, low: float = 1.0, high: float = 100.0) -> list[float]:
    """``num_tasks`` scales log-spaced from ``low`` to ``high`` (just ``[low]`` for one task)."""
    if num_tasks == 1:
        return [low]
    step = (math.log(high) - math.log(low)) / (num_tasks - 1)
    return [math.exp(math.log(low) + i * step) for i in range(num_tasks)]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be an integer >= 1. Got {value!r}.")
    return value


def gradnorm_synthetic(
    *, num_tasks: int | None = None, scales: Sequence[float] | None = None, in_dim: int = 250, out_dim: int = 100,
    shared_std: float = 10.0, task_std: float = 3.5, n_train: int = 2_000, n_val: int = 500, n_test: int = 1_000,
    seed: int = 0,
) -> list[Task]:
    """Regression tasks ``task_0`` … on the same inputs (task group ``gradnorm``), ``y: [n, out_dim]``.

    ``scales`` (one σᵢ > 0 per task; default :func:`gradnorm_scales`) — when given, its length sets the number of
    tasks and ``num_tasks``, if also given, must agree; without either there are 10 tasks. ``seed`` draws ``B``,
    every ``εᵢ`` and then the train, val and test inputs, in that order.
    """
    if num_tasks is not None:
        _positive_int("num_tasks", num_tasks)
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("n_train", n_train), ("n_val", n_val),
                    ("n_test", n_test)):
        _positive_int(name, v)
    if scales is None:
        sigma = gradnorm_scales(10 if num_tasks is None else num_tasks)
    else:
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
            raise ConfigError(f"`scales` must be a non-empty list of positive numbers (one σᵢ per task). Got "
                              f"{scales!r}.")
        if num_tasks is not None and len(scales) != num_tasks:
            raise ConfigError(f"`scales` holds {len(scales)} values but `num_tasks` is {num_tasks}; give one scale "
                              "(> 0) per task, or leave `num_tasks` out.")
        sigma = [float(s) for s in scales]
    for name, std in (("shared_std", shared_std), ("task_std", task_std)):
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ConfigError(f"`{name}` must be a number >= 0. Got {std!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"`seed` must be an integer >= 0. Got {seed!r}.")
    gen = torch.Generator().manual_seed(seed)
    shared = shared_std * torch.randn(out_dim, in_dim, generator=gen)
    own = task_std * torch.randn(len(sigma), out_dim, in_dim, generator=gen)
    xs = {s: 2 * torch.rand(n, in_dim, generator=gen) - 1 for s, n in (("train", n_train), ("val", n_val),
                                                                          ("test", n_test))}
    tasks = []
    for i, s in enumerate(sigma):
        train, val, test = (Split(x, s * torch.tanh(x @ (shared + own[i]).T)) for x in xs.values())
        tasks.append(Task(f"task_{i}", TaskKind.REGRESSION, train, val, test, group="gradnorm"))
    return tasks
