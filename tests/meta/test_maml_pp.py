"""MAML++: float64 oracle against a per-task loop (multi-step loss, learned per-step rates), the schedules, the
outer-step counter, checkpoints and the config route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import mtml.meta._maml_pp as maml_pp_module
from mtml.engine import load_checkpoint
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, Episode, MAMLPlusPlus, meta_parameters, meta_step, msl_weights
from mtml.tasks import Split

from .conftest import PathSpy, expected_engines, make_episode, make_model
from .test_oracle import TOL, assert_same_objective, call, loss_of


def loop_maml_pp(algorithm: MAMLPlusPlus, model: nn.Module, episode: Episode, weights: list[float],
                 second_order: bool) -> Tensor:
    """MAML++'s objective the textbook way: one task at a time, functional_call and autograd.grad, the query loss
    after every inner step weighted by ``weights``, parameter ``n`` stepped by ``rates[n][i]`` at step ``i``."""
    params = dict(model.named_parameters())
    objectives = []
    for t in range(episode.num_tasks):
        fast = dict(params)
        total: Tensor = torch.zeros((), dtype=torch.float64)
        for i, weight in enumerate(weights):
            loss = loss_of(call(model, fast, episode.support.x[t]), episode.support.y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: w - algorithm.rates[n.replace(".", "__")][i] * g
                    for (n, w), g in zip(fast.items(), grads, strict=True)}
            total = total + weight * loss_of(call(model, fast, episode.query.x[t]), episode.query.y[t])
        objectives.append(total)
    return torch.stack(objectives).mean()


def distinct_rates(algorithm: MAMLPlusPlus) -> None:
    """Different rates per parameter and per step, so a mix-up of either shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for rate in algorithm.rates.values():
            rate.copy_(0.05 + 0.3 * torch.rand(rate.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_equals_loop(second_order: bool, paths: str, model_kind: str, episode_kind: str,
                                   path_spy: PathSpy) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind)
    algorithm = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=3, msl_steps=10,
                             first_order_steps=0 if second_order else 100).double()
    distinct_rates(algorithm)
    algorithm.meta_steps.fill_(4)  # part way through the multi-step-loss annealing: three different weights
    weights = msl_weights(3, 4, 10)
    assert len(set(weights)) == 2 and weights[-1] > weights[0] > 0 and sum(weights) == pytest.approx(1.0)
    assert_same_objective(algorithm, model, episode, loop_maml_pp(algorithm, model, episode, weights, second_order))
    assert path_spy.ran() == expected_engines(model_kind, paths)


def test_rates_get_a_meta_gradient_per_step() -> None:
    model = make_model("mlp")
    algorithm = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=3, msl_steps=10).double()
    objective = algorithm.meta_objective(model, make_episode("regression")).objective
    grads = torch.autograd.grad(objective, list(algorithm.rates.values()))
    assert all(g.shape == (3,) and bool((g != 0).all()) for g in grads)


def test_msl_weights_closed_form() -> None:
    assert msl_weights(1, 0, 10) == [1.0]
    assert msl_weights(4, 0, 10) == [0.25] * 4
    assert msl_weights(4, 5, 10) == pytest.approx([0.125, 0.125, 0.125, 0.625])  # 1/4 ∓ 5 steps of 1/40
    assert msl_weights(4, 9, 10) == pytest.approx([0.025, 0.025, 0.025, 0.925])
    assert msl_weights(4, 99, 100) == pytest.approx([0.0075, 0.0075, 0.0075, 0.9775])  # floored at 0.03/4
    assert msl_weights(4, 10, 10) == [0.0, 0.0, 0.0, 1.0]
    assert msl_weights(4, 3, 0) == [0.0, 0.0, 0.0, 1.0]
    for t in range(12):
        assert sum(msl_weights(5, t, 11)) == pytest.approx(1.0)


def test_without_multi_step_loss_it_is_maml_with_learned_rates() -> None:
    model = make_model("multitask")
    episode = make_episode("classification")
    algorithm = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=2, multi_step_loss=False, first_order_steps=0).double()
    distinct_rates(algorithm)
    assert algorithm.loss_weights() == [0.0, 1.0]
    assert_same_objective(algorithm, model, episode, loop_maml_pp(algorithm, model, episode, [0.0, 1.0], True))
    plain = ALGORITHMS.create("maml", model, inner_lr=0.2, inner_steps=2)
    same = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=2, multi_step_loss=False, first_order_steps=0).double()
    torch.testing.assert_close(same.meta_objective(model, episode).objective,
                               plain.meta_objective(model, episode).objective, **TOL)


def test_derivative_order_switches_at_the_stated_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """First order for the first ``first_order_steps`` outer steps (inner gradients built without a graph), then
    second order; and the first-order phase's meta-gradient is the first-order loop's."""
    seen: list[bool] = []
    original = maml_pp_module.task_gradients

    def spy(*args: object, create_graph: bool = False, **kwargs: object) -> object:
        seen.append(create_graph)
        return original(*args, create_graph=create_graph, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maml_pp_module, "task_gradients", spy)
    model = make_model("mlp")
    algorithm = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=2, first_order_steps=3).double()
    optimizer = torch.optim.SGD(meta_parameters(algorithm, model), lr=0.0)  # lr 0: the model stays put
    episode = make_episode("regression")
    flags = []
    for _ in range(5):
        seen.clear()
        meta_step(algorithm, model, episode, optimizer)
        assert len(seen) == 2 and len(set(seen)) == 1  # both inner steps of one outer step agree
        flags.append(seen[0])
    assert flags == [False, False, False, True, True]
    assert int(algorithm.meta_steps) == 5

    monkeypatch.setattr(maml_pp_module, "task_gradients", original)
    algorithm.meta_steps.fill_(2)  # still first order: the gradient is the first-order loop's, not MAML's
    weights = algorithm.loss_weights()
    first = loop_maml_pp(algorithm, model, episode, weights, second_order=False)
    assert_same_objective(algorithm, model, episode, first)
    algorithm.meta_steps.fill_(3)
    weights = algorithm.loss_weights()
    second = loop_maml_pp(algorithm, model, episode, weights, second_order=True)
    assert_same_objective(algorithm, model, episode, second)
    g_first = torch.autograd.grad(loop_maml_pp(algorithm, model, episode, weights, False), list(model.parameters()))
    g_second = torch.autograd.grad(loop_maml_pp(algorithm, model, episode, weights, True), list(model.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(g_first, g_second, strict=True)) > 1e-4


def test_an_episode_back_propagated_task_by_task_counts_once() -> None:
    """On images the task loop back-propagates one task at a time (four meta_objective calls here); the counter
    still moves by one per episode and every chunk sees the same weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.arange(6).remainder(3).repeat(4, 1)
    episode = Episode(Split(x[:, :3], y[:, :3]), Split(x[:, 3:], y[:, 3:]), ways=3)
    algorithm = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=2, msl_steps=4)
    assert algorithm.backward_chunk(episode) == 1
    algorithm._chunks_left = 0
    calls: list[list[float]] = []
    original = algorithm.loss_weights

    def recorded() -> list[float]:
        calls.append(original())
        return calls[-1]

    algorithm.loss_weights = recorded  # type: ignore[method-assign]
    optimizer = torch.optim.SGD(meta_parameters(algorithm, model), lr=0.01)
    meta_step(algorithm, model, episode, optimizer)
    meta_step(algorithm, model, episode, optimizer)
    assert int(algorithm.meta_steps) == 2
    assert calls == [msl_weights(2, 0, 4)] * 4 + [msl_weights(2, 1, 4)] * 4


def test_evaluate_uses_the_learned_rates_and_repeats_the_last() -> None:
    model = make_model("multitask")
    episode = make_episode("classification")
    algorithm = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=2, test_inner_steps=4).double()
    distinct_rates(algorithm)
    scores = algorithm.evaluate(model, episode, [0, 1, 4])
    params = {n: p.detach() for n, p in model.named_parameters()}
    for steps, got in scores.items():
        want = []
        for t in range(episode.num_tasks):
            fast = dict(params)
            for i in range(steps):
                with torch.enable_grad():
                    fast = {n: w.requires_grad_() for n, w in fast.items()}
                    loss = loss_of(call(model, fast, episode.support.x[t]), episode.support.y[t])
                    grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {n: (w - algorithm.rates[n.replace(".", "__")][min(i, 1)] * g).detach()
                        for (n, w), g in zip(fast.items(), grads, strict=True)}
            want.append(loss_of(call(model, fast, episode.query.x[t]), episode.query.y[t]))
        torch.testing.assert_close(got["loss"], torch.stack(want).detach(), **TOL)


def test_checkpoint_round_trip() -> None:
    model = make_model("mlp")
    algorithm = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=3).double()
    optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=0.01)
    for s in range(3):
        meta_step(algorithm, model, make_episode("classification", seed=s), optimizer)
    state = algorithm.state_dict()
    assert set(state) == {"meta_steps", *(f"rates.{n.replace('.', '__')}" for n, _ in model.named_parameters())}
    assert not torch.equal(state["rates.0__weight"], torch.full((3,), 0.1, dtype=torch.float64))  # learned
    copy = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=3).double()
    copy.load_state_dict(state)
    assert int(copy.meta_steps) == 3
    episode = make_episode("classification", seed=9)
    a, b = algorithm.evaluate(model, episode, [3])[3], copy.evaluate(model, episode, [3])[3]
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("option", "value"),
    [("msl_steps", -1), ("msl_steps", 2.5), ("first_order_steps", -3), ("multi_step_loss", "sometimes"),
     ("inner_steps", 0), ("inner_lr", 0.0), ("test_inner_steps", -1), ("adapt", "everything")],
)
def test_bad_options_are_one_line_errors(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"[`']{option}[`']") as err:  # the constructor's check or the registry's
        ALGORITHMS.create("maml_pp", make_model("mlp"), **{option: value})
    assert "got" in str(err.value).lower() and repr(value) in str(err.value) and "\n" not in str(err.value)


def test_mtml_train_from_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "maml_pp.yaml"
    cfg.write_text(
        "seed: 0\nthreads: 1\n"
        "data: {dataset: gaussian_classes, options: {classes: 45, dim: 6, ways: 3, shots: 1, query_shots: 2, "
        "meta_batch: 2}}\n"
        "model: {trunk_hidden: [8]}\n"
        "training: {algorithm: maml_pp, algorithm_options: {inner_lr: 0.1, inner_steps: 2, msl_steps: 2, "
        "first_order_steps: 1}, max_steps: 4, eval_every: 2, meta_val_tasks: 5, meta_test_tasks: 5}\n")
    out = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "meta-test over 5 held-out tasks" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "maml_pp" and summary["test"]["gaussian_classes"]["num_tasks"] == 5
    last = max((out / "checkpoints").glob("*.safetensors"), key=lambda p: load_checkpoint(p).tensors[
        "algorithm.meta_steps"].item())
    tensors = load_checkpoint(last).tensors
    assert int(tensors["algorithm.meta_steps"]) == 4  # four outer steps counted, carried by the checkpoint
    assert tensors["algorithm.rates.heads__task__0__weight"].shape == (2,)

    bad = subprocess.run([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(tmp_path / "bad"),
                          "--quiet", "--set", "training.algorithm_options.msl_steps=-1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "`msl_steps` must be an integer >= 0. Got -1." in bad.stderr
