"""Metrics computed from model outputs (logits or predictions) and targets.

Every function takes ``pred`` and ``y`` tensors of one split and returns a Python float. Shapes follow
:class:`mtml.tasks.Task`: regression ``pred, y: [n, outputs]``; binary ``pred: [n, 1]`` logits, ``y: [n]`` in
{0, 1}; multiclass ``pred: [n, classes]`` logits, ``y: [n]`` integer labels; multilabel ``pred, y: [n, labels]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Metric", "auroc", "delta_m", "macro_f1"]


#: ``segmented(pred, y, owner, m) -> [m]``: the metric of each of m tasks whose rows are concatenated, row i
#: belonging to task ``owner[i]`` (every task with at least one row)
Segmented = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class Metric:
    """A named metric and its direction (``higher_is_better``); ``segmented``, when given, computes it for many
    tasks' rows at once (equal to ``fn`` on each task's rows, up to summation order)."""

    fn: Callable[[Tensor, Tensor], float]
    higher_is_better: bool
    segmented: Segmented | None = None

    def __call__(self, pred: Tensor, y: Tensor) -> float:
        return self.fn(pred, y)


def _segment_sum(values: Tensor, owner: Tensor, m: int) -> Tensor:
    return values.new_zeros((m, *values.shape[1:])).index_add(0, owner, values)


def _segment_mean(values: Tensor, owner: Tensor, m: int) -> Tensor:
    rows = _segment_sum(values.new_ones(values.shape[0]), owner, m)
    return _segment_sum(values, owner, m) / rows.reshape(-1, *[1] * (values.dim() - 1))


def mse(pred: Tensor, y: Tensor) -> float:
    return float(F.mse_loss(pred, y))


def _mse_segmented(pred: Tensor, y: Tensor, owner: Tensor, m: int) -> Tensor:
    return _segment_mean(((pred - y) ** 2).mean(1), owner, m)


def mae(pred: Tensor, y: Tensor) -> float:
    return float(F.l1_loss(pred, y))


def _mae_segmented(pred: Tensor, y: Tensor, owner: Tensor, m: int) -> Tensor:
    return _segment_mean((pred - y).abs().mean(1), owner, m)


def _r2_score(ss_res: Tensor, ss_tot: Tensor) -> Tensor:
    # a constant target column scores 1 if predicted exactly, else 0 (as scikit-learn), not -1e12·ss_res
    constant = ss_tot == 0
    score = torch.where(constant, (ss_res == 0).to(ss_res.dtype), 1 - ss_res / ss_tot.masked_fill(constant, 1.0))
    return score.mean(-1)


def r2(pred: Tensor, y: Tensor) -> float:
    """Coefficient of determination, averaged over output columns."""
    return float(_r2_score(((y - pred) ** 2).sum(0), ((y - y.mean(0)) ** 2).sum(0)))


def _r2_segmented(pred: Tensor, y: Tensor, owner: Tensor, m: int) -> Tensor:
    centre = _segment_mean(y, owner, m)[owner]
    return _r2_score(_segment_sum((y - pred) ** 2, owner, m), _segment_sum((y - centre) ** 2, owner, m))


def macro_f1(labels_pred: Tensor, labels_true: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes present in prediction or truth."""
    scores = []
    for c in range(num_classes):
        tp = ((labels_pred == c) & (labels_true == c)).sum().item()
        fp = ((labels_pred == c) & (labels_true != c)).sum().item()
        fn = ((labels_pred != c) & (labels_true == c)).sum().item()
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(scores) / len(scores)) if scores else 0.0


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann–Whitney U) formula, ties counted half.

    Returns NaN when only one class is present.
    """
    scores = scores.reshape(-1).double()
    labels = labels.reshape(-1).bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based mean rank of each tie block
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def delta_m(values: Mapping[str, float], single: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Δm in percent, the mean relative change against single-task models (lower is better):
    ``Δm = 100/T · Σᵢ (−1)^{lᵢ} (Mᵢ − M_single,ᵢ) / M_single,ᵢ`` with ``lᵢ = 1`` when higher is better.

    Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; Vandenhende et al.,
    "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021. Each mapping is keyed by the same
    (task, metric) names; ``single`` holds the single-task values, none of them zero.
    """
    if set(values) != set(single) or set(single) != set(higher_is_better) or not single:
        raise ValueError(f"delta_m needs the same non-empty keys in all three mappings; got {sorted(values)}, "
                         f"{sorted(single)} and {sorted(higher_is_better)}")
    terms = []
    for key, base in single.items():
        if base == 0:
            raise ValueError(f"delta_m: the single-task value of {key!r} is 0, so its relative change is undefined")
        sign = -1.0 if higher_is_better[key] else 1.0
        terms.append(sign * (values[key] - base) / base)
    return 100.0 * sum(terms) / len(terms)


def _binary_metrics() -> dict[str, Metric]:
    def acc(p: Tensor, y: Tensor) -> float:
        return float(((p.reshape(-1) > 0).float() == y).float().mean())

    def f1(p: Tensor, y: Tensor) -> float:
        return macro_f1((p.reshape(-1) > 0).long(), y.long(), 2)

    def logloss(p: Tensor, y: Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(p.reshape(-1), y))

    def auc(p: Tensor, y: Tensor) -> float:
        return auroc(p, y)

    return {
        "accuracy": Metric(acc, True),
        "macro_f1": Metric(f1, True),
        "log_loss": Metric(logloss, False),
        "auroc": Metric(auc, True),
    }


def _multiclass_metrics() -> dict[str, Metric]:
    def acc(p: Tensor, y: Tensor) -> float:
        return float((p.argmax(-1) == y).float().mean())

    def f1(p: Tensor, y: Tensor) -> float:
        return macro_f1(p.argmax(-1), y, p.shape[-1])

    def logloss(p: Tensor, y: Tensor) -> float:
        return float(F.cross_entropy(p, y))

    return {"accuracy": Metric(acc, True), "macro_f1": Metric(f1, True), "log_loss": Metric(logloss, False)}


def _multilabel_metrics() -> dict[str, Metric]:
    def acc(p: Tensor, y: Tensor) -> float:  # label-wise (Hamming) accuracy
        return float(((p > 0).float() == y).float().mean())

    def f1(p: Tensor, y: Tensor) -> float:
        per_label = [macro_f1((p[:, j] > 0).long(), y[:, j].long(), 2) for j in range(y.shape[1])]
        return float(sum(per_label) / len(per_label))

    def logloss(p: Tensor, y: Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(p, y))

    return {"accuracy": Metric(acc, True), "macro_f1": Metric(f1, True), "log_loss": Metric(logloss, False)}


def default_metrics(kind: str) -> dict[str, Metric]:
    """The default metrics of a task kind (``regression``, ``binary``, ``multiclass``, ``multilabel``)."""
    if kind == "regression":
        return {"mse": Metric(mse, False, _mse_segmented), "mae": Metric(mae, False, _mae_segmented),
                "r2": Metric(r2, True, _r2_segmented)}
    if kind == "binary":
        return _binary_metrics()
    if kind == "multiclass":
        return _multiclass_metrics()
    if kind == "multilabel":
        return _multilabel_metrics()
    raise ValueError(f"unknown task kind {kind!r}")
