"""Your own texts (CSV or Parquet): one text column and several target columns, learned as tasks on the same rows.

The text of each row is read by the all-MiniLM-L6-v2 sentence encoder (Reimers & Gurevych 2019), as in the
``texts`` suite: by default as its frozen 384-d embeddings, computed once and kept in the embedding cache of
:mod:`mtml.datasets._text_cache` (a second run, or another config over the same texts, encodes nothing), or as
token ids for a model that fine-tunes the encoder (``inputs="tokens"``, architecture ``minilm``). Targets are
read, typed and masked exactly as the ``table`` dataset reads them (:mod:`mtml.datasets._table`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtml.datasets._table import check_splits, encode_target, read_table, split_masks, target_column
from mtml.datasets._text import check_encoder_options, clean_text, text_inputs
from mtml.datasets._util import make_task, split_indices, standardize
from mtml.errors import ConfigError, DataError
from mtml.tasks import Task, TaskKind

__all__ = ["text_table"]

NAME = "text_table"


def _text_column(df: Any, text: str) -> Any:
    """The text column ``text`` of ``df``: it exists and holds text, not numbers."""
    columns = list(map(str, df.columns))
    if not isinstance(text, str) or text not in df.columns:
        near = difflib.get_close_matches(str(text), columns, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"data.options.text: column {text!r} is not in the table; columns are "
                          f"{', '.join(columns)}.{hint}")
    col = df[text]
    if not col.notna().any():
        raise DataError(f"data.options.text: column '{text}' has no text at all (all {len(col)} values are "
                        "missing); name the column with the texts.")
    if col.dtype.kind in "biufc" or (col.dropna().map(type).isin([int, float, bool]).all()):
        others = [c for c in columns if c != text and df[c].dtype.kind not in "biufcmM"]
        hint = f" (columns holding text: {', '.join(others)})" if others else ""
        raise ConfigError(f"data.options.text: column '{text}' holds numbers ({col.dtype}), not text; name the "
                          f"column with the texts{hint}.")
    return col


def _texts(col: Any, clean: bool) -> list[str]:
    """Every row's text (cleaned with :func:`~mtml.datasets._text.clean_text` if ``clean``), or a
    :class:`DataError` naming the first missing, non-text or empty one by its data row (1-based)."""
    out = []
    for i, value in enumerate(col.tolist()):
        if not isinstance(value, str):
            what = "no text (the value is missing)" if col.isna().iloc[i] else f"a {type(value).__name__}, not text"
            raise DataError(f"data.options.text: column '{col.name}' has {what} in data row {i + 1}; fill it in "
                            "or set data.options.dropna: true to drop rows without text.")
        value = clean_text(value) if clean else value
        if not value.strip():
            raise DataError(f"data.options.text: column '{col.name}' is empty in data row {i + 1}"
                            f"{' after cleaning' if clean else ''}; an empty text has no embedding: give it some "
                            "words or set data.options.dropna: true to drop empty texts.")
        out.append(value)
    return out


def _drop_rows(df: Any, text: str, target_cols: list[str], clean: bool) -> Any:
    """``df`` without the rows that miss a target value or whose text is missing or empty (after cleaning)."""
    col = df[text]
    has_text = col.map(lambda v: isinstance(v, str) and bool((clean_text(v) if clean else v).strip()))
    kept = df[has_text.to_numpy(bool) & df[target_cols].notna().all(axis=1).to_numpy(bool)]
    if kept.empty:
        raise DataError(f"data.options.dropna: every one of the {len(df)} rows misses its text or a target value; "
                        "no row is left to learn from.")
    return kept.reset_index(drop=True)


def _labels(specs: Mapping[str, tuple[str, TaskKind, Any]], parts: list[torch.Tensor],
            ) -> list[tuple[str, TaskKind, torch.Tensor, list[torch.Tensor | None] | None, dict[str, Any]]]:
    """Each target's name, kind, encoded values ``[n]`` (regression ``[n, 1]``), per-split masks and task
    options (see :func:`~mtml.datasets._table.encode_target`)."""
    out = []
    for name, (column, kind, values) in specs.items():
        y, labelled, extra = encode_target(name, kind, values)
        out.append((name, kind, y, split_masks(name, column, labelled, parts), extra))
    return out


def text_table(
    *, path: str, text: str, targets: Mapping[str, str | Mapping[str, Any]], dropna: bool = False,
    clean: bool = False, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
    inputs: str = "embeddings", max_length: int = 256, cache_dir: str | None = None, progress: bool = True,
) -> list[Task]:
    """One task per target column (``targets``: task name → column, or ``{column, kind}``), all on one text column.

    The rows are those of a CSV (UTF-8, header row) or Parquet file at ``path``; ``text`` names the column whose
    texts every task reads.

    Inputs: the MiniLM embeddings of the texts (``[n, 384]``, unit-RMS coordinates, cached on disk under
    ``cache_dir``, default ``$MTML_CACHE/embeddings`` or ``~/.cache/mtml/embeddings``), or with
    ``inputs="tokens"`` their token ids (``[n, tokens]``, truncated at ``max_length``) for the ``minilm``
    architecture. ``clean`` removes HTML tags, entities and printer overstrikes and collapses whitespace first.

    Targets as in ``table``: float columns default to regression (standardised with the labelled training rows),
    others to multiclass; declare ``kind: binary`` for a two-valued column. A row without a target value stays in
    every task; that task just has no label there (``Split(mask=...)``). A row without text is an error, unless
    ``dropna`` drops every row that misses its text or any target value. Several targets form the task group
    ``text_table`` (one trunk pass per batch of rows). ``seed`` draws the train/val/test split.
    """
    check_encoder_options(inputs, max_length)
    if not targets or not isinstance(targets, Mapping):
        raise ConfigError("data.options.targets: give at least one target as name → column, e.g. {sentiment: "
                          "{column: label, kind: binary}}.")
    df = read_table(Path(path), NAME)
    col = _text_column(df, text)
    specs = {name: target_column(df, name, spec) for name, spec in targets.items()}
    for name, (column, _, _) in specs.items():
        if column == text:
            raise ConfigError(f"data.options.targets.{name}: column '{column}' is the text column (data.options."
                              "text); a column cannot be both read and predicted. Predict another column.")
    if dropna:
        df = _drop_rows(df, text, [c for c, _, _ in specs.values()], clean)
        col = df[text]
        specs = {name: target_column(df, name, spec) for name, spec in targets.items()}
    texts = _texts(col, clean)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    check_splits(len(df), val_fraction, test_fraction, what=f"the text table {path}")
    parts = split_indices(len(df), fractions, torch.Generator().manual_seed(seed))
    labels = _labels(specs, parts)  # every target is checked before the (slow) encoder runs
    x = text_inputs(texts, inputs=inputs, max_length=max_length, cache_dir=cache_dir, progress=progress,
                    dataset=NAME)
    xs = [x[p].float() for p in parts]  # token ids as float once (exact below 2**24): every task holds these
    group = NAME if len(specs) > 1 else None
    tasks = []
    for name, kind, y, masks, extra in labels:
        ys = tuple(y[p] for p in parts)
        if kind is TaskKind.REGRESSION:
            ys = standardize(*ys, mask=None if masks is None else masks[0])
        tasks.append(make_task(name, kind.value, xs, ys, group=group, masks=masks, **extra))
    return tasks
