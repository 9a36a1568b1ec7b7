"""Task families for meta-learning: each gives meta-train / meta-val / meta-test episode samplers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtml.errors import ConfigError
from mtml.meta import EpisodeSampler
from mtml.sampling import SinusoidTasks, few_shot_splits

__all__ = ["EpisodeSource", "gaussian_classes", "sinusoid"]


@dataclass(frozen=True)
class EpisodeSource:
    """Samplers of the three meta-splits plus what a model for them needs to know."""

    train: EpisodeSampler
    val: EpisodeSampler
    test: EpisodeSampler
    input_shape: tuple[int, ...]
    num_outputs: int
    kind: str  # "regression" or "classification"


def sinusoid(*, shots: int = 5, query_shots: int = 10, meta_batch: int = 25, seed: int = 0) -> EpisodeSource:
    """Sinusoid regression (Finn et al. 2017): ``y = A·sin(x − φ)``, A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5].

    Every split draws from the same distribution (fresh tasks each time); ``seed`` is unused but accepted so
    every family follows the run's seed.
    """
    def make() -> SinusoidTasks:
        return SinusoidTasks(shots=shots, query_shots=query_shots, meta_batch=meta_batch)

    return EpisodeSource(make(), make(), make(), (1,), 1, "regression")


def gaussian_classes(
    *, classes: int = 200, dim: int = 32, examples: int = 40, spread: float = 1.0, ways: int = 5, shots: int = 1,
    query_shots: int = 15, meta_batch: int = 8, seed: int = 0,
) -> EpisodeSource:
    """N-way K-shot classification over synthetic classes: each class is an isotropic Gaussian around a random
    centre in ``dim`` dimensions; classes are split 64/16/20 % into disjoint meta-train/val/test sets."""
    if classes < 3 * ways:
        raise ConfigError(f"`classes` must be >= 3 * ways = {3 * ways} for class-disjoint splits. Got {classes}.")
    if not spread > 0:
        raise ConfigError(f"`spread` must be > 0. Got {spread}.")
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 2.0
    x = centres.repeat_interleave(examples, 0) + spread * torch.randn(classes * examples, dim, generator=gen)
    y = torch.arange(classes).repeat_interleave(examples)
    s = few_shot_splits(x, y, ways=ways, shots=shots, query_shots=query_shots, meta_batch=meta_batch, seed=seed)
    return EpisodeSource(s["train"], s["val"], s["test"], (dim,), ways, "classification")
