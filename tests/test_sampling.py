"""Episode samplers: the sinusoid family of Finn et al. and N-way K-shot classification."""

from __future__ import annotations

import math

import pytest
import torch

from mtml.errors import ConfigError, DataError
from mtml.sampling import FewShotClassification, SinusoidTasks, few_shot_splits, split_classes


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sinusoid_shapes_and_ranges() -> None:
    episode = SinusoidTasks(shots=5, query_shots=7, meta_batch=300).sample(gen())
    assert episode.support.x.shape == (300, 5, 1) and episode.query.y.shape == (300, 7, 1)
    xs = torch.cat([episode.support.x, episode.query.x], 1)
    ys = torch.cat([episode.support.y, episode.query.y], 1)
    assert xs.min() >= -5 and xs.max() <= 5
    assert ys.abs().max() <= 5
    assert ys.abs().max() > 4  # amplitudes reach towards 5
    assert not episode.is_classification


def test_sinusoid_follows_amplitude_and_phase() -> None:
    fixed = SinusoidTasks(shots=10, meta_batch=3, amplitude=(2.0, 2.0), phase=(0.5, 0.5))
    episode = fixed.sample(gen())
    torch.testing.assert_close(episode.support.y, 2.0 * torch.sin(episode.support.x - 0.5))


def test_sinusoid_recovers_uniform_parameters() -> None:
    """With x fixed at two points the amplitude and phase of each task can be read back."""
    episode = SinusoidTasks(shots=2, meta_batch=2000, x_range=(0.0, 0.0)).sample(gen(1))
    y0 = episode.support.y[:, 0, 0]  # A·sin(−φ) = −A·sin φ
    assert (y0 <= 0).all()  # φ ∈ [0, π]
    assert y0.min() > -5.0
    assert SinusoidTasks().phase == (0.0, math.pi)


def test_sinusoid_is_reproducible_from_the_generator() -> None:
    sampler = SinusoidTasks()
    a, b, c = sampler.sample(gen(3)), sampler.sample(gen(3)), sampler.sample(gen(4))
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.y, b.query.y)
    assert not torch.equal(a.support.x, c.support.x)


@pytest.mark.parametrize(("option", "value"), [("shots", 0), ("query_shots", 0), ("meta_batch", 0)])
def test_sinusoid_rejects_bad_settings(option: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"`{option}`"):
        SinusoidTasks(**{option: value})


def labelled(classes: int = 12, per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.stack([y.float(), torch.arange(len(y)).float()], 1)  # column 0: class, column 1: example id
    return x, y


def test_few_shot_episode_layout() -> None:
    x, y = labelled()
    sampler = FewShotClassification(x, y, ways=4, shots=2, query_shots=3, meta_batch=6)
    episode = sampler.sample(gen())
    assert episode.ways == 4 and episode.is_classification
    assert episode.support.x.shape == (6, 8, 2) and episode.query.x.shape == (6, 12, 2)
    for t in range(6):
        for split, n in ((episode.support, 2), (episode.query, 3)):
            assert torch.equal(torch.bincount(split.y[t], minlength=4), torch.full((4,), n))
        sx, sy, qx, qy = episode.support.x[t], episode.support.y[t], episode.query.x[t], episode.query.y[t]
        original = {}
        for xs, ys in ((sx, sy), (qx, qy)):
            for row, label in zip(xs, ys, strict=True):
                original.setdefault(int(label), set()).add(int(row[0]))
        assert all(len(c) == 1 for c in original.values())  # one source class per label
        assert len({next(iter(c)) for c in original.values()}) == 4  # four distinct classes
        ids = torch.cat([sx[:, 1], qx[:, 1]])
        assert len(ids.unique()) == len(ids)  # no example twice


def test_few_shot_labels_are_remapped_per_episode() -> None:
    x, y = labelled()
    sampler = FewShotClassification(x, y, ways=3, shots=1, query_shots=1, meta_batch=50)
    episode = sampler.sample(gen())
    label0_class = episode.support.x[:, 0, 0]  # source class behind label 0, per task
    assert len(label0_class.unique()) > 3


def test_few_shot_is_reproducible() -> None:
    x, y = labelled()
    sampler = FewShotClassification(x, y, ways=3, shots=2, query_shots=2, meta_batch=4)
    assert torch.equal(sampler.sample(gen(9)).support.x, sampler.sample(gen(9)).support.x)
    assert not torch.equal(sampler.sample(gen(9)).support.x, sampler.sample(gen(10)).support.x)


def test_class_disjoint_splits() -> None:
    x, y = labelled(classes=25)
    groups = split_classes(y, generator=gen())
    sets = [set(groups[k].tolist()) for k in ("train", "val", "test")]
    assert [len(s) for s in sets] == [16, 4, 5]
    assert set.union(*sets) == set(range(25)) and sum(len(s) for s in sets) == 25
    splits = few_shot_splits(x, y, ways=3, shots=1, query_shots=2, meta_batch=5, seed=0)
    for name, sampler in splits.items():
        seen = sampler.sample(gen()).support.x[..., 0].unique()
        assert set(seen.long().tolist()) <= set(groups[name].tolist())


def test_classes_with_too_few_examples_are_skipped() -> None:
    x, y = labelled(classes=6, per_class=4)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[-2:] = False  # class 5 keeps 2 examples, fewer than shots + query_shots = 4
    sampler = FewShotClassification(x[keep], y[keep], ways=3, shots=2, query_shots=2)
    assert sampler.classes.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ways": 13}, "`ways` must be <="),
        ({"ways": 1}, "`ways`"),
        ({"shots": 0}, "`shots`"),
        ({"query_shots": 0}, "`query_shots`"),
        ({"meta_batch": 0}, "`meta_batch`"),
        ({"shots": 6, "query_shots": 5}, "`ways` must be <="),
    ],
)
def test_few_shot_rejects_bad_settings(options: dict[str, int], match: str) -> None:
    x, y = labelled()
    with pytest.raises(ConfigError, match=match):
        FewShotClassification(x, y, **options)


def test_few_shot_rejects_float_labels() -> None:
    x, y = labelled()
    with pytest.raises(DataError, match="integer labels"):
        FewShotClassification(x, y.float())


def test_split_fractions_are_validated() -> None:
    with pytest.raises(ConfigError, match="`fractions`"):
        split_classes(torch.arange(10), fractions=(0.5, 0.5, 0.5), generator=gen())


def test_episode_classes_are_the_picked_global_classes() -> None:
    """``classes[t, k]`` indexes ``sampler.classes`` and names the dataset label of task t's label-k images."""
    y = torch.arange(30).repeat_interleave(4) * 3 + 7  # labels 7, 10, ..., sparse on purpose
    x = y.float().view(-1, 1).expand(-1, 2).clone()  # every row carries its own label
    sampler = FewShotClassification(x, y, ways=5, shots=2, query_shots=2, meta_batch=6, classes=y.unique()[:20])
    assert sampler.num_classes == 20
    episode = sampler.sample(gen(4))
    assert episode.classes is not None and episode.classes.shape == (6, 5)
    assert int(episode.classes.max()) < 20 and all(len(set(row.tolist())) == 5 for row in episode.classes)
    for split in (episode.support, episode.query):
        truth = split.x[..., 0].long()  # [tasks, shots]
        assert torch.equal(truth, sampler.classes[episode.classes.gather(1, split.y)])
    part = episode.tasks(2, 5)
    assert part.classes is not None and torch.equal(part.classes, episode.classes[2:5])
    moved = episode.to("cpu")
    assert moved.classes is not None and torch.equal(moved.classes, episode.classes)


def test_episode_classes_shape_is_checked_and_optional() -> None:
    from mtml.errors import ShapeError
    from mtml.meta import Episode
    from mtml.tasks import Split

    s = Split(torch.zeros(2, 3, 1), torch.zeros(2, 3, dtype=torch.long))
    assert Episode(s, s, ways=3).classes is None and Episode(s, s, ways=3).task(1).classes is None
    with pytest.raises(ShapeError, match=r"`classes` must be an integer tensor \[tasks, ways\] = \[2, 3\]"):
        Episode(s, s, ways=3, classes=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="`classes` must be an integer tensor"):
        Episode(s, s, ways=3, classes=torch.zeros(2, 3))


def test_shard_episode_keeps_the_classes() -> None:
    from mtml.engine._dist_steps import shard_episode

    y = torch.arange(10).repeat_interleave(4)
    episode = FewShotClassification(torch.randn(40, 3), y, ways=3, shots=1, query_shots=1,
                                    meta_batch=4).sample(gen())
    local = shard_episode(episode)  # outside a process group: the whole episode
    assert local.classes is not None and torch.equal(local.classes, episode.classes)
