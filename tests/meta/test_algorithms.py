"""Properties every registered algorithm must have, the step functions, and bad settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError, ShapeError, UnknownNameError
from mtml.meta import (
    ALGORITHMS,
    MAML,
    R2D2,
    Episode,
    MetaSGD,
    ProtoNet,
    mean_ci,
    meta_evaluate,
    meta_parameters,
    meta_step,
)
from mtml.nn import MultiTaskModel
from mtml.sampling import SinusoidTasks
from mtml.tasks import Split

from .conftest import make_episode, make_model

ALL = ALGORITHMS.names()
#: hand-built episodes carry no global class ids: the Baseline family meta-trains through its support fit here
#: (its pre-training is tested in test_baselines.py)
OPTIONS = {name: {"pretrain": False} for name in ("baseline", "baseline_pp", "rfs_linear")}


def test_registry_lists_the_issue_algorithms() -> None:
    assert set(ALL) == {"maml", "fomaml", "reptile", "anil", "boil", "metasgd", "protonet", "ridge",
                        "maml_pp", "proto_maml", "metaoptnet", "baseline", "baseline_pp", "rfs_linear"}
    assert all(ALGORITHMS.describe().values())


def learnable_episode() -> Episode:
    """Classification whose labels follow one rule (the nearest of three centres) in support and query."""
    g = torch.Generator().manual_seed(7)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=torch.float64)
    labels = torch.arange(9).remainder(3).repeat(4, 1)
    x = centres[labels] + 0.5 * torch.randn(4, 9, 2, generator=g, dtype=torch.float64)
    return Episode(Split(x[:, :6], labels[:, :6]), Split(x[:, 6:], labels[:, 6:]), ways=3)


@pytest.mark.parametrize("name", ALL)
def test_meta_training_lowers_the_query_loss(name: str) -> None:
    model = make_model("multitask", seed=2)
    episode = learnable_episode()
    algorithm = ALGORITHMS.create(name, model, **OPTIONS.get(name, {}))
    optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=0.02)
    first = meta_step(algorithm, model, episode, optimizer)
    for _ in range(40):
        last = meta_step(algorithm, model, episode, optimizer)
    assert set(first) == {"loss", "accuracy"}
    assert torch.isfinite(torch.tensor(last["loss"]))
    assert last["loss"] < first["loss"]


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_run(name: str) -> None:
    def run() -> list[float]:
        model = make_model("mlp", seed=5)
        algorithm = ALGORITHMS.create(name, model, **OPTIONS.get(name, {}))
        optimizer = torch.optim.SGD(meta_parameters(algorithm, model), lr=0.05)
        return [meta_step(algorithm, model, make_episode("classification", seed=s), optimizer)["loss"]
                for s in range(3)]

    assert run() == run()


@pytest.mark.parametrize("name", ALL)
def test_meta_evaluate_reports_mean_and_ci_per_step(name: str) -> None:
    model = make_model("mlp")
    algorithm = ALGORITHMS.create(name, model, **OPTIONS.get(name, {}))
    episodes = [make_episode("classification", seed=s) for s in range(3)]  # 4 tasks each
    result = meta_evaluate(algorithm, model, episodes, steps=[0, 2], num_tasks=10)
    assert result["num_tasks"] == 10
    for step in (0, 2):
        assert 0 <= result[f"accuracy@{step}"] <= 1
        assert result[f"loss@{step}_ci95"] > 0
    if not algorithm.uses_inner_steps:
        assert result["loss@0"] == result["loss@2"]


def test_meta_evaluate_default_steps_and_sampler() -> None:
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    algorithm = MAML(model, inner_steps=1, test_inner_steps=3)
    sampler = SinusoidTasks(shots=5, meta_batch=7)
    result = meta_evaluate(algorithm, model, sampler, num_tasks=20,
                           generator=torch.Generator().manual_seed(0))
    assert {k for k in result if "@" in k} == {f"loss@{s}{c}" for s in (0, 1, 3) for c in ("", "_ci95")}
    again = meta_evaluate(algorithm, model, sampler, num_tasks=20, generator=torch.Generator().manual_seed(0))
    assert result == again


def test_meta_evaluate_needs_enough_tasks() -> None:
    model = make_model("mlp")
    with pytest.raises(ConfigError, match="num_tasks"):
        meta_evaluate(MAML(model), model, [make_episode("regression")], num_tasks=600)


def test_mean_ci_is_the_normal_interval() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    mean, half = mean_ci(values)
    assert mean == 2.5
    assert half == pytest.approx(1.959964 * values.std().item() / 2)


def test_sinusoid_maml_learns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    algorithm = MAML(model, inner_lr=0.01, inner_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler, g = SinusoidTasks(shots=10), torch.Generator().manual_seed(0)
    test = SinusoidTasks(shots=10, query_shots=50, meta_batch=100)

    def score() -> float:
        return meta_evaluate(algorithm, model, test, steps=[5], num_tasks=200,
                             generator=torch.Generator().manual_seed(1))["loss@5"]

    before = score()
    for _ in range(300):
        meta_step(algorithm, model, sampler.sample(g), optimizer)
    assert score() < 0.8 * before


def test_learned_state_is_in_the_state_dict() -> None:
    model = make_model("mlp")
    metasgd = MetaSGD(model, inner_lr=0.05)
    assert {k.removeprefix("rates.") for k in metasgd.state_dict()} == {
        n.replace(".", "__") for n, _ in model.named_parameters()
    }
    ridge = R2D2(model, l2=2.0)
    copy = R2D2(model)
    copy.load_state_dict(ridge.state_dict())
    assert copy.log_l2.exp().item() == pytest.approx(2.0)
    assert meta_parameters(ridge, model)[-3:] == [ridge.log_l2, ridge.scale, ridge.offset]


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("maml", "inner_lr", -1),
        ("maml", "inner_lr", 0.0),
        ("maml", "inner_lr", float("nan")),
        ("maml", "inner_steps", 0),
        ("maml", "inner_steps", 1.5),
        ("maml", "test_inner_steps", -1),
        ("maml", "test_inner_lr", -0.1),
        ("maml", "first_order", "yes"),
        ("maml", "adapt", "everything"),
        ("reptile", "inner_lr", -1),
        ("metasgd", "inner_lr", -1),
        ("anil", "inner_steps", 0),
        ("boil", "inner_lr", 0),
        ("ridge", "l2", -1.0),
        ("ridge", "scale", 0),
    ],
)
def test_bad_settings_are_rejected_naming_the_option(name: str, option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"`{option}`") as err:
        ALGORITHMS.create(name, make_model("mlp"), **{option: value})
    assert "Got" in str(err.value)


def test_error_message_is_sklearn_style() -> None:
    with pytest.raises(ConfigError, match=r"`inner_lr` must be a finite number > 0\. Got -1\."):
        MAML(make_model("mlp"), inner_lr=-1)


def test_unknown_option_and_name() -> None:
    with pytest.raises(ConfigError, match="inner_lr"):
        ALGORITHMS.create("maml", make_model("mlp"), inner_rate=0.1)
    with pytest.raises(UnknownNameError, match="maml"):
        ALGORITHMS.create("mamal", make_model("mlp"))


def test_filter_that_selects_nothing_is_rejected() -> None:
    with pytest.raises(ConfigError, match="selects none"):
        MAML(make_model("mlp"), adapt=lambda name: name.startswith("nothing."))


def test_protonet_rejects_regression_episodes() -> None:
    model = make_model("mlp")
    with pytest.raises(ConfigError, match="classification"):
        ProtoNet(model).meta_objective(model, make_episode("regression"))


def test_several_heads_are_rejected() -> None:
    model = MultiTaskModel(nn.Linear(2, 3), {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    algorithm = ALGORITHMS.create("protonet", model)
    with pytest.raises(ConfigError, match="single head"):
        algorithm.meta_objective(model, make_episode("classification"))


def test_episode_checks_shapes() -> None:
    x = torch.zeros(2, 3, 1)
    with pytest.raises(ShapeError, match="same two leading sizes"):
        Episode(Split(x, torch.zeros(2, 4, 1)), Split(x, torch.zeros(2, 3, 1)))
    with pytest.raises(ShapeError, match="tasks"):
        Episode(Split(x, torch.zeros(2, 3, 1)), Split(torch.zeros(3, 3, 1), torch.zeros(3, 3, 1)))
    with pytest.raises(ShapeError, match="ways"):
        Episode(Split(x, torch.zeros(2, 3, dtype=torch.long)), Split(x, torch.zeros(2, 3, dtype=torch.long)))


def test_zero_head_needs_an_adapted_head() -> None:
    model = make_model("multitask")
    with pytest.raises(ConfigError, match="zero_head") as err:
        ALGORITHMS.create("maml", model, adapt="trunk", zero_head=True)
    assert "heads.task" in str(err.value) and "adapt" in str(err.value)
    with pytest.raises(ConfigError, match="true or false"):
        MAML(model, zero_head="yes")  # type: ignore[arg-type]
