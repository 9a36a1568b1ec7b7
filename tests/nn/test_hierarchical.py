"""Hierarchical heads: on an identity trunk they are the linear mixed model — checked against statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mtml.engine._joint import evaluate, task_losses
from mtml.errors import ConfigError
from mtml.nn._hierarchical import HierarchicalModel
from mtml.tasks import Split, Task


def _grouped(groups: int = 30, seed: int = 0) -> list[Task]:
    """y = 1 + 0.5·x0 − 0.8·x1 + u0_g + u1_g·x1 + ε, with sd(u0) = 0.7, sd(u1) = 0.4, sd(ε) = 0.5."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(groups):
        n = int(torch.randint(6, 30, (1,), generator=g))
        x = torch.randn(n + 10, 2, generator=g, dtype=torch.float64)
        u0, u1 = 0.7 * torch.randn((), generator=g, dtype=torch.float64), 0.4 * torch.randn((), generator=g,
                                                                                          dtype=torch.float64)
        y = 1 + 0.5 * x[:, 0] - 0.8 * x[:, 1] + u0 + u1 * x[:, 1] + 0.5 * torch.randn(n + 10, generator=g,
                                                                                     dtype=torch.float64)
        tasks.append(Task(f"g{i}", "regression", Split(x[:n], y[:n]), val=Split(x[n:], y[n:])))
    return tasks


def _fit_ml(model: HierarchicalModel, tasks: list[Task]) -> None:
    """Maximum likelihood of every parameter on all training rows at once (LBFGS, float64)."""
    batch = {t.name: (t.train.x, t.train.y) for t in tasks}
    by_name = {t.name: t for t in tasks}
    rows = torch.tensor([len(t.train) for t in tasks], dtype=torch.float64)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = (task_losses(model, by_name, batch, list(by_name)) * rows).sum()
        total.backward()
        return total

    opt.step(closure)


@pytest.fixture(scope="module")
def fitted() -> tuple[HierarchicalModel, list[Task], object]:
    sm = pytest.importorskip("statsmodels.api")
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    tasks = _grouped()
    model = HierarchicalModel(nn.Identity(), tasks, d=2, random=[1, 2]).double()  # slope of x1 and intercept
    _fit_ml(model, tasks)
    x = np.concatenate([t.train.x.numpy() for t in tasks])
    y = np.concatenate([t.train.y.numpy()[:, 0] for t in tasks])
    group = np.concatenate([np.full(len(t.train), i) for i, t in enumerate(tasks)])
    exog = np.column_stack([np.ones(len(x)), x])
    exog_re = np.column_stack([np.ones(len(x)), x[:, 1]])
    free = MixedLMParams.from_components(np.ones(3), np.eye(2))  # a diagonal Ψ, as the heads learn
    result = sm.MixedLM(y, exog, group, exog_re=exog_re).fit(reml=False, free=free, method="lbfgs")
    return model, tasks, result


def test_estimates_match_statsmodels_mixedlm(fitted: tuple) -> None:
    model, _, result = fitted
    h = model.hierarchy
    beta = h.mean.detach()[:, 0]  # [x0, x1, intercept]
    np.testing.assert_allclose(beta.numpy()[[2, 0, 1]], result.fe_params, rtol=1e-4, atol=1e-4)
    sigma2 = float(h.log_sigma2.detach().exp())
    np.testing.assert_allclose(sigma2, result.scale, rtol=1e-3)
    tau2 = h.log_tau2.exp().detach().numpy()  # [x1 slope, intercept]
    np.testing.assert_allclose(tau2[[1, 0]], np.diag(result.cov_re), rtol=2e-3, atol=1e-5)


def test_predictions_are_the_blups(fitted: tuple) -> None:
    model, tasks, result = fitted
    evaluate(model, tasks, "val")  # refits the deviations from the training rows
    for i, t in enumerate(tasks):
        u = np.asarray(result.random_effects[i])  # [intercept, x1 slope]
        xv = t.split("val").x.numpy()
        want = result.fe_params[0] + xv @ result.fe_params[1:] + u[0] + u[1] * xv[:, 1]
        got = model(t.split("val").x, t.name)[:, 0].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_shrinkage_beats_pooled_and_separate_fits_on_small_groups() -> None:
    tasks = _grouped(groups=40, seed=3)
    model = HierarchicalModel(nn.Identity(), tasks, d=2).double()
    _fit_ml(model, tasks)
    mixed = np.mean([m["mse"] for m in evaluate(model, tasks, "val").values()])

    def design(x: torch.Tensor) -> np.ndarray:
        return np.column_stack([np.ones(len(x)), x.numpy()])

    xs = np.concatenate([design(t.train.x) for t in tasks])
    beta = np.linalg.lstsq(xs, np.concatenate([t.train.y.numpy()[:, 0] for t in tasks]), rcond=None)[0]
    pooled, separate = [], []
    for t in tasks:
        v = t.split("val")
        pooled.append(np.mean((design(v.x) @ beta - v.y.numpy()[:, 0]) ** 2))
        own = np.linalg.lstsq(design(t.train.x), t.train.y.numpy()[:, 0], rcond=None)[0]
        separate.append(np.mean((design(v.x) @ own - v.y.numpy()[:, 0]) ** 2))
    assert mixed < np.mean(pooled) and mixed < np.mean(separate), (mixed, np.mean(pooled), np.mean(separate))


def test_refuses_classification_and_shared_rows() -> None:
    x = torch.randn(10, 2)
    c = Task("c", "binary", Split(x, (x[:, 0] > 0).float()))
    with pytest.raises(ConfigError, match=r"regression tasks.*\['c'\]"):
        HierarchicalModel(nn.Identity(), [c], d=2)
    tasks = [Task(f"r{i}", "regression", Split(x, torch.randn(10)), group="rows") for i in range(2)]
    with pytest.raises(ConfigError, match="own rows"):  # refused when the model is built, before any run exists
        HierarchicalModel(nn.Identity(), tasks, d=2)
    own = [Task(f"r{i}", "regression", Split(torch.randn(10, 2), torch.randn(10))) for i in range(2)]
    model = HierarchicalModel(nn.Identity(), own, d=2)
    with pytest.raises(ConfigError, match="own rows"):  # and a batch that hands them one tensor anyway
        task_losses(model, {t.name: t for t in own}, {t.name: (x, t.train.y) for t in own}, ["r0", "r1"])


def test_a_hierarchical_config_trains_evaluates_and_resumes(tmp_path: object) -> None:
    from pathlib import Path

    from mtml.config import load_config
    from mtml.workflows import build, evaluate_run, train

    root = Path(str(tmp_path))
    shipped = Path(__file__).resolve().parents[2] / "examples" / "configs" / "schools_mixed.yaml"
    config = load_config(shipped, ["data.options.max_schools=12", "training.max_steps=60", "training.eval_every=20"])
    assert isinstance(build(config).model, HierarchicalModel)
    run, result = train(config, root / "run")
    scores = evaluate_run(run.path, "test")
    assert scores.keys() == result.test.keys()
    for task, metrics in result.test.items():
        assert metrics["mse"] == pytest.approx(scores[task]["mse"], rel=1e-6)
    single = build(load_config(shipped, ["data.options.max_schools=3", "model.share_trunk=false"])).model
    assert not isinstance(single, HierarchicalModel)  # the single-task baseline: independent heads
    with pytest.raises(ConfigError, match="head_options: unknown keys"):
        build(load_config(shipped, ["data.options.max_schools=3", "model.head_options.randm=all"]))
    with pytest.raises(ConfigError, match="hps architecture"):
        build(load_config(shipped, ["data.options.max_schools=3", "model.architecture=mmoe"]))


def test_blup_transfer_predicts_a_new_group_from_few_rows(fitted: tuple) -> None:
    from mtml.transfer._strategies import STRATEGIES, Source

    model, _, result = fitted
    new = _grouped(groups=1, seed=11)[0]
    few = Task("new", "regression", Split(new.train.x[:5], new.train.y[:5]), test=new.split("val"))
    predictor = STRATEGIES.create("blup").fit(Source(model), few, generator=torch.Generator())
    # the mixed model's prediction for a new group: fixed part + the BLUP of its 5 rows, by hand
    beta, sigma2 = result.fe_params, result.scale
    psi = np.diag(np.diag(result.cov_re))
    xs = few.train.x.numpy()
    zr = np.column_stack([np.ones(5), xs[:, 1]])
    resid = few.train.y.numpy()[:, 0] - (beta[0] + xs @ beta[1:])
    u = psi @ zr.T @ np.linalg.solve(sigma2 * np.eye(5) + zr @ psi @ zr.T, resid)
    xt = new.split("val").x.numpy()
    want = beta[0] + xt @ beta[1:] + u[0] + u[1] * xt[:, 1]
    np.testing.assert_allclose(predictor(new.split("val").x)[:, 0].detach().numpy(), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError, match="hierarchical"):
        STRATEGIES.create("blup").fit(Source(nn.Sequential()), few, generator=torch.Generator())  # type: ignore[arg-type]
