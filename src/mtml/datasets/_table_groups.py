"""Grouped tables for :func:`mtml.datasets._table`: one task per value of a column (school, hospital, store), each
task with rows of its own.

This module decides which rows go where: the groups, their train/val/test rows, which groups are held out and
which training rows set the scale. :mod:`mtml.datasets._table` turns that plan into tensors and tasks.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtml.datasets._util import split_indices
from mtml.errors import ConfigError, DataError

__all__ = ["GroupPlan", "check_group_column", "check_group_options", "plan_groups", "warn_id_like"]

SUBSETS = ("train", "heldout", "all")
SMALL_GROUPS = ("error", "drop")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_SHOWN = 5  # groups or values quoted in an error message


@dataclass(frozen=True)
class GroupPlan:
    """The selected groups in sorted order (sanitised name, global train/val/test row positions) and the rows
    whose statistics standardise every group: the training rows of the groups that are not held out."""

    groups: list[tuple[str, list[Tensor]]]
    scale_rows: Tensor


def check_group_options(*, group_by: str | None, min_rows: int, small_groups: str, subset: str | None,
                        heldout_groups: float | Sequence[Any] | None) -> str:
    """Validate the grouping options; return the subset to build (``subset``, else ``"train"`` with held-out
    groups, else ``"all"``)."""
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 3:
        raise ConfigError(f"data.options.min_rows: must be a whole number >= 3 (a group needs a training, a "
                          f"validation and a test row). Got {min_rows!r}.")
    if small_groups not in SMALL_GROUPS:
        raise ConfigError(f"data.options.small_groups: must be one of {', '.join(SMALL_GROUPS)}. Got "
                          f"{small_groups!r}.")
    if subset is not None and subset not in SUBSETS:
        raise ConfigError(f"data.options.subset: must be one of {', '.join(SUBSETS)}. Got {subset!r}.")
    if group_by is None:
        given = [name for name, used in (("heldout_groups", heldout_groups is not None),
                                         ("subset", subset not in (None, "all")), ("min_rows", min_rows != 5),
                                         ("small_groups", small_groups != "error")) if used]
        if given:
            raise ConfigError(f"data.options.{given[0]}: only applies with data.options.group_by (one task per "
                              "value of a column); add group_by: COLUMN or leave it out.")
        return "all"
    if heldout_groups is not None:
        _check_heldout(heldout_groups)
    elif subset in ("train", "heldout"):
        raise ConfigError(f"data.options.subset: '{subset}' needs data.options.heldout_groups (a fraction such as "
                          "0.25, or a list of group values); set it or use subset: all.")
    return subset or ("train" if heldout_groups is not None else "all")


def _check_heldout(heldout: Any) -> None:
    if isinstance(heldout, bool | str):
        raise ConfigError(f"data.options.heldout_groups: give a fraction in (0, 1) or a list of group values "
                          f"(e.g. [{heldout!r}]). Got {heldout!r}.")
    if isinstance(heldout, int | float):
        if not 0 < heldout < 1:
            raise ConfigError(f"data.options.heldout_groups: a fraction must lie strictly between 0 and 1; for "
                              f"particular groups give a list such as [{heldout!r}]. Got {heldout!r}.")
        return
    if not isinstance(heldout, Sequence) or not heldout:
        raise ConfigError(f"data.options.heldout_groups: give a fraction in (0, 1) or a non-empty list of group "
                          f"values. Got {heldout!r}.")
    labels = [_label(v) for v in heldout]
    twice = sorted({v for v in labels if labels.count(v) > 1})
    if twice:
        raise ConfigError(f"data.options.heldout_groups: {', '.join(twice)} listed more than once; list each "
                          "group once.")


def check_group_column(df: Any, group_by: str, *, target_cols: set[str], features: Sequence[str] | None) -> None:
    """The group column exists, is no target and no explicit feature."""
    if not isinstance(group_by, str) or group_by not in df.columns:
        raise ConfigError(f"data.options.group_by: column {group_by!r} is not in the table; columns are "
                          f"{', '.join(map(str, df.columns))}.")
    if group_by in target_cols:
        raise ConfigError(f"data.options.group_by: column '{group_by}' is also a target; a column cannot both "
                          "name the tasks and be predicted. Group by another column or drop that target.")
    if features is not None and group_by in features:
        raise ConfigError(f"data.options.features: '{group_by}' is the group_by column and is never a feature "
                          "(each task holds one value of it); remove it from features.")


def warn_id_like(df: Any, feature_cols: Sequence[str]) -> None:
    """Warn about whole-number or text feature columns with a different value in every row (row ids)."""
    if len(df) < 20:
        return
    from pandas.api.types import is_integer_dtype, is_string_dtype

    for column in feature_cols:
        col = df[column]
        if (is_integer_dtype(col) or is_string_dtype(col)) and col.nunique(dropna=False) == len(df):
            warnings.warn(f"data.options.features: column '{column}' has a different value in each of its {len(df)} "
                          f"rows, like a row id; if it is one, add ids: [{column}] so it is not a feature.",
                          UserWarning, stacklevel=3)


def _label(value: Any) -> str:
    """A group value as text: whole floats without their '.0' (a column with gaps reads as float)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _groups(df: Any, group_by: str) -> tuple[list[str], list[np.ndarray]]:
    """Every group's label and row positions, sorted by label."""
    col = df[group_by]
    missing = col.isna().to_numpy(bool)
    if missing.any():
        first = int(np.argmax(missing)) + 1
        raise DataError(f"data.options.group_by: column '{group_by}' has {int(missing.sum())} missing values "
                        f"(the first in data row {first}); fill them in or set data.options.dropna: true to drop "
                        "those rows.")
    codes, uniques = col.factorize(sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    rows = np.split(order, bounds)
    labels = [_label(v) for v in uniques]
    ranked = sorted(range(len(labels)), key=labels.__getitem__)
    return [labels[i] for i in ranked], [rows[i] for i in ranked]


def _names(labels: Sequence[str], target: str) -> list[str]:
    """Task-name-safe group names (letters, digits, '_', '-'); two labels with one name are an error."""
    seen: dict[str, str] = {}
    for label in labels:
        name = _UNSAFE.sub("_", label)
        if name in seen:
            raise DataError(f"data.options.group_by: groups '{seen[name]}' and '{label}' both become task "
                            f"'{target}_{name}' (only letters, digits, '_' and '-' are kept); rename one of them "
                            "in the table.")
        seen[name] = label
    return list(seen)


def _heldout(labels: list[str], dropped: dict[str, int], heldout: float | Sequence[Any], min_rows: int) -> set[str]:
    """The held-out labels: an explicit list, or for a fraction ``f`` the ``h = round(f·G)`` groups at evenly
    spaced places in sorted order (positions ``⌊(i+1)·G/h⌋ - 1``: every fourth group for 0.25, as in ``schools``),
    so the choice depends on the groups alone, never on the split seed."""
    if isinstance(heldout, int | float):
        count = max(1, round(heldout * len(labels)))
        if count >= len(labels):
            raise ConfigError(f"data.options.heldout_groups: {heldout} of {len(labels)} groups leaves no training "
                              "group; use a smaller fraction.")
        return {labels[(i + 1) * len(labels) // count - 1] for i in range(count)}
    chosen = {_label(v) for v in heldout}
    gone = sorted(chosen & set(dropped))
    if gone:
        raise DataError(f"data.options.heldout_groups: group '{gone[0]}' has {dropped[gone[0]]} rows, fewer than "
                        f"min_rows={min_rows}, and was dropped (small_groups: drop); hold out another group or "
                        "lower min_rows.")
    unknown = sorted(chosen - set(labels))
    if unknown:
        shown = ", ".join(labels[:20]) + (f" … ({len(labels)} in all)" if len(labels) > 20 else "")
        raise ConfigError(f"data.options.heldout_groups: {', '.join(map(repr, unknown))} "
                          f"{'is' if len(unknown) == 1 else 'are'} not a group of the table; groups are {shown}.")
    if len(chosen) >= len(labels):
        raise ConfigError("data.options.heldout_groups: every group is held out, which leaves no training group; "
                          "hold out fewer.")
    return chosen


def plan_groups(df: Any, group_by: str, *, target: str, min_rows: int, small_groups: str,
                heldout_groups: float | Sequence[Any] | None, subset: str, seed: int,
                fractions: tuple[float, float, float]) -> GroupPlan:
    """Group the rows of ``df`` by ``group_by`` and split each group (see :func:`mtml.datasets._table`).

    One generator seeded with ``seed`` splits every group in sorted order, dropped and held-out ones included,
    so a group's split depends neither on ``subset`` nor on which groups ``min_rows`` drops."""
    labels, rows = _groups(df, group_by)
    gen = torch.Generator().manual_seed(seed)
    parts = [[torch.from_numpy(r)[p] for p in split_indices(len(r), fractions, gen)] for r in rows]
    small = [(label, len(r)) for label, r in zip(labels, rows, strict=True) if len(r) < min_rows]
    if small and small_groups == "error":
        shown = ", ".join(f"'{label}' ({n} row{'s' if n > 1 else ''})" for label, n in small[:_SHOWN])
        raise DataError(f"data.options.group_by: {len(small)} of {len(labels)} groups of column '{group_by}' have "
                        f"fewer than min_rows={min_rows} rows: {shown}{' …' if len(small) > _SHOWN else ''}; set "
                        "data.options.small_groups: drop to leave them out, or lower data.options.min_rows (>= 3).")
    dropped = dict(small)
    keep = [i for i, label in enumerate(labels) if label not in dropped]
    if not keep:
        raise DataError(f"data.options.group_by: no group of column '{group_by}' has at least min_rows={min_rows} "
                        f"rows (the largest has {max(map(len, rows))}); lower data.options.min_rows (>= 3).")
    kept = [labels[i] for i in keep]
    names = dict(zip(kept, _names(kept, target), strict=True))
    held = set() if heldout_groups is None else _heldout(kept, dropped, heldout_groups, min_rows)
    scale_rows = torch.cat([parts[i][0] for i in keep if labels[i] not in held])
    chosen = [i for i in keep if subset == "all" or (labels[i] in held) == (subset == "heldout")]
    return GroupPlan([(names[labels[i]], parts[i]) for i in chosen], scale_rows)
