"""The `table` dataset with ``group_by``: one task per value of a column, each with rows of its own."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mtml.datasets import DATASETS, table
from mtml.errors import ConfigError, DataError
from mtml.groups import task_groups
from mtml.tasks import SPLITS, Task

SIZES = [8 + 2 * g for g in range(12)]  # 12 groups of 8..30 rows


def _frame(sizes: list[int] = SIZES, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for g, n in enumerate(sizes):
        for i in range(n):
            x1, x2 = rng.normal(), rng.normal()
            rows.append({"pid": 1000 + len(rows), "store": f"S-{g:02d}", "x1": x1, "x2": x2, "colour": "ab"[i % 2],
                         "sales": g + 2 * x1 + 0.1 * rng.normal(), "visits": x2 - g + 0.1 * rng.normal()})
    return pd.DataFrame(rows)


def _csv(tmp_path: Path, df: pd.DataFrame | None = None, name: str = "stores.csv") -> str:
    path = tmp_path / name
    (_frame() if df is None else df).to_csv(path, index=False)
    return str(path)


def _build(path: str, **options: Any) -> list[Task]:
    options = {"targets": {"sales": "sales"}, "group_by": "store", "ids": ["pid"], **options}
    return table(path=path, **options)


def test_one_task_per_group_with_non_empty_splits_split_within_each_group(tmp_path: Path) -> None:
    tasks = _build(_csv(tmp_path))
    assert [t.name for t in tasks] == [f"sales_S-{g:02d}" for g in range(12)]
    assert all(t.group is None for t in tasks) and len(task_groups(tasks)) == 12
    for task, n in zip(tasks, SIZES, strict=True):
        sizes = [len(task.split(s)) for s in SPLITS]
        assert sum(sizes) == n and min(sizes) >= 1
        # stratified by group: every group is split by the fractions on its own
        assert sizes[1:] == [max(1, round(0.2 * n))] * 2
        assert task.input_shape == (5,)  # x1, x2, visits, colour one-hot (2): no pid, no store


def test_rows_never_cross_groups(tmp_path: Path) -> None:
    df = _frame()
    tasks = _build(_csv(tmp_path, df))
    # one affine map standardises every row's target: invert it from all values, sorted
    std = np.concatenate([t.split(s).y.numpy().ravel() for t in tasks for s in SPLITS])
    slope, intercept = np.polyfit(np.sort(std), np.sort(df.sales.to_numpy()), 1)
    for g, task in enumerate(tasks):
        got = np.concatenate([task.split(s).y.numpy().ravel() for s in SPLITS]) * slope + intercept
        own = df.loc[df.store == f"S-{g:02d}", "sales"].to_numpy()
        assert np.allclose(np.sort(got), np.sort(own), atol=1e-4)


def _same_rows(a: list[Task], b: dict[str, Task]) -> bool:
    """Whether tasks ``a`` hold the same rows in each split as their namesakes in ``b``, up to one affine rescale
    of the target (another set of training rows sets the scale)."""
    ya = np.concatenate([t.split(s).y.numpy().ravel() for t in a for s in SPLITS])
    yb = np.concatenate([b[t.name].split(s).y.numpy().ravel() for t in a for s in SPLITS])
    slope, intercept = np.polyfit(yb, ya, 1)
    return bool(np.allclose(ya, slope * yb + intercept, atol=1e-4))


def test_split_depends_neither_on_subset_nor_on_dropped_groups(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    every = {t.name: t for t in _build(path, heldout_groups=0.25, subset="all")}
    for subset in ("train", "heldout"):
        for task in _build(path, heldout_groups=0.25, subset=subset):  # same rows, same scale
            assert all(torch.equal(task.split(s).y, every[task.name].split(s).y) for s in SPLITS)
            assert all(torch.equal(task.split(s).x, every[task.name].split(s).x) for s in SPLITS)
    dropped = _build(path, min_rows=12, small_groups="drop")
    assert len(dropped) == 10 and "sales_S-00" not in {t.name for t in dropped}
    assert _same_rows(dropped, every)
    assert not _same_rows(_build(path, seed=1), every)


def test_train_and_heldout_subsets_share_the_training_groups_scale(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    train = _build(path, heldout_groups=0.25)
    held = _build(path, heldout_groups=0.25, subset="heldout")
    both = _build(path, heldout_groups=0.25, subset="all")
    assert len(train) == 9 and len(held) == 3 and len(both) == 12
    assert [t.name for t in held] == ["sales_S-03", "sales_S-07", "sales_S-11"]  # every fourth, sorted
    assert not {t.name for t in train} & {t.name for t in held}
    x = torch.cat([t.train.x for t in train])
    y = torch.cat([t.train.y for t in train])
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0) - 1).abs().max() < 1e-4
    assert abs(float(y.mean())) < 1e-5
    by = {t.name: t for t in both}
    for task in [*train, *held]:  # one scale for all three subsets
        assert torch.allclose(task.test.x, by[task.name].test.x) and torch.allclose(task.test.y, by[task.name].test.y)
    plain = {t.name: t for t in _build(path)}  # without held-out groups every group's training rows count
    assert not torch.allclose(plain["sales_S-03"].test.y, by["sales_S-03"].test.y)


def test_explicit_heldout_list_and_unknown_values(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    held = _build(path, heldout_groups=["S-01", "S-10"], subset="heldout")
    assert [t.name for t in held] == ["sales_S-01", "sales_S-10"]
    assert len(_build(path, heldout_groups=["S-01", "S-10"])) == 10
    with pytest.raises(ConfigError, match=r"'S-99' is not a group of the table; groups are S-00, S-01"):
        _build(path, heldout_groups=["S-01", "S-99"])
    with pytest.raises(ConfigError, match=r"needs data\.options\.heldout_groups"):
        _build(path, subset="heldout")
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        _build(path, heldout_groups=1.5)
    with pytest.raises(ConfigError, match=r"only applies with data\.options\.group_by"):
        table(path=path, targets={"sales": "sales"}, heldout_groups=0.25)


def test_ids_and_the_group_column_are_never_features(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    (task, *_) = _build(path, features=["x1", "x2"])
    assert task.input_shape == (2,)
    with pytest.raises(ConfigError, match=r"'pid' is also in data\.options\.features"):
        _build(path, features=["x1", "pid"])
    with pytest.raises(ConfigError, match="'store' is the group_by column and is never a feature"):
        _build(path, features=["x1", "store"])
    with pytest.raises(ConfigError, match=r"data.options.ids: columns \['nope'\] are not in the table"):
        _build(path, ids=["nope"])


def test_id_like_feature_column_warns_once_and_naming_it(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    with pytest.warns(UserWarning, match=r"column 'pid' has a different value in each of its 228 rows.*ids: \[pid\]"):
        _build(path, ids=None, features=["x1", "pid"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(path)  # pid listed in ids: no warning; floats are never id-like


def test_min_rows_error_and_drop(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    with pytest.raises(DataError, match=r"2 of 12 groups of column 'store' have fewer than min_rows=12 rows: "
                                        r"'S-00' \(8 rows\), 'S-01' \(10 rows\); set data.options.small_groups: drop"):
        _build(path, min_rows=12)
    assert len(_build(path, min_rows=12, small_groups="drop")) == 10
    with pytest.raises(DataError, match="no group of column 'store' has at least min_rows=40 rows"):
        _build(path, min_rows=40, small_groups="drop")
    with pytest.raises(DataError, match="was dropped"):
        _build(path, min_rows=12, small_groups="drop", heldout_groups=["S-00"])
    for bad in (2, 3.5, True):
        with pytest.raises(ConfigError, match="min_rows: must be a whole number >= 3"):
            _build(path, min_rows=bad)
    with pytest.raises(ConfigError, match="small_groups: must be one of error, drop"):
        _build(path, small_groups="keep")


def test_one_row_group_is_an_error_unless_dropped(tmp_path: Path) -> None:
    df = pd.concat([_frame(), _frame([1], seed=3).assign(store="lonely", pid=9999)], ignore_index=True)
    path = _csv(tmp_path, df)
    with pytest.raises(DataError, match=r"1 of 13 groups .* 'lonely' \(1 row\)"):
        _build(path)
    assert "sales_lonely" not in {t.name for t in _build(path, small_groups="drop")}


def test_missing_group_values_and_missing_column(tmp_path: Path) -> None:
    df = _frame()
    df.loc[[5, 40], "store"] = None
    path = _csv(tmp_path, df)
    with pytest.raises(DataError, match=r"column 'store' has 2 missing values \(the first in data row 6\); fill "
                                        r"them in or set data.options.dropna: true"):
        _build(path)
    assert sum(len(t.split(s)) for t in _build(path, dropna=True) for s in SPLITS) == sum(SIZES) - 2
    with pytest.raises(ConfigError, match=r"group_by: column 'shop' is not in the table; columns are pid, store"):
        _build(path, group_by="shop")
    with pytest.raises(ConfigError, match="column 'sales' is also a target"):
        _build(path, group_by="sales")


def test_sanitised_names_must_stay_distinct(tmp_path: Path) -> None:
    df = _frame([6, 6]).assign(store=["a b"] * 6 + ["a_b"] * 6)
    with pytest.raises(DataError, match="groups 'a b' and 'a_b' both become task 'sales_a_b'"):
        _build(_csv(tmp_path, df))


def test_several_targets_share_each_groups_rows(tmp_path: Path) -> None:
    tasks = _build(_csv(tmp_path), targets={"sales": "sales", "visits": "visits"}, heldout_groups=["S-02"])
    assert len(tasks) == 22
    groups = task_groups(tasks)
    assert len(groups) == 11 and all(g.shared and len(g.tasks) == 2 for g in groups)
    sales, visits = tasks[0], tasks[1]
    assert (sales.name, visits.name, sales.group, visits.group) == ("sales_S-00", "visits_S-00", "S-00", "S-00")
    assert all(sales.split(s).x is visits.split(s).x for s in SPLITS)
    assert sales.input_shape == (4,)  # x1, x2, colour one-hot: visits is a target now


def test_registry_accepts_the_new_options(tmp_path: Path) -> None:
    tasks = DATASETS.create("table", where="data.options", path=_csv(tmp_path), targets={"sales": "sales"},
                            group_by="store", ids=["pid"], heldout_groups=0.5, subset="heldout")
    assert len(tasks) == 6


def test_two_thousand_groups_build_quickly(tmp_path: Path) -> None:
    n = 2000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"store": np.repeat(np.arange(n), 6), "x1": rng.normal(size=6 * n),
                       "x2": rng.normal(size=6 * n), "sales": rng.normal(size=6 * n)})
    path = _csv(tmp_path, df)
    start = time.perf_counter()
    tasks = table(path=path, targets={"sales": "sales"}, group_by="store", heldout_groups=0.25)
    elapsed = time.perf_counter() - start
    print(f"2,000 groups x 6 rows: {elapsed:.2f} s")
    assert len(tasks) == 1500 and all(len(t.val) == 1 and len(t.test) == 1 for t in tasks)
    assert elapsed < 30
