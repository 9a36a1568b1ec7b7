"""The ``meta_dataset`` family: the Meta-Dataset sampler's rules (Triantafillou et al., ICLR 2020), class-disjoint
splits, global class ids, variable-way episodes through the algorithms, per-source meta-test keys, bad options."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mtml.datasets import FAMILIES, MetaDatasetEpisodes, load_glyphs
from mtml.datasets._fashion import DEFAULT_ROOT, load_fashion_mnist
from mtml.datasets._meta_dataset import ClassPool
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, meta_backward

FASHION = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not FASHION, reason="needs dataset-fashion-mnist")
SMALL_GLYPHS: dict[str, Any] = {"alphabets": ["OGHAM", "RUNIC", "GOTHIC", "OLD ITALIC"], "max_characters": 12,
                                "min_characters": 10, "examples_per_class": 6}
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "meta_dataset_protonet.yaml"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_pool(sizes: list[int], first: int = 0) -> ClassPool:
    """Class ``c``'s images are filled with the value ``first + c + 1``, so a pixel tells an image's class."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    images = (labels + first + 1).to(torch.uint8).view(-1, 1, 1).expand(-1, 4, 4).contiguous()
    return ClassPool(images, tuple(torch.nonzero(labels == c).flatten() for c in range(len(sizes))))


def decode(x: torch.Tensor) -> torch.Tensor:
    """Class code of each image ``[1, n, 1, 4, 4]`` → ``[n]``."""
    return (x[0, :, 0, 0, 0] * 255).round().long() - 1


def paper_plan(sizes: torch.Tensor, g: torch.Generator, *, sources: int, min_ways: int, max_ways: int,
               max_support: int, query: int) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """The appendix's formulas written out again, drawing in the sampler's order (source, way, classes, β, α)."""
    source = int(torch.randint(sources, (), generator=g))
    ways = int(torch.randint(min_ways, min(max_ways, len(sizes)) + 1, (), generator=g))
    picks = torch.randperm(len(sizes), generator=g)[:ways]
    im = [int(sizes[c]) for c in picks]
    q = min(query, min(n // 2 for n in im))
    beta = 1.0 - float(torch.rand((), generator=g, dtype=torch.float64))
    budget = min(max_support, sum(math.ceil(beta * min(100, n - q)) for n in im))
    alpha = (torch.rand(ways, generator=g, dtype=torch.float64) * math.log(4.0) + math.log(0.5)).tolist()
    r = [math.exp(a) * n for a, n in zip(alpha, im, strict=True)]
    shots = [min(math.floor(rc * (budget - ways) / sum(r)) + 1, n - q) for rc, n in zip(r, im, strict=True)]
    return source, picks, torch.tensor(shots), q


SIZES = [3, 5, 8, 21, 21, 40, 60, 120, 250, 400, 900, 1000] * 5  # 60 classes, 3 to 1000 images


def test_sampler_follows_the_papers_rules_over_many_draws() -> None:
    sampler = MetaDatasetEpisodes({"a": coded_pool(SIZES)}, min_ways=5, max_ways=50, max_support=500,
                                  query_per_class=10)
    g, mirror = gen(3), gen(3)
    ways_seen: Counter[int] = Counter()
    for _ in range(3000):
        name, picks, shots, query = sampler.draw(g)
        _, want_picks, want_shots, want_query = paper_plan(torch.tensor(SIZES), mirror, sources=1, min_ways=5,
                                                           max_ways=50, max_support=500, query=10)
        assert name == "a" and torch.equal(picks, want_picks) and torch.equal(shots, want_shots)
        assert query == want_query
        sizes = torch.tensor(SIZES)[picks]
        ways_seen[len(picks)] += 1
        assert 5 <= len(picks) <= 50 and len(set(picks.tolist())) == len(picks)
        assert query == min(10, int(sizes.min()) // 2) >= 1
        assert (shots >= 1).all() and (shots <= sizes - query).all()
        assert len(picks) <= int(shots.sum()) <= 500
    assert set(ways_seen) == set(range(5, 51))  # every way from 5 to 50, about uniformly
    assert max(ways_seen.values()) < 1.6 * 3000 / 46 and min(ways_seen.values()) > 0.5 * 3000 / 46


def test_shots_follow_class_sizes_and_the_budget_binds() -> None:
    """Imbalance rule: shares ∝ e^α·|Im(c)| with α ~ U[log ½, log 2), so a 10× larger class gets several times
    the shots of a small one while both stay >= 1; a small ``max_support`` caps the total."""
    pool = coded_pool([30] * 5 + [300] * 5)
    big_over_small: list[float] = []
    for support in (500, 40):
        sampler = MetaDatasetEpisodes({"a": pool}, min_ways=10, max_ways=10, max_support=support)
        g = gen(1)
        for _ in range(400):
            _, picks, shots, q = sampler.draw(g)
            assert q == 10 and int(shots.sum()) <= support and (shots >= 1).all()
            big = shots[picks >= 5].double()
            small = shots[picks < 5].double()
            if support == 500:
                big_over_small.append(float(big.mean() / small.mean()))
    assert 3.0 < sum(big_over_small) / len(big_over_small) < 10.0


def test_sources_are_uniform_and_ids_are_global() -> None:
    pools = {"a": coded_pool([12] * 7), "b": coded_pool([12] * 9, first=7)}
    sampler = MetaDatasetEpisodes(pools, min_ways=5, max_ways=8)
    assert sampler.num_classes == 16 and sampler.offsets == {"a": 0, "b": 7}
    g = gen(0)
    picked: Counter[str] = Counter()
    for _ in range(600):
        episode = sampler.sample(g)
        assert episode.num_tasks == 1 and episode.classes is not None
        ids = episode.classes[0]
        picked["a" if int(ids.max()) < 7 else "b"] += 1
        for split in (episode.support, episode.query):  # each label's images are of class classes[label]
            assert torch.equal(decode(split.x), ids[split.y[0]])
            assert (split.y[0].diff() >= 0).all()  # ordered by label
    assert abs(picked["a"] - 300) < 60
    per = sampler.by_source()
    assert set(per) == {"a", "b"} and per["b"].offsets == {"b": 7}
    one = per["b"].sample(gen(1))
    assert one.classes is not None and int(one.classes.min()) >= 7


@pytest.fixture(scope="module")
def small_family(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = str(tmp_path_factory.mktemp("glyph-cache"))
    test_sources = ["fashion"] if FASHION else []
    family = FAMILIES.create("meta_dataset", test_sources=test_sources, max_ways=12,
                             glyph_options={**SMALL_GLYPHS, "cache_dir": cache})
    return family, load_glyphs(seed=0, cache_dir=cache, progress=False, **SMALL_GLYPHS)


def test_glyph_classes_and_alphabets_are_disjoint_across_splits(small_family: Any) -> None:
    family, data = small_family
    chars: dict[str, set[int]] = {}
    for split in ("train", "val", "test"):
        pool = getattr(family, split).pools["glyphs"]
        labels = [set(data.character[m].tolist()) for m in pool.members]
        assert all(len(s) == 1 for s in labels) and all(len(m) == 6 for m in pool.members)  # one character each
        chars[split] = set().union(*labels)
        assert getattr(family, split).num_classes >= len(chars[split])
    assert not (chars["train"] & chars["val"]) and not (chars["train"] & chars["test"])
    assert not (chars["val"] & chars["test"])
    alphabets = {k: set(data.character_alphabet[sorted(v)].tolist()) for k, v in chars.items()}
    assert not (alphabets["train"] & alphabets["test"]) and not (alphabets["train"] & alphabets["val"])
    assert len(chars["train"]) + len(chars["val"]) + len(chars["test"]) == data.num_classes
    episode = family.train.sample(gen())
    assert episode.support.x.shape[2:] == (1, 28, 28) and episode.support.x.dtype == torch.float32
    assert family.num_outputs == 12 and family.input_shape == (1, 28, 28)


def test_episode_classes_match_the_images_true_classes(small_family: Any) -> None:
    family, data = small_family
    sampler = family.train
    pool = sampler.pools["glyphs"]
    lookup = {bytes(pool.images[i].flatten().tolist()): int(data.character[i]) for m in pool.members for i in m}
    cls_char = [int(data.character[m[0]]) for m in pool.members]
    g = gen(5)
    for _ in range(5):
        episode = sampler.sample(g)
        for split in (episode.support, episode.query):
            pixels = (split.x[0, :, 0] * 255).round().to(torch.uint8)
            true = torch.tensor([lookup[bytes(p.flatten().tolist())] for p in pixels])
            assert torch.equal(true, torch.tensor(cls_char)[episode.classes[0, split.y[0]]])


@needs_fashion
def test_fashion_is_a_held_out_test_source(small_family: Any) -> None:
    family, _ = small_family
    assert family.test.sources == ("glyphs", "fashion") and family.train.sources == ("glyphs",)
    fashion = family.test.by_source()["fashion"]
    assert fashion.num_classes == 10 and sum(len(m) for m in fashion.pools["fashion"].members) == 10_000
    plan = [fashion.draw(gen(s)) for s in range(200)]
    assert all(5 <= len(p[1]) <= 10 and p[3] == 10 and int(p[2].sum()) <= 500 for p in plan)
    assert max(int(p[2].sum()) for p in plan) > 300  # large classes: the 500 budget is approached


def _hand_protonet_loss(model: torch.nn.Module, episode: Any) -> torch.Tensor:
    s = model.features(episode.support.x[0])
    q = model.features(episode.query.x[0])
    protos = torch.stack([s[episode.support.y[0] == k].mean(0) for k in range(episode.ways)])
    return F.cross_entropy(-torch.cdist(q, protos).square(), episode.query.y[0])


def test_variable_way_and_shot_episodes_through_the_algorithms(small_family: Any) -> None:
    """One task per episode, unequal shots per class: ProtoNet's objective equals per-class means computed by
    hand; ridge (R2D2) and MetaOptNet run on episodes of different ways back to back."""
    from mtml.nn import MultiTaskModel, build_backbone

    family, _ = small_family
    torch.manual_seed(0)
    trunk = build_backbone("conv4", (1, 28, 28), {"width": 8, "norm": "group", "groups": 4})
    model = MultiTaskModel(trunk, {"task": torch.nn.Identity()}, input_shapes={"task": (1, 28, 28)})
    g = gen(2)
    episodes = [family.train.sample(g) for _ in range(6)]
    assert len({e.ways for e in episodes}) > 1 and any(len(set(e.support.y[0].bincount().tolist())) > 1
                                                        for e in episodes)
    proto = ALGORITHMS.create("protonet", model)
    for e in episodes:
        out = proto.meta_objective(model, e)
        torch.testing.assert_close(out.objective, _hand_protonet_loss(model, e), atol=1e-5, rtol=1e-5)
    for name in ("ridge", "metaoptnet"):
        algorithm = ALGORITHMS.create(name, model)
        for e in episodes[:3]:
            out = meta_backward(algorithm, model, e)
            assert out.losses.shape == (1,) and torch.isfinite(out.objective)


@pytest.mark.parametrize(("options", "message"), [
    ({"sources": ["glyph"]}, "unknown source 'glyph'"),
    ({"sources": []}, "`sources` is empty"),
    ({"sources": "glyphs"}, "`sources` must be"),
    ({"sources": ["glyphs", "glyphs"]}, "names a source twice"),
    ({"sources": ["glyphs"], "test_sources": ["glyphs"]}, "in both `sources` and `test_sources`"),
    ({"meta_batch": 4}, "`meta_batch` must be 1"),
    ({"min_ways": 1}, "`min_ways` must be an integer >= 2"),
    ({"max_ways": 3}, "`max_ways` must be an integer >= 5"),
    ({"max_support": 10}, "`max_support` must be an integer >= 50"),
    ({"query_per_class": 0}, "`query_per_class` must be an integer >= 1"),
    ({"image_size": 4}, "`image_size` must be an integer >= 8"),
])
def test_bad_options_are_one_line_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        FAMILIES.create("meta_dataset", **options)
    assert "\n" not in str(info.value)


@needs_fashion
def test_a_source_with_too_few_classes_per_split_says_so() -> None:
    with pytest.raises(ConfigError, match="source 'fashion' has 6 classes in this split, fewer than min_ways = 7"):
        FAMILIES.create("meta_dataset", sources=["fashion"], test_sources=[], min_ways=7, max_ways=7)
    family = FAMILIES.create("meta_dataset", sources=["fashion"], test_sources=[], min_ways=2, max_ways=5,
                             fractions=(0.5, 0.2, 0.3))
    assert [getattr(family, s).num_classes for s in ("train", "val", "test")] == [5, 2, 3]
    data = load_fashion_mnist()
    labels = torch.cat([data["train"][1], data["test"][1]])  # the pools index the train + test images
    seen = []
    for split in ("train", "val", "test"):  # each class's images are all of one category, none shared by splits
        pool = getattr(family, split).pools["fashion"]
        categories = [set(labels[m].tolist()) for m in pool.members]
        assert all(len(c) == 1 for c in categories)
        seen.append(set().union(*categories))
        assert sum(len(m) for m in pool.members) == 7000 * getattr(family, split).num_classes
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_cli_train_of_the_shipped_config_reports_per_source_keys(tmp_path: Path) -> None:
    glyphs = json.dumps({**SMALL_GLYPHS, "cache_dir": str(tmp_path / "cache")}, separators=(",", ":"))
    sets = ["training.max_steps=2", "training.eval_every=1", "training.meta_val_tasks=3",
            "training.meta_test_tasks=4", "model.backbone_options.width=8", "data.options.max_ways=10",
            f"data.options.glyph_options={glyphs}"]
    if not FASHION:
        sets.append("data.options.test_sources=[]")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtml", "train", str(CONFIG), "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert done.returncode == 0, done.stderr
    scores = json.loads((out / "summary.json").read_text())["test"]["meta_dataset"]
    sources = ["glyphs", "fashion"] if FASHION else ["glyphs"]
    assert scores["num_tasks"] == 4 and "accuracy@0" in scores and "accuracy@0_ci95" in scores
    for source in sources:
        assert scores[f"{source}/num_tasks"] == 4
        assert 0.0 <= scores[f"{source}/accuracy@0"] <= 1.0 and f"{source}/accuracy@0_ci95" in scores
    assert "glyphs/accuracy" in done.stdout  # the printed meta-test table has a column per source
