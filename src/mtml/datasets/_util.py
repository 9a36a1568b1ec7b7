"""Shared helpers for dataset builders: seeded splits, standardisation, optional imports."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from mtml._optional import require as _require
from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["make_task", "require_for", "split_indices", "standardize"]


def require_for(module: str, dataset: str) -> ModuleType:
    """Import an optional dependency or raise a :class:`ConfigError` saying how to install it."""
    return _require(module, f"dataset '{dataset}'")


def split_indices(n: int, fractions: tuple[float, float, float], generator: torch.Generator) -> list[Tensor]:
    """A seeded random partition of ``range(n)`` into train/val/test with the given fractions.

    Val and test get at least one example each when ``n >= 3``.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be >= 0 and sum to 1. Got {fractions}.")
    perm = torch.randperm(n, generator=generator)
    n_val = max(1, round(n * fractions[1])) if n >= 3 and fractions[1] > 0 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 and fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    return [perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]]


def standardize(train: Tensor, *others: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
    """Scale columns to zero mean and unit variance using statistics of ``train`` only.

    With ``mask`` (bool ``[len(train)]``, True = labelled) the statistics come from the marked train rows only;
    the other rows (NaN allowed) are scaled alike and stay unused.
    """
    ref = train if mask is None else train[mask]
    mean = ref.mean(0, keepdim=True)
    std = ref.std(0, keepdim=True).nan_to_num(1.0).clamp_min(1e-8) if ref.shape[0] > 1 else torch.ones_like(mean)
    return tuple((t - mean) / std for t in (train, *others))


def make_task(name: str, kind: str, xs: Sequence[Tensor], ys: Sequence[Tensor], *, group: str | None = None,
              masks: Sequence[Tensor | None] | None = None, **options: Any) -> Task:
    """A task from train/val/test inputs ``xs``, targets ``ys`` and optionally label ``masks`` (three of each;
    see :class:`~mtml.tasks.Split`). Tasks on the same rows pass the same ``xs`` tensors and one ``group``."""
    masks = [None] * len(xs) if masks is None else masks
    train, val, test = (Split(x, y, m) for x, y, m in zip(xs, ys, masks, strict=True))
    return Task(name, TaskKind(kind), train, val, test, group=group, **options)
