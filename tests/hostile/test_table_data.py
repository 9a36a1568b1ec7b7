"""One validator for ``table`` (and ``text_table``) data (issue 17's *data accepted silently* class): label type,
cardinality, leaks and rows per split are refused with one line naming the column and the fix. Each case below
trained silently before (a continuous column as 200 classes, fractional labels re-indexed into classes, a single
class, a 4-row table with a test MSE of 4e13, a misspelt ``kind`` key ignored, a target read as a feature)
or crashed after training (``test_fraction: 0``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtml.datasets import table
from mtml.errors import ConfigError, DataError

pd = pytest.importorskip("pandas")


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "cont": rng.normal(size=n),
                          "label": rng.integers(0, 3, n), "half": rng.integers(0, 3, n) + 0.5,
                          "whole_float": rng.integers(0, 3, n).astype(float), "one": np.ones(n, int)})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    frame.head(4).to_csv(tmp_path / "tiny.csv", index=False)
    return path


def target(column: str, kind: str = "multiclass") -> dict[str, Any]:
    return {"y": {"column": column, "kind": kind}}


@pytest.mark.parametrize(("targets", "error", "needle"), [
    (target("cont"), DataError, "fractional numbers"),
    (target("half"), DataError, "fractional numbers such as 0.5"),
    (target("one"), DataError, "a single class"),
    (target("one", "binary"), DataError, "a single class"),
    ({"y": {"column": "label", "knd": "regression"}}, ConfigError, "unknown key 'knd'.*Did you mean 'kind'"),
    ({"y": ["label"]}, ConfigError, "give a column name or"),
])
def test_bad_targets_are_refused(csv: Path, targets: dict[str, Any], error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle):
        table(path=str(csv), targets=targets)


def test_a_continuous_integer_column_as_classes_is_refused(tmp_path: Path) -> None:
    n = 300
    path = tmp_path / "ids.csv"
    pd.DataFrame({"a": np.arange(n) * 0.1, "count": np.arange(n) * 7}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"300 distinct values in 300 labelled rows.*looks continuous"):
        table(path=str(path), targets=target("count"))


def test_whole_number_floats_stay_classes(csv: Path) -> None:
    (task,) = table(path=str(csv), targets=target("whole_float"))
    assert task.num_outputs == 3


def test_a_target_listed_as_a_feature_is_a_leak(csv: Path) -> None:
    with pytest.raises(ConfigError, match=r"'label' is also a target.*label leak"):
        table(path=str(csv), targets=target("label"), features=["a", "label"])


def test_too_few_rows_for_the_splits(csv: Path) -> None:
    with pytest.raises(DataError, match="4 rows: 2 to train on, 1 to validate and 1 to test"):
        table(path=str(csv.with_name("tiny.csv")), targets=target("label"))


@pytest.mark.parametrize(("val", "test", "needle"), [
    (0.2, 0.0, "test_fraction: must be between 0 and 1"), (0.0, 0.2, "val_fraction"), (0.5, 0.5, "below 1"),
    (0.2, -0.1, "test_fraction"),
])
def test_split_fractions_are_checked_before_anything_trains(csv: Path, val: float, test: float, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        table(path=str(csv), targets=target("label"), val_fraction=val, test_fraction=test)
