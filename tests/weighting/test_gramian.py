"""Gramian backends: every backend against a per-task loop of explicit gradients (the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.engine.joint import joint_step, task_losses
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, GramianTape, task_gramian
from mtml.weighting._layer_gram import batched_gram as _batched_gram
from mtml.weighting._layer_gram import rows_gram as _rows_gram


def _oracle(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params, strict=True)]))
    jac = torch.stack(rows)
    return jac @ jac.T


def _task(name: str, width: int, n: int, seed: int, kind: TaskKind = TaskKind.REGRESSION) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=torch.float64)
    if kind is TaskKind.REGRESSION:
        y = torch.randn(n, 1, generator=g, dtype=torch.float64)
        return Task(name, kind, Split(x, y))
    return Task(name, kind, Split(x, torch.randint(0, 3, (n,), generator=g)), num_outputs=3)


def _model(trunk: nn.Module | None = None) -> tuple[MultiTaskModel, dict[str, Task], dict]:
    """Five tasks: four stem-less of one width (stacked linear heads) with unequal batches, one with a stem."""
    torch.manual_seed(0)
    tasks = [_task(f"r{i}", 6, 5 + i, i) for i in range(4)] + [_task("c", 3, 7, 9, TaskKind.MULTICLASS)]
    trunk = trunk if trunk is not None else mlp(6, (8, 5), activation="tanh")
    heads = {t.name: nn.Linear(5, t.num_outputs) for t in tasks}
    model = MultiTaskModel(trunk, heads, {"c": mlp(3, (), 6, activation="tanh", final_activation=True)}).double()
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    return model, {t.name: t for t in tasks}, batch


def _gram(model: MultiTaskModel, tasks: dict, batch: dict, backend: str, *, owners: bool = True) -> tuple:
    names = list(tasks)
    tape = GramianTape(model, backend)
    with tape:
        losses = task_losses(model, tasks, batch, names)
    inputs = {n: batch[n][0] for n in names} if owners else None
    return tape.gramian(losses, inputs, names if owners else None), losses, tape.used


@pytest.mark.parametrize(("backend", "owners", "used"), [
    ("auto", True, "layerwise/rows"), ("layerwise", True, "layerwise/rows"), ("layerwise", False, "layerwise/batched"),
    ("loop", True, "loop"), ("batched", True, "batched"), ("auto", False, "layerwise/batched"),
])
def test_backends_match_the_loop_oracle(backend: str, owners: bool, used: str) -> None:
    model, tasks, batch = _model()
    gram, losses, how = _gram(model, tasks, batch, backend, owners=owners)
    assert how == used
    torch.testing.assert_close(gram, _oracle(losses, list(model.shared_parameters())), rtol=1e-10, atol=1e-12)
    losses.sum().backward()  # the graph stays alive for the weighted backward


def test_non_linear_shared_parameters_fall_back_or_are_added() -> None:
    trunk = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5))
    model, tasks, batch = _model(trunk)
    oracle = None
    for backend, used in (("auto", "loop"), ("layerwise", "layerwise/rows")):
        gram, losses, how = _gram(model, tasks, batch, backend)
        oracle = _oracle(losses, list(model.shared_parameters()))
        assert how == used
        torch.testing.assert_close(gram, oracle, rtol=1e-10, atol=1e-12)


def test_representation_gramian() -> None:
    model, tasks, batch = _model()
    names = list(tasks)
    gram, losses, how = _gram(model, tasks, batch, "representation")
    assert how == "representation/rows"
    assert torch.equal(gram, torch.diag(gram.diagonal()))  # each task owns its rows: disjoint supports
    tape = GramianTape(model, "representation")
    with tape:
        losses = task_losses(model, tasks, batch, names)
    generic = tape.gramian(losses)  # without ownership: batched backward to the features
    feats = tape._calls
    rows = []
    for i in range(len(names)):
        grads = torch.autograd.grad(losses[i], feats, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(f)).reshape(-1)
                               for g, f in zip(grads, feats, strict=True)]))
    jac = torch.stack(rows)
    torch.testing.assert_close(generic, jac @ jac.T)
    torch.testing.assert_close(gram, torch.diag((jac @ jac.T).diagonal()))


@pytest.mark.parametrize("n", [6, 300])  # small N: kernel identity; large N: explicit per-task gradients
def test_layer_grams_both_regimes(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    m, i, o = 4, 5, 3
    a = torch.randn(n, i, generator=g, dtype=torch.float64)
    d = torch.randn(n, o, generator=g, dtype=torch.float64)
    owner = torch.randint(0, m, (n,), generator=g)
    jac = torch.stack([(d[owner == t].T @ a[owner == t]).reshape(-1) for t in range(m)])
    torch.testing.assert_close(_rows_gram(a, d, owner, m), jac @ jac.T)
    deltas = torch.randn(m, n, o, generator=g, dtype=torch.float64)
    jac = torch.stack([(deltas[t].T @ a).reshape(-1) for t in range(m)])
    torch.testing.assert_close(_batched_gram(a, deltas), jac @ jac.T)


def test_task_gramian_loop_equals_batched() -> None:
    model, tasks, batch = _model()
    losses = task_losses(model, tasks, batch, list(tasks))
    params = list(model.shared_parameters())
    torch.testing.assert_close(task_gramian(losses, params, backend="loop"), task_gramian(losses, params))
    with pytest.raises(ConfigError, match="`backend` must be"):
        task_gramian(losses, params, backend="fast")
    with pytest.raises(ConfigError, match="`gramian` must be one of"):
        GramianTape(model, "fast")


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad"])
def test_joint_step_updates_identically_with_every_exact_backend(name: str) -> None:
    updated = {}
    for backend in ("loop", "batched", "layerwise", "auto"):
        model, tasks, batch = _model()
        weighting = WEIGHTINGS.create(name, list(tasks), gramian=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        result = joint_step(model, tasks, batch, weighting, opt)
        assert set(result.weights) == set(tasks)
        updated[backend] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for backend in ("batched", "layerwise", "auto"):
        torch.testing.assert_close(updated[backend], updated["loop"], rtol=1e-9, atol=1e-10)


def test_joint_step_argument_overrides_the_weighting_option() -> None:
    model, tasks, batch = _model()
    weighting = WEIGHTINGS.create("mgda_ub", list(tasks))
    assert weighting.gramian == "representation"  # type: ignore[attr-defined]
    result = joint_step(model, tasks, batch, weighting, torch.optim.SGD(model.parameters(), lr=0.1), gramian="loop")
    assert abs(sum(result.weights.values()) - 1.0) < 1e-6
