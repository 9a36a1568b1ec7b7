"""Task validation (every error path), output-width inference, defaults, overrides and ``.to()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtml.errors import DataError, MtmlError
from mtml.metrics import Metric
from mtml.tasks import Split, Task, TaskKind


def _x(n: int = 6, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _labels(n: int = 6, classes: int = 3) -> torch.Tensor:
    return torch.arange(n) % classes


# -- error paths --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["has space", "", "a/b", "dot.name", "é", 3])
def test_bad_name(name: object) -> None:
    with pytest.raises(DataError, match=r"task name .* is not valid"):
        Task(name, "regression", Split(_x(), torch.zeros(6)))  # type: ignore[arg-type]


def test_valid_names() -> None:
    for name in ("a", "Task_1", "school-1224", "X9"):
        assert Task(name, "regression", Split(_x(), torch.zeros(6))).name == name


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(DataError) as info:
        Task("t", "regresion", Split(_x(), torch.zeros(6)))  # type: ignore[arg-type]
    msg = str(info.value)
    assert "'t'" in msg and "regresion" in msg
    for kind in TaskKind:
        assert kind.value in msg


def test_kind_string_is_normalised_to_enum() -> None:
    t = Task("t", "binary", Split(_x(), torch.tensor([0, 1, 0, 1, 1, 0])))
    assert t.kind is TaskKind.BINARY


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_row_mismatch_names_task_split_and_counts(split: str) -> None:
    good = Split(_x(), torch.zeros(6))
    bad = Split(_x(6), torch.zeros(5))
    kwargs = {"train": good, "val": good, "test": good, split: bad}
    with pytest.raises(DataError) as info:
        Task("rows", "regression", **kwargs)
    msg = str(info.value)
    assert "'rows'" in msg and f"{split} split" in msg and "6 rows" in msg and "5" in msg


def test_one_dimensional_x_is_rejected_with_fix() -> None:
    with pytest.raises(DataError, match="unsqueeze"):
        Task("t", "regression", Split(torch.zeros(6), torch.zeros(6)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row", [0, 4])
def test_non_finite_x_names_the_row(bad: float, row: int) -> None:
    x = _x()
    x[row, 1] = bad
    with pytest.raises(DataError) as info:
        Task("fin", "regression", Split(torch.zeros(2, 3), torch.zeros(2)), val=Split(x, torch.zeros(6)))
    msg = str(info.value)
    assert "'fin'" in msg and "val split" in msg and ": x" in msg and f"row {row}" in msg


@pytest.mark.parametrize("kind", ["regression", "binary", "multilabel"])
def test_non_finite_y_names_the_row(kind: str) -> None:
    y = torch.zeros(6, 2) if kind != "binary" else torch.zeros(6)
    y[3] = float("nan")
    with pytest.raises(DataError) as info:
        Task("fin", kind, Split(_x(), y))
    msg = str(info.value)
    assert ": y" in msg and "row 3" in msg and "train split" in msg


def test_nan_multiclass_label_is_rejected() -> None:
    y = torch.tensor([0.0, 1.0, float("nan"), 2.0, 0.0, 1.0])
    with pytest.raises(DataError, match="whole numbers"):
        Task("mc", "multiclass", Split(_x(), y))


def test_fractional_multiclass_label_is_rejected() -> None:
    with pytest.raises(DataError, match="whole numbers"):
        Task("mc", "multiclass", Split(_x(), torch.tensor([0.0, 1.5, 2.0, 0.0, 1.0, 2.0])))


def test_multiclass_label_above_num_outputs() -> None:
    with pytest.raises(DataError) as info:
        Task("mc", "multiclass", Split(_x(), torch.tensor([0, 1, 2, 3, 0, 1])), num_outputs=3)
    msg = str(info.value)
    assert "[0, 3]" in msg and "num_outputs=3" in msg and "[0, 2]" in msg


def test_negative_multiclass_label() -> None:
    with pytest.raises(DataError, match=r"labels span \[-1, 2\]"):
        Task("mc", "multiclass", Split(_x(), torch.tensor([0, -1, 2, 1, 0, 1])))


def test_multiclass_label_out_of_range_in_test_split() -> None:
    with pytest.raises(DataError, match="test split"):
        Task("mc", "multiclass", Split(_x(), _labels()), test=Split(_x(2), torch.tensor([0, 7])), num_outputs=3)


@pytest.mark.parametrize("value", [2.0, -1.0, 0.5])
def test_binary_targets_must_be_zero_or_one(value: float) -> None:
    y = torch.tensor([0.0, 1.0, value, 1.0, 0.0, 1.0])
    with pytest.raises(DataError) as info:
        Task("b", "binary", Split(_x(), y))
    assert "0 or 1" in str(info.value) and f"{value:g}" in str(info.value)


def test_multilabel_targets_must_be_zero_or_one() -> None:
    y = torch.zeros(6, 3)
    y[2, 1] = 3.0
    with pytest.raises(DataError, match="multilabel targets must be 0 or 1, found 3"):
        Task("ml", "multilabel", Split(_x(), y))


@pytest.mark.parametrize(("kind", "y"), [
    ("binary", torch.zeros(6, 2)),
    ("multiclass", torch.zeros(6, 2, dtype=torch.long)),
    ("multilabel", torch.zeros(6)),
    ("regression", torch.zeros(6, 2, 2)),
])
def test_target_rank_is_checked(kind: str, y: torch.Tensor) -> None:
    with pytest.raises(DataError, match="targets must have shape"):
        Task("t", kind, Split(_x(), y))


def test_split_feature_shape_mismatch() -> None:
    with pytest.raises(DataError) as info:
        Task("t", "regression", Split(_x(6, 3), torch.zeros(6)), val=Split(_x(4, 5), torch.zeros(4)))
    msg = str(info.value)
    assert "val split" in msg and "(5,)" in msg and "(3,)" in msg


def test_regression_output_width_mismatch_between_splits() -> None:
    with pytest.raises(DataError, match="columns"):
        Task("t", "regression", Split(_x(), torch.zeros(6, 2)), val=Split(_x(3), torch.zeros(3, 3)))


def test_num_outputs_mismatch_for_regression() -> None:
    with pytest.raises(DataError, match="num_outputs=3 but the targets have 2 columns"):
        Task("t", "regression", Split(_x(), torch.zeros(6, 2)), num_outputs=3)


@pytest.mark.parametrize("kind", ["regression", "binary", "multiclass", "multilabel"])
def test_empty_train_split(kind: str) -> None:
    y = {"regression": torch.zeros(0), "binary": torch.zeros(0), "multiclass": torch.zeros(0, dtype=torch.long),
         "multilabel": torch.zeros(0, 2)}[kind]
    with pytest.raises(DataError, match="train split is empty"):
        Task("t", kind, Split(torch.zeros(0, 3), y))


def test_split_must_be_a_split() -> None:
    with pytest.raises(DataError, match=r"expected mtml.Split"):
        Task("t", "regression", (_x(), torch.zeros(6)))  # type: ignore[arg-type]


def test_errors_are_mtml_errors_and_value_errors() -> None:
    with pytest.raises(MtmlError):
        Task("t", "binary", Split(_x(), torch.full((6,), 2.0)))
    with pytest.raises(ValueError):
        Task("t", "binary", Split(_x(), torch.full((6,), 2.0)))


def test_missing_split_lookup() -> None:
    t = Task("t", "regression", Split(_x(), torch.zeros(6)))
    assert t.split("train") is t.train
    with pytest.raises(DataError, match="no 'val' split; available: train"):
        t.split("val")
    with pytest.raises(DataError, match="no 'bogus' split"):
        t.split("bogus")


# -- inference and normalisation ----------------------------------------------------------------------------
def test_num_outputs_inferred_per_kind() -> None:
    assert Task("r", "regression", Split(_x(), torch.zeros(6))).num_outputs == 1
    assert Task("r", "regression", Split(_x(), torch.zeros(6, 4))).num_outputs == 4
    assert Task("b", "binary", Split(_x(), torch.tensor([0, 1, 1, 0, 1, 0]))).num_outputs == 1
    assert Task("m", "multiclass", Split(_x(), _labels(6, 3))).num_outputs == 3
    assert Task("l", "multilabel", Split(_x(), torch.zeros(6, 5))).num_outputs == 5


def test_multiclass_infers_classes_from_every_split() -> None:
    t = Task("m", "multiclass", Split(_x(), torch.tensor([0, 1, 0, 1, 0, 1])),
             val=Split(_x(2), torch.tensor([0, 1])), test=Split(_x(2), torch.tensor([4, 0])))
    assert t.num_outputs == 5


def test_multiclass_num_outputs_may_exceed_seen_labels() -> None:
    t = Task("m", "multiclass", Split(_x(), torch.tensor([0, 1, 0, 1, 0, 1])), num_outputs=4)
    assert t.num_outputs == 4


def test_normalisation_dtypes_and_shapes() -> None:
    reg = Task("r", "regression", Split(torch.arange(12).reshape(6, 2), torch.arange(6)))
    assert reg.train.x.dtype == torch.float32 and reg.train.y.shape == (6, 1)
    assert reg.train.y.dtype == torch.float32
    mc = Task("m", "multiclass", Split(_x(), torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])))
    assert mc.train.y.dtype == torch.long
    b = Task("b", "binary", Split(_x(), torch.tensor([True, False, True, False, True, False])))
    assert b.train.y.dtype == torch.float32
    r64 = Task("r", "regression", Split(_x().double(), torch.zeros(6, dtype=torch.float32)))
    assert r64.train.y.dtype == torch.float64
    img = Task("img", "regression", Split(torch.zeros(6, 2, 3, 3), torch.zeros(6)))
    assert img.input_shape == (2, 3, 3)


def test_default_losses_per_kind() -> None:
    g = torch.Generator().manual_seed(1)
    x = _x()
    reg = Task("r", "regression", Split(x, torch.randn(6, 2, generator=g)))
    pred = torch.randn(6, 2, generator=g)
    assert torch.allclose(reg.compute_loss(pred, reg.train.y), F.mse_loss(pred, reg.train.y))

    yb = torch.tensor([0.0, 1, 1, 0, 1, 0])
    b = Task("b", "binary", Split(x, yb))
    logit = torch.randn(6, 1, generator=g)
    p = torch.sigmoid(logit[:, 0])
    manual = -(yb * p.log() + (1 - yb) * (1 - p).log()).mean()
    assert torch.allclose(b.compute_loss(logit, yb), manual, atol=1e-6)

    mc = Task("m", "multiclass", Split(x, _labels()))
    logits = torch.randn(6, 3, generator=g)
    manual = -torch.log_softmax(logits, 1)[torch.arange(6), mc.train.y].mean()
    assert torch.allclose(mc.compute_loss(logits, mc.train.y), manual, atol=1e-6)

    yl = (torch.rand(6, 4, generator=g) > 0.5).float()
    ml = Task("l", "multilabel", Split(x, yl))
    logits = torch.randn(6, 4, generator=g)
    p = torch.sigmoid(logits)
    manual = -(yl * p.log() + (1 - yl) * (1 - p).log()).mean()
    assert torch.allclose(ml.compute_loss(logits, yl), manual, atol=1e-6)


@pytest.mark.parametrize(("kind", "metrics", "primary"), [
    ("regression", {"mse", "mae", "r2"}, "mse"),
    ("binary", {"accuracy", "macro_f1", "log_loss", "auroc"}, "accuracy"),
    ("multiclass", {"accuracy", "macro_f1", "log_loss"}, "accuracy"),
    ("multilabel", {"accuracy", "macro_f1", "log_loss"}, "accuracy"),
])
def test_default_metrics_per_kind(kind: str, metrics: set[str], primary: str) -> None:
    y = {"regression": torch.zeros(6), "binary": torch.tensor([0, 1, 0, 1, 0, 1]), "multiclass": _labels(),
         "multilabel": torch.eye(6)[:, :2]}[kind]
    t = Task("t", kind, Split(_x(), y))
    assert set(t.metrics) == metrics
    assert t.primary_metric == primary
    pred = torch.zeros(6, t.num_outputs)
    out = t.compute_metrics(pred, t.train.y)
    assert set(out) == metrics | {"loss"}
    assert out["loss"] == pytest.approx(float(t.compute_loss(pred, t.train.y)))


def test_loss_and_metric_overrides() -> None:
    def l1(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (pred - y).abs().sum()

    maxerr = Metric(lambda p, y: float((p - y).abs().max()), higher_is_better=False)
    t = Task("t", "regression", Split(_x(), torch.zeros(6)), loss=l1, metrics={"maxerr": maxerr})
    pred = torch.arange(6.0).reshape(6, 1)
    assert float(t.compute_loss(pred, t.train.y)) == 15.0
    assert t.compute_metrics(pred, t.train.y) == {"maxerr": 5.0, "loss": 15.0}
    assert t.primary_metric == "maxerr"


def test_to_returns_equal_copy_keeping_overrides() -> None:
    def loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (p - y).pow(4).mean()

    metrics = {"m": Metric(lambda p, y: 0.0, True)}
    t = Task("t", "multiclass", Split(_x(), _labels()), val=Split(_x(3), torch.tensor([0, 1, 2])),
             num_outputs=5, loss=loss, metrics=metrics)
    moved = t.to("cpu")
    assert moved is not t
    assert moved.name == t.name and moved.kind is t.kind and moved.num_outputs == 5
    assert moved.loss is loss and dict(moved.metrics) == metrics
    assert moved.test is None
    assert torch.equal(moved.train.x, t.train.x) and torch.equal(moved.val.y, t.val.y)
    assert moved.train.x.device.type == "cpu"
    s = t.train.to(torch.device("cpu"))
    assert isinstance(s, Split) and len(s) == 6


def test_task_is_frozen() -> None:
    t = Task("t", "regression", Split(_x(), torch.zeros(6)))
    with pytest.raises(AttributeError):
        t.name = "u"  # type: ignore[misc]


def test_scalar_target_is_a_data_error() -> None:
    with pytest.raises(DataError, match="y is a scalar"):
        Task("t", "regression", Split(torch.zeros(1, 3), torch.tensor(1.0)))


def test_tasks_and_splits_compare_by_identity_without_raising() -> None:
    """`==` used to compare the tensors field by field and raise "Boolean value of Tensor ... is ambiguous"."""
    a = Split(torch.randn(4, 2), torch.randn(4, 1))
    b = Split(torch.randn(4, 2), torch.randn(4, 1))
    assert a == a and a != b and len({a, b, a}) == 2
    t = Task("t", TaskKind.REGRESSION, a, b, b)
    u = Task("t", TaskKind.REGRESSION, b, a, a)
    assert t == t and t != u and t in [u, t] and len({t, u}) == 2
