"""Your own table (CSV or Parquet): several target columns learned as tasks from the same feature columns, or
one task per target and value of a group column (see :mod:`mtml.datasets._table_groups`)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtml._optional import require
from mtml.datasets._table_groups import GroupPlan, check_group_column, check_group_options, plan_groups, warn_id_like
from mtml.datasets._util import make_task, require_for, split_indices, standardize
from mtml.errors import ConfigError, DataError
from mtml.tasks import Task, TaskKind

__all__ = ["encode_target", "read_table", "split_masks", "table", "target_column"]


PARQUET = (".parquet", ".pq")
KINDS = ("regression", "binary", "multiclass")


def read_table(path: Path, dataset: str = "table") -> Any:
    """The CSV (UTF-8, header row) or Parquet (``.parquet``/``.pq``, needs pyarrow) file at ``path`` as a pandas
    DataFrame, or a one-line :class:`ConfigError`/:class:`DataError` saying what to fix."""
    pd = require_for("pandas", dataset)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"data.options.path: {path} {what}; give the path of a CSV or Parquet file (relative "
                          "paths start at the directory mtml runs in).")
    parquet = path.suffix.lower() in PARQUET
    if parquet:
        require("pyarrow", f"dataset '{dataset}' reading the Parquet file {path}", extra="parquet")
    try:
        return pd.read_parquet(path) if parquet else pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    except Exception as exc:  # pandas raises many parser error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "Parquet file" if parquet else "CSV file with a header row"
        raise DataError(f"could not read {path} as a table: {first}. Give a {what}.") from None


def _not_utf8(path: Path) -> str:
    """Where ``path`` stops being UTF-8 (pandas decodes in chunks, so its own error has no file position)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        where = f": byte 0x{data[exc.start]:02x} on line {line} is no UTF-8 character"
    else:
        where = ""
    return (f"{path} is not UTF-8 text{where}; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.csv > "
            "out.csv).")


def target_column(df: Any, name: str, spec: str | Mapping[str, Any]) -> tuple[str, TaskKind, Any]:
    """Column, kind and values of the target ``name`` given as a column name or ``{column, kind}``; the kind
    defaults to regression for a float column and to multiclass otherwise."""
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(f"data.options.targets.{name}: give a column name or {{column, kind}}. Got {spec!r}.")
    spec = {"column": spec} if isinstance(spec, str) else dict(spec)
    for key in spec:
        if key not in TARGET_KEYS:
            near = difflib.get_close_matches(str(key), TARGET_KEYS, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"data.options.targets.{name}: unknown key '{key}'; a target takes "
                              f"{' and '.join(TARGET_KEYS)}.{hint}")
    column = spec.get("column", name)
    if column not in df.columns:
        near = difflib.get_close_matches(str(column), list(map(str, df.columns)), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"data.options.targets.{name}: column '{column}' is not in the table; columns are "
                          f"{', '.join(map(str, df.columns))}.{hint}")
    kind = spec.get("kind")
    if kind is None:
        kind = "regression" if df[column].dtype.kind == "f" else "multiclass"
    if kind not in KINDS:
        raise ConfigError(f"data.options.targets.{name}.kind: '{kind}' is not one of {', '.join(KINDS)}.")
    return column, TaskKind(kind), df[column]


TARGET_KEYS = ("column", "kind")
#: a class column with more distinct values than this, and than half its labelled rows, is refused as continuous
MAX_LOOSE_CLASSES = 50


def _check_classes(name: str, kind: TaskKind, col: Any, classes: list[Any]) -> None:
    """A class target must have two classes or more, whole-number or text values, and not one class per row."""
    column = col.name
    if len(classes) < 2:
        raise DataError(f"task '{name}': {kind.value} target column '{column}' has a single class "
                        f"({classes[0]!r} in all {int(col.notna().sum())} labelled rows): nothing to learn; drop the "
                        "target or give rows of another class.")
    fractional = [c for c in classes if isinstance(c, float) and not float(c).is_integer()]
    if fractional:
        raise DataError(f"task '{name}': {kind.value} target column '{column}' holds fractional numbers such as "
                        f"{fractional[0]!r}; class labels are whole numbers or text. If it is a quantity, use "
                        "kind: regression.")
    labelled = int(col.notna().sum())
    if len(classes) > MAX_LOOSE_CLASSES and len(classes) > labelled // 2:
        raise DataError(f"task '{name}': {kind.value} target column '{column}' has {len(classes)} distinct values "
                        f"in {labelled} labelled rows, too many for classes (it looks continuous); use kind: "
                        "regression, or bin it into classes first.")


def check_splits(n: int, val_fraction: float, test_fraction: float, *, what: str = "the table") -> None:
    """Split fractions in range, and enough rows for every split: at least 5 to train on and 1 each to validate
    and test (``what`` names the rows in the message)."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"data.options.{key}: must be between 0 and 1 (exclusive), got {value!r}; every run "
                              "validates (early stopping) and reports test metrics, so each split needs rows.")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.options.val_fraction + test_fraction must be below 1 (got {val_fraction} + "
                          f"{test_fraction}); the rest is the training split.")
    n_val = max(1, round(n * val_fraction)) if n >= 3 else 0
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    if n - n_val - n_test < 5 or n_val < 1 or n_test < 1:
        raise DataError(f"{what} has {n} rows: {max(n - n_val - n_test, 0)} to train on, {n_val} to validate and "
                        f"{n_test} to test; give at least {5 + 2} rows (5 to train, 1 each to validate and test), "
                        "ideally hundreds.")


def encode_target(name: str, kind: TaskKind, col: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Targets, the labelled-row mask (bool ``[n]``) and extra task options of one target column.

    Missing values are no class: they get label 0 (regression: NaN) and False in the mask. A regression column
    must hold finite numbers."""
    labelled = torch.tensor(col.notna().to_numpy(bool))
    if not bool(labelled.any()):
        raise DataError(f"task '{name}': target column '{col.name}' has no labels (all {len(col)} values are "
                        "missing); fill some in or leave the target out.")
    if kind is TaskKind.REGRESSION:
        return _numbers(name, col)[:, None], labelled, {}
    classes = sorted(col.dropna().unique().tolist(), key=str)
    _check_classes(name, kind, col, classes)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[v] if ok else 0 for v, ok in zip(col.tolist(), labelled.tolist(), strict=True)])
    if kind is TaskKind.BINARY:
        if len(classes) > 2:
            raise DataError(f"task '{name}': binary target column '{col.name}' has {len(classes)} distinct values "
                            f"({classes[:5]}…); use kind: multiclass.")
        return labels.float(), labelled, {}
    return labels, labelled, {"num_outputs": len(classes)}


def _numbers(name: str, col: Any) -> torch.Tensor:
    """A regression column as float ``[n]`` (missing values NaN); text or infinite values are a DataError."""
    pd = require_for("pandas", "table")
    values = pd.to_numeric(col, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.flatnonzero(np.isinf(values) | (np.isnan(values) & col.notna().to_numpy(bool)))
    if len(bad):
        row = int(bad[0])
        count = f"{len(bad)} values like it" if len(bad) > 1 else "the only one"
        raise DataError(f"task '{name}': regression target column '{col.name}' holds '{col.iloc[row]}' in data "
                        f"row {row + 1} ({count}), not a finite number; fix those values or give the target "
                        "kind: multiclass (or binary).")
    return torch.tensor(values.astype(np.float32))


def split_masks(name: str, column: str, labelled: torch.Tensor, parts: Sequence[torch.Tensor],
                 ) -> list[torch.Tensor | None] | None:
    """Per-split masks of a target (None when every row is labelled; None for an empty split), or a
    :class:`DataError` for a split that would hold no labelled row."""
    if bool(labelled.all()):
        return None
    masks: list[torch.Tensor | None] = [labelled[p] if len(p) else None for p in parts]
    for split, mask in zip(("train", "val", "test"), masks, strict=True):
        if mask is not None and not bool(mask.any()):
            raise DataError(f"task '{name}': target column '{column}' has no label in the {split} split's "
                            f"{len(mask)} rows ({int(labelled.sum())} of {len(labelled)} rows are labelled); add "
                            "labelled rows or set data.options.dropna: true.")
    return masks


def table(
    *, path: str, targets: Mapping[str, str | Mapping[str, Any]], features: Sequence[str] | None = None,
    dropna: bool = False, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
    group_by: str | None = None, min_rows: int = 5, small_groups: str = "error", ids: Sequence[str] | None = None,
    heldout_groups: float | Sequence[Any] | None = None, subset: str | None = None,
) -> list[Task]:
    """One task per entry of ``targets`` (task name → column, or ``{column, kind}``), all from the same rows;
    with ``group_by``, one task per target and value of that column, each on that value's rows.

    Features are ``features`` (default: every column that is not a target, an ``ids`` column or the ``group_by``
    column); text columns are one-hot encoded, numeric ones standardised with training statistics, regression
    targets too (with their labelled training rows). Kinds: float columns default to regression, others to
    multiclass (pandas reads whole numbers with gaps as floats: give such a class column's ``kind``). Several
    targets form the task group ``table``.

    Missing values: a row without a target value stays in every task; that task just has no label there
    (``Split(mask=...)``, so each task trains and is scored on its labelled rows). Missing feature values are an
    error, as are a target with no label at all or with none in a split. ``dropna`` instead drops every row
    that misses a feature or a target value (or its ``group_by`` value).

    Grouped tables (one regression per school, hospital or store):

    - ``group_by: COLUMN``: one task ``<target>_<value>`` per distinct value (sorted as text; characters other
      than letters, digits, ``_`` and ``-`` become ``_``). Each group's rows are split on their own by
      ``val_fraction``/``test_fraction`` (at least one validation and one test row each), with one generator
      seeded by ``seed`` running over every group in sorted order, so a group's split never depends on which
      groups are built. With several targets a group's tasks share its rows (``Task.group`` = the value).
    - ``min_rows`` (default 5, at least 3) and ``small_groups`` (``"error"``, the default, or ``"drop"``): what
      to do with groups of fewer rows.
    - ``ids``: columns that are never features (row or entity ids). A whole-number or text feature column with
      a different value in each of 20+ rows warns that it looks like one.
    - ``heldout_groups``: a fraction ``f`` in (0, 1) holds out ``round(f·groups)`` groups evenly spaced in sorted
      order (0.25: every fourth group, as ``schools``; it does not move with ``seed``), or a list of values.
    - ``subset``: ``"train"`` (default with ``heldout_groups``: the other groups), ``"heldout"`` or ``"all"``
      (default otherwise). Features and regression targets are always standardised with the training rows of
      the groups that are not held out, so a model trained on ``train`` sees ``heldout`` on the same scale.
    """
    if not targets:
        raise ConfigError("data.options.targets: give at least one target, e.g. {price: {column: price, kind: "
                          "regression}}.")
    chosen = check_group_options(group_by=group_by, min_rows=min_rows, small_groups=small_groups, subset=subset,
                                 heldout_groups=heldout_groups)
    df = read_table(Path(path))
    specs = {name: target_column(df, name, spec) for name, spec in targets.items()}
    target_cols = {col for col, _, _ in specs.values()}
    id_cols = _ids(df, ids, target_cols, features)
    if group_by is not None:
        check_group_column(df, group_by, target_cols=target_cols, features=features)
    excluded = {*target_cols, *id_cols, group_by}
    feature_cols = list(features) if features is not None else [c for c in df.columns if c not in excluded]
    unknown = [c for c in feature_cols if c not in df.columns]
    if unknown or not feature_cols:
        raise ConfigError(f"data.options.features: columns {unknown or '(none)'} are not usable; columns are "
                          f"{', '.join(map(str, df.columns))}.")
    leaks = [c for c in feature_cols if c in target_cols]
    if leaks:
        raise ConfigError(f"data.options.features: column '{leaks[0]}' is also a target: the model would read the "
                          "answer from its input (a label leak); remove it from features.")
    if dropna:
        grouped = [] if group_by is None else [group_by]
        df = df.dropna(subset=[*feature_cols, *target_cols, *grouped]).reset_index(drop=True)
        specs = {name: target_column(df, name, spec) for name, spec in targets.items()}
    if group_by is not None:
        warn_id_like(df, feature_cols)
    pd = require_for("pandas", "table")
    x_frame = pd.get_dummies(df[feature_cols], dtype=np.float32)
    bad = x_frame.columns[x_frame.isna().any()].tolist()
    if bad:
        raise DataError(f"feature columns {bad} have missing values; impute them or set data.options.dropna: true.")
    x = torch.tensor(x_frame.to_numpy(np.float32))
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    check_splits(len(df), val_fraction, test_fraction)
    if group_by is not None:
        plan = plan_groups(df, group_by, target=next(iter(specs)), min_rows=min_rows, small_groups=small_groups,
                           heldout_groups=heldout_groups, subset=chosen, seed=seed, fractions=fractions)
        return _grouped_tasks(plan, x, specs)
    parts = split_indices(len(df), fractions, torch.Generator().manual_seed(seed))
    xs = standardize(*(x[p] for p in parts))
    group = "table" if len(specs) > 1 else None
    tasks = []
    for name, (column, kind, col) in specs.items():
        y, labelled, extra = encode_target(name, kind, col)
        masks = split_masks(name, column, labelled, parts)
        ys = tuple(y[p] for p in parts)
        if kind is TaskKind.REGRESSION:
            ys = standardize(*ys, mask=None if masks is None else masks[0])
        tasks.append(make_task(name, kind.value, xs, ys, group=group, masks=masks, **extra))
    return tasks


def _ids(df: Any, ids: Sequence[str] | None, target_cols: set[str], features: Sequence[str] | None) -> list[str]:
    """The ``ids`` columns, checked: in the table, neither targets nor listed features."""
    if ids is None:
        return []
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ConfigError(f"data.options.ids: give a list of columns, e.g. [{ids!r}]. Got {ids!r}.")
    unknown = [c for c in ids if c not in df.columns]
    if unknown:
        raise ConfigError(f"data.options.ids: columns {unknown} are not in the table; columns are "
                          f"{', '.join(map(str, df.columns))}.")
    clash = [c for c in ids if c in target_cols or (features is not None and c in features)]
    if clash:
        what = "a target" if clash[0] in target_cols else "in data.options.features"
        raise ConfigError(f"data.options.ids: column '{clash[0]}' is also {what}; an id column is never learned "
                          "from or predicted, so remove it from one of the two.")
    return list(ids)


def _grouped_tasks(plan: GroupPlan, x: torch.Tensor, specs: Mapping[str, tuple[str, TaskKind, Any]]) -> list[Task]:
    """The tasks of a grouped table: every target of every planned group, standardised with the planned rows."""
    _, x = standardize(x[plan.scale_rows], x)
    targets = []
    for name, (column, kind, col) in specs.items():
        y, labelled, extra = encode_target(name, kind, col)
        if kind is TaskKind.REGRESSION:
            _, y = standardize(y[plan.scale_rows], y, mask=labelled[plan.scale_rows])
        targets.append((name, column, kind, y, labelled, extra))
    tasks = []
    for group, parts in plan.groups:
        xs = [x[p] for p in parts]
        local = torch.arange(sum(map(len, parts))).split([len(p) for p in parts])
        for name, column, kind, y, labelled, extra in targets:
            task = f"{name}_{group}"
            masks = split_masks(task, column, labelled[torch.cat(parts)], local)
            tasks.append(make_task(task, kind.value, xs, [y[p] for p in parts], masks=masks,
                                   group=group if len(targets) > 1 else None, **extra))
    return tasks
