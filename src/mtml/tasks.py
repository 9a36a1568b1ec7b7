"""Tasks: named learning problems with their data splits, kind, loss and metrics.

A :class:`Task` validates itself when built, so shape, label-range and NaN problems surface with the task's name,
the field and a fix, before any training starts.

Target conventions (``n`` examples):

============  ======================  ==========================  ====================
kind          ``y``                   model output                default loss
============  ======================  ==========================  ====================
regression    float ``[n, outputs]``  ``[n, outputs]``            mean squared error
binary        float ``[n]`` in {0,1}  ``[n, 1]`` logit            binary cross-entropy
multiclass    long ``[n]`` in [0, C)  ``[n, C]`` logits           cross-entropy
multilabel    float ``[n, L]`` {0,1}  ``[n, L]`` logits           mean binary CE
============  ======================  ==========================  ====================

A 1-D regression target is reshaped to ``[n, 1]``.

Missing labels: a split may carry ``mask: bool [n]`` (True = labelled). Unlabelled rows keep their place (tasks
on shared rows see the same ``x``) but count in no loss and no metric; their ``y`` is ignored (NaN allowed) and
stored as 0. Tasks that share their rows name a common ``group`` (see :mod:`mtml.groups`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.errors import DataError
from mtml.metrics import Metric, default_metrics

__all__ = ["Split", "Task", "TaskKind"]

LossFn = Callable[[Tensor, Tensor], Tensor]
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
SPLITS = ("train", "val", "test")


class TaskKind(str, Enum):
    REGRESSION = "regression"
    BINARY = "binary"
    MULTICLASS = "multiclass"
    MULTILABEL = "multilabel"


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare (and hash) by identity
class Split:
    """One split of a task: inputs ``x: [n, *input_shape]``, targets ``y`` (see module docstring) and optionally
    ``mask: bool [n]``, True where the row has a label (None: every row has one)."""

    x: Tensor
    y: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labelled(self) -> int:
        """Rows with a label."""
        return len(self) if self.mask is None else int(self.mask.sum())

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device), None if self.mask is None else self.mask.to(device))


def _default_loss(kind: TaskKind) -> LossFn:
    if kind is TaskKind.REGRESSION:
        return F.mse_loss
    if kind is TaskKind.MULTICLASS:
        return F.cross_entropy
    if kind is TaskKind.BINARY:
        return lambda pred, y: F.binary_cross_entropy_with_logits(pred.reshape(-1), y)
    return F.binary_cross_entropy_with_logits


@dataclass(frozen=True, eq=False)  # by identity, like its splits (`==` on tensors has no single truth value)
class Task:
    """A named learning problem.

    Args:
        name: letters, digits, ``_`` and ``-`` (it keys the task's head in the model).
        kind: a :class:`TaskKind` or its value: ``"regression"``, ``"binary"``, ``"multiclass"``, ``"multilabel"``.
        train, val, test: data splits; ``val`` drives early stopping, ``test`` the reported metrics.
        num_outputs: model output width; inferred when omitted (classes = largest label + 1, so pass it when a
            class may be absent from the training split).
        loss: ``loss(pred, y) -> scalar`` overriding the kind's default.
        metrics: name → :class:`~mtml.metrics.Metric` overriding the kind's defaults.
        group: the name of the task group whose rows this task shares (same ``x`` in every split, one target
            column per task); None for a task with rows of its own. See :func:`mtml.groups.task_groups`.
    """

    name: str
    kind: TaskKind
    train: Split
    val: Split | None = None
    test: Split | None = None
    num_outputs: int = 0
    loss: LossFn | None = field(default=None, compare=False)
    metrics: Mapping[str, Metric] = field(default_factory=dict, compare=False)
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise DataError(
                f"task name {self.name!r} is not valid: use letters, digits, '_' and '-' only (it keys the "
                "task's head in the model)."
            )
        try:
            kind = TaskKind(self.kind)
        except ValueError:
            valid = ", ".join(k.value for k in TaskKind)
            raise DataError(f"task '{self.name}': kind {self.kind!r} is not one of {valid}.") from None
        object.__setattr__(self, "kind", kind)
        if self.group is not None and (not isinstance(self.group, str) or not _NAME.match(self.group)):
            raise DataError(f"task '{self.name}': group {self.group!r} is not valid: use letters, digits, '_' and "
                            "'-' only.")
        for split in SPLITS:
            value = getattr(self, split)
            if value is not None:
                object.__setattr__(self, split, self._normalise(split, value))
        if self.train is None or len(self.train) == 0:
            raise DataError(f"task '{self.name}': the train split is empty; give it at least one example.")
        width = self._infer_outputs()
        if self.num_outputs and self.num_outputs != width and kind is not TaskKind.MULTICLASS:
            raise DataError(
                f"task '{self.name}': num_outputs={self.num_outputs} but the targets have {width} columns; "
                "omit num_outputs or fix the targets."
            )
        object.__setattr__(self, "num_outputs", self.num_outputs or width)
        for split in SPLITS:
            value = getattr(self, split)
            if value is not None:
                self._check_labels(split, value)
        if not self.metrics:
            object.__setattr__(self, "metrics", default_metrics(kind.value))

    # -- validation -------------------------------------------------------------------------------------
    def _normalise(self, split: str, s: Split) -> Split:
        where = f"task '{self.name}', {split} split"
        if not isinstance(s, Split):
            raise DataError(f"{where}: expected mtml.Split(x, y), got {type(s).__name__}.")
        x, y = torch.as_tensor(s.x), torch.as_tensor(s.y)
        if x.ndim < 2:
            raise DataError(f"{where}: x must be [examples, features...], got shape {tuple(x.shape)}; "
                            "reshape a single feature with x.unsqueeze(-1).")
        if y.ndim == 0:
            raise DataError(f"{where}: y is a scalar; give one target per row of x (shape [{x.shape[0]}, ...]).")
        if y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}; give one target per row.")
        x = x.float() if not x.is_floating_point() else x
        _check_finite(x, f"{where}: x")
        mask = _check_mask(s.mask, x.shape[0], where)
        if mask is not None:  # unlabelled rows: any y (NaN included) becomes 0, so it can never leak into a number
            keep = mask.reshape(-1, *([1] * (y.ndim - 1)))
            y = torch.where(keep, y, torch.zeros((), dtype=y.dtype))
        if self.kind in (TaskKind.REGRESSION, TaskKind.BINARY, TaskKind.MULTILABEL):
            y = y.to(x.dtype) if y.is_floating_point() else y.to(torch.get_default_dtype())
            _check_finite(y, f"{where}: y")
        if self.kind is TaskKind.REGRESSION and y.ndim == 1:
            y = y.unsqueeze(-1)
        expect = {TaskKind.REGRESSION: 2, TaskKind.BINARY: 1, TaskKind.MULTICLASS: 1, TaskKind.MULTILABEL: 2}
        if y.ndim != expect[self.kind]:
            shape = "[n]" if expect[self.kind] == 1 else "[n, outputs]"
            raise DataError(f"{where}: {self.kind.value} targets must have shape {shape}, got {tuple(y.shape)}.")
        if self.kind is TaskKind.MULTICLASS:
            if y.is_floating_point() and (not torch.isfinite(y).all() or (y != y.round()).any()):
                raise DataError(f"{where}: multiclass labels must be whole numbers (class indices), "
                                "with no NaN; map class names to 0..C-1 first.")
            y = y.long()
        return Split(x, y, mask)

    def _infer_outputs(self) -> int:
        y = self.train.y
        if self.kind is TaskKind.MULTICLASS:
            top = max(int(s.y.max()) for s in (self.train, self.val, self.test) if s is not None and len(s))
            return max(self.num_outputs, top + 1)  # unlabelled rows hold 0, which adds no class
        return 1 if self.kind is TaskKind.BINARY else int(y.shape[1])

    def _check_labels(self, split: str, s: Split) -> None:
        where = f"task '{self.name}', {split} split"
        if s.x.shape[1:] != self.train.x.shape[1:]:
            raise DataError(f"{where}: x has feature shape {tuple(s.x.shape[1:])} but the train split has "
                            f"{tuple(self.train.x.shape[1:])}; all splits of a task share one input shape.")
        if self.kind is TaskKind.MULTICLASS and len(s):
            lo, hi = int(s.y.min()), int(s.y.max())
            if lo < 0 or hi >= self.num_outputs:
                raise DataError(f"{where}: labels span [{lo}, {hi}] but num_outputs={self.num_outputs}; labels "
                                f"must lie in [0, {self.num_outputs - 1}]. Remap the labels or raise num_outputs.")
        if self.kind in (TaskKind.BINARY, TaskKind.MULTILABEL):
            bad = ~((s.y == 0) | (s.y == 1))
            if bad.any():
                value = float(s.y[bad][0])
                raise DataError(f"{where}: {self.kind.value} targets must be 0 or 1, found {value:g}; "
                                "threshold or re-encode the targets.")
        if self.kind is TaskKind.REGRESSION and s.y.shape[1] != self.num_outputs:
            raise DataError(f"{where}: y has {s.y.shape[1]} columns, the train split {self.num_outputs}.")

    # -- use --------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(features,)`` or ``(channels, height, width)``."""
        return tuple(self.train.x.shape[1:])

    def split(self, name: str) -> Split:
        value = getattr(self, name, None) if name in SPLITS else None
        if value is None:
            raise DataError(f"task '{self.name}' has no '{name}' split; available: "
                            f"{', '.join(s for s in SPLITS if getattr(self, s) is not None)}.")
        return value

    def compute_loss(self, pred: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar loss of ``pred`` (model output) against targets ``y``, over the rows ``mask`` marks labelled
        (every row when None). With no labelled row the loss is an exact 0 that still depends on ``pred``."""
        fn = self.loss or _default_loss(self.kind)
        if mask is not None:
            if not bool(mask.any()):
                return pred.sum() * 0.0
            pred, y = pred[mask], y[mask]
        return fn(pred, y)

    def compute_metrics(self, pred: Tensor, y: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Every metric of this task on one split (its labelled rows), plus ``loss``."""
        with torch.no_grad():
            if mask is not None:
                pred, y = pred[mask], y[mask]
            out = {name: m(pred, y) for name, m in self.metrics.items()}
            out["loss"] = float(self.compute_loss(pred, y))
        return out

    @property
    def primary_metric(self) -> str:
        """The metric tables lead with: ``mse`` for regression, ``accuracy`` otherwise (if present)."""
        want = "mse" if self.kind is TaskKind.REGRESSION else "accuracy"
        return want if want in self.metrics else next(iter(self.metrics))

    def to(self, device: torch.device | str) -> Task:
        """A copy of this task with every split on ``device``.

        Moving tensors cannot make valid data invalid, so the copy is not validated again.
        """
        moved = copy.copy(self)
        for name in SPLITS:
            split = getattr(self, name)
            if split is not None:
                object.__setattr__(moved, name, split.to(device))
        return moved


def _check_mask(mask: Tensor | None, n: int, where: str) -> Tensor | None:
    """``mask`` as a bool ``[n]`` tensor (None when every row is labelled), or a :class:`DataError`."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise DataError(f"{where}: mask must be booleans (True = labelled), got dtype {mask.dtype}; pass "
                            "mask=~torch.isnan(y) or a 0/1 integer tensor.")
        mask = mask.bool()
    if mask.shape != (n,):
        raise DataError(f"{where}: mask has shape {tuple(mask.shape)}, but x has {n} rows; give one flag per row.")
    if not bool(mask.any()):
        raise DataError(f"{where}: every label is missing (mask is all False); give the task labelled rows in this "
                        "split or leave the task out.")
    return None if bool(mask.all()) else mask


def _check_finite(t: Tensor, where: str) -> None:
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bad.any():
            row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0])
            raise DataError(f"{where} has {int(bad.sum())} NaN/inf values (first in row {row}); drop or impute "
                            "those rows before building the Task.")
