"""Built-in datasets: valid tasks, standardised features, seeded determinism, option errors."""

from __future__ import annotations

import pytest
import torch

from mtml.datasets import DATASETS
from mtml.errors import ConfigError
from mtml.tasks import SPLITS, Task, TaskKind

# Small options so every dataset builds quickly; datasets registered later are tested with their defaults.
SMALL: dict[str, dict] = {
    "schools": {"max_schools": 12},
    "movies": {"n": 600},
    "images": {"alphabets": ["GREEK", "LATIN"], "characters_per_alphabet": 4, "examples_per_character": 10,
               "fashion_train": 64, "fashion_val": 32, "fashion_test": 32, "flatten": True},
    "tables": {"movies_n": 600},
    "texts": {"per_topic": 10, "reviews": 30, "tweets": 30, "progress": False},  # ~140 texts to encode (cached)
    "synthetic": {"num_tasks": 4, "n_train": 30, "n_val": 20, "n_test": 20},
    "table": {"targets": {"price": {"column": "price", "kind": "regression"}, "colour": "colour"}},
    "text_table": {"text": "note", "targets": {"price": {"column": "price", "kind": "regression"},
                                              "colour": "colour"}, "progress": False},  # 60 short texts (cached)
}
NAMES = DATASETS.names()


@pytest.fixture(scope="module", autouse=True)
def csv_table(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A small CSV for the ``table`` dataset: numeric and text features, a float and a text target."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("table") / "shop.csv"
    rows = ["size,weight,shape,price,colour"]
    for i in range(60):
        size, weight = torch.randn(2, generator=g).tolist()
        rows.append(f"{size:.4f},{10 + 3 * weight:.4f},{['round', 'square'][i % 2]},{size + weight:.4f},"
                    f"{['red', 'green', 'blue'][i % 3]}")
    path.write_text("\n".join(rows) + "\n")
    SMALL["table"]["path"] = str(path)
    notes = path.with_name("notes.csv")  # the same rows with a text column, for ``text_table``
    lines = path.read_text().splitlines()
    notes.write_text("\n".join([lines[0] + ",note"] + [
        f"{row},a {row.split(',')[4]} {row.split(',')[2]} thing of size {float(row.split(',')[0]):.1f}"
        for row in lines[1:]]) + "\n")
    SMALL["text_table"]["path"] = str(notes)


def build(name: str, **options: object) -> list[Task]:
    return DATASETS.create(name, **{**SMALL.get(name, {}), **options})


def _fingerprint(tasks: list[Task]) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    return [(t.name, s, getattr(t, s).x, getattr(t, s).y) for t in tasks for s in SPLITS if getattr(t, s) is not None]


@pytest.mark.parametrize("name", NAMES)
def test_builds_valid_tasks(name: str) -> None:
    tasks = build(name)
    assert tasks and all(isinstance(t, Task) for t in tasks)
    assert len({t.name for t in tasks}) == len(tasks)
    for t in tasks:
        assert isinstance(t.kind, TaskKind)
        assert len(t.train) > 0 and t.val is not None and len(t.val) > 0 and t.test is not None and len(t.test) > 0
        assert len(t.input_shape) == 1  # flat features: the MLP models take them
        for s in SPLITS:
            split = getattr(t, s)
            assert torch.isfinite(split.x).all()
            assert split.x.dtype == torch.float32
            if split.y.is_floating_point():
                assert torch.isfinite(split.y).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed_and_different_across_seeds(name: str) -> None:
    a, b, c = build(name, seed=0), build(name, seed=0), build(name, seed=1)
    for (na, sa, xa, ya), (nb, sb, xb, yb) in zip(_fingerprint(a), _fingerprint(b), strict=True):
        assert (na, sa) == (nb, sb) and torch.equal(xa, xb) and torch.equal(ya, yb)
    fa, fc = _fingerprint(a), _fingerprint(c)
    assert [f[:2] for f in fa] == [f[:2] for f in fc]  # the same tasks and splits...
    assert any(not torch.equal(x[2], y[2]) for x, y in zip(fa, fc, strict=True))  # ...with other examples


def _assert_standardised(x: torch.Tensor) -> None:
    varying = x.std(0) > 0
    assert varying.any()
    torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["penguins", "movies", "schools", "table"])
def test_features_standardised_with_train_statistics(name: str) -> None:
    tasks = build(name)
    pooled = name == "schools"  # one scaling for all schools, from every school's training pupils
    _assert_standardised(torch.cat([t.train.x for t in tasks]) if pooled else tasks[0].train.x)
    held_out = torch.cat([t.test.x for t in tasks])
    assert held_out.abs().mean() < 3  # same scale, but not re-standardised on its own statistics
    regression = [t for t in tasks if t.kind is TaskKind.REGRESSION]
    for t in regression:
        _assert_standardised(torch.cat([u.train.y for u in regression]) if pooled else t.train.y)


def test_synthetic_features_are_standard_normal_and_sizes_follow_options() -> None:
    tasks = build("synthetic", num_tasks=3, in_dim=7, latent_dim=2, n_train=500, n_val=4, n_test=9)
    assert [t.name for t in tasks] == ["task_0", "task_1", "task_2"]
    for t in tasks:
        assert t.kind is TaskKind.REGRESSION and t.input_shape == (7,) and t.num_outputs == 1
        assert (len(t.train), len(t.val), len(t.test)) == (500, 4, 9)
        assert t.train.x.mean().abs() < 0.1 and (t.train.x.std() - 1).abs() < 0.1
    noiseless = build("synthetic", num_tasks=2, in_dim=5, latent_dim=5, n_train=20, noise=0.0)
    x, y = noiseless[0].train.x, noiseless[0].train.y
    coef = torch.linalg.lstsq(x.double(), y.double()).solution  # exactly linear without noise
    torch.testing.assert_close(x.double() @ coef, y.double(), atol=1e-5, rtol=0)


def test_penguins_tasks_share_rows() -> None:
    species, mass = build("penguins")
    assert species.kind is TaskKind.MULTICLASS and species.num_outputs == 3
    assert mass.kind is TaskKind.REGRESSION
    assert len(species.train) + len(species.val) + len(species.test) == 333
    for s in SPLITS:
        assert torch.equal(getattr(species, s).x, getattr(mass, s).x)
    assert set(species.train.y.tolist()) == {0, 1, 2}


def test_movies_binary_and_multilabel() -> None:
    binary = build("movies")
    assert binary[0].name == "rating" and binary[0].kind is TaskKind.REGRESSION
    assert [t.kind for t in binary[1:]] == [TaskKind.BINARY] * 7
    assert all(t.name.startswith("genre_") for t in binary[1:])
    multi = build("movies", genres_as="multilabel")
    assert [t.name for t in multi] == ["rating", "genres"]
    genres = multi[1]
    assert genres.kind is TaskKind.MULTILABEL and genres.num_outputs == 7
    stacked = torch.stack([t.train.y for t in binary[1:]], 1)
    assert torch.equal(stacked, genres.train.y)
    assert sum(len(getattr(binary[0], s)) for s in SPLITS) == 600


def test_schools_one_task_per_school() -> None:
    tasks = build("schools", max_schools=5)
    assert len(tasks) == 5 and all(t.name.startswith("school_") for t in tasks)
    assert all(t.kind is TaskKind.REGRESSION and t.input_shape == (4,) for t in tasks)
    assert len(build("schools", max_schools=None)) == 160


@pytest.mark.parametrize(("name", "options", "match"), [
    ("schools", {"max_schools": 0}, "max_schools"),
    ("schools", {"val_fraction": 0.6, "test_fraction": 0.6}, "split fractions"),
    ("movies", {"genres_as": "x"}, "genres_as"),
    ("movies", {"n": 5}, "`n` must be >= 10"),
    ("penguins", {"val_fraction": -0.1}, "split fractions"),
    ("synthetic", {"num_tasks": 0}, "num_tasks"),
    ("synthetic", {"n_train": 0}, "n_train"),
    ("synthetic", {"noise": -1.0}, "noise"),
    ("synthetic", {"noise": float("nan")}, "noise"),
])
def test_option_errors(name: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(name, **options)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'max_school'.*max_schools"):
        DATASETS.create("schools", where="data.options", max_school=3)


def test_missing_required_options_are_named() -> None:
    with pytest.raises(ConfigError, match=r"^data\.options: missing required options 'path', 'targets'"):
        DATASETS.create("table", where="data.options")


def test_table_tasks() -> None:
    price, colour = build("table")
    assert price.kind is TaskKind.REGRESSION and colour.kind is TaskKind.MULTICLASS and colour.num_outputs == 3
    assert price.input_shape == (4,)  # size, weight and the one-hot shape column
    assert sum(len(getattr(price, s)) for s in SPLITS) == 60
