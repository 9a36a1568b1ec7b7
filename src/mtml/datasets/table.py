"""Your own table (CSV or Parquet): several target columns learned as tasks from the same feature columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtml.datasets._util import make_task, require, split_indices, standardize
from mtml.errors import ConfigError, DataError
from mtml.tasks import Task, TaskKind

__all__ = ["table"]


def _read(path: Path) -> Any:
    pd = require("pandas", "table")
    if not path.is_file():
        raise ConfigError(f"data.options.path: file {path} does not exist.")
    try:
        return pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as exc:  # pandas raises many parser error types
        raise DataError(f"could not read {path} as a table: {exc}. Give a CSV file with a header row.") from None


def _target(df: Any, name: str, spec: str | Mapping[str, Any]) -> tuple[str, TaskKind, Any]:
    spec = {"column": spec} if isinstance(spec, str) else dict(spec)
    column = spec.get("column", name)
    if column not in df.columns:
        raise ConfigError(f"data.options.targets.{name}: column '{column}' is not in the table; columns are "
                          f"{', '.join(map(str, df.columns))}.")
    kind = spec.get("kind")
    if kind is None:
        kind = "regression" if df[column].dtype.kind == "f" else "multiclass"
    try:
        return column, TaskKind(kind), df[column]
    except ValueError:
        raise ConfigError(f"data.options.targets.{name}.kind: '{kind}' is not one of regression, binary, "
                          "multiclass.") from None


def _encode_target(name: str, kind: TaskKind, col: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Targets, the labelled-row mask (bool ``[n]``) and extra task options of one target column.

    Missing values are no class: they get label 0 (regression: NaN) and False in the mask."""
    labelled = torch.tensor(col.notna().to_numpy(bool))
    if not bool(labelled.any()):
        raise DataError(f"task '{name}': target column '{col.name}' has no labels (all {len(col)} values are "
                        "missing); fill some in or leave the target out.")
    if kind is TaskKind.REGRESSION:
        return torch.tensor(col.to_numpy(np.float32, na_value=np.nan))[:, None], labelled, {}
    classes = sorted(col.dropna().unique().tolist(), key=str)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[v] if ok else 0 for v, ok in zip(col.tolist(), labelled.tolist(), strict=True)])
    if kind is TaskKind.BINARY:
        if len(classes) > 2:
            raise DataError(f"task '{name}': binary target column '{col.name}' has {len(classes)} distinct values "
                            f"({classes[:5]}…); use kind: multiclass.")
        return labels.float(), labelled, {}
    return labels, labelled, {"num_outputs": len(classes)}


def _split_masks(name: str, column: str, labelled: torch.Tensor, parts: Sequence[torch.Tensor],
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
) -> list[Task]:
    """One task per entry of ``targets`` (task name → column, or ``{column, kind}``), all from the same rows.

    Features are ``features`` (default: every column that is not a target); text columns are one-hot encoded,
    numeric ones standardised with training statistics, regression targets too (with their labelled training
    rows). Kinds: float columns default to regression, others to multiclass (pandas reads whole numbers with
    gaps as floats: give such a class column's ``kind``). Several targets form the task group ``table``.

    Missing values: a row without a target value stays in every task; that task just has no label there
    (``Split(mask=...)``, so each task trains and is scored on its labelled rows). Missing feature values are an
    error, as are a target with no label at all or with none in a split. ``dropna`` instead drops every row
    that misses a feature or a target value.
    """
    if not targets:
        raise ConfigError("data.options.targets: give at least one target, e.g. {price: {column: price, kind: "
                          "regression}}.")
    df = _read(Path(path))
    specs = {name: _target(df, name, spec) for name, spec in targets.items()}
    target_cols = {col for col, _, _ in specs.values()}
    feature_cols = list(features) if features is not None else [c for c in df.columns if c not in target_cols]
    unknown = [c for c in feature_cols if c not in df.columns]
    if unknown or not feature_cols:
        raise ConfigError(f"data.options.features: columns {unknown or '(none)'} are not usable; columns are "
                          f"{', '.join(map(str, df.columns))}.")
    if dropna:
        df = df.dropna(subset=[*feature_cols, *target_cols]).reset_index(drop=True)
        specs = {name: _target(df, name, spec) for name, spec in targets.items()}
    pd = require("pandas", "table")
    x_frame = pd.get_dummies(df[feature_cols], dtype=np.float32)
    bad = x_frame.columns[x_frame.isna().any()].tolist()
    if bad:
        raise DataError(f"feature columns {bad} have missing values; impute them or set data.options.dropna: true.")
    x = torch.tensor(x_frame.to_numpy(np.float32))
    parts = split_indices(len(df), (1 - val_fraction - test_fraction, val_fraction, test_fraction),
                          torch.Generator().manual_seed(seed))
    xs = standardize(*(x[p] for p in parts))
    group = "table" if len(specs) > 1 else None
    tasks = []
    for name, (column, kind, col) in specs.items():
        y, labelled, extra = _encode_target(name, kind, col)
        masks = _split_masks(name, column, labelled, parts)
        ys = tuple(y[p] for p in parts)
        if kind is TaskKind.REGRESSION:
            ys = standardize(*ys, mask=None if masks is None else masks[0])
        tasks.append(make_task(name, kind.value, xs, ys, group=group, masks=masks, **extra))
    return tasks
