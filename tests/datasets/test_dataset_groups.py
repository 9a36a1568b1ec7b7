"""Datasets whose tasks share rows: one named group, the very same ``x`` tensor per split for every task, and (in
``table``) per-task label masks where a target column has missing values."""

from __future__ import annotations

import gzip
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mtml.datasets import table
from mtml.datasets._fashion import DEFAULT_ROOT, fashion
from mtml.datasets._movies import movies
from mtml.datasets._penguins import penguins
from mtml.errors import DataError
from mtml.groups import task_groups
from mtml.tasks import SPLITS, Task, TaskKind


def assert_one_group(tasks: Sequence[Task], name: str) -> None:
    """Every task names group ``name``, holds the first task's ``x`` objects and :func:`task_groups` agrees."""
    first = tasks[0]
    for task in tasks:
        assert task.group == name
        for split in SPLITS:
            assert task.split(split).x is first.split(split).x, (task.name, split)
    groups = task_groups(tasks)
    assert [(g.name, [t.name for t in g.tasks]) for g in groups] == [(name, [t.name for t in tasks])]


def test_penguins_share_rows() -> None:
    assert_one_group(penguins(seed=1), "penguins")


@pytest.mark.parametrize("genres_as", ["binary", "multilabel"])
def test_movies_share_rows(genres_as: str) -> None:
    tasks = movies(n=200, genres_as=genres_as)
    assert len(tasks) == (8 if genres_as == "binary" else 2)
    assert_one_group(tasks, "movies")


def _idx(data: torch.Tensor) -> bytes:
    dims = tuple(data.shape)
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data.to(torch.uint8).numpy().tobytes()


def test_fashion_shares_rows_small_root(tmp_path: Path) -> None:
    """Forty fake 28×28 training images and twenty test images in the four IDX files."""
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = torch.arange(n) % 10
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(torch.zeros(n, 28, 28))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    assert_one_group(fashion(root=str(tmp_path), train_size=20, val_size=10), "fashion")


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                    reason="sudo apt-get install dataset-fashion-mnist")
def test_fashion_shares_rows_real() -> None:
    assert_one_group(fashion(train_size=50, val_size=20, test_size=20), "fashion")


def test_glyph_tasks_share_rows(tmp_path: Path) -> None:
    pytest.importorskip("fontTools")
    from mtml.datasets._image_suite import glyph_tasks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without Noto fonts the renderer falls back to matplotlib's (and says so)
        tasks = glyph_tasks(alphabets=["GREEK", "LATIN"], characters=4, examples=10, fractions=(0.6, 0.2, 0.2),
                            gen=torch.Generator().manual_seed(0), cache_dir=str(tmp_path), flatten=True)
    assert [t.name for t in tasks] == ["script", "character", "font_style"]
    assert_one_group(tasks, "glyphs")


# -- table: several targets, missing target values ------------------------------------------------------------
N = 60
GAPS = {3, 10, 17, 25, 33, 41, 50}  # data rows whose price is missing


def _csv(tmp_path: Path, *, price: str = "gaps", size_gap: bool = False) -> Path:
    """``size, colour`` features; targets ``price`` (regression; ``gaps``: missing in GAPS, ``empty``: all
    missing, ``one``: only row 0 labelled), ``kind`` (3 classes, one missing value) and ``flag`` (binary)."""
    g = torch.Generator().manual_seed(0)
    rows = ["size,colour,price,kind,flag"]
    for i in range(N):
        size = float(torch.rand((), generator=g)) * 10
        missing = {"gaps": i in GAPS, "empty": True, "one": i > 0}[price]
        rows.append(f"{'' if size_gap and i == 7 else f'{size:.3f}'},{['red', 'green', 'blue'][i % 3]},"
                    f"{'' if missing else f'{3 * size + 1:.3f}'},{'' if i == 5 else 'abc'[i % 3]},"
                    f"{'yes' if size > 5 else 'no'}")
    path = tmp_path / "shop.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


TARGETS = {"cost": {"column": "price", "kind": "regression"}, "kind": "kind", "flag": {"column": "flag",
                                                                                      "kind": "binary"}}


def _mask(task: Task, split: str) -> torch.Tensor:
    s = task.split(split)
    return torch.ones(len(s), dtype=torch.bool) if s.mask is None else s.mask


def test_table_targets_share_rows_and_mask_missing_labels(tmp_path: Path) -> None:
    tasks = table(path=str(_csv(tmp_path)), targets=TARGETS)
    assert_one_group(tasks, "table")
    cost, kind, flag = tasks
    assert sum(len(cost.split(s)) for s in SPLITS) == N  # no row dropped, for any task
    assert cost.train.mask is not None and cost.train.labelled == int(cost.train.mask.sum()) < len(cost.train)
    assert sum(cost.split(s).labelled for s in SPLITS) == N - len(GAPS)
    # the masks mark exactly the rows without a price: standardising keeps the order of the (distinct) sizes,
    # so a row's rank by its size feature identifies it
    size = torch.tensor([float(r.split(",")[0]) for r in _csv(tmp_path).read_text().splitlines()[1:]])
    rank_of_row = torch.argsort(torch.argsort(size))
    x_all = torch.cat([cost.split(s).x for s in SPLITS])
    mask_all = torch.cat([_mask(cost, s) for s in SPLITS])
    ranks = torch.argsort(torch.argsort(x_all[:, 0]))
    assert sorted(ranks[~mask_all].tolist()) == sorted(rank_of_row[sorted(GAPS)].tolist())
    # unlabelled rows hold 0; the labelled train targets are standardised with their own statistics
    y = cost.train.y[:, 0]
    assert torch.equal(y[~cost.train.mask], torch.zeros(int((~cost.train.mask).sum())))
    labelled = y[cost.train.mask]
    assert abs(float(labelled.mean())) < 1e-5 and abs(float(labelled.std()) - 1) < 1e-4
    # the missing class value is no class; flag has every label
    assert kind.kind is TaskKind.MULTICLASS and kind.num_outputs == 3
    assert sum(kind.split(s).labelled for s in SPLITS) == N - 1
    assert flag.kind is TaskKind.BINARY and all(flag.split(s).mask is None for s in SPLITS)


def test_table_single_target_has_no_group(tmp_path: Path) -> None:
    (task,) = table(path=str(_csv(tmp_path)), targets={"flag": {"column": "flag", "kind": "binary"}},
                    features=["size", "colour"])
    assert task.group is None


def test_table_all_missing_target_names_task_and_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task 'cost': target column 'price' has no labels \(all 60 values"):
        table(path=str(_csv(tmp_path, price="empty")), targets=TARGETS)


def test_table_split_without_labels_names_split_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task 'cost': target column 'price' has no label in the (train|val) "
                                        r"split.*dropna"):
        table(path=str(_csv(tmp_path, price="one")), targets=TARGETS)


def test_table_dropna_still_drops_rows(tmp_path: Path) -> None:
    tasks = table(path=str(_csv(tmp_path)), targets=TARGETS, dropna=True)
    assert_one_group(tasks, "table")
    for task in tasks:
        assert sum(len(task.split(s)) for s in SPLITS) == N - len(GAPS) - 1  # the price gaps and row 5's kind
        assert all(task.split(s).mask is None for s in SPLITS)


def test_table_missing_feature_is_still_an_error(tmp_path: Path) -> None:
    path = _csv(tmp_path, size_gap=True)
    with pytest.raises(DataError, match=r"feature columns \['size'\] have missing values.*dropna"):
        table(path=str(path), targets=TARGETS)
    tasks = table(path=str(path), targets=TARGETS, dropna=True)
    assert sum(len(tasks[0].split(s)) for s in SPLITS) == N - len(GAPS) - 2
