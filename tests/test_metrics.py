"""Oracle tests of mtml's metrics against scikit-learn on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from mtml.metrics import auroc, default_metrics, macro_f1

SEEDS = range(20)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(
    scores=st.lists(st.integers(-3, 3), min_size=2, max_size=40),
    labels=st.lists(st.booleans(), min_size=2, max_size=40),
)
@settings(max_examples=150, deadline=None)
def test_auroc_matches_sklearn_with_many_ties(scores: list[int], labels: list[bool]) -> None:
    n = min(len(scores), len(labels))
    s, y = np.array(scores[:n], float), np.array(labels[:n])
    ours = auroc(torch.tensor(s), torch.tensor(y))
    if y.all() or not y.any():
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_sklearn_continuous_and_quantised(seed: int) -> None:
    g = _gen(seed)
    n = int(torch.randint(5, 300, (1,), generator=g))
    y = torch.rand(n, generator=g) < 0.3
    y[0], y[1] = True, False
    scores = torch.randn(n, 1, generator=g) + y[:, None].float()
    assert auroc(scores, y.float()) == pytest.approx(roc_auc_score(y.numpy(), scores[:, 0].numpy()), abs=1e-9)
    tied = (scores * 2).round()
    assert auroc(tied, y.float()) == pytest.approx(roc_auc_score(y.numpy(), tied[:, 0].numpy()), abs=1e-9)


def test_auroc_extremes() -> None:
    y = torch.tensor([0.0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.zeros(4), y) == 0.5
    assert math.isnan(auroc(torch.randn(4), torch.ones(4)))


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed: int) -> None:
    g = _gen(seed)
    classes = int(torch.randint(2, 7, (1,), generator=g))
    n = int(torch.randint(1, 60, (1,), generator=g))
    y_true = torch.randint(0, classes, (n,), generator=g)
    y_pred = torch.where(torch.rand(n, generator=g) < 0.5, y_true, torch.randint(0, classes, (n,), generator=g))
    ours = macro_f1(y_pred, y_true, classes)
    assert ours == pytest.approx(f1_score(y_true.numpy(), y_pred.numpy(), average="macro", zero_division=0.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_metrics_match_sklearn(seed: int) -> None:
    g = _gen(seed)
    n, k = int(torch.randint(3, 100, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    y = torch.randn(n, k, generator=g, dtype=torch.float64) * 3 + 1
    pred = y + torch.randn(n, k, generator=g, dtype=torch.float64)
    m = default_metrics("regression")
    assert m["r2"](pred, y) == pytest.approx(r2_score(y.numpy(), pred.numpy()), rel=1e-9)
    assert m["mse"](pred, y) == pytest.approx(mean_squared_error(y.numpy(), pred.numpy()), rel=1e-9)
    assert m["mae"](pred, y) == pytest.approx(mean_absolute_error(y.numpy(), pred.numpy()), rel=1e-9)
    assert m["r2"].higher_is_better and not m["mse"].higher_is_better


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_metrics_match_sklearn(seed: int) -> None:
    g = _gen(seed)
    n = int(torch.randint(4, 120, (1,), generator=g))
    y = (torch.rand(n, generator=g) < 0.4).double()
    y[0], y[1] = 1.0, 0.0
    logits = (torch.randn(n, 1, generator=g, dtype=torch.float64) + 2 * y[:, None] - 1) * 2
    prob, labels = torch.sigmoid(logits[:, 0]).numpy(), (logits[:, 0] > 0).long().numpy()
    m = default_metrics("binary")
    assert m["accuracy"](logits, y) == pytest.approx(accuracy_score(y.numpy(), labels))
    assert m["macro_f1"](logits, y) == pytest.approx(f1_score(y.numpy(), labels, average="macro", zero_division=0))
    assert m["log_loss"](logits, y) == pytest.approx(log_loss(y.numpy(), prob, labels=[0, 1]), rel=1e-7)
    assert m["auroc"](logits, y) == pytest.approx(roc_auc_score(y.numpy(), logits[:, 0].numpy()))


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_metrics_match_sklearn(seed: int) -> None:
    g = _gen(seed)
    n, c = int(torch.randint(2, 100, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    logits[torch.arange(n), y] += 1.0
    prob = torch.softmax(logits, 1).numpy()
    pred = logits.argmax(1).numpy()
    m = default_metrics("multiclass")
    assert m["accuracy"](logits, y) == pytest.approx(accuracy_score(y.numpy(), pred))
    assert m["macro_f1"](logits, y) == pytest.approx(f1_score(y.numpy(), pred, average="macro", zero_division=0))
    assert m["log_loss"](logits, y) == pytest.approx(log_loss(y.numpy(), prob, labels=list(range(c))), rel=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_metrics_match_sklearn(seed: int) -> None:
    g = _gen(seed)
    n, k = int(torch.randint(2, 60, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    y = (torch.rand(n, k, generator=g) < 0.5).double()
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) + y - 0.5
    prob, pred = torch.sigmoid(logits).numpy(), (logits > 0).long().numpy()
    yn = y.numpy()
    m = default_metrics("multilabel")
    assert m["accuracy"](logits, y) == pytest.approx(float((pred == yn).mean()))
    per_label_f1 = [f1_score(yn[:, j], pred[:, j], average="macro", zero_division=0) for j in range(k)]
    assert m["macro_f1"](logits, y) == pytest.approx(float(np.mean(per_label_f1)))
    per_label_ll = [log_loss(yn[:, j], prob[:, j], labels=[0, 1]) for j in range(k)]
    assert m["log_loss"](logits, y) == pytest.approx(float(np.mean(per_label_ll)), rel=1e-7)


def test_macro_f1_edge_cases() -> None:
    assert macro_f1(torch.tensor([]), torch.tensor([]), 3) == 0.0
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1]), 3) == 1.0
    assert macro_f1(torch.tensor([0, 0]), torch.tensor([1, 1]), 2) == 0.0


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        default_metrics("ranking")


def test_r2_constant_target_column_matches_sklearn() -> None:
    y = torch.tensor([[1.0, 0.5], [2.0, 0.5], [4.0, 0.5]], dtype=torch.float64)
    r2 = default_metrics("regression")["r2"]
    for pred in (y + 0.3, y.clone(), torch.zeros_like(y)):
        assert r2(pred, y) == pytest.approx(r2_score(y.numpy(), pred.numpy()))
