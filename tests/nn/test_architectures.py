"""Architectures: contract of MultiTaskModel, parameter ownership, Gramian backends, registry and options."""

from __future__ import annotations

import pytest
import torch

import mtml.datasets  # noqa: F401  (the data layer registers architectures that load files: minilm)
from mtml.engine._joint import joint_step, task_losses
from mtml.errors import ConfigError, UnknownNameError
from mtml.nn import ARCHITECTURES, build_model
from mtml.nn._architectures import CrossStitchTrunk
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, GramianTape

# minilm reads token ids through a pretrained encoder, not float features: tests/datasets/test_text.py covers it.
TOKEN_ARCHS = {"minilm"}
ARCHS = [name for name in ARCHITECTURES.names() if name not in TOKEN_ARCHS]


def _tasks(widths: tuple[int, ...] = (5, 5, 5, 4)) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, w in enumerate(widths):
        x = torch.randn(6 + i, w, generator=g, dtype=torch.float64)
        if i % 2:
            out.append(Task(f"t{i}", TaskKind.MULTICLASS, Split(x, torch.randint(0, 3, (6 + i,), generator=g)),
                            num_outputs=3))
        else:
            out.append(Task(f"t{i}", TaskKind.REGRESSION, Split(x, torch.randn(6 + i, 2, generator=g,
                                                                               dtype=torch.float64))))
    return out


def _build(name: str, tasks: list[Task]) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(tasks, name, trunk_hidden=[6, 4], activation="tanh").double()


def test_registry_names() -> None:
    assert set(ARCHITECTURES.names()) == {"hps", "mmoe", "cgc", "ple", "cross_stitch", "mtan", "dselect_k",
                                          *TOKEN_ARCHS}
    assert all(ARCHITECTURES.describe().values())


@pytest.mark.parametrize("name", ARCHS)
def test_forward_many_equals_forward_per_task(name: str) -> None:
    tasks = _tasks()
    model = _build(name, tasks)
    many = model.forward_many({t.name: t.train.x for t in tasks})
    for t in tasks:
        one = model(t.train.x, t.name)
        assert one.shape == (len(t.train), t.num_outputs)
        torch.testing.assert_close(many[t.name], one)
        assert model.features(t.train.x, t.name).shape == (len(t.train), 4)


@pytest.mark.parametrize("name", ARCHS)
def test_parameters_split_into_shared_and_task_parts(name: str) -> None:
    tasks = _tasks()
    model = _build(name, tasks)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t.name)} for t in tasks]
    every = {id(p) for p in model.parameters()}
    assert shared and all(per_task)
    assert shared.union(*per_task) == every
    assert sum(len(s) for s in per_task) + len(shared) == len(every)  # disjoint
    # a task's own parameters are reached by its loss only
    losses = task_losses(model, {t.name: t for t in tasks}, {t.name: (t.train.x, t.train.y) for t in tasks},
                         [t.name for t in tasks])
    for i, t in enumerate(tasks):
        own = list(model.task_parameters(t.name))
        for j in range(len(tasks)):
            grads = torch.autograd.grad(losses[j], own, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            assert reached == (i == j), (t.name, j)


@pytest.mark.parametrize("name", ARCHS)
def test_gramian_backends_agree_on_every_architecture(name: str) -> None:
    tasks = _tasks()
    model = _build(name, tasks)
    by_name = {t.name: t for t in tasks}
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    names = [t.name for t in tasks]
    grams = {}
    for backend in ("loop", "batched", "layerwise", "auto"):
        tape = GramianTape(model, backend)
        with tape:
            losses = task_losses(model, by_name, batch, names)
        grams[backend] = tape.gramian(losses, {n: batch[n][0] for n in names}, names)
        if backend == "auto":
            assert tape.used == ("loop" if name == "cross_stitch" else "layerwise/rows")
    for backend in ("batched", "layerwise", "auto"):
        torch.testing.assert_close(grams[backend], grams["loop"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ARCHS)
def test_training_lowers_the_loss(name: str) -> None:
    tasks = _tasks((5, 5, 5, 5))
    model = _build(name, tasks)
    by_name = {t.name: t for t in tasks}
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    weighting = WEIGHTINGS.create("mgda", list(by_name))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = joint_step(model, by_name, batch, weighting, opt).task_losses
    for _ in range(40):
        last = joint_step(model, by_name, batch, weighting, opt).task_losses
    assert sum(last.values()) < sum(first.values())


def test_cross_stitch_starts_near_separate_columns() -> None:
    trunk = CrossStitchTrunk(3, ["a", "b", "c"], hidden=[4], self_weight=0.8)
    alpha = trunk.stitches[0].detach()
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    assert float(alpha[0, 0]) == pytest.approx(0.8)


@pytest.mark.parametrize(("name", "options", "match"), [
    ("mmoe", {"num_experts": 0}, "`num_experts` must be an integer >= 1"),
    ("ple", {"levels": 0}, "`levels` must be"),
    ("cgc", {"trunk_hidden": []}, "`trunk_hidden` must be"),
    ("cross_stitch", {"self_weight": 2.0}, "`self_weight` must be in"),
    ("mmoe", {"activation": "swish"}, "`activation` must be one of"),
    ("mmoe", {"experts": 3}, "unknown option 'experts'"),
])
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(_tasks(), name, **options)


def test_unknown_architecture_suggests_the_nearest() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'mmoe'"):
        build_model(_tasks(), "mmeo")


def _shared_tasks() -> list[Task]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    return [Task(f"s{i}", TaskKind.REGRESSION, Split(x, torch.randn(9, 1, generator=g, dtype=torch.float64)),
                 group="rows") if i % 2 == 0 else
            Task(f"s{i}", TaskKind.MULTICLASS, Split(x, torch.randint(0, 3, (9,), generator=g)), num_outputs=3,
                 group="rows") for i in range(4)]


@pytest.mark.parametrize("name", ARCHS)
def test_shared_rows_make_one_expert_pass_and_exact_gramians(name: str) -> None:
    tasks = _shared_tasks()
    model = _build(name, tasks)
    by_name = {t.name: t for t in tasks}
    x = tasks[0].train.x
    batch = {t.name: (x, t.train.y) for t in tasks}
    names = [t.name for t in tasks]
    calls: list[int] = []
    model.trunk.register_forward_hook(lambda mod, a, out: calls.append(int(a[0].shape[0])))
    out = model.forward_many({n: x for n in names})
    assert calls == [9]  # one trunk (experts, gates, columns) pass for all four tasks
    for n in names:
        torch.testing.assert_close(out[n], model(x, n))
    grams = {}
    for backend in ("loop", "auto"):
        tape = GramianTape(model, backend)
        with tape:
            losses = task_losses(model, by_name, batch, names)
        grams[backend] = tape.gramian(losses, {n: x for n in names}, names)
        if backend == "auto":
            assert tape.used == ("loop" if name == "cross_stitch" else "layerwise/batched")
    torch.testing.assert_close(grams["auto"], grams["loop"], rtol=1e-9, atol=1e-12)
