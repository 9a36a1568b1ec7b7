"""The ``meta_dataset`` task family: variable-way, variable-shot episodes over several offline image sources.

Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol & Larochelle,
"Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples", ICLR 2020 (§3.2 and appendix).

Each episode first picks its source uniformly at random (the paper's training on all sources), then, within
that source's split with ``C`` classes:

- **way** ``N ~ U{min_ways, …, min(max_ways, C)}`` (paper: 5 and 50), the ``N`` classes uniformly at random;
- **query** ``q = min(query_per_class, min_c ⌊|Im(c)| / 2⌋)`` images of every picked class (paper: 10);
- **support budget** ``|S| = min(max_support, Σ_c ⌈β · min(100, |Im(c)| − q)⌉)`` with ``β ~ U(0, 1]``
  (paper: 500);
- **shots** ``k_c = min(⌊R_c · (|S| − N) / Σ_c' R_c'⌋ + 1, |Im(c)| − q)`` with ``R_c = e^{α_c} · |Im(c)|``,
  ``α_c ~ U[log ½, log 2)``: shares follow class sizes, perturbed, every class keeps at least one shot.

Simplifications, stated: classes are picked flat (the paper walks the ImageNet hierarchy and Omniglot's
alphabets); sources are ``glyphs`` (scripts rendered from fonts; alphabet-disjoint splits) and ``fashion``
(Fashion-MNIST's 10 categories). By default ``fashion`` is a meta-test-only source (``test_sources``), as the
paper holds Traffic Signs and MSCOCO out: its 10 classes are too few for class-disjoint splits of ≥ 5 ways.
The 200 ``lfw_faces`` crops hold one face / non-face label, not identities, so faces are not a source.

Batching: an episode holds ONE task (``meta_batch`` is 1): its ways and shots are its own, so nothing is padded
or masked and every algorithm's loss sees exactly the task. For several tasks per outer update use
``training.accumulate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml._checks import check_int
from mtml.datasets._families import EpisodeSource
from mtml.datasets._fashion import load_fashion_mnist
from mtml.datasets._glyphs import load_glyphs
from mtml.errors import ConfigError
from mtml.meta import Episode
from mtml.sampling import split_classes, split_groups
from mtml.tasks import Split

__all__ = ["ClassPool", "MetaDatasetEpisodes", "meta_dataset"]

SOURCES = ("glyphs", "fashion")
MAX_SHOTS_PER_CLASS = 100  # the paper's cap on one class's share of the support budget


@dataclass(frozen=True)
class ClassPool:
    """One source's classes in one split: ``images: uint8 [n, size, size]`` and ``members[c]``, the indices of
    class ``c``'s images (classes ``0..C-1`` of this split, every one with at least 2 images)."""

    images: Tensor
    members: tuple[Tensor, ...]

    @property
    def num_classes(self) -> int:
        return len(self.members)


def _pool(images: Tensor, labels: Tensor, classes: Tensor) -> ClassPool:
    return ClassPool(images, tuple(torch.nonzero(labels == c).flatten() for c in classes.tolist()))


def check_rules(*, min_ways: int, max_ways: int, max_support: int, query_per_class: int) -> None:
    """:class:`ConfigError` naming the first bad bound of the Meta-Dataset sampler."""
    check_int("min_ways", min_ways, 2, "An N-way task needs at least 2 classes.")
    check_int("max_ways", max_ways, min_ways, "It must be >= min_ways.")
    check_int("max_support", max_support, max_ways,
              "The support set holds at least one image of each of max_ways classes.")
    check_int("query_per_class", query_per_class, 1, "Query at least one image per class.")


class MetaDatasetEpisodes:
    """The Meta-Dataset episode sampler (Triantafillou et al., ICLR 2020) over named :class:`ClassPool` s.

    :meth:`sample` gives a one-task :class:`~mtml.meta.Episode`: support ``x: [1, |S|, 1, size, size]`` floats in
    [0, 1], labels ``[1, |S|]`` ordered by label, query ``[1, N·q, ...]``, ``ways = N`` and ``classes: [1, N]``,
    the picked classes' global ids (source offset + class; :attr:`offsets`, :attr:`num_classes`). The source is
    uniform per episode; :meth:`by_source` gives the sampler of each source alone (per-source meta-test tables).
    """

    meta_batch = 1

    def __init__(self, pools: Mapping[str, ClassPool], *, min_ways: int = 5, max_ways: int = 50,
                 max_support: int = 500, query_per_class: int = 10) -> None:
        if not pools:
            raise ConfigError("meta_dataset: a split needs at least one source.")
        check_rules(min_ways=min_ways, max_ways=max_ways, max_support=max_support, query_per_class=query_per_class)
        self.min_ways, self.max_ways, self.max_support = min_ways, max_ways, max_support
        self.query_per_class = query_per_class
        self.pools = dict(pools)
        for name, pool in self.pools.items():
            small = [c for c, m in enumerate(pool.members) if len(m) < 2]
            if small:
                raise ConfigError(f"meta_dataset: source '{name}' has classes {small[:5]} with fewer than 2 images; "
                                  "each class needs one query and one support image.")
            if pool.num_classes < self.min_ways:
                raise ConfigError(f"meta_dataset: source '{name}' has {pool.num_classes} classes in this split, "
                                  f"fewer than min_ways = {min_ways}. Lower min_ways, or move it to test_sources.")
        sizes = [p.num_classes for p in self.pools.values()]
        self.offsets = dict(zip(self.pools, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
        # what mtml's memory estimate reads (meta_batch × ways × (shots + query_shots) rows at most)
        self.ways = min(self.max_ways, max(sizes))
        self.shots = math.ceil(self.max_support / self.ways)
        self.query_shots = self.query_per_class

    @property
    def num_classes(self) -> int:
        """Classes of all sources together: global ids are ``0..num_classes-1``."""
        return sum(p.num_classes for p in self.pools.values())

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.pools)

    def by_source(self) -> dict[str, MetaDatasetEpisodes]:
        """One sampler per source, with the same rules (and the same global ids through :attr:`offsets`)."""
        out = {}
        for name, pool in self.pools.items():
            one = MetaDatasetEpisodes({name: pool}, min_ways=self.min_ways, max_ways=self.max_ways,
                                      max_support=self.max_support, query_per_class=self.query_per_class)
            one.offsets = {name: self.offsets[name]}
            out[name] = one
        return out

    def draw(self, generator: torch.Generator) -> tuple[str, Tensor, Tensor, int]:
        """One task's plan: ``(source, classes [N] of that source, shots [N], query per class)``."""
        names = list(self.pools)
        name = names[int(torch.randint(len(names), (), generator=generator))]
        pool = self.pools[name]
        top = min(self.max_ways, pool.num_classes)
        ways = int(torch.randint(self.min_ways, top + 1, (), generator=generator))
        picks = torch.randperm(pool.num_classes, generator=generator)[:ways]
        sizes = torch.tensor([len(pool.members[c]) for c in picks.tolist()], dtype=torch.float64)
        query = min(self.query_per_class, int(sizes.min()) // 2)
        room = sizes - query  # ≥ 1 for every class
        beta = 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))  # U(0, 1]
        budget = min(self.max_support, int(torch.ceil(beta * room.clamp_max(MAX_SHOTS_PER_CLASS)).sum()))
        alpha = torch.rand(ways, generator=generator, dtype=torch.float64) * math.log(4.0) + math.log(0.5)
        share = alpha.exp() * sizes
        shots = torch.minimum(torch.floor(share * (budget - ways) / share.sum()) + 1, room).long()
        return name, picks, shots, query

    def sample(self, generator: torch.Generator) -> Episode:
        name, picks, shots, query = self.draw(generator)
        pool = self.pools[name]
        support: list[Tensor] = []
        held: list[Tensor] = []
        for c, k in zip(picks.tolist(), shots.tolist(), strict=True):
            members = pool.members[c]
            order = members[torch.randperm(len(members), generator=generator)]
            held.append(order[:query])
            support.append(order[query : query + k])
        ways = len(picks)
        ys = torch.repeat_interleave(torch.arange(ways), shots).unsqueeze(0)
        yq = torch.arange(ways).repeat_interleave(query).unsqueeze(0)
        classes = (picks + self.offsets[name]).unsqueeze(0)
        return Episode(Split(self._pixels(pool, support), ys), Split(self._pixels(pool, held), yq), ways=ways,
                       classes=classes)

    @staticmethod
    def _pixels(pool: ClassPool, parts: list[Tensor]) -> Tensor:
        return pool.images[torch.cat(parts)].unsqueeze(0).unsqueeze(2).float() / 255.0  # [1, n, 1, size, size]


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size:
        return images
    out = F.interpolate(images.unsqueeze(1).float(), size=(size, size), mode="bilinear", antialias=True)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def _check_sources(value: Sequence[str], key: str, empty_ok: bool) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"meta_dataset: `{key}` must be a list of source names from {list(SOURCES)}. Got {value!r}.")
    names = list(value)
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise ConfigError(f"meta_dataset: unknown source {bad[0]!r} in `{key}`; valid sources: {list(SOURCES)}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"meta_dataset: `{key}` names a source twice: {names}. List each once.")
    if not names and not empty_ok:
        raise ConfigError(f"meta_dataset: `{key}` is empty; train on at least one of {list(SOURCES)}.")
    return names


def meta_dataset(
    *, sources: Sequence[str] = ("glyphs",), test_sources: Sequence[str] = ("fashion",), min_ways: int = 5,
    max_ways: int = 50, max_support: int = 500, query_per_class: int = 10, image_size: int = 28,
    meta_batch: int = 1, seed: int = 0, fractions: Sequence[float] = (0.6, 0.1, 0.3),
    glyph_options: Mapping[str, object] | None = None, fashion_root: str | None = None,
) -> EpisodeSource:
    """Meta-Dataset episodes (Triantafillou et al., ICLR 2020) over offline 28×28 grey sources.

    Args:
        sources: sources split class-disjointly into meta-train / val / test by ``fractions`` (glyphs: whole
            alphabets, as Omniglot; fashion: whole categories).
        test_sources: sources held out for meta-test only, all their classes (default ``fashion``).
        min_ways, max_ways, max_support, query_per_class: the sampler's bounds (paper: 5, 50, 500, 10).
        image_size: the common side of every source's grey images (fashion is resized from 28).
        meta_batch: must be 1 (one variable-way task per episode; use ``training.accumulate``).
        seed: the class splits and the glyphs rendering.
        glyph_options: passed to :func:`~mtml.datasets.load_glyphs` (``alphabets``, ``max_characters``, ...).
        fashion_root: the Fashion-MNIST directory (default Debian's dataset-fashion-mnist).

    The test sampler's :meth:`~MetaDatasetEpisodes.by_source` gives per-source meta-test tables.
    """
    if meta_batch != 1:
        raise ConfigError(f"meta_dataset: `meta_batch` must be 1 (each episode is one task with its own ways and "
                          f"shots). Got {meta_batch!r}. Use training.accumulate: N for N tasks per update.")
    train_names = _check_sources(sources, "sources", empty_ok=False)
    test_only = _check_sources(test_sources, "test_sources", empty_ok=True)
    both = sorted(set(train_names) & set(test_only))
    if both:
        raise ConfigError(f"meta_dataset: {both} is in both `sources` and `test_sources`; keep it in one.")
    size = check_int("image_size", image_size, 8, "Use images of at least 8×8.")
    rules = {"min_ways": min_ways, "max_ways": max_ways, "max_support": max_support,
             "query_per_class": query_per_class}
    check_rules(**rules)  # before any data is loaded
    splits: dict[str, dict[str, ClassPool]] = {"train": {}, "val": {}, "test": {}}
    for name in train_names + test_only:
        held_out = name in test_only
        parts = (_glyph_pools if name == "glyphs" else _fashion_pools)(
            size=size, seed=seed, fractions=fractions, held_out=held_out, glyph_options=glyph_options or {},
            fashion_root=fashion_root)
        for split, pool in parts.items():
            splits[split][name] = pool
    samplers = {split: MetaDatasetEpisodes(pools, **rules) for split, pools in splits.items()}
    return EpisodeSource(samplers["train"], samplers["val"], samplers["test"], (1, size, size),
                         samplers["train"].ways, "classification")


def _glyph_pools(*, size: int, seed: int, fractions: Sequence[float], held_out: bool,
                 glyph_options: Mapping[str, object], fashion_root: str | None) -> dict[str, ClassPool]:
    options = {"progress": False, **glyph_options}
    if "image_size" in options or "seed" in options:
        raise ConfigError("meta_dataset: set image_size and seed at the top of data.options, not in glyph_options.")
    data = load_glyphs(seed=seed, image_size=size, **options)  # type: ignore[arg-type]
    if held_out:
        return {"test": _pool(data.images, data.character, torch.arange(data.num_classes))}
    groups = split_groups(data.character_alphabet, fractions=fractions, generator=torch.Generator().manual_seed(seed))
    return {split: _pool(data.images, data.character, classes) for split, classes in groups.items()}


def _fashion_pools(*, size: int, seed: int, fractions: Sequence[float], held_out: bool,
                   glyph_options: Mapping[str, object], fashion_root: str | None) -> dict[str, ClassPool]:
    data = load_fashion_mnist(fashion_root)
    if held_out:
        x, y = data["test"]
        return {"test": _pool(_resize(x, size), y, torch.arange(10))}
    x = torch.cat([data["train"][0], data["test"][0]])
    y = torch.cat([data["train"][1], data["test"][1]])
    groups = split_classes(y, fractions=fractions, generator=torch.Generator().manual_seed(seed))
    images = _resize(x, size)
    return {split: _pool(images, y, classes.sort().values) for split, classes in groups.items()}
