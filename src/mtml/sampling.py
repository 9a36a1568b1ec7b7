"""Task distributions that draw :class:`~mtml.meta.Episode` s from an explicit ``torch.Generator``.

- :class:`SinusoidTasks` — sinusoid regression exactly as Finn et al. (ICML 2017): amplitude ~ U[0.1, 5],
  phase ~ U[0, π], inputs ~ U[−5, 5], ``y = A·sin(x − φ)``.
- :class:`FewShotClassification` — N-way K-shot episodes from any labelled dataset, with labels remapped per
  episode to ``0..ways-1`` in a random order; :func:`few_shot_splits` builds class-disjoint meta-train,
  meta-validation and meta-test distributions from one dataset.

The same generator state always gives the same episode; nothing here touches global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtml._checks import check_int
from mtml.errors import ConfigError, DataError
from mtml.meta import Episode
from mtml.tasks import Split

__all__ = ["FewShotClassification", "SinusoidTasks", "few_shot_splits", "split_classes", "split_groups"]


def _check_range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(b) for b in bounds)
    if not lo <= hi:
        raise ConfigError(f"`{name}` must be a (low, high) pair with low <= high. Got {tuple(bounds)}.")
    return lo, hi


class SinusoidTasks:
    """Sinusoid regression tasks (Finn et al., ICML 2017, section 5.1).

    Each task is ``y = A·sin(x − φ)`` with ``A ~ U[amplitude]``, ``φ ~ U[phase]`` and inputs
    ``x ~ U[x_range]``. :meth:`sample` draws ``meta_batch`` tasks with ``shots`` support and ``query_shots``
    query points each: ``x, y: [meta_batch, shots, 1]`` and ``[meta_batch, query_shots, 1]``.
    """

    def __init__(
        self,
        *,
        shots: int = 10,
        query_shots: int | None = None,
        meta_batch: int = 25,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.shots = check_int("shots", shots, 1, "Give each task at least one support point.")
        self.query_shots = self.shots if query_shots is None else check_int(
            "query_shots", query_shots, 1, "Give each task at least one query point.")
        self.meta_batch = check_int("meta_batch", meta_batch, 1, "Draw at least one task per episode.")
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.dtype = dtype
        self.device = device

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator) -> Tensor:
        u = torch.rand(shape, generator=g, dtype=self.dtype, device=g.device)
        return u * (bounds[1] - bounds[0]) + bounds[0]

    def sample(self, generator: torch.Generator) -> Episode:
        tasks, n = self.meta_batch, self.shots + self.query_shots
        amplitude = self._uniform((tasks, 1, 1), self.amplitude, generator)
        phase = self._uniform((tasks, 1, 1), self.phase, generator)
        x = self._uniform((tasks, n, 1), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        k = self.shots
        return Episode(Split(x[:, :k], y[:, :k]), Split(x[:, k:], y[:, k:]))


class FewShotClassification:
    """N-way K-shot episodes drawn from a labelled dataset ``x: [n, *input]``, ``y: [n]``.

    Each task picks ``ways`` distinct classes (among ``classes``, default all) and, for each, ``shots``
    support and ``query_shots`` query examples, all distinct. Labels are remapped per task: the ``k``-th
    picked class becomes label ``k``, so the mapping is random from episode to episode. Examples are ordered
    by label within each split. Only classes with at least ``shots + query_shots`` examples are eligible; they
    are :attr:`classes` (sorted dataset labels), and an episode's ``classes[t, k] = i`` says that task ``t``'s
    label ``k`` is the dataset label ``self.classes[i]`` (a global id in ``0..num_classes-1``).
    ``transform`` (optional) maps the drawn inputs ``[tasks, shots, *input]`` to what the model takes, per
    episode: image readers keep ``x`` as compact uint8 pixels and turn them into floats here.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        meta_batch: int = 4,
        classes: Sequence[int] | Tensor | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if x.ndim < 2 or y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise DataError(f"few-shot data must be x [n, *input] with integer labels y [n]; got x "
                            f"{tuple(x.shape)} and y {tuple(y.shape)} ({y.dtype}).")
        self.ways = check_int("ways", ways, 2, "An N-way task needs at least 2 classes.")
        self.shots = check_int("shots", shots, 1, "Give each class at least one support example.")
        self.query_shots = check_int("query_shots", query_shots, 1, "Give each class at least one query "
                                     "example.")
        self.meta_batch = check_int("meta_batch", meta_batch, 1, "Draw at least one task per episode.")
        self.x, self.y, self.transform = x, y, transform
        wanted = torch.unique(y.cpu()) if classes is None else torch.as_tensor(classes).cpu().unique()
        labels = y.cpu()
        per_class = [torch.nonzero(labels == c).flatten() for c in wanted.tolist()]
        need = self.shots + self.query_shots
        eligible = [(c, idx) for c, idx in zip(wanted.tolist(), per_class, strict=True) if len(idx) >= need]
        if len(eligible) < self.ways:
            raise ConfigError(
                f"`ways` must be <= the number of classes with at least shots + query_shots = {need} "
                f"examples ({len(eligible)} of {len(wanted)} classes). Got {ways}. Lower ways, shots or "
                "query_shots, or give more classes."
            )
        self.classes = torch.tensor([c for c, _ in eligible])
        self._counts = torch.tensor([len(idx) for _, idx in eligible])
        table = torch.zeros(len(eligible), int(self._counts.max()), dtype=torch.long)
        for row, (_, idx) in enumerate(eligible):
            table[row, : len(idx)] = idx
        self._table = table

    def sample(self, generator: torch.Generator) -> Episode:
        tasks, ways, need = self.meta_batch, self.ways, self.shots + self.query_shots
        picks = torch.rand(tasks, len(self.classes), generator=generator).argsort(1)[:, :ways]  # [T, ways]
        keys = torch.rand(tasks, ways, self._table.shape[1], generator=generator)
        keys[torch.arange(self._table.shape[1]) >= self._counts[picks].unsqueeze(-1)] = 2.0  # padding last
        order = keys.argsort(-1)[..., :need]  # [tasks, ways, need] positions within each class
        index = self._table[picks.unsqueeze(-1), order]
        labels = torch.arange(ways).view(1, ways, 1).expand(tasks, ways, need)
        return Episode(self._split(index[..., : self.shots], labels[..., : self.shots]),
                       self._split(index[..., self.shots :], labels[..., self.shots :]), ways=ways,
                       classes=picks.to(self.x.device))

    @property
    def num_classes(self) -> int:
        """Eligible classes: an episode's ``classes[t, k]`` indexes :attr:`classes` (the dataset's labels)."""
        return len(self.classes)

    def _split(self, index: Tensor, labels: Tensor) -> Split:
        tasks = index.shape[0]
        flat = index.reshape(tasks, -1).to(self.x.device)
        x = self.x[flat]
        return Split(x if self.transform is None else self.transform(x),
                     labels.reshape(tasks, -1).to(self.x.device))


def split_classes(labels: Tensor, *, fractions: Sequence[float] = (0.64, 0.16, 0.20),
                  generator: torch.Generator) -> dict[str, Tensor]:
    """Class ids of ``labels`` shuffled into disjoint ``train``/``val``/``test`` groups by ``fractions``.

    Group sizes are the fractions of the number of classes, rounded, with at least one class each; the test
    group takes the remainder.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"`fractions` must be three positive numbers (train, val, test) summing to 1. "
                          f"Got {tuple(fractions)}.")
    classes = torch.unique(labels.cpu())
    if len(classes) < 3:
        raise ConfigError(f"class-disjoint splits need at least 3 classes; the labels hold {len(classes)}.")
    shuffled = classes[torch.randperm(len(classes), generator=generator)]
    n_train = max(1, round(fractions[0] * len(classes)))
    n_val = max(1, min(round(fractions[1] * len(classes)), len(classes) - n_train - 1))
    n_train = min(n_train, len(classes) - n_val - 1)
    return {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val],
            "test": shuffled[n_train + n_val :]}


def split_groups(class_group: Tensor, *, fractions: Sequence[float] = (0.6, 0.1, 0.3),
                 generator: torch.Generator) -> dict[str, Tensor]:
    """Class ids ``0..C-1`` split into ``train``/``val``/``test`` so that no group (e.g. an alphabet) straddles
    two splits, like Omniglot's background and evaluation alphabets; ``class_group: [C]`` is each class's group.

    Groups are shuffled and taken whole, in that order, until each split holds about its fraction of the
    classes (every split gets at least one group; the test split takes the rest).
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"`fractions` must be three positive numbers (train, val, test) summing to 1. "
                          f"Got {tuple(fractions)}.")
    groups = torch.unique(class_group.cpu())
    if len(groups) < 3:
        raise ConfigError(f"group-disjoint splits need at least 3 groups; the classes belong to {len(groups)}. "
                          "Use more groups (e.g. more alphabets).")
    shuffled = groups[torch.randperm(len(groups), generator=generator)]
    share = torch.stack([(class_group == g).sum() for g in shuffled]).cumsum(0).double() / len(class_group)
    n_train = min(max(1, int((share < fractions[0]).sum()) + 1), len(groups) - 2)
    n_both = int((share < fractions[0] + fractions[1]).sum()) + 1
    n_val = min(max(1, n_both - n_train), len(groups) - n_train - 1)
    parts = {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val],
             "test": shuffled[n_train + n_val :]}
    return {name: torch.nonzero(torch.isin(class_group.cpu(), part)).flatten() for name, part in parts.items()}


def few_shot_splits(
    x: Tensor,
    y: Tensor,
    *,
    ways: int = 5,
    shots: int = 1,
    query_shots: int = 15,
    meta_batch: int = 4,
    fractions: Sequence[float] = (0.64, 0.16, 0.20),
    seed: int = 0,
) -> dict[str, FewShotClassification]:
    """Meta-train, meta-validation and meta-test task distributions over disjoint classes of one dataset."""
    groups = split_classes(y, fractions=fractions, generator=torch.Generator().manual_seed(seed))
    return {name: FewShotClassification(x, y, ways=ways, shots=shots, query_shots=query_shots,
                                        meta_batch=meta_batch, classes=classes)
            for name, classes in groups.items()}
