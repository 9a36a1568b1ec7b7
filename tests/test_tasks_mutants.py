"""Behaviour of :mod:`mtml.tasks` that the mutation run (benchmarks/mutation_score.py) found untested: missing-label
masks on every target kind, the all-unlabelled loss, task groups, shape messages and ``Task.to``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtml.errors import DataError
from mtml.tasks import Split, Task


def _x(n: int = 6, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


MASK = torch.tensor([True, False, True, True, False, True])


@pytest.mark.parametrize(
    ("kind", "y", "shape"),
    [
        ("multiclass", torch.tensor([0, 7, 2, 1, -4, 0]), (6,)),
        ("binary", torch.tensor([1.0, float("nan"), 0.0, 1.0, 5.0, 0.0]), (6,)),
        ("multilabel", torch.tensor([[1.0, 0], [9, 9], [0, 1], [1, 1], [float("nan"), 2], [0, 0]]), (6, 2)),
        ("regression", torch.tensor([0.5, float("nan"), -1.0, 2.0, float("inf"), 3.0]), (6, 1)),
    ],
)
def test_a_mask_zeroes_unlabelled_targets_and_keeps_the_target_shape(kind: str, y: torch.Tensor,
                                                                     shape: tuple[int, ...]) -> None:
    task = Task("t", kind, Split(_x(), y, MASK))
    got = task.train.y
    assert tuple(got.shape) == shape
    assert torch.equal(got[~MASK], torch.zeros_like(got[~MASK]))  # garbage (NaN, out of range) became 0
    assert torch.equal(got[MASK].reshape(-1).double(), y[MASK].reshape(-1).double())
    assert torch.equal(task.train.mask, MASK)
    assert task.train.labelled == 4


def test_an_integer_zero_one_mask_is_accepted_as_booleans() -> None:
    task = Task("t", "multiclass", Split(_x(), torch.tensor([0, 1, 2, 0, 1, 2]), MASK.long()))
    assert task.train.mask is not None and task.train.mask.dtype == torch.bool
    assert torch.equal(task.train.mask, MASK)


@pytest.mark.parametrize("bad", [[1, 0, 2, 1, 0, 1], [1, 0, -1, 1, 0, 1]])
def test_an_integer_mask_outside_zero_one_is_refused(bad: list[int]) -> None:
    with pytest.raises(DataError, match=r"mask must be booleans .* 0/1 integer tensor"):
        Task("t", "multiclass", Split(_x(), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor(bad)))


def test_the_loss_over_no_labelled_row_is_an_exact_zero_that_still_depends_on_pred() -> None:
    task = Task("t", "regression", Split(_x(), torch.ones(6)))
    pred = torch.full((6, 1), 3.0, requires_grad=True)
    loss = task.compute_loss(pred, torch.zeros(6, 1), torch.zeros(6, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros(6, 1))


def test_the_masked_loss_is_the_loss_of_the_labelled_rows_only() -> None:
    task = Task("t", "regression", Split(_x(), torch.ones(6)))
    pred, y = torch.arange(6.0).reshape(6, 1), torch.zeros(6, 1)
    assert torch.allclose(task.compute_loss(pred, y, MASK), F.mse_loss(pred[MASK], y[MASK]))


@pytest.mark.parametrize("group", ["rows", "School_1", "g-2"])
def test_a_valid_group_name_is_kept(group: str) -> None:
    assert Task("t", "regression", Split(_x(), torch.ones(6)), group=group).group == group


@pytest.mark.parametrize("group", ["has space", "", "a/b", 3])
def test_an_invalid_group_name_is_refused_in_one_line(group: object) -> None:
    with pytest.raises(DataError, match=r"task 't': group .* is not valid: use letters, digits"):
        Task("t", "regression", Split(_x(), torch.ones(6)), group=group)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "y", "shape"),
    [("binary", torch.zeros(6, 2), r"\[n\], got \(6, 2\)"), ("multiclass", torch.zeros(6, 2), r"\[n\], got"),
     ("regression", torch.zeros(6, 2, 2), r"\[n, outputs\], got \(6, 2, 2\)"),
     ("multilabel", torch.zeros(6), r"\[n, outputs\], got \(6,\)")],
)
def test_a_target_of_the_wrong_rank_names_the_shape_the_kind_wants(kind: str, y: torch.Tensor, shape: str) -> None:
    with pytest.raises(DataError, match=rf"{kind} targets must have shape {shape}"):
        Task("t", kind, Split(_x(), y))


def test_to_moves_every_split_and_its_mask_and_leaves_the_original_alone() -> None:
    task = Task("t", "multiclass", Split(_x(), torch.tensor([0, 1, 2, 0, 1, 2]), MASK),
                val=Split(_x(4), torch.tensor([0, 1, 2, 1])), test=Split(_x(3), torch.tensor([2, 1, 0])))
    moved = task.to("meta")  # the meta device needs no accelerator, and differs from cpu
    for name in ("train", "val", "test"):
        assert getattr(moved, name).x.device.type == "meta"
        assert getattr(moved, name).y.device.type == "meta"
        assert getattr(task, name).x.device.type == "cpu"
    assert moved.train.mask is not None and moved.train.mask.device.type == "meta"
    assert moved.name == "t" and moved.num_outputs == 3
