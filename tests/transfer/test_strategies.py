"""Transfer strategies: every registered one runs; oracles for ridge, freezing, L2-SP and meta adaptation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task
from mtml.transfer._strategies import STRATEGIES, Source, loo_ridge, ridge_fit, trunk_blocks

D_IN = 5


def _source(out: int = 1, seed: int = 0, heads: tuple[str, ...] = ("a", "b")) -> MultiTaskModel:
    torch.manual_seed(seed)
    heads = {name: mlp(8, [], out) for name in heads}
    return MultiTaskModel(mlp(D_IN, [16, 12, 8]), heads, input_shapes={n: (D_IN,) for n in heads})


def _task(kind: str, n: int = 12, seed: int = 1) -> Task:
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, D_IN, generator=g), torch.randn(30, D_IN, generator=g)
    if kind == "regression":
        w = torch.randn(D_IN, 2, generator=g)
        return Task("t", "regression", Split(x, x @ w), test=Split(xt, xt @ w))
    if kind == "multiclass":
        y = torch.arange(n) % 3
        return Task("t", "multiclass", Split(x + y[:, None], y), test=Split(xt, torch.arange(30) % 3))
    y = (x[:, 0] > 0).float()
    return Task("t", kind, Split(x, y if kind == "binary" else torch.stack([y, 1 - y], 1)),
                test=Split(xt, (xt[:, 0] > 0).float() if kind == "binary" else torch.ones(30, 2)))


def _fit(name: str, source: Source, task: Task, seed: int = 0, **opts: object) -> nn.Module:
    return STRATEGIES.create(name, **opts).fit(source, task, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["regression", "multiclass", "binary", "multilabel"])
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_gives_finite_metrics_and_leaves_the_source(name: str, kind: str) -> None:
    task = _task(kind)
    model = _source(heads=("task",) if name == "meta_adapt" else ("a", "b"))
    before = copy.deepcopy(model.state_dict())
    algorithm = ALGORITHMS.create("protonet", model) if name == "meta_adapt" else None
    if name == "meta_adapt" and kind in ("binary", "multilabel"):
        with pytest.raises(ConfigError, match="regression and multiclass"):
            _fit(name, Source(model, algorithm), task)
        return
    if name == "meta_adapt" and kind == "regression":
        algorithm = ALGORITHMS.create("ridge", model)
    if name in ("co_tuning", "stochnorm"):  # need head kinds / BatchNorm; run in tests/transfer/test_regularised.py
        with pytest.raises(ConfigError, match=r"co_tuning|stochnorm"):
            _fit(name, Source(model, algorithm), task)
        return
    if name == "blup":  # the mixed model's new-group prediction: a hierarchical-heads source, regression targets
        from mtml.nn._hierarchical import build_hierarchical

        with pytest.raises(ConfigError, match="hierarchical"):
            _fit(name, Source(model), task)
        if kind != "regression":
            return
        g = torch.Generator().manual_seed(1)
        groups = [Task(f"g{i}", "regression", Split(torch.randn(12, 5, generator=g),
                                                    torch.randn(12, task.num_outputs, generator=g)))
                  for i in range(3)]
        model = build_hierarchical(groups, trunk_hidden=[4])
        before = copy.deepcopy(model.state_dict())
    predictor = _fit(name, Source(model, algorithm), task, steps=20) if name not in (
        "linear_probe", "meta_adapt", "blup") else _fit(name, Source(model, algorithm), task)
    pred = predictor(task.test.x)
    assert pred.shape == (30, task.num_outputs)
    metrics = task.compute_metrics(pred, task.test.y)
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "auroc")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} changed the source's {key}"


def test_linear_probe_equals_the_closed_form_ridge_solution() -> None:
    model, task = _source(), _task("regression", n=20)
    predictor = _fit("linear_probe", Source(model), task, l2=0.3)
    with torch.no_grad():
        f = model.trunk(task.train.x).double()
    fc, yc = f - f.mean(0), task.train.y.double() - task.train.y.double().mean(0)
    w = torch.linalg.solve(fc.T @ fc + 0.3 * torch.eye(f.shape[1], dtype=torch.float64), fc.T @ yc)
    b = task.train.y.double().mean(0) - f.mean(0) @ w
    expected = model.trunk(task.test.x).double() @ w + b
    torch.testing.assert_close(predictor(task.test.x).double(), expected, atol=1e-4, rtol=1e-4)


def test_leave_one_out_choice_equals_refitting_without_each_example() -> None:
    g = torch.Generator().manual_seed(3)
    f, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)
    grid = [1e-3, 0.1, 1.0, 10.0]
    _, errors = loo_ridge(f, y, grid)
    for l2, err in zip(grid, errors, strict=True):
        sq = []
        for i in range(9):
            keep = torch.arange(9) != i
            w, b = ridge_fit(f[keep], y[keep], l2)
            sq.append((y[i] - (f[i] @ w + b)).square().mean())
        torch.testing.assert_close(err, torch.stack(sq).mean())


def test_finetune_head_leaves_the_trunk_and_finetune_last_only_the_last_blocks() -> None:
    model, task = _source(), _task("regression")
    head_only = _fit("finetune_head", Source(model), task, steps=30)
    for p, q in zip(head_only[0].parameters(), model.trunk.parameters(), strict=True):
        assert torch.equal(p, q)
    last2 = _fit("finetune_last", Source(model), task, steps=30, k=2)
    changed = [not torch.equal(p, q) for p, q in zip(trunk_blocks(last2[0]), trunk_blocks(model.trunk),
                                                        strict=True) for p, q in [(p.weight, q.weight)]]
    assert changed == [False, True, True]
    with pytest.raises(ConfigError, match=r"k=4.*only 3 blocks"):
        _fit("finetune_last", Source(model), task, k=4)


def test_l2sp_with_a_huge_alpha_stays_at_the_source() -> None:
    model, task = _source(), _task("regression")

    def distance(predictor: nn.Module) -> float:
        pairs = zip(predictor[0].parameters(), model.trunk.parameters(), strict=True)
        return max(float((p - q).detach().abs().max()) for p, q in pairs)

    free = distance(_fit("l2sp", Source(model), task, steps=100, alpha=1e-8))
    pinned = distance(_fit("l2sp", Source(model), task, steps=100, alpha=1e6))
    assert free > 0.2 and pinned < 0.02, (free, pinned)


def test_scratch_ignores_the_source() -> None:
    task = _task("regression")
    a = _fit("scratch", Source(_source(seed=0)), task, steps=20)
    b = _fit("scratch", Source(_source(seed=7)), task, steps=20)
    torch.testing.assert_close(a(task.test.x), b(task.test.x))


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "ridge"])
def test_meta_adapt_equals_calling_the_algorithm(algorithm: str) -> None:
    torch.manual_seed(0)
    model = MultiTaskModel(mlp(D_IN, [8]), {"task": mlp(8, [], 3)}, input_shapes={"task": (D_IN,)})
    alg = ALGORITHMS.create(algorithm, model, **({"inner_steps": 3} if algorithm == "maml" else {}))
    task = _task("multiclass")
    pred = _fit("meta_adapt", Source(model, alg), task)(task.test.x)
    adapted = alg.adapt(model, Split(task.train.x[None], task.train.y[None]), ways=3, train=False)
    with torch.no_grad():
        direct = alg.predict(model, adapted, task.test.x[None])[0]
    torch.testing.assert_close(pred, direct)


def test_meta_adapt_errors_name_the_fix() -> None:
    task = _task("multiclass")
    with pytest.raises(ConfigError, match="meta-learned source"):
        _fit("meta_adapt", Source(_source()), task)
    model = MultiTaskModel(mlp(D_IN, [8]), {"task": mlp(8, [], 5)})
    with pytest.raises(ConfigError, match=r"5 outputs.*3"):
        _fit("meta_adapt", Source(model, ALGORITHMS.create("maml", model)), task)


def test_hyperparameters_are_validated_at_construction_and_widths_at_fit() -> None:
    for name, opts, match in [("finetune_all", {"lr": -1}, "`lr`"), ("finetune_last", {"k": 0}, "`k`"),
                              ("l2sp", {"alpha": 0}, "`alpha`"), ("scratch", {"steps": 0}, "`steps`"),
                              ("linear_probe", {"l2": -2.0}, "`l2`"), ("linear_probe", {"grid": []}, "`grid`")]:
        with pytest.raises(ConfigError, match=match):
            STRATEGIES.create(name, **opts)
    g = torch.Generator().manual_seed(0)
    wide = Task("w", "regression", Split(torch.randn(4, D_IN + 1), torch.randn(4, 1)))
    with pytest.raises(ConfigError, match=r"shape \(6,\).*\(5,\)"):
        STRATEGIES.create("finetune_all").fit(Source(_source()), wide, generator=g)


def test_linear_probe_with_a_huge_penalty_is_the_source_mean_head_with_its_own_intercept() -> None:
    model = _source(out=2)
    task = _task("regression", n=20)
    predictor = _fit("linear_probe", Source(model), task, l2=1e12)
    with torch.no_grad():
        w0 = torch.stack([h[0].weight for h in model.heads.values()]).mean(0).double()  # [2, 8]
        f, ft = model.trunk(task.train.x).double(), model.trunk(task.test.x).double()
        b = (task.train.y.double() - f @ w0.T).mean(0)
        torch.testing.assert_close(predictor(task.test.x).double(), ft @ w0.T + b, atol=1e-4, rtol=1e-4)


def test_heads_start_from_the_source_for_regression_and_fresh_for_new_classes() -> None:
    model = _source(out=2)
    head = _fit("finetune_head", Source(model), _task("regression"), steps=1, lr=1e-9)[1]
    mean = torch.stack([h[0].weight for h in model.heads.values()]).mean(0)
    torch.testing.assert_close(head[0].weight, mean, atol=1e-6, rtol=0)
    three = _source(out=3)
    head = _fit("finetune_head", Source(three), _task("multiclass"), steps=1, lr=1e-9)[1]
    assert not any(torch.allclose(head[0].weight, h[0].weight, atol=1e-3) for h in three.heads.values())
