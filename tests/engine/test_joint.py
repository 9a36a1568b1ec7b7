"""Joint multi-task steps: the fast loss path, the weighted update, batching, evaluation and training."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtml.datasets import synthetic_linear
from mtml.engine import StopRule, TaskBatcher, evaluate, joint_step, make_optimizer, objective, predict, train_multitask
from mtml.engine._joint import task_losses
from mtml.errors import ConfigError, UnknownNameError
from mtml.nn import MultiTaskModel, build_multitask_model
from mtml.tasks import Split, Task
from mtml.weighting import Fixed, Weighting, task_gramian


def _regression_tasks(sizes: list[int], outputs: int = 2, seed: int = 0, **kw: object) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    return [Task(f"r{i}", "regression", Split(torch.randn(n, 5, generator=g, dtype=torch.float64),
                                              torch.randn(n, outputs, generator=g, dtype=torch.float64)), **kw)
            for i, n in enumerate(sizes)]


def _model(tasks: list[Task]) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_multitask_model(tasks, trunk_hidden=(6,), activation="tanh").double()


def _generic(model: MultiTaskModel, tasks: list[Task]) -> Tensor:
    return torch.stack([t.compute_loss(model(t.train.x, t.name), t.train.y) for t in tasks])


@pytest.mark.parametrize("sizes", [[7, 7, 7, 7, 7], [3, 9, 1, 4, 12], [5, 8]])
def test_task_losses_fast_path_equals_generic(sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _regression_tasks(sizes)
    model = _model(tasks)
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    names = [t.name for t in reversed(tasks)]
    by_name = {t.name: t for t in tasks}
    segmented: list[int] = []
    real = Tensor.index_add
    monkeypatch.setattr(Tensor, "index_add", lambda self, *a, **k: (segmented.append(1), real(self, *a, **k))[1])
    fast = task_losses(model, by_name, batch, names)
    monkeypatch.undo()
    assert bool(segmented) == (len(set(sizes)) > 1)  # equal batches: the stacked reduction; else the segmented one
    slow = _generic(model, list(reversed(tasks)))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    w = torch.linspace(0.5, 2.0, len(names), dtype=torch.float64)
    g_fast = torch.autograd.grad((w * fast).sum(), list(model.parameters()))
    g_slow = torch.autograd.grad((w * slow).sum(), list(model.parameters()))
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_task_losses_mixed_kinds_and_custom_loss() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g)
    tasks = [Task("reg", "regression", Split(x, torch.randn(6, generator=g))),
             Task("cls", "multiclass", Split(x, torch.arange(6) % 3)),
             Task("bin", "binary", Split(x, (torch.arange(6) % 2).float())),
             Task("l1", "regression", Split(x, torch.randn(6, generator=g)),
                  loss=lambda p, y: (p - y).abs().mean())]
    model = build_multitask_model(tasks, trunk_hidden=(4,))
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    out = task_losses(model, {t.name: t for t in tasks}, batch, [t.name for t in tasks])
    torch.testing.assert_close(out, _generic(model, tasks))
    # one custom loss among plain regressions disables the fast path, values still agree
    reg = _regression_tasks([4, 4, 4, 4], outputs=1)
    reg[2] = Task("r2", "regression", reg[2].train, loss=lambda p, y: (p - y).abs().mean())
    model = _model(reg)
    batch = {t.name: (t.train.x, t.train.y) for t in reg}
    torch.testing.assert_close(task_losses(model, {t.name: t for t in reg}, batch, [t.name for t in reg]),
                               _generic(model, reg))


class _InverseGradNorm(Weighting):
    """A test-only Gramian weighting: w_i = 1 / sqrt(G_ii), recording what it received."""

    needs_gramian = True

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        self.seen = gramian.detach().clone()
        return (1.0 / gramian.diagonal().sqrt()).detach()


@pytest.mark.parametrize("weighting", ["fixed", "gramian"])
def test_joint_step_is_one_sgd_step_on_the_weighted_sum(weighting: str) -> None:
    tasks = _regression_tasks([6, 4, 5])
    names = [t.name for t in tasks]
    model = _model(tasks)
    w: Weighting = Fixed(names, weights=[0.5, 2.0, 1.0]) if weighting == "fixed" else _InverseGradNorm(names)
    by_name = {t.name: t for t in tasks}
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    before = [p.detach().clone() for p in model.parameters()]

    losses = _generic(model, tasks)
    gram = task_gramian(losses, list(model.shared_parameters()))
    weights = w.weights(losses, gram)
    grads = torch.autograd.grad((weights * losses).sum(), list(model.parameters()))

    lr = 0.1
    res = joint_step(model, by_name, batch, w, torch.optim.SGD(model.parameters(), lr=lr))
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - lr * g)
    assert res.task_losses == pytest.approx(dict(zip(names, losses.tolist(), strict=True)))
    assert res.weights == pytest.approx(dict(zip(names, weights.tolist(), strict=True)))
    assert res.loss == pytest.approx(float((weights * losses).sum().detach()))
    if weighting == "gramian":
        torch.testing.assert_close(w.seen, gram)
    assert set(res.as_dict()) == {"loss", "task_losses", "weights"}


def test_task_batcher_is_seeded_and_without_replacement() -> None:
    tasks = _regression_tasks([50, 3])
    tasks = [Task(t.name, t.kind, Split(torch.arange(len(t.train), dtype=torch.float64)[:, None].repeat(1, 5),
                                        t.train.y)) for t in tasks]
    batcher = TaskBatcher(tasks, 8)
    a = batcher.sample(torch.Generator().manual_seed(0))
    b = batcher.sample(torch.Generator().manual_seed(0))
    c = batcher.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a["r0"][0], b["r0"][0]) and not torch.equal(a["r0"][0], c["r0"][0])
    rows = a["r0"][0][:, 0]
    assert rows.shape == (8,) and len(set(rows.tolist())) == 8
    assert torch.equal(a["r0"][1], tasks[0].train.y[rows.long()])
    assert a["r1"][0].shape[0] == 3  # smaller than the batch: the whole split
    with pytest.raises(ConfigError, match="batch_size"):
        TaskBatcher(tasks, 0)


def test_evaluate_predict_objective() -> None:
    tasks = _regression_tasks([6, 9])
    tasks = [Task(t.name, t.kind, t.train, val=Split(t.train.x[:3], t.train.y[:3])) for t in tasks]
    model = _model(tasks)
    model.train()
    metrics = evaluate(model, tasks, "val")
    assert model.training  # restored
    for t in tasks:
        pred = model(t.val.x, t.name).detach()
        assert metrics[t.name]["mse"] == pytest.approx(float(((pred - t.val.y) ** 2).mean()))
    assert objective(metrics) == pytest.approx((metrics["r0"]["loss"] + metrics["r1"]["loss"]) / 2)
    x = tasks[1].train.x
    torch.testing.assert_close(predict(model, "r1", x, batch_size=2), model(x, "r1"))


def test_make_optimizer() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adam", params, lr=0.1), torch.optim.Adam)
    assert isinstance(make_optimizer("adamw", params, lr=0.1), torch.optim.AdamW)
    sgd = make_optimizer("sgd", params, lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(UnknownNameError, match="adam, adamw, sgd"):
        make_optimizer("rmsprop", params, lr=0.1)
    with pytest.raises(ConfigError, match=r"`lr` must be > 0\. Got -1"):
        make_optimizer("adam", params, lr=-1)
    with pytest.raises(ConfigError, match="weight_decay"):
        make_optimizer("adam", params, lr=0.1, weight_decay=-0.5)


def test_train_multitask_input_errors() -> None:
    tasks = synthetic_linear(num_tasks=2, in_dim=4, latent_dim=2, n_train=5, n_val=5, n_test=5)
    model = build_multitask_model(tasks, trunk_hidden=(4,))
    with pytest.raises(ConfigError, match="at least one task"):
        train_multitask(model, [])
    other = synthetic_linear(num_tasks=3, in_dim=4, latent_dim=2, n_train=5, n_val=5, n_test=5)
    with pytest.raises(ConfigError, match=r"no head for tasks \['task_2'\]"):
        train_multitask(model, other)
    no_val = [Task(t.name, t.kind, t.train) for t in tasks]
    with pytest.raises(ConfigError, match="no validation split"):
        train_multitask(model, no_val)
    with pytest.raises(ConfigError, match="unknown option 'temp'"):
        train_multitask(model, tasks, weighting="dwa", weighting_options={"temp": 1.0})


def test_train_multitask_is_reproducible() -> None:
    tasks = synthetic_linear(num_tasks=3, in_dim=6, latent_dim=2, n_train=30, n_val=10, n_test=10, seed=1)

    def once() -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = build_multitask_model(tasks, trunk_hidden=(4,))
        r = train_multitask(model, tasks, lr=1e-2, batch_size=8, stop=StopRule(max_steps=40, eval_every=10), seed=3)
        return model.state_dict(), r.test

    (s1, t1), (s2, t2) = once(), once()
    assert t1 == t2 and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_shared_trunk_beats_separate_trunks_on_synthetic_linear() -> None:
    """30 tasks sharing a 20→2 projection, 20 training examples each: pooling the tasks identifies the shared
    projection, single-task models overfit their 20 examples."""
    tasks = synthetic_linear(num_tasks=30, in_dim=20, latent_dim=2, n_train=20, n_val=50, n_test=200, seed=0)
    mse = {}
    for share in (True, False):
        torch.manual_seed(0)
        model = build_multitask_model(tasks, trunk_hidden=(4,), activation="tanh", share_trunk=share)
        result = train_multitask(model, tasks, lr=3e-2, batch_size=20, seed=0,
                                 stop=StopRule(max_steps=400, eval_every=25, patience=6))
        mse[share] = sum(m["mse"] for m in result.test.values()) / len(result.test)
    variance = float(torch.cat([t.test.y for t in tasks]).var())
    assert mse[True] < 0.5 * mse[False], mse
    assert mse[True] < 0.1 * variance, (mse, variance)


# -- tasks on shared rows ---------------------------------------------------------------------------------
def _shared_tasks(m: int = 4, n: int = 30, seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    xv = torch.randn(9, 5, generator=g, dtype=torch.float64)
    tasks = []
    for i in range(m):
        y = torch.randn(n, 1, generator=g, dtype=torch.float64)
        mask = torch.rand(n, generator=g) > 0.3 if i == 1 else None  # task 1 misses some labels
        tasks.append(Task(f"s{i}", "regression", Split(x, y, mask=mask),
                          val=Split(xv, torch.randn(9, 1, generator=g, dtype=torch.float64)), group="rows"))
    return tasks


def test_batcher_draws_once_per_group_and_keeps_own_rows_draws() -> None:
    shared = _shared_tasks()
    own = _regression_tasks([12, 20], seed=3)
    batch = TaskBatcher([own[0], *shared, own[1]], batch_size=8).sample(torch.Generator().manual_seed(0))
    assert list(batch) == ["r0", "s0", "s1", "s2", "s3", "r1"]  # the tasks' order
    assert all(batch[f"s{i}"][0] is batch["s0"][0] for i in range(4))  # one x for the group
    assert len(batch["s1"]) == 3 and len(batch["s0"]) == 2  # the masked task carries its mask
    g = torch.Generator().manual_seed(0)  # draws: r0, then the group (first appearance), then r1
    r0, rows, r1 = (torch.randperm(n, generator=g)[:8] for n in (12, 30, 20))
    assert torch.equal(batch["r0"][0], own[0].train.x[r0]) and torch.equal(batch["r1"][1], own[1].train.y[r1])
    assert torch.equal(batch["s0"][0], shared[0].train.x[rows])
    assert shared[1].train.mask is not None and torch.equal(batch["s1"][2], shared[1].train.mask[rows])


def _count_trunk(model: MultiTaskModel) -> list[int]:
    calls: list[int] = []
    model.trunk.register_forward_hook(lambda mod, a, out: calls.append(int(a[0].shape[0])))
    return calls


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "mgda", "pcgrad"])
def test_joint_step_on_shared_rows_is_one_trunk_pass_and_the_loop_update(weighting: str) -> None:
    tasks = _shared_tasks()
    by_name = {t.name: t for t in tasks}
    batch = TaskBatcher(tasks, batch_size=16).sample(torch.Generator().manual_seed(1))
    fast, ref = _model(tasks), _model(tasks)
    calls = _count_trunk(fast)
    from mtml.weighting import WEIGHTINGS

    options = {"gramian": "loop"} if weighting in ("mgda", "pcgrad") else {}
    for model, opts, seed in ((fast, {}, 5), (ref, options, 5)):
        w = WEIGHTINGS.create(weighting, list(by_name), **opts).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(seed)
        if model is ref:  # the reference: one forward per task, losses on labelled rows only
            losses = torch.stack([by_name[n].compute_loss(model(batch[n][0], n), *batch[n][1:]) for n in by_name])
            from mtml.weighting import task_gramian

            gram = task_gramian(losses, list(model.shared_parameters()), backend="loop") if w.needs_gramian else None
            ww = w(losses, gram)
            opt.zero_grad()
            ((ww * losses).sum() + w.penalty().to(losses)).backward()
            opt.step()
        else:
            joint_step(model, by_name, batch, w, opt)
    assert calls == [16]  # one trunk pass of the group's 16 rows
    for p, q in zip(fast.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_evaluate_scores_a_group_in_one_pass_on_labelled_rows() -> None:
    tasks = _shared_tasks(n=12)
    model = _model(tasks)
    calls = _count_trunk(model)
    scores = evaluate(model, tasks, "train")
    assert calls == [12]
    t = tasks[1]
    assert t.train.mask is not None
    want = t.compute_metrics(predict(model, t.name, t.train.x)[t.train.mask], t.train.y[t.train.mask])
    assert scores["s1"] == pytest.approx(want)


def test_train_multitask_rejects_duplicate_task_names() -> None:
    tasks = _regression_tasks([5, 5], seed=1)
    twice = [tasks[0], Task("r0", "regression", tasks[1].train, val=tasks[1].train)]
    with pytest.raises(ConfigError, match=r"task names \['r0'\] occur more than once"):
        train_multitask(_model(tasks), twice)
