"""TAG lookahead affinity: oracle against an explicit copy-and-step loop, accumulation, negative-transfer flags,
and recovery of planted task clusters from affinity recorded during real joint training."""

from __future__ import annotations

import copy

import pytest
import torch

from mtml import Split, StopRule, Task, build_multitask_model, train_multitask
from mtml.errors import ConfigError, DataError
from mtml.transfer import AffinityAccumulator, TagRecorder, group_tasks, lookahead_affinity, negative_transfer


def _mixed_tasks(seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=g)
    reg = [Task(f"reg{i}", "regression", Split(x, x @ torch.randn(5, 2, generator=g))) for i in range(4)]
    binary = Task("flag", "binary", Split(x, (x[:, 0] > 0).float()))
    multi = Task("kind", "multiclass", Split(x, torch.randint(0, 3, (24,), generator=g)))
    return [*reg, binary, multi]


def _batch(tasks: list[Task]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {t.name: (t.train.x, t.train.y) for t in tasks}


def _explicit(model: torch.nn.Module, tasks: list[Task], lr: float) -> torch.Tensor:
    """A[i, j] by copying the model, stepping its trunk on task i alone, and re-evaluating every loss."""
    model = copy.deepcopy(model).eval()
    before = torch.stack([t.compute_loss(model(t.train.x, t.name), t.train.y) for t in tasks]).detach()
    rows = []
    for ti in tasks:
        m = copy.deepcopy(model)
        m.zero_grad()
        ti.compute_loss(m(ti.train.x, ti.name), ti.train.y).backward()
        with torch.no_grad():
            for p in m.shared_parameters():
                p -= lr * p.grad
            rows.append(torch.stack([t.compute_loss(m(t.train.x, t.name), t.train.y) for t in tasks]))
    return 1 - torch.stack(rows) / before


@pytest.mark.parametrize("vectorize", [True, False])
def test_lookahead_matches_explicit_copy_and_step(vectorize: bool) -> None:
    tasks = _mixed_tasks()
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=[7], dropout=0.2)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = lookahead_affinity(model, {t.name: t for t in tasks}, _batch(tasks), lr=0.1, vectorize=vectorize)
    torch.testing.assert_close(a, _explicit(model, tasks, 0.1), rtol=1e-4, atol=1e-6)
    assert model.training  # mode restored, parameters untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_identical_tasks_help_and_opposite_tasks_hurt() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    tasks = [Task("a", "regression", Split(x, y)), Task("a2", "regression", Split(x, y)),
             Task("neg", "regression", Split(x, -y))]
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=[3], activation="linear")
    with torch.no_grad():  # heads that read the trunk the same way, so only the targets differ
        for name in ("a2", "neg"):
            for p, q in zip(model.heads[name].parameters(), model.heads["a"].parameters(), strict=True):
                p.copy_(q)
    a = lookahead_affinity(model, {t.name: t for t in tasks}, _batch(tasks), lr=0.01)
    assert a[0, 1] > 0 and a[1, 0] > 0
    assert torch.allclose(a[0, 1], a[0, 0]) and torch.allclose(a[1, 0], a[1, 1])
    assert a[0, 2] < 0 and a[2, 0] < 0


def test_accumulator_mean_stderr_and_negative_flags() -> None:
    g = torch.Generator().manual_seed(2)
    draws = 0.2 + torch.randn(30, 3, 3, generator=g, dtype=torch.float64) * 0.1
    draws[:, 0, 1] -= 1.2  # a clearly harmful pair
    acc = AffinityAccumulator(["a", "b", "c"])
    with pytest.raises(DataError, match="no affinity"):
        acc.mean()
    for d in draws:
        acc.update(d)
    torch.testing.assert_close(acc.mean(), draws.mean(0))
    torch.testing.assert_close(acc.stderr(), draws.std(0) / 30**0.5)
    flags = negative_transfer(acc.mean(), acc.stderr())
    assert flags[0, 1] and int(flags.sum()) == 1
    assert not negative_transfer(-torch.eye(3), torch.zeros(3, 3)).any()  # the diagonal is never flagged
    with pytest.raises(DataError, match="shape"):
        acc.update(torch.zeros(2, 2))
    with pytest.raises(DataError, match="non-finite"):
        acc.update(torch.full((3, 3), float("nan")))


def test_recorder_every_and_errors() -> None:
    tasks = _mixed_tasks()
    model = build_multitask_model(tasks, trunk_hidden=[4])
    rec = TagRecorder(model, tasks, lr=0.1, every=3)
    for _ in range(7):
        rec(_batch(tasks))
    assert rec.accumulator.count == 3  # calls 1, 4 and 7
    with pytest.raises(ConfigError, match="every"):
        TagRecorder(model, tasks, lr=0.1, every=0)
    with pytest.raises(ConfigError, match="lr"):
        lookahead_affinity(model, {t.name: t for t in tasks}, _batch(tasks), lr=0)
    with pytest.raises(DataError, match="no batch"):
        lookahead_affinity(model, {t.name: t for t in tasks}, _batch(tasks[:2]), lr=0.1, names=["reg0", "kind"])


def clustered_tasks(sizes: list[int], *, dim: int = 12, n: int = 64, spread: float = 0.2,
                    seed: int = 0) -> tuple[list[Task], list[int]]:
    """Linear regressions in clusters: every task of cluster c is ``y = wᵢ·x`` with ``wᵢ = u_c + spread·εᵢ``
    (``u_c`` a random unit direction of the cluster). Returns the tasks and each task's cluster."""
    g = torch.Generator().manual_seed(seed)
    tasks, truth = [], []
    for c, size in enumerate(sizes):
        u = torch.randn(dim, generator=g)
        u = u / u.norm()
        for i in range(size):
            w = u + spread * torch.randn(dim, generator=g) / dim**0.5

            def split(m: int, w: torch.Tensor = w) -> Split:
                x = torch.randn(m, dim, generator=g)
                return Split(x, x @ w + 0.05 * torch.randn(m, generator=g))

            tasks.append(Task(f"c{c}_t{i}", "regression", split(n), split(32)))
            truth.append(c)
    return tasks, truth


@pytest.mark.parametrize("seed", [0, 3])
def test_tag_during_joint_training_recovers_planted_clusters(seed: int) -> None:
    tasks, truth = clustered_tasks([3, 4, 3], seed=seed)
    torch.manual_seed(seed)
    # a 2-wide linear trunk for 3 clusters: clusters compete for the shared capacity
    model = build_multitask_model(tasks, trunk_hidden=[2], activation="linear")
    rec = TagRecorder(model, tasks, lr=0.05, every=5)
    train_multitask(model, tasks, lr=1e-2, batch_size=32, seed=seed, before_step=rec,
                    stop=StopRule(max_steps=150, eval_every=50, patience=0))
    assert rec.accumulator.count == 30
    found = group_tasks(rec.accumulator.mean(), 3)
    want = tuple(tuple(i for i, c in enumerate(truth) if c == k) for k in range(3))
    assert found.groups == want


def test_recording_does_not_change_the_training_trajectory() -> None:
    tasks, _ = clustered_tasks([2, 2], seed=1)
    finals = []
    for hook in (False, True):
        torch.manual_seed(0)
        model = build_multitask_model(tasks, trunk_hidden=[4], dropout=0.1)
        rec = TagRecorder(model, tasks, lr=0.05, every=2) if hook else None
        train_multitask(model, tasks, lr=1e-2, batch_size=16, before_step=rec,
                        stop=StopRule(max_steps=20, eval_every=10, patience=0))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])
