"""Baseline, Baseline++ and the RFS linear probe: the cosine head by hand, the hand-written head gradients against
autograd, the whole algorithm against a per-task autograd loop, convergence against scikit-learn's logistic
regression, and every one through ``mtml train``."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, FineTunedHead, baseline, baseline_pp, rfs_linear
from mtml.meta._baselines import cosine_logits

from .conftest import make_episode, make_model

NAMES = ["baseline", "baseline_pp", "rfs_linear"]


def test_cosine_head_by_hand() -> None:
    f = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]], dtype=torch.float64)  # [1 task, 2 examples, 2 dims]
    w = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 2.0, 0.0]]], dtype=torch.float64)  # [1, 2 dims, 3 classes]
    # cos((3,4), (1,0)) = 3/5, cos((3,4), (0,2)) = 4/5, cos((3,4), (-2,0)) = -3/5; (1,0): 1, 0, -1
    expected = 2.5 * torch.tensor([[[0.6, 0.8, -0.6], [1.0, 0.0, -1.0]]], dtype=torch.float64)
    torch.testing.assert_close(cosine_logits(f, w, 2.5), expected)


def head_loss(head: FineTunedHead, x: Tensor, y: Tensor, w: Tensor, ways: int) -> Tensor:
    """The support objective each head descends, written with autograd-friendly ops (summed over tasks)."""
    if head.head == "cosine":
        logits = cosine_logits(x, w, head.scale)
        return sum(F.cross_entropy(logits[t], y[t]) for t in range(x.shape[0]))  # type: ignore[return-value]
    xb = F.pad(F.normalize(x, dim=-1) if head.normalize else x, (0, 1), value=1.0)
    n = x.shape[1]
    l2 = 1.0 / (head.c * n) if head.c is not None else head.l2
    total = torch.zeros((), dtype=x.dtype)
    for t in range(x.shape[0]):
        total = total + F.cross_entropy(xb[t] @ w[t], y[t]) + 0.5 * l2 * w[t, :-1].square().sum()
    return total


@pytest.mark.parametrize("name", NAMES)
def test_hand_gradients_equal_autograd(name: str) -> None:
    """After ``k`` steps the weights equal ``k`` plain gradient steps taken with autograd, at the stated step."""
    model = make_model("mlp")
    head = ALGORITHMS.create(name, model, lr=0.7, **({"l2": 0.3} if name == "baseline" else {}))
    assert isinstance(head, FineTunedHead)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    y = torch.arange(6).remainder(3).repeat(3, 1)
    w = head.fit(x, y, 3, 1)
    for steps in (1, 2, 3):
        current = head.fit(x, y, 3, steps)
        if steps == 1:  # from the start: zeros, or the imprinted normalised class means
            if head.head == "cosine":
                xn = F.normalize(x, dim=-1)
                start = F.normalize(torch.stack([torch.stack([xn[t][y[t] == k].mean(0) for k in range(3)], 1)
                                                 for t in range(3)]), dim=1)
            else:
                start = torch.zeros(3, 5, 3, dtype=torch.float64)
            previous = start
        inputs = F.normalize(x, dim=-1) if head.head == "cosine" or head.normalize else x
        if head.head == "linear":
            inputs = F.pad(inputs, (0, 1), value=1.0)
        top = torch.linalg.eigvalsh(inputs.transpose(1, 2) @ inputs).amax(-1).view(3, 1, 1)
        if head.head == "cosine":
            step = 0.7 / (head.scale.detach() ** 2 * top / 12)
        else:
            l2 = 1.0 / (head.c * 6) if head.c is not None else head.l2
            step = 0.7 / (top / 12 + l2)
        leaf = previous.clone().requires_grad_()
        (grad,) = torch.autograd.grad(head_loss(head, x, y, leaf, 3), leaf)  # per-task means, summed
        torch.testing.assert_close(current, previous - step * grad, rtol=1e-10, atol=1e-12)
        previous = current
    assert not torch.equal(w, head.fit(x, y, 3, 2))


@pytest.mark.parametrize("name", ["baseline", "rfs_linear"])
def test_linear_heads_descend_monotonically(name: str) -> None:
    head = ALGORITHMS.create(name, make_model("mlp"))
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(2, 10, 5, generator=g, dtype=torch.float64)
    y = torch.arange(10).remainder(5).repeat(2, 1)
    losses = [float(head_loss(head, x, y, head.fit(x, y, 5, k), 5)) for k in range(1, 40)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))
    assert losses[-1] < (0.5 if name == "baseline" else 0.9) * losses[0]  # rfs: the L2 penalty keeps it higher


def test_rfs_probe_converges_to_scikit_learn_logistic_regression() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    head = rfs_linear(make_model("mlp"), steps=2000, c=1.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 15, 4, generator=g, dtype=torch.float64) + torch.arange(15).remainder(3).view(1, 15, 1)
    y = torch.arange(15).remainder(3).unsqueeze(0)
    q = torch.randn(1, 8, 4, generator=g, dtype=torch.float64)
    ours = torch.softmax(head.predict(torch.nn.Identity(), head.fit(x, y, 3, 2000), q), -1)[0]
    clf = linear_model.LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000)
    clf.fit(F.normalize(x[0], dim=-1).numpy(), y[0].numpy())
    theirs = torch.from_numpy(clf.predict_proba(F.normalize(q[0], dim=-1).numpy()))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def loop_objective(head: FineTunedHead, model: torch.nn.Module, steps: int) -> Tensor:
    """One task at a time: fit the head by autograd gradient steps (kept in the graph), score the query."""
    episode = make_episode("classification")
    losses = []
    for t in range(episode.num_tasks):
        s, q = model(episode.support.x[t])[None], model(episode.query.x[t])[None]
        ys = episode.support.y[t][None]
        if head.head == "cosine":
            sn = F.normalize(s, dim=-1)
            w = F.normalize(torch.stack([sn[0][ys[0] == k].mean(0) for k in range(episode.ways)], 1)[None], dim=1)
            step = head.lr / (head.scale.detach() ** 2 * torch.linalg.eigvalsh((sn.transpose(1, 2) @ sn).detach())
                              .amax() / (2 * s.shape[1]))
        else:
            xb = F.pad(s, (0, 1), value=1.0)
            w = torch.zeros(1, xb.shape[-1], episode.ways, dtype=s.dtype, requires_grad=True)
            step = head.lr / (torch.linalg.eigvalsh((xb.transpose(1, 2) @ xb).detach()).amax() / (2 * s.shape[1]))
        for _ in range(steps):
            (grad,) = torch.autograd.grad(head_loss(head, s, ys, w, episode.ways), w, create_graph=True)
            w = w - step * grad
        logits = cosine_logits(q, w, head.scale) if head.head == "cosine" else F.pad(q, (0, 1), value=1.0) @ w
        losses.append(F.cross_entropy(logits[0], episode.query.y[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("name", ["baseline", "baseline_pp"])
def test_meta_objective_and_gradient_equal_a_per_task_autograd_loop(name: str) -> None:
    model = make_model("mlp")
    head = ALGORITHMS.create(name, model, train_steps=3, lr=0.8)
    assert isinstance(head, FineTunedHead)
    ours = head.meta_objective(model, make_episode("classification")).objective
    reference = loop_objective(head, model, 3)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    params = [*model.parameters(), *([head.scale] if name == "baseline_pp" else [])]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params), strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_meta_test_fits_steps_and_training_fits_train_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = FineTunedHead.fit

    def spy(self: FineTunedHead, features: Tensor, labels: Tensor, ways: int, steps: int) -> Tensor:
        seen.append(steps)
        return original(self, features, labels, ways, steps)

    monkeypatch.setattr(FineTunedHead, "fit", spy)
    model = make_model("mlp")
    head = baseline_pp(model, steps=17, train_steps=4)
    episode = make_episode("classification")
    head.meta_objective(model, episode)
    with torch.no_grad():  # meta-test runs under no_grad: the hand gradients need no autograd
        scores = head.evaluate(model, episode, [0])
    assert seen == [4, 17] and torch.isfinite(scores[0]["loss"]).all()


def test_frozen_embedding_at_meta_test() -> None:
    model = make_model("mlp")
    head = baseline(model)
    head.evaluate(model, make_episode("classification"), [0])
    assert all(p.grad is None for p in model.parameters())


def test_only_baseline_pp_learns_a_scale() -> None:
    model = make_model("mlp")
    assert baseline_pp(model).scale.requires_grad and not baseline_pp(model, learn_scale=False).scale.requires_grad
    assert not baseline(model).scale.requires_grad and not rfs_linear(model).scale.requires_grad
    assert math.isclose(float(baseline_pp(model, scale=4.0).scale.detach()), 4.0)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("baseline", "steps", 0), ("baseline", "train_steps", 0), ("baseline", "lr", -1.0), ("baseline", "l2", -0.5),
     ("baseline_pp", "scale", 0.0), ("baseline_pp", "lr", 0), ("rfs_linear", "c", 0.0), ("rfs_linear", "steps", -2)],
)
def test_bad_options_are_one_line_config_errors(name: str, option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option) as err:
        ALGORITHMS.create(name, make_model("mlp"), **{option: value})
    assert "Got" in str(err.value) and "\n" not in str(err.value)


def test_unknown_head_and_regression_are_rejected() -> None:
    model = make_model("mlp")
    with pytest.raises(ConfigError, match=r"`head` must be one of linear, cosine\. Got 'svm'"):
        FineTunedHead(model, head="svm")
    with pytest.raises(ConfigError, match="classification"):
        baseline(model).meta_objective(model, make_episode("regression"))


@pytest.mark.parametrize("name", NAMES)
def test_mtml_train_from_yaml(tmp_path: Path, name: str) -> None:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}-tiny\nthreads: 1\n"
                   "data: {dataset: gaussian_classes, options: {classes: 45, dim: 6, ways: 3, shots: 2, "
                   "query_shots: 2, meta_batch: 2}}\nmodel: {trunk_hidden: [8, 8]}\n"
                   f"training: {{algorithm: {name}, algorithm_options: {{steps: 20, train_steps: 3}}, max_steps: 4, "
                   "eval_every: 2, meta_val_tasks: 6, meta_test_tasks: 6}\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "meta-test over 6 held-out tasks" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == name and summary["test"]["gaussian_classes"]["num_tasks"] == 6
