"""Proto-MAML: the prototype initialisation, ProtoNet at zero steps, a float64 oracle against a per-task loop,
errors and the config route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, MAML, Episode, ProtoMAML, ProtoNet, meta_parameters, meta_step, prototype_head
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

from .conftest import NotAChain, PathSpy, expected_engines, make_episode, make_model
from .test_oracle import TOL, assert_same_objective, call, loss_of

HEAD = {"mlp": "4", "multitask": "heads.task", "vmap": "head"}  # the head Linear of each make_model kind


def head_input(model: nn.Module, x: Tensor) -> Tensor:
    """What the head of a :func:`make_model` model sees, written out by hand for each kind."""
    if isinstance(model, MultiTaskModel):
        return model.features(x, "task")
    if isinstance(model, NotAChain):
        h = torch.tanh(model.body(x))
        return h + 0.5 * h.square()
    assert isinstance(model, nn.Sequential)
    return model[:-1](x)


def loop_prototypes(model: nn.Module, episode: Episode, t: int) -> Tensor:
    s = head_input(model, episode.support.x[t])
    return torch.stack([s[episode.support.y[t] == c].mean(0) for c in range(episode.ways)])


def loop_proto_maml(model: nn.Module, episode: Episode, kind: str, adapt: str, second_order: bool, lr: float,
                    steps: int) -> Tensor:
    """Per task: head ← (2cₖ, −‖cₖ‖²) from that task's prototypes, then plain gradient steps (functional_call and
    autograd.grad) on the head (``adapt="heads"``) or on everything (``"all"``), then the query loss."""
    params = dict(model.named_parameters())
    w_name, b_name = f"{HEAD[kind]}.weight", f"{HEAD[kind]}.bias"
    losses = []
    for t in range(episode.num_tasks):
        c = loop_prototypes(model, episode, t)
        start = {**params, w_name: 2 * c, b_name: -(c * c).sum(1)}
        # clones: each task's copy of the trunk is a variable of its own, so the inner gradient does not run into the
        # prototypes (the head's start is fixed once computed; only the outer gradient reaches the trunk through it)
        fast = {n: w.clone() for n, w in start.items() if adapt == "all" or n in (w_name, b_name)}
        for _ in range(steps):
            loss = loss_of(call(model, {**start, **fast}, episode.support.x[t]), episode.support.y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        losses.append(loss_of(call(model, {**start, **fast}, episode.query.x[t]), episode.query.y[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("adapt", ["heads", "all"])
@pytest.mark.parametrize(("steps", "first_order"), [(1, False), (2, False), (2, True)])
def test_meta_gradient_equals_loop(adapt: str, steps: int, first_order: bool, paths: str, model_kind: str,
                                   path_spy: PathSpy) -> None:
    """Loss and meta-gradient, through the inner loop and through the prototype initialisation into the trunk."""
    model = make_model(model_kind)
    episode = make_episode("classification")
    algorithm = ProtoMAML(model, inner_lr=0.3, inner_steps=steps, first_order=first_order, adapt=adapt)
    reference = loop_proto_maml(model, episode, model_kind, adapt, not first_order, 0.3, steps)
    assert_same_objective(algorithm, model, episode, reference)
    # head only: the inner loop runs on embeddings computed once (plain model calls), not through the engine
    assert path_spy.ran() == (expected_engines(model_kind, paths) if adapt == "all" else set())


def test_head_only_path_equals_maml_engine(model_kind: str, path_spy: PathSpy) -> None:
    """The embed-once head loop gives what MAML's engine gives when it adapts the prototype heads itself."""
    model = make_model(model_kind)
    episode = make_episode("classification")
    algorithm = ProtoMAML(model, inner_lr=0.3, inner_steps=3)
    ours = algorithm.meta_objective(model, episode).objective
    assert path_spy.ran() == set()
    engine = MAML.meta_objective(algorithm, model, episode).objective  # MAML's loop, from the same prototype start
    assert path_spy.ran() == expected_engines(model_kind, "fast")
    torch.testing.assert_close(ours, engine, **TOL)
    params = list(model.trunk.parameters() if isinstance(model, MultiTaskModel) else model[:-1].parameters()
                  if isinstance(model, nn.Sequential) else model.body.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(engine, params), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("adapt", ["heads", "all"])
def test_evaluate_equals_loop_at_every_step(adapt: str, model_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode("classification")
    scores = ProtoMAML(model, inner_lr=0.3, inner_steps=1, test_inner_steps=4, adapt=adapt).evaluate(
        model, episode, [0, 1, 4])
    for steps, got in scores.items():
        want = torch.stack([loop_proto_maml(model, episode.tasks(t, t + 1), model_kind, adapt, False, 0.3, steps)
                            for t in range(episode.num_tasks)]).detach()
        torch.testing.assert_close(got["loss"], want, **TOL)


def test_trunk_gets_its_gradient_through_the_initialisation() -> None:
    """Head-only adaptation: the trunk is not adapted, yet the outer gradient reaches it (through the prototypes);
    the model's own head parameters are never used."""
    model = make_model("multitask")
    algorithm = ProtoMAML(model, inner_lr=0.3, inner_steps=1, first_order=True)
    objective = algorithm.meta_objective(model, make_episode("classification")).objective
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(objective, list(named.values()), allow_unused=True), strict=True))
    assert grads["heads.task.weight"] is None and grads["heads.task.bias"] is None
    assert all(g is not None and float(g.abs().max()) > 0 for n, g in grads.items() if not n.startswith("heads."))


def test_initialisation_is_the_prototype_formula(model_kind: str) -> None:
    model = make_model(model_kind)
    episode = make_episode("classification")
    algorithm = ProtoMAML(model, inner_steps=1, test_inner_steps=0)
    adapted = algorithm.adapt(model, episode.support, ways=episode.ways, train=False)
    weight, bias = adapted[f"{HEAD[model_kind]}.weight"], adapted[f"{HEAD[model_kind]}.bias"]
    for t in range(episode.num_tasks):
        c = loop_prototypes(model, episode, t).detach()
        torch.testing.assert_close(weight[t], 2 * c, **TOL)
        torch.testing.assert_close(bias[t], -(c * c).sum(1), **TOL)
    w, b = prototype_head(torch.tensor([[[1.0, 2.0], [0.0, -3.0]]]))
    assert w.tolist() == [[[2.0, 4.0], [0.0, -6.0]]] and b.tolist() == [[-5.0, -9.0]]


def test_zero_steps_is_protonet_up_to_a_per_query_constant() -> None:
    """Before any inner step the logits are ProtoNet's −‖f − cₖ‖² plus ‖f‖² (the same for every class), so the
    loss and the accuracy are ProtoNet's."""
    model = make_model("multitask")
    episode = make_episode("classification", query=9)
    algorithm = ProtoMAML(model, inner_steps=1, test_inner_steps=0)
    protonet = ProtoNet(model)
    with torch.no_grad():
        ours = algorithm.predict(model, algorithm.adapt(model, episode.support, ways=3, train=False), episode.query.x)
        theirs = protonet.predict(model, protonet.adapt(model, episode.support, ways=3), episode.query.x)
    gap = ours - theirs
    norms = model.features(episode.query.x, "task").square().sum(-1, keepdim=True).detach()
    torch.testing.assert_close(gap, norms.expand_as(gap), **TOL)
    mine = algorithm.evaluate(model, episode, [0])[0]
    reference = protonet.evaluate(model, episode, [0])[0]
    torch.testing.assert_close(mine["loss"], reference["loss"], **TOL)
    assert torch.equal(mine["accuracy"], reference["accuracy"])


def test_trains_and_evaluates_after_steps() -> None:
    model = make_model("multitask", seed=2)
    algorithm = ALGORITHMS.create("proto_maml", model, inner_lr=0.3, inner_steps=2)
    optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=0.02)
    episode = make_episode("classification")
    first = meta_step(algorithm, model, episode, optimizer)["loss"]
    for _ in range(30):
        last = meta_step(algorithm, model, episode, optimizer)["loss"]
    assert last < first
    scores = algorithm.evaluate(model, episode, [0, 2])
    assert not torch.equal(scores[0]["loss"], scores[2]["loss"])  # the inner steps move the head


def test_checkpoint_round_trip_has_no_state_of_its_own() -> None:
    model = make_model("mlp")
    algorithm = ProtoMAML(model)
    assert algorithm.state_dict() == {} and list(algorithm.parameters()) == []
    copy = ProtoMAML(model)
    copy.load_state_dict(algorithm.state_dict())
    episode = make_episode("classification")
    a, b = algorithm.evaluate(model, episode, [1])[1], copy.evaluate(model, episode, [1])[1]
    assert torch.equal(a["loss"], b["loss"])


def test_bad_settings_are_one_line_errors() -> None:
    def raises(match: str, make: object) -> None:
        with pytest.raises(ConfigError, match=match) as err:
            make()  # type: ignore[operator]
        assert "\n" not in str(err.value)

    mlp = make_model("mlp")
    raises(r"`adapt` must be 'heads' or 'all'.*Got 'trunk'", lambda: ALGORITHMS.create("proto_maml", mlp,
                                                                                       adapt="trunk"))
    raises(r"`inner_lr` must be a finite number > 0\. Got -1", lambda: ALGORITHMS.create("proto_maml", mlp,
                                                                                        inner_lr=-1))
    deep_head = MultiTaskModel(nn.Linear(2, 4), {"task": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))})
    raises(r"one nn\.Linear.*heads\.task\.0\.bias.*head_hidden: \[\]", lambda: ProtoMAML(deep_head))
    raises("needs a classification episode", lambda: ProtoMAML(mlp).meta_objective(mlp, make_episode("regression")))
    two = make_model("mlp", out=2)  # (a head with more outputs than ways is fine: tests/meta/test_variable_way.py)
    raises("head has 2 outputs but the episode has 3 ways",
           lambda: ProtoMAML(two).evaluate(two, make_episode("classification"), [0]))


def test_mtml_train_from_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "proto_maml.yaml"
    cfg.write_text(
        "seed: 0\nthreads: 1\n"
        "data: {dataset: gaussian_classes, options: {classes: 45, dim: 6, ways: 3, shots: 2, query_shots: 2, "
        "meta_batch: 2}}\n"
        "model: {trunk_hidden: [8]}\n"
        "training: {algorithm: proto_maml, algorithm_options: {inner_lr: 0.1, inner_steps: 2, adapt: all}, "
        "max_steps: 4, eval_every: 2, meta_val_tasks: 5, meta_test_tasks: 5}\n")
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "mtml", "train", str(cfg), "--quiet"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "meta-test over 5 held-out tasks" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "proto_maml" and {"accuracy@0", "accuracy@2"} <= set(summary["test"][
        "gaussian_classes"])
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "bad"), "--set", "training.algorithm_options.adapt=trunk"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "`adapt` must be 'heads' or 'all' for proto_maml" in bad.stderr


def test_images_head_only_in_one_backward_and_equal_to_the_task_loop(path_spy: PathSpy) -> None:
    """On images the head-only path embeds all tasks in one call each for support and query and back-propagates
    the episode at once; it equals MAML's task loop adapting the prototype heads; adapt="all" keeps the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.arange(9).remainder(3).repeat(4, 1)
    episode = Episode(Split(x[:, :6], y[:, :6]), Split(x[:, 6:], y[:, 6:]), ways=3)
    heads = ProtoMAML(model, inner_lr=0.3, inner_steps=2)
    assert heads.backward_chunk(episode) == 4 and ProtoMAML(model, adapt="all").backward_chunk(episode) == 1
    ours = heads.meta_objective(model, episode).objective
    assert path_spy.ran() == set()
    loop = MAML.meta_objective(heads, model, episode).objective
    assert path_spy.ran() == {"_loop_forward"}
    torch.testing.assert_close(ours, loop, **TOL)
    trunk = list(model[0].parameters())
    for a, b in zip(torch.autograd.grad(ours, trunk), torch.autograd.grad(loop, trunk), strict=True):
        torch.testing.assert_close(a, b, **TOL)
