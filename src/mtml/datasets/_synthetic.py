"""Synthetic linear-regression tasks sharing a low-dimensional representation (the seed architecture's data)."""

from __future__ import annotations

import torch

from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["shared_projection", "synthetic_linear"]


def _projection(gen: torch.Generator, latent_dim: int, in_dim: int) -> torch.Tensor:
    return torch.randn(latent_dim, in_dim, generator=gen) / in_dim**0.5


def shared_projection(*, in_dim: int = 100, latent_dim: int = 10, seed: int = 0) -> torch.Tensor:
    """The true shared map ``A: [latent_dim, in_dim]`` behind :func:`synthetic_linear` with the same arguments."""
    return _projection(torch.Generator().manual_seed(seed), latent_dim, in_dim)


def synthetic_linear(
    *, num_tasks: int = 8, in_dim: int = 100, latent_dim: int = 10, n_train: int = 40, n_val: int = 100,
    n_test: int = 500, noise: float = 0.1, seed: int = 0,
) -> list[Task]:
    """Tasks ``task_i``: ``y = wᵢ·(A x) + ε`` with ``A: [latent_dim, in_dim]`` shared by every task and a
    per-task ``wᵢ: [latent_dim]``; ``x ~ N(0, I)``, ``ε ~ N(0, noise²)``.

    With few training examples per task (``n_train < in_dim``) single-task models cannot identify the
    100-dimensional weights, while a shared ``in_dim → latent_dim`` layer learned from all tasks can.
    """
    for name, v in (("num_tasks", num_tasks), ("in_dim", in_dim), ("latent_dim", latent_dim),
                    ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 1:
            raise ConfigError(f"`{name}` must be >= 1. Got {v}.")
    if not noise >= 0:
        raise ConfigError(f"`noise` must be >= 0. Got {noise}.")
    gen = torch.Generator().manual_seed(seed)
    shared = _projection(gen, latent_dim, in_dim)
    tasks = []
    for i in range(num_tasks):
        w = torch.randn(latent_dim, generator=gen)

        def draw(n: int, w: torch.Tensor = w) -> Split:
            x = torch.randn(n, in_dim, generator=gen)
            y = (x @ shared.T) @ w + noise * torch.randn(n, generator=gen)
            return Split(x, y)

        tasks.append(Task(f"task_{i}", TaskKind.REGRESSION, draw(n_train), draw(n_val), draw(n_test)))
    return tasks
