"""The `table` dataset (user CSV files) and the meta-learning task families."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mtml.datasets import FAMILIES, gaussian_classes, sinusoid, table
from mtml.errors import ConfigError, DataError
from mtml.tasks import TaskKind


def _write(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("\n".join(["size,colour,price,kind,flag", *rows]) + "\n")
    return path


def _rows(n: int = 60) -> list[str]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        size = float(torch.rand((), generator=g)) * 10
        colour = ["red", "green", "blue"][i % 3]
        out.append(f"{size:.3f},{colour},{2 * size + 1:.3f},{['a', 'b', 'c'][i % 3]},{'yes' if size > 5 else 'no'}")
    return out


def test_table_builds_one_task_per_target(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows())
    tasks = table(path=str(path), targets={"price": {"column": "price", "kind": "regression"}, "kind": "kind",
                                           "flag": {"column": "flag", "kind": "binary"}})
    by = {t.name: t for t in tasks}
    assert by["price"].kind is TaskKind.REGRESSION and by["kind"].kind is TaskKind.MULTICLASS
    assert by["kind"].num_outputs == 3 and by["flag"].kind is TaskKind.BINARY
    # features: size (numeric) + colour one-hot (3); targets are not features
    assert by["price"].input_shape == (4,)
    assert len(by["price"].train) + len(by["price"].val) + len(by["price"].test) == 60
    assert torch.equal(by["price"].train.x, by["kind"].train.x)
    assert abs(float(by["price"].train.y.mean())) < 1e-5  # standardised regression target


def test_table_missing_target_is_masked_or_dropped(tmp_path: Path) -> None:
    rows = _rows()
    rows[4] = "1.0,red,,a,no"
    path = _write(tmp_path, rows)
    (task,) = table(path=str(path), targets={"price": {"column": "price", "kind": "regression"}})
    splits = (task.train, task.val, task.test)
    assert sum(len(s) for s in splits) == 60 and sum(s.labelled for s in splits) == 59  # row kept, unlabelled
    tasks = table(path=str(path), targets={"price": {"column": "price", "kind": "regression"}}, dropna=True)
    assert sum(len(s) for s in (tasks[0].train, tasks[0].val, tasks[0].test)) == 59
    assert all(s.mask is None for s in (tasks[0].train, tasks[0].val, tasks[0].test))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": {"p": "nope"}}, ConfigError, "column 'nope' is not in the table"),
        ({"targets": {}}, ConfigError, "at least one target"),
        ({"targets": {"p": {"column": "price", "kind": "ordinal"}}}, ConfigError, "'ordinal' is not one of"),
        ({"targets": {"k": {"column": "kind", "kind": "binary"}}}, DataError, "3 distinct values"),
        ({"targets": {"p": "price"}, "features": ["weight"]}, ConfigError, "data.options.features"),
    ],
)
def test_table_bad_options(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    path = _write(tmp_path, _rows())
    with pytest.raises(error, match=match):
        table(path=str(path), **kwargs)


def test_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        table(path=str(tmp_path / "nope.csv"), targets={"p": "price"})


def test_families_registered_and_shapes() -> None:
    assert set(FAMILIES.names()) >= {"sinusoid", "gaussian_classes"}
    src = sinusoid(shots=5, query_shots=7, meta_batch=3)
    ep = src.train.sample(torch.Generator().manual_seed(0))
    assert ep.support.x.shape == (3, 5, 1) and ep.query.y.shape == (3, 7, 1)
    assert float(ep.support.x.abs().max()) <= 5.0
    assert float(ep.support.y.abs().max()) <= 5.0 + 1e-6
    cls = gaussian_classes(classes=60, dim=8, ways=5, shots=2, query_shots=3, meta_batch=4)
    ep = cls.test.sample(torch.Generator().manual_seed(0))
    assert ep.support.x.shape == (4, 10, 8) and ep.ways == 5
    assert set(ep.support.y.unique().tolist()) == set(range(5))


def test_gaussian_classes_splits_are_class_disjoint() -> None:
    cls = gaussian_classes(classes=60, dim=4, ways=5, seed=3)
    groups = [set(getattr(cls, s).classes.tolist()) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sum(len(g) for g in groups) == 60
    with pytest.raises(ConfigError, match="classes"):
        gaussian_classes(classes=10, ways=5)
    assert math.isfinite(float(cls.train.sample(torch.Generator()).support.x.sum()))
