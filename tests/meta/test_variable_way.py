"""Variable-way episodes through a head with more outputs than the episode has ways (``meta_dataset``: a head of
``max_ways`` outputs, episodes of fewer): the logits of the unused classes must not enter any softmax.

The oracle: for a 3-way episode, a model whose head has 5 outputs must give every MAML-family algorithm exactly the
meta-objective, meta-gradient and meta-test scores of the same model with its head cut to its first 3 outputs (the
extra rows get a zero gradient); and an episode with as many ways as outputs must be computed bit for bit as before
the slicing existed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import mtml.meta._base
import mtml.meta._functional
import mtml.meta._maml
import mtml.meta._maml_pp
import mtml.meta._mlp
import mtml.meta._proto_maml
import mtml.meta._reptile
from mtml.errors import ShapeError
from mtml.meta import ALGORITHMS, MAML, Episode, MetaAlgorithm
from mtml.meta._episode import way_logits
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

from .conftest import IN, TASKS, WAYS, make_episode, make_model

OUTPUTS = 5  # the head's outputs; the episodes have WAYS = 3
MAML_FAMILY = {"maml", "fomaml", "reptile", "anil", "boil", "metasgd", "maml_pp", "proto_maml"}
#: options that make every algorithm take more than one inner step (so the inner loop's softmax matters twice)
OPTIONS: dict[str, dict[str, object]] = {name: {"inner_steps": 2} for name in MAML_FAMILY}
OPTIONS["maml_pp"] = {"inner_steps": 2, "first_order_steps": 0}  # second order from the first step
OPTIONS["proto_maml"] = {"inner_steps": 2, "adapt": "all"}
VARIANTS = [(name, OPTIONS[name]) for name in sorted(MAML_FAMILY)] + [
    ("maml", {"inner_steps": 2, "zero_head": True}),
    ("maml", {"inner_steps": 2, "checkpoint_inner": True}),
    ("proto_maml", {"inner_steps": 2, "adapt": "heads"}),
]


def family() -> list[str]:
    """The registry's MAML-family algorithms (those built on MAML's inner loop)."""
    baselines = {"baseline", "baseline_pp", "rfs_linear"}  # (built without the num_classes their pre-training needs)
    return [n for n in ALGORITHMS.names()
            if isinstance(ALGORITHMS.create(n, make_model("mlp"), **({"pretrain": False} if n in baselines else {})),
                          MAML)]


def test_the_oracle_covers_every_maml_family_algorithm_of_the_registry() -> None:
    assert set(family()) == MAML_FAMILY


class TinyConv(nn.Module):
    """An image model, so the task loop (inputs ``[tasks, n, C, H, W]``) runs the inner loop."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(8, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build(kind: str, out: int = OUTPUTS, seed: int = 0) -> nn.Module:
    if kind == "image":
        torch.manual_seed(seed)
        return TinyConv(out).double()
    return make_model(kind, out=out, seed=seed)


def head_path(model: nn.Module) -> str:
    """The name of the model's output layer (its head, else its last ``nn.Linear``)."""
    if isinstance(model, MultiTaskModel):
        return "heads.task"
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def cut_head(model: nn.Module, ways: int) -> nn.Module:
    """A copy of ``model`` whose output layer keeps only its first ``ways`` outputs (same values)."""
    small = copy.deepcopy(model)
    path = head_path(small)
    parent_path, _, leaf = path.rpartition(".")
    parent = small.get_submodule(parent_path) if parent_path else small
    old = getattr(parent, leaf)
    new = nn.Linear(old.in_features, ways, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:ways])
        new.bias.copy_(old.bias[:ways])
    setattr(parent, leaf, new)
    return small


def episode_for(kind: str) -> Episode:
    episode = make_episode("classification")
    if kind != "image":
        return episode
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(TASKS, episode.support.x.shape[1], 1, 4, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(TASKS, episode.query.x.shape[1], 1, 4, 4, generator=g, dtype=torch.float64)
    return Episode(Split(xs, episode.support.y), Split(xq, episode.query.y), ways=episode.ways)


def trainable(algorithm: MetaAlgorithm, model: nn.Module) -> dict[str, Tensor]:
    named = {f"model.{n}": p for n, p in model.named_parameters()}
    named.update({f"algorithm.{n}": p for n, p in algorithm.named_parameters()})
    return {n: p for n, p in named.items() if p.requires_grad}


def run(name: str, options: dict[str, object], model: nn.Module,
        episode: Episode) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """Objective, per-task losses and accuracies, meta-gradient ``{name: grad}`` and scores after 0-3 test steps."""
    algorithm = ALGORITHMS.create(name, model, **options)
    out = algorithm.meta_objective(model, episode)
    params = trainable(algorithm, model)
    grads = torch.autograd.grad(out.objective, list(params.values()), allow_unused=True)
    gradient = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)}
    scores = algorithm.evaluate(model, episode, [0, 1, 3])
    return out.objective.detach(), out.losses, out.accuracy, gradient, scores


@pytest.mark.parametrize("kind", ["mlp", "multitask", "vmap", "image"])
@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=[f"{n}-{'-'.join(o)}" for n, o in VARIANTS])
def test_a_head_with_more_outputs_equals_its_slice_to_the_episode_ways(
        name: str, options: dict[str, object], kind: str, paths: str) -> None:
    big = build(kind)
    small = cut_head(big, WAYS)
    episode = episode_for(kind)
    objective, losses, accuracy, gradient, scores = run(name, options, big, episode)
    objective_s, losses_s, accuracy_s, gradient_s, scores_s = run(name, options, small, episode)
    tight = {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(objective, objective_s, **tight)
    torch.testing.assert_close(losses, losses_s, **tight)
    assert accuracy is not None and accuracy_s is not None and torch.equal(accuracy, accuracy_s)
    assert gradient.keys() == gradient_s.keys()
    moved = 0
    for key, grad in gradient.items():
        reference = gradient_s[key]
        if grad.shape != reference.shape:  # the head's weight and bias (or Meta-SGD's rates of them): extra rows
            assert grad.shape[0] == OUTPUTS and reference.shape[0] == WAYS, key
            assert torch.equal(grad[WAYS:], torch.zeros_like(grad[WAYS:])), key
            grad = grad[:WAYS]
        torch.testing.assert_close(grad, reference, **tight, msg=key)
        moved += int(bool(reference.abs().max() > 0))
    assert moved >= 2  # a meta-gradient that is not all zeros
    assert scores.keys() == scores_s.keys()
    for steps, got in scores.items():
        torch.testing.assert_close(got["loss"], scores_s[steps]["loss"], **tight)
        assert torch.equal(got["accuracy"], scores_s[steps]["accuracy"])


#: every module that calls way_logits: patched to the identity, they compute what they did before it existed
CALLERS = [mtml.meta._base, mtml.meta._functional, mtml.meta._mlp, mtml.meta._maml, mtml.meta._maml_pp,
           mtml.meta._reptile]


def unsliced(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in CALLERS:
        assert hasattr(module, "way_logits"), module.__name__
        monkeypatch.setattr(module, "way_logits", lambda pred, y, ways: pred)


def same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a is b


@pytest.mark.parametrize("kind", ["mlp", "vmap"])
@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=[f"{n}-{'-'.join(o)}" for n, o in VARIANTS])
def test_ways_equal_to_the_outputs_is_bit_identical_to_no_slicing(
        name: str, options: dict[str, object], kind: str, paths: str, monkeypatch: pytest.MonkeyPatch) -> None:
    episode = episode_for(kind)
    now = run(name, options, build(kind, out=WAYS), episode)
    fewer = run(name, options, build(kind), episode)
    with monkeypatch.context() as patch:
        unsliced(patch)
        before = run(name, options, build(kind, out=WAYS), episode)
        before_fewer = run(name, options, build(kind), episode)
    assert same(now, before)
    if name != "proto_maml":  # (its prototype heads have the episode's ways whatever the model's head)
        assert not same(fewer, before_fewer)  # the patch reaches the slicing: without it 5 logits enter the softmax


def test_way_logits() -> None:
    pred = torch.randn(2, 4, 5)
    labels = torch.zeros(2, 4, dtype=torch.long)
    assert way_logits(pred, labels, 5) is pred and way_logits(pred, labels, 0) is pred
    assert way_logits(pred, torch.zeros(2, 4, 5), 3) is pred  # regression targets: never sliced
    assert torch.equal(way_logits(pred, labels, 3), pred[..., :3])
    with pytest.raises(ShapeError, match="6 ways but the model gives 5 logits"):
        way_logits(pred, labels, 6)


def test_more_ways_than_outputs_is_one_clear_error() -> None:
    model = make_model("mlp", out=2)
    with pytest.raises(ShapeError, match="3 ways but the model gives 2 logits") as err:
        ALGORITHMS.create("maml", model).meta_objective(model, make_episode("classification"))
    assert "\n" not in str(err.value)


def test_variable_way_meta_training_step_by_step() -> None:
    """Episodes of 2 and 3 ways through one 5-output head, as meta_dataset draws them: every step's objective is
    the 2- or 3-output slice's, and the unused head rows are never moved by the outer update."""
    torch.manual_seed(0)
    model = MultiTaskModel(nn.Sequential(nn.Linear(IN, 6), nn.Tanh()), {"task": nn.Linear(6, OUTPUTS)}).double()
    algorithm = ALGORITHMS.create("maml", model, inner_lr=0.5, inner_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model.heads["task"].weight.detach().clone()
    for ways in (2, 3, 2):
        g = torch.Generator().manual_seed(ways)
        ys = torch.arange(2 * ways).remainder(ways).repeat(TASKS, 1)
        episode = Episode(Split(torch.randn(TASKS, 2 * ways, IN, generator=g, dtype=torch.float64), ys),
                          Split(torch.randn(TASKS, 2 * ways, IN, generator=g, dtype=torch.float64), ys), ways=ways)
        reference = algorithm.meta_objective(cut_head(model, ways), episode).objective
        optimizer.zero_grad()
        out = algorithm.meta_objective(model, episode)
        torch.testing.assert_close(out.objective, reference, rtol=1e-12, atol=1e-13)
        out.objective.backward()
        optimizer.step()
    weight = model.heads["task"].weight.detach()
    assert torch.equal(weight[3:], start[3:]) and not torch.equal(weight[:3], start[:3])
