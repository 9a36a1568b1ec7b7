"""The ``glyphs`` few-shot task family and its raw-pixel nearest-neighbour baseline.

Meta-train, meta-val and meta-test draw N-way K-shot tasks from disjoint *alphabets* (as Omniglot's background
and evaluation sets), so a test character is never from a script seen in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml._checks import check_int
from mtml.datasets._families import EpisodeSource
from mtml.datasets._glyphs import GlyphSet, load_glyphs
from mtml.errors import ConfigError
from mtml.meta import EpisodeSampler
from mtml.sampling import FewShotClassification, split_groups

__all__ = ["glyph_splits", "glyphs", "pixel_nn_accuracy"]


def _to_float(x: Tensor) -> Tensor:
    """``uint8 [tasks, n, size, size]`` → float ``[tasks, n, 1, size, size]`` in [0, 1]."""
    return x.unsqueeze(2).float() / 255.0


def glyph_splits(data: GlyphSet, *, fractions: Sequence[float] = (0.6, 0.1, 0.3), ways: int = 5,
                 shots: int = 1, query_shots: int = 15, meta_batch: int = 4, seed: int = 0,
                 train_ways: int | None = None, train_query_shots: int | None = None,
                 ) -> dict[str, FewShotClassification]:
    """Alphabet-disjoint ``train``/``val``/``test`` N-way K-shot samplers over ``data``; episodes hold float
    images ``x: [meta_batch, ways * shots, 1, size, size]``.

    ``train_ways`` / ``train_query_shots`` (default: ``ways`` / ``query_shots``) set the meta-train episodes
    only, e.g. 60-way training for 20-way testing (Snell et al. 2017); meta-val and meta-test keep ``ways``.
    """
    t_ways = ways if train_ways is None else check_int("train_ways", train_ways, 2,
                                                       "An N-way task needs at least 2 classes.")
    t_query = query_shots if train_query_shots is None else check_int(
        "train_query_shots", train_query_shots, 1, "Training episodes need at least one query example per class.")
    per_class = len(data.character) // max(1, data.num_classes)
    for key, need in (("query_shots", shots + query_shots), ("train_query_shots", shots + t_query)):
        if need > per_class:
            raise ConfigError(f"glyphs: shots + {key} = {need} exceeds examples_per_class = {per_class}. "
                              f"Lower shots/{key} or raise examples_per_class.")
    groups = split_groups(data.character_alphabet, fractions=fractions,
                          generator=torch.Generator().manual_seed(seed))
    for name, classes in groups.items():
        key, n = ("train_ways", t_ways) if name == "train" and train_ways is not None else ("ways", ways)
        if len(classes) < n:
            scripts = sorted({data.alphabets[a] for a in data.character_alphabet[classes].tolist()})
            raise ConfigError(f"glyphs: `{key}` = {n} exceeds the {len(classes)} characters of the {name} split "
                              f"(alphabets {', '.join(scripts)}). Lower {key}, or use more alphabets or a larger "
                              "max_characters.")
    return {name: FewShotClassification(data.images, data.character, ways=t_ways if name == "train" else ways,
                                        shots=shots, query_shots=t_query if name == "train" else query_shots,
                                        meta_batch=meta_batch, classes=classes, transform=_to_float)
            for name, classes in groups.items()}


def glyphs(
    *, ways: int = 5, shots: int = 1, query_shots: int = 15, meta_batch: int = 4, seed: int = 0,
    examples_per_class: int = 20, image_size: int = 28, fractions: Sequence[float] = (0.6, 0.1, 0.3),
    max_characters: int = 40, min_characters: int = 14, alphabets: Sequence[str] | None = None,
    font_dir: str | None = None, cache_dir: str | None = None, train_ways: int | None = None,
    train_query_shots: int | None = None,
) -> EpisodeSource:
    """N-way K-shot character classification over the ``glyphs`` dataset (an offline Omniglot stand-in).

    ``seed`` fixes the rendered set (characters, fonts, distortions) and the alphabet split; ``fractions`` are
    the shares of characters in meta-train / val / test (whole alphabets each). Inputs are ``[1, size, size]``
    floats in [0, 1]. See :func:`mtml.datasets._glyphs.load_glyphs` for the rendering options.
    ``train_ways`` / ``train_query_shots`` change the meta-train episodes only (e.g. train 60-way, test 20-way);
    the model's head has ``ways`` outputs, so they suit head-free methods (protonet, ridge, metaoptnet, ...).
    """
    data = load_glyphs(seed=seed, examples_per_class=examples_per_class, image_size=image_size,
                       max_characters=max_characters, min_characters=min_characters, alphabets=alphabets,
                       font_dir=font_dir, cache_dir=cache_dir)
    s = glyph_splits(data, fractions=fractions, ways=ways, shots=shots, query_shots=query_shots,
                     meta_batch=meta_batch, seed=seed, train_ways=train_ways, train_query_shots=train_query_shots)
    return EpisodeSource(s["train"], s["val"], s["test"], (1, image_size, image_size), ways, "classification")


def pixel_nn_accuracy(sampler: EpisodeSampler, *, tasks: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Accuracy (%) of 1-nearest-neighbour on raw pixels with cosine similarity (Vinyals et al. 2016's
    "pixels cosine" baseline) over ``tasks`` tasks of ``sampler``: the mean and its 95% confidence half-width.

    Each query image takes the label of the most cosine-similar support image.
    """
    tasks = check_int("tasks", tasks, 2, "Average over at least two tasks to get a confidence interval.")
    gen = torch.Generator().manual_seed(seed)
    scores: list[Tensor] = []
    done = 0
    while done < tasks:
        episode = sampler.sample(gen)
        if not episode.is_classification:
            raise ConfigError("pixel_nn_accuracy needs a classification sampler (integer labels).")
        support = F.normalize(episode.support.x.flatten(2).float(), dim=-1)  # [T, S, D]
        query = F.normalize(episode.query.x.flatten(2).float(), dim=-1)  # [T, Q, D]
        nearest = (query @ support.transpose(1, 2)).argmax(-1)  # [T, Q]
        predicted = episode.support.y.gather(1, nearest)
        scores.append((predicted == episode.query.y).float().mean(1) * 100)
        done += episode.num_tasks
    acc = torch.cat(scores)[:tasks]
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(tasks))
