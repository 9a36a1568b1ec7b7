"""Task groups and missing labels: tasks on shared rows, label masks, device moves that keep sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.errors import DataError
from mtml.groups import labelled_only, task_groups, tasks_to
from mtml.tasks import Split, Task


def _shared(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, list[Task]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, [Task("a", "regression", Split(x, torch.randn(n, 1, generator=g)), val=Split(x, torch.randn(n, 1)),
                    group="g"),
               Task("b", "multiclass", Split(x, torch.randint(0, 3, (n,), generator=g)),
                    val=Split(x, torch.randint(0, 3, (n,))), group="g", num_outputs=3)]


def test_named_and_identity_groups() -> None:
    x, tasks = _shared()
    other = Task("c", "regression", Split(torch.randn(4, 3), torch.randn(4, 1)))
    unnamed = [Task(f"u{i}", "regression", Split(x, torch.randn(10, 1))) for i in range(2)]
    groups = task_groups([tasks[0], other, tasks[1], *unnamed])
    assert [g.name for g in groups] == ["g", "c", "u0+u1"]
    assert [[t.name for t in g.tasks] for g in groups] == [["a", "b"], ["c"], ["u0", "u1"]]
    assert [g.shared for g in groups] == [True, False, True]
    assert groups[0].x("train") is x and groups[0].rows("val") == 10


def test_named_group_with_equal_copies_of_x_is_accepted() -> None:
    x, (a, _) = _shared()
    b = Task("b", "regression", Split(x.clone(), torch.randn(10, 1)), val=Split(x.clone(), torch.randn(10, 1)),
             group="g")
    assert len(task_groups([a, b])) == 1


def test_group_errors_name_both_tasks() -> None:
    x, (a, _) = _shared()
    short = Task("b", "regression", Split(x[:7], torch.randn(7, 1)), val=Split(x, torch.randn(10, 1)), group="g")
    with pytest.raises(DataError, match=r"'a' and 'b'.*group 'g'.*10 and 7 rows"):
        task_groups([a, short])
    differs = Task("b", "regression", Split(x + 1, torch.randn(10, 1)), val=Split(x, torch.randn(10, 1)), group="g")
    with pytest.raises(DataError, match=r"'a' and 'b'.*train inputs differ"):
        task_groups([a, differs])
    no_val = Task("b", "regression", Split(x, torch.randn(10, 1)), group="g")
    with pytest.raises(DataError, match=r"only 'a' has a val split"):
        task_groups([a, no_val])
    with pytest.raises(DataError, match="group 'bad name'"):
        Task("c", "regression", Split(x, torch.randn(10, 1)), group="bad name")


def test_tasks_to_keeps_shared_tensors_shared() -> None:
    x, tasks = _shared()
    moved = tasks_to(tasks, "meta")
    assert moved[0].train.x is moved[1].train.x and moved[0].train.x.device.type == "meta"
    assert moved[0].val is not None and moved[1].val is not None and moved[0].val.x is moved[1].val.x
    assert tasks[0].train.x is x and x.device.type == "cpu"  # the originals are untouched


def test_mask_validation_and_storage() -> None:
    x = torch.randn(5, 2)
    y = torch.tensor([1.0, float("nan"), 2.0, float("nan"), 0.5])
    t = Task("r", "regression", Split(x, y, mask=~torch.isnan(y)))
    assert t.train.mask is not None and t.train.labelled == 3 and len(t.train) == 5
    assert torch.equal(t.train.y[:, 0], torch.tensor([1.0, 0.0, 2.0, 0.0, 0.5]))  # unlabelled rows hold 0
    full = Task("r", "regression", Split(x, torch.ones(5), mask=torch.ones(5, dtype=torch.bool)))
    assert full.train.mask is None  # an all-True mask is no mask
    labels = torch.tensor([0, -1, 2, 1, -1])
    c = Task("c", "multiclass", Split(x, labels, mask=torch.tensor([1, 0, 1, 1, 0])))
    assert c.num_outputs == 3 and c.train.mask is not None and c.train.mask.dtype == torch.bool
    with pytest.raises(DataError, match=r"task 'r', train split: mask has shape \(4,\).*5 rows"):
        Task("r", "regression", Split(x, torch.ones(5), mask=torch.ones(4, dtype=torch.bool)))
    with pytest.raises(DataError, match="mask must be booleans"):
        Task("r", "regression", Split(x, torch.ones(5), mask=torch.full((5,), 0.5)))
    with pytest.raises(DataError, match="task 'r', train split: every label is missing"):
        Task("r", "regression", Split(x, torch.ones(5), mask=torch.zeros(5, dtype=torch.bool)))
    with pytest.raises(DataError, match="NaN/inf"):  # a NaN on a labelled row is still an error
        Task("r", "regression", Split(x, y, mask=torch.tensor([True, True, True, False, True])))


def test_masked_loss_and_metrics_cover_labelled_rows_only() -> None:
    x = torch.randn(6, 2)
    mask = torch.tensor([True, False, True, True, False, True])
    y = torch.randn(6, 1)
    t = Task("r", "regression", Split(x, y, mask=mask))
    pred = torch.randn(6, 1, requires_grad=True)
    loss = t.compute_loss(pred, t.train.y, t.train.mask)
    torch.testing.assert_close(loss, ((pred[mask] - y[mask]) ** 2).mean())
    loss.backward()
    assert pred.grad is not None and bool((pred.grad[~mask] == 0).all())
    metrics = t.compute_metrics(pred.detach(), t.train.y, t.train.mask)
    assert metrics["mse"] == pytest.approx(float(((pred.detach()[mask] - y[mask]) ** 2).mean()))
    none = t.compute_loss(pred, t.train.y, torch.zeros(6, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad  # no labelled row in a batch: an exact 0


def test_labelled_only_drops_unlabelled_rows() -> None:
    x = torch.arange(8.0).reshape(4, 2)
    t = Task("r", "regression", Split(x, torch.ones(4), mask=torch.tensor([True, False, True, False])), group="g")
    alone = labelled_only(t)
    assert len(alone.train) == 2 and alone.train.mask is None and alone.group is None
    assert torch.equal(alone.train.x, x[[0, 2]])
    plain = Task("p", "regression", Split(x, torch.ones(4)))
    assert labelled_only(plain) is plain


def test_model_with_a_shared_stem_per_group() -> None:
    from mtml.nn import build_multitask_model

    _, tasks = _shared()
    own = Task("c", "regression", Split(torch.randn(4, 5), torch.randn(4, 1)), val=Split(torch.randn(2, 5),
                                                                                           torch.randn(2, 1)))
    model = build_multitask_model([*tasks, own], trunk_hidden=(4,), stem_width=6)
    assert set(model.stems) == {"g", "c"} and model.stem_of == {"a": "g", "b": "g", "c": "c"}
    assert model.stem("a") is model.stem("b")
    names = [n for n, _ in model.named_task_parameters("b")]
    assert names[0].startswith("stems.g.")
    calls = []
    model.trunk.register_forward_hook(lambda *a: calls.append(1))
    x = tasks[0].train.x
    out = model.forward_many({"a": x, "b": x, "c": own.train.x})
    assert len(calls) == 2  # the group's rows once, the own-row task once
    torch.testing.assert_close(out["b"], model(x, "b"))
    assert len(model.state_dict()) == len({id(v) for v in model.state_dict().values()})  # no aliased tensors
    with pytest.raises(Exception, match="stem_of"):
        type(model)(nn.Identity(), {"a": nn.Linear(2, 1)}, {"s": nn.Linear(2, 2)}, stem_of={"a": "t"})
