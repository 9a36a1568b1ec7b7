"""Oracle tests: each vectorised algorithm equals a plain per-task loop on one episode (float64, 1e-5)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtml.meta import ALGORITHMS, Episode, MetaAlgorithm, MetaSGD
from mtml.nn import MultiTaskModel

from .conftest import PathSpy, expected_engines, make_episode, make_model

TOL = dict(rtol=1e-5, atol=1e-7)
GRADIENT_BASED = ["maml", "fomaml", "anil", "boil", "metasgd"]


def call(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    if isinstance(model, MultiTaskModel):
        return functional_call(model, params, (x, "task"))
    return functional_call(model, params, (x,))


def loss_of(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred, y) if y.is_floating_point() else F.cross_entropy(pred, y)


def adapted_names(model: nn.Module, spec: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if isinstance(model, MultiTaskModel):
        return [n for n in names if n.startswith("heads." if spec == "heads" else "trunk.")]
    last = [n for n, _ in model.named_children()][-1] + "."
    return [n for n in names if n.startswith(last) == (spec == "heads")]


def loop_inner(model: nn.Module, x: Tensor, y: Tensor, names: list[str],
               rate: Callable[[str], Tensor | float], steps: int, second_order: bool,
               detach: bool = False) -> dict[str, Tensor]:
    """One task's inner loop, the textbook way: functional_call and autograd.grad."""
    params = dict(model.named_parameters())
    if detach:
        params = {n: p.detach() for n, p in params.items()}
    fast = {n: params[n] for n in names}
    for _ in range(steps):
        with torch.enable_grad():
            fast = {n: w if w.requires_grad else w.requires_grad_() for n, w in fast.items()}
            loss = loss_of(call(model, {**params, **fast}, x), y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
        fast = {n: w - rate(n) * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        if detach:
            fast = {n: w.detach() for n, w in fast.items()}
    return {**params, **fast}


def loop_maml(algorithm: MetaAlgorithm, model: nn.Module, episode: Episode, spec: str) -> Tensor:
    names = adapted_names(model, spec)
    if isinstance(algorithm, MetaSGD):
        def rate(n: str) -> Tensor | float:
            return algorithm.rates[n.replace(".", "__")]
    else:
        def rate(n: str) -> Tensor | float:
            return algorithm.inner_lr
    losses = []
    for t in range(episode.num_tasks):
        params = loop_inner(model, episode.support.x[t], episode.support.y[t], names, rate,
                            algorithm.inner_steps, second_order=not algorithm.first_order)
        losses.append(loss_of(call(model, params, episode.query.x[t]), episode.query.y[t]))
    return torch.stack(losses).mean()


def features(model: nn.Module, x: Tensor) -> Tensor:
    return model.features(x, "task") if isinstance(model, MultiTaskModel) else model(x)


def loop_protonet(model: nn.Module, episode: Episode) -> Tensor:
    losses = []
    for t in range(episode.num_tasks):
        s, q = features(model, episode.support.x[t]), features(model, episode.query.x[t])
        protos = torch.stack([s[episode.support.y[t] == c].mean(0) for c in range(episode.ways)])
        logits = -((q[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, episode.query.y[t]))
    return torch.stack(losses).mean()


def loop_ridge(algorithm: MetaAlgorithm, model: nn.Module, episode: Episode) -> Tensor:
    losses = []
    for t in range(episode.num_tasks):
        s = F.pad(features(model, episode.support.x[t]), (0, 1), value=1.0)
        q = F.pad(features(model, episode.query.x[t]), (0, 1), value=1.0)
        y = episode.support.y[t]
        target = F.one_hot(y, episode.ways).double() if episode.is_classification else y
        eye = torch.eye(s.shape[1], dtype=s.dtype)
        w = torch.linalg.solve(s.T @ s + algorithm.log_l2.exp() * eye, s.T @ target)  # primal form
        pred = q @ w
        if episode.is_classification:
            pred = algorithm.scale * pred + algorithm.offset
        losses.append(loss_of(pred, episode.query.y[t]))
    return torch.stack(losses).mean()


def meta_params(algorithm: MetaAlgorithm, model: nn.Module) -> list[Tensor]:
    return [p for p in (*model.parameters(), *algorithm.parameters()) if p.requires_grad]


def assert_same_objective(algorithm: MetaAlgorithm, model: nn.Module, episode: Episode,
                          reference: Tensor) -> None:
    ours = algorithm.meta_objective(model, episode).objective
    torch.testing.assert_close(ours, reference, **TOL)
    params = meta_params(algorithm, model)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_ref = torch.autograd.grad(reference, params, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        if a is None or b is None:  # unused on one side: then it must be exactly zero on the other
            other = a if a is not None else b
            assert other is None or other.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", GRADIENT_BASED)
@pytest.mark.parametrize("steps", [1, 3])
def test_gradient_based_equals_loop(name: str, steps: int, paths: str, model_kind: str, episode_kind: str,
                                    path_spy: PathSpy) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind)
    algorithm = ALGORITHMS.create(name, model, inner_lr=0.3, inner_steps=steps).double()
    spec = {"anil": "heads", "boil": "trunk"}.get(name, "all")
    assert_same_objective(algorithm, model, episode, loop_maml(algorithm, model, episode, spec))
    assert path_spy.ran() == expected_engines(model_kind, paths)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("which", ["biases", "weights", "middle"])
def test_partial_adaptation_equals_loop(which: str, steps: int, paths: str, episode_kind: str,
                                        path_spy: PathSpy) -> None:
    """Layers whose bias adapts but not their weight, weights without their biases, a fast layer between shared
    ones: the hand-derived backward pass stops and skips where it should."""
    model = make_model("mlp")
    episode = make_episode(episode_kind)
    keep = {"biases": lambda n: n.endswith("bias"), "weights": lambda n: n.endswith("weight"),
            "middle": lambda n: n.startswith("2.")}[which]
    algorithm = ALGORITHMS.create("maml", model, inner_lr=0.3, inner_steps=steps, adapt=keep)
    names = [n for n, _ in model.named_parameters() if keep(n)]
    losses = []
    for t in range(episode.num_tasks):
        params = loop_inner(model, episode.support.x[t], episode.support.y[t], names, lambda n: 0.3, steps,
                            second_order=True)
        losses.append(loss_of(call(model, params, episode.query.x[t]), episode.query.y[t]))
    assert_same_objective(algorithm, model, episode, torch.stack(losses).mean())
    assert path_spy.ran() == expected_engines("mlp", paths)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil"])
def test_zero_head_equals_loop_from_a_zeroed_head(name: str, paths: str, model_kind: str,
                                                 episode_kind: str, path_spy: PathSpy) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind)
    algorithm = ALGORITHMS.create(name, model, inner_lr=0.3, inner_steps=2, zero_head=True)
    zeroed = copy.deepcopy(model)
    head = adapted_names(zeroed, "heads")
    with torch.no_grad():
        for n, p in zeroed.named_parameters():
            if n in head:
                p.zero_()
    spec = "heads" if name == "anil" else "all"
    reference = loop_maml(algorithm, zeroed, episode, spec)
    ours = algorithm.meta_objective(model, episode).objective
    assert path_spy.ran() == expected_engines(model_kind, paths)
    torch.testing.assert_close(ours, reference, **TOL)
    trunk = [n for n, _ in model.named_parameters() if n not in head]
    mine = dict(zip(trunk, torch.autograd.grad(ours, [dict(model.named_parameters())[n] for n in trunk]),
                    strict=True))
    want = dict(zip(trunk, torch.autograd.grad(reference, [dict(zeroed.named_parameters())[n] for n in trunk]),
                    strict=True))
    for n in trunk:
        torch.testing.assert_close(mine[n], want[n], **TOL)
    before = algorithm.evaluate(model, episode, [0])[0]["loss"]  # a zero head predicts zeros before adapting
    y = episode.query.y
    expected = (torch.full((episode.num_tasks,), math.log(episode.ways), dtype=torch.float64)
                if episode.is_classification else y.square().mean((1, 2)))
    torch.testing.assert_close(before, expected, **TOL)


def test_metasgd_learned_rates_equal_loop(paths: str, model_kind: str, path_spy: PathSpy) -> None:
    model = make_model(model_kind)
    episode = make_episode("regression")
    algorithm = MetaSGD(model, inner_lr=0.2, inner_steps=2).double()
    with torch.no_grad():  # distinct rates per element, so a mix-up of names or shapes shows
        for rate in algorithm.rates.values():
            rate.uniform_(0.05, 0.4)
    assert_same_objective(algorithm, model, episode, loop_maml(algorithm, model, episode, "all"))
    assert path_spy.ran() == expected_engines(model_kind, paths)


@pytest.mark.parametrize("steps", [1, 4])
def test_reptile_equals_loop(steps: int, model_kind: str, episode_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind)
    algorithm = ALGORITHMS.create("reptile", model, inner_lr=0.3, inner_steps=steps)
    out = algorithm.meta_objective(model, episode)
    names = [n for n, _ in model.named_parameters()]
    adapted = [loop_inner(model, episode.support.x[t], episode.support.y[t], names, lambda n: 0.3, steps,
                          second_order=False, detach=True) for t in range(episode.num_tasks)]
    grads = torch.autograd.grad(out.objective, list(model.parameters()))
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        mean = torch.stack([a[name] for a in adapted]).mean(0)
        torch.testing.assert_close(g, p.detach() - mean, **TOL)
    query = torch.stack([loss_of(call(model, a, episode.query.x[t]), episode.query.y[t])
                         for t, a in enumerate(adapted)])
    torch.testing.assert_close(out.losses, query, **TOL)


def test_protonet_equals_loop(model_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode("classification")
    algorithm = ALGORITHMS.create("protonet", model)
    assert_same_objective(algorithm, model, episode, loop_protonet(model, episode))


@pytest.mark.parametrize("shots", [3, 9])  # fewer and more examples than features: both ridge solves
def test_ridge_equals_loop(shots: int, model_kind: str, episode_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind, shots=shots)
    algorithm = ALGORITHMS.create("ridge", model, l2=0.7, scale=2.0)
    with torch.no_grad():
        algorithm.offset.fill_(0.3)
    assert_same_objective(algorithm, model, episode, loop_ridge(algorithm, model, episode))


@pytest.mark.parametrize("name", [*GRADIENT_BASED, "reptile"])
def test_evaluate_equals_loop_at_every_step(name: str, paths: str, model_kind: str, episode_kind: str,
                                            path_spy: PathSpy) -> None:
    model = make_model(model_kind)
    episode = make_episode(episode_kind)
    algorithm = ALGORITHMS.create(name, model, inner_lr=0.3, inner_steps=1, test_inner_steps=4).double()
    if isinstance(algorithm, MetaSGD):
        def rate(n: str) -> Tensor | float:
            return algorithm.rates[n.replace(".", "__")].detach()
    else:
        def rate(n: str) -> Tensor | float:
            return 0.3
    spec = {"anil": "heads", "boil": "trunk"}.get(name, "all")
    names = adapted_names(model, spec)
    scores = algorithm.evaluate(model, episode, [0, 1, 4])
    for steps, got in scores.items():
        want = []
        for t in range(episode.num_tasks):
            params = loop_inner(model, episode.support.x[t], episode.support.y[t], names, rate, steps,
                                second_order=False, detach=True)
            want.append(loss_of(call(model, params, episode.query.x[t]), episode.query.y[t]))
        torch.testing.assert_close(got["loss"], torch.stack(want).detach(), **TOL)
    assert path_spy.ran() == expected_engines(model_kind, paths)


def test_checkpointed_inner_loop_gives_the_same_meta_gradient(model_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode("regression")
    plain = ALGORITHMS.create("maml", model, inner_lr=0.3, inner_steps=3)
    bounded = ALGORITHMS.create("maml", model, inner_lr=0.3, inner_steps=3, checkpoint_inner=True)
    a = torch.autograd.grad(plain.meta_objective(model, episode).objective, list(model.parameters()))
    b = torch.autograd.grad(bounded.meta_objective(model, episode).objective, list(model.parameters()))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **TOL)
