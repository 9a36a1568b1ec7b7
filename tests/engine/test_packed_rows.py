"""Packed rows (many own-row tasks drawn and scored as one pack) against the per-task path: same losses,
gradients and metrics, and the packed path is the one that ran."""

from __future__ import annotations

import pytest
import torch

from mtml.engine._joint import TaskBatcher, evaluate, task_losses
from mtml.engine._packed import MIN_TASKS, PackedBatch
from mtml.meta import speed_paths
from mtml.nn import build_hierarchical, build_multitask_model
from mtml.tasks import Split, Task


def _tasks(m: int = 34, kind: str = "regression", seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(m):
        def split(n: int, i: int = i) -> Split:
            x = torch.randn(n, 3, generator=g, dtype=torch.float64)
            if kind == "regression":
                return Split(x, x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + i)
            return Split(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
        tasks.append(Task(f"t{i}", kind, train=split(5 + 3 * i), val=split(2 + i % 3), test=split(3)))
    return tasks


def _losses_and_grads(model: torch.nn.Module, tasks: list[Task], packed: bool) -> tuple[torch.Tensor, list]:
    with speed_paths(packed_rows=packed):
        batch = TaskBatcher(tasks, 10).sample(torch.Generator().manual_seed(3))
        assert isinstance(batch, PackedBatch) is packed
        names = [t.name for t in tasks]
        model.zero_grad()
        losses = task_losses(model, {t.name: t for t in tasks}, batch, names)
        (losses * torch.arange(1.0, len(names) + 1, dtype=losses.dtype)).sum().backward()
    return losses.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["regression", "multiclass"])
def test_packed_losses_and_gradients_equal_the_per_task_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks(kind=kind)
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=[8]).double()
    calls = []
    original = type(model).forward_rows
    monkeypatch.setattr(type(model), "forward_rows", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    # the draw differs between the two paths: give both every row (batch 10 < some tasks' rows, so draw equal)
    big = [Task(t.name, t.kind, train=t.train, val=t.val, test=t.test) for t in tasks]
    lp, _ = _losses_and_grads(model, big, True)
    assert calls, "the packed path did not run"
    n_calls = len(calls)
    lu, _ = _losses_and_grads(model, big, False)
    assert len(calls) == n_calls  # and the per-task path did not use it
    # both paths draw rows differently when a task has more than batch_size: compare on tasks that fit
    fit = [i for i, t in enumerate(tasks) if len(t.train) <= 10]
    assert len(fit) >= 2
    assert torch.allclose(lp[fit], lu[fit], rtol=1e-12, atol=1e-12)


def test_every_row_in_batch_gives_identical_losses_gradients_and_metrics() -> None:
    tasks = _tasks()
    torch.manual_seed(1)
    model = build_multitask_model(tasks, trunk_hidden=[8]).double()
    with speed_paths(packed_rows=True):
        batch = TaskBatcher(tasks, 1000).sample(torch.Generator())
    assert isinstance(batch, PackedBatch) and all(batch[t.name][0] is t.train.x for t in tasks)
    mp, mu = _both_paths_agree(model, tasks, "val")
    for name in mu:
        for key in mu[name]:
            assert mp[name][key] == pytest.approx(mu[name][key], rel=1e-9, abs=1e-12), (name, key)


def _losses_and_grads_full(model: torch.nn.Module, tasks: list[Task], packed: bool) -> tuple[torch.Tensor, list]:
    with speed_paths(packed_rows=packed):
        batch = TaskBatcher(tasks, 1000).sample(torch.Generator())
        names = [t.name for t in tasks]
        model.zero_grad()
        losses = task_losses(model, {t.name: t for t in tasks}, batch, names)
        (losses * torch.arange(1.0, len(names) + 1, dtype=losses.dtype)).sum().backward()
    return losses.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _spy(model: torch.nn.Module, name: str) -> list[int]:
    """Count the calls of ``model.<name>`` from now on."""
    calls: list[int] = []
    original = getattr(model, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    setattr(model, name, counted)
    return calls


def _both_paths_agree(model: torch.nn.Module, tasks: list[Task], split: str, *, rtol: float = 1e-12,
                      per_task: str | None = None) -> tuple[dict, dict]:
    """Assert packed and per-task losses and gradients agree, and which path ran; the metrics of ``split`` from
    each path. The packed step is seen by ``forward_rows`` running, or, for models with their own training
    losses, by the per-task method ``per_task`` not running; the packed evaluation by ``forward_rows``."""
    rows = _spy(model, "forward_rows")
    own = _spy(model, per_task) if per_task else []
    lp, gp = _losses_and_grads_full(model, tasks, True)
    assert (not own) if per_task else rows, "the packed step did not run"
    ran = len(rows)
    lu, gu = _losses_and_grads_full(model, tasks, False)
    assert len(rows) == ran and (own if per_task else True), "the per-task step took the packed path"
    assert torch.allclose(lp, lu, rtol=rtol, atol=1e-13)
    for a, b in zip(gp, gu, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9 if per_task else 1e-10, atol=1e-12)
    with speed_paths(packed_rows=True):
        mp = evaluate(model, tasks, split)
    assert len(rows) > ran, "the packed evaluation did not run"
    ran = len(rows)
    with speed_paths(packed_rows=False):
        mu = evaluate(model, tasks, split)
    assert len(rows) == ran, "the per-task evaluation took the packed path"
    return mp, mu


def test_hierarchical_heads_packed_equals_per_task() -> None:
    tasks = _tasks()
    torch.manual_seed(2)
    model = build_hierarchical(tasks, trunk_hidden=[4]).double()
    mp, mu = _both_paths_agree(model, tasks, "test", rtol=1e-10, per_task="_features")
    assert all(mp[n]["mse"] == pytest.approx(mu[n]["mse"], rel=1e-9) for n in mu)


def test_drawn_pack_takes_batch_size_distinct_rows_of_each_task() -> None:
    tasks = _tasks(m=MIN_TASKS + 2)
    with speed_paths(packed_rows=True):
        batch = TaskBatcher(tasks, 6).sample(torch.Generator().manual_seed(5))
    assert isinstance(batch, PackedBatch)
    for t in tasks:
        x = batch[t.name][0]
        assert len(x) == min(6, len(t.train))
        # every drawn row is one of the task's own training rows, none twice
        rows = {tuple(r.tolist()) for r in x}
        assert len(rows) == len(x) and rows <= {tuple(r.tolist()) for r in t.train.x}


def test_few_tasks_are_not_packed() -> None:
    with speed_paths(packed_rows=True):
        batch = TaskBatcher(_tasks(m=MIN_TASKS - 1), 6).sample(torch.Generator())
    assert not isinstance(batch, PackedBatch)
