"""Gramian backends: every backend against a per-task loop of explicit gradients (the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.engine._joint import joint_step, task_losses
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
    torch.testing.assert_close(_batched_gram(a, [deltas]), jac @ jac.T)
    torch.testing.assert_close(_batched_gram(a, list(deltas.split(2))), jac @ jac.T)  # task chunks


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


# -- shared rows, mixed batches, row coupling, the fused weighted gradient -----------------------------------
def _shared_model(trunk: nn.Module | None = None) -> tuple[MultiTaskModel, dict[str, Task], dict]:
    """A group of three tasks on the same rows, one task with its own rows and one with a stem."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    group = [Task(f"g{i}", "regression", Split(x, torch.randn(9, 1, generator=g, dtype=torch.float64)), group="g")
             for i in range(3)]
    tasks = [*group, _task("own", 6, 5, 7), _task("c", 3, 7, 9, TaskKind.MULTICLASS)]
    trunk = trunk if trunk is not None else mlp(6, (8, 5), activation="tanh")
    heads = {t.name: nn.Linear(5, t.num_outputs) for t in tasks}
    model = MultiTaskModel(trunk, heads, {"c": mlp(3, (), 6, activation="tanh", final_activation=True)}).double()
    return model, {t.name: t for t in tasks}, {t.name: (t.train.x, t.train.y) for t in tasks}


@pytest.mark.parametrize(("backend", "used"), [("auto", "layerwise/batched"), ("layerwise", "layerwise/batched"),
                                               ("loop", "loop"), ("batched", "batched")])
def test_every_backend_is_exact_on_shared_rows(backend: str, used: str) -> None:
    model, tasks, batch = _shared_model()
    calls: list[int] = []
    model.trunk.register_forward_hook(lambda mod, a, out: calls.append(int(a[0].shape[0])))
    gram, losses, how = _gram(model, tasks, batch, backend)
    assert how == used
    assert sorted(calls) == [7, 14]  # the stem task alone; the group's 9 rows once + the own task's 5
    torch.testing.assert_close(gram, _oracle(losses, list(model.shared_parameters())), rtol=1e-9, atol=1e-12)


def test_rows_backend_refuses_shared_rows_and_row_coupling_trunks() -> None:
    model, tasks, batch = _shared_model()
    with pytest.raises(ConfigError, match=r"gramian 'rows' needs every trunk row read by exactly one task.*layerwise"):
        _gram(model, tasks, batch, "rows")
    coupled = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.Tanh(), nn.Linear(8, 5))
    model, tasks, batch = _model(coupled)
    with pytest.raises(ConfigError, match=r"1 \(BatchNorm1d in training mode\) mixes rows.*layerwise.*batched.*loop"):
        _gram(model, tasks, batch, "rows")
    gram, losses, how = _gram(model, tasks, batch, "auto")  # auto falls back to per-task δ: still exact
    assert how == "layerwise/batched"
    torch.testing.assert_close(gram, _oracle(losses, list(model.shared_parameters())), rtol=1e-9, atol=1e-12)
    model.eval()  # running statistics: rows are independent again
    assert _gram(model, tasks, batch, "rows")[2] == "layerwise/rows"


class _Centre(nn.Module):
    """Subtracts the batch mean: a module of unknown type that couples rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class _Scale(nn.Module):
    """A module of unknown type that keeps rows apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.parametrize(("module", "used"), [(_Centre(), "layerwise/batched"), (_Scale(), "layerwise/rows")])
def test_unknown_modules_are_probed_for_row_coupling(module: nn.Module, used: str) -> None:
    trunk = nn.Sequential(nn.Linear(6, 8), module, nn.Tanh(), nn.Linear(8, 5))
    model, tasks, batch = _model(trunk)
    gram, losses, how = _gram(model, tasks, batch, "auto")
    assert how == used
    from mtml.weighting._row_coupling import _probed

    assert trunk in _probed  # judged by the probe, not by type
    torch.testing.assert_close(gram, _oracle(losses, list(model.shared_parameters())), rtol=1e-9, atol=1e-12)


GRAMIAN_METHODS = ["mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl", "gradvac", "mgda_ub"]


@pytest.mark.parametrize("shape", ["shared", "own"])
@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_fused_weighted_gradient_equals_the_plain_backward(name: str, shape: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mtml.weighting._layer_gram as kernels

    monkeypatch.setattr(kernels, "_CHUNK", 20)  # several task chunks and column chunks
    import mtml.weighting._gramian as gramian_module

    chunks: list[int] = []
    real_chunks = kernels.task_chunks

    def counting(m: int, per_task: int) -> list[slice]:
        out = real_chunks(m, per_task)
        chunks.append(len(out))
        return out

    monkeypatch.setattr(gramian_module, "task_chunks", counting)
    grads = []
    for fused in (True, False):
        model, tasks, batch = _shared_model() if shape == "shared" else _model()
        w = WEIGHTINGS.create(name, list(tasks), **({"gramian": "auto"} if name != "mgda_ub" else {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if not fused:
            monkeypatch.undo()
            monkeypatch.setattr(kernels, "_CHUNK", 20)
            monkeypatch.setattr(GramianTape, "backward", lambda self, objective, *a: objective.backward())
        elif name != "mgda_ub":  # layer-wise: the fused path must run, never a full backward of the objective
            def refuse(*a: object, **k: object) -> None:
                raise AssertionError("the fused path was not taken")

            monkeypatch.setattr(torch.Tensor, "backward", refuse)
        torch.manual_seed(3)
        joint_step(model, tasks, batch, w, opt)
        if fused and shape == "shared" and name != "mgda_ub":
            assert chunks and max(chunks) > 1, chunks  # the per-task δ really came in several task chunks
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_representation_gramian_on_shared_rows_is_the_feature_gradient_gramian() -> None:
    model, tasks, batch = _shared_model()
    feats: list[torch.Tensor] = []
    model.trunk.register_forward_hook(lambda mod, a, out: feats.append(out))
    gram, losses, how = _gram(model, tasks, batch, "representation")
    assert how == "representation/batched"
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], feats, retain_graph=True)])
            for i in range(losses.shape[0])]
    jac = torch.stack(rows)
    torch.testing.assert_close(gram, jac @ jac.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "batched"])
@pytest.mark.parametrize("shape", ["shared", "own"])
def test_explicit_backends_reuse_their_per_task_gradients_for_the_update(backend: str, shape: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    grads = []
    for fused in (True, False):
        model, tasks, batch = _shared_model() if shape == "shared" else _model()
        w = WEIGHTINGS.create("upgrad", list(tasks), gramian=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if fused:  # the update is wᵀJ from the Gramian's own gradients: no backward of the whole objective
            def refuse(*a: object, **k: object) -> None:
                raise AssertionError("the fused path was not taken")

            monkeypatch.setattr(torch.Tensor, "backward", refuse)
        else:
            monkeypatch.setattr(GramianTape, "backward", lambda self, objective, *a: objective.backward())
        joint_step(model, tasks, batch, w, opt)
        monkeypatch.undo()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
