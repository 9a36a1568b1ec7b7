"""The compiled meta-gradient (``MAML(..., compiled=True)``, :mod:`mtml.meta._compiled`).

Oracle: on float64 MLP chains the compiled meta-gradient equals the eager one (itself checked against autograd and
float64 loops in test_oracle.py) for MAML, FOMAML, ANIL, BOIL and Meta-SGD (with its rates' gradients), several
steps, the zeroing trick, variable ways and frozen parameters — and each case asserts the compiled function
computed it. Then: training through :func:`~mtml.meta.meta_step` follows the eager run, programs are shared by
algorithms of one structure, what it refuses, and the eager fallback when compiling fails.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import mtml.meta._compiled as compiled_module
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, MAML, Episode, meta_step, speed_paths
from mtml.tasks import Split

from .conftest import make_episode, make_model


def _meta_gradient(algorithm: MAML, model: nn.Module, episode: Episode) -> tuple[float, list[torch.Tensor]]:
    out = algorithm.meta_objective(model, episode)
    params = [p for p in (*model.parameters(), *algorithm.parameters()) if p.requires_grad]  # Meta-SGD's rates
    grads = torch.autograd.grad(out.objective, params, allow_unused=True)  # a zeroed head gets none
    return float(out.objective.detach()), [torch.full_like(p, torch.nan) if g is None else g
                                           for p, g in zip(params, grads, strict=True)]


CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("maml", "mlp", "regression", {}),
    ("maml", "mlp", "classification", {"inner_steps": 2}),
    ("fomaml", "multitask", "regression", {}),
    ("anil", "mlp", "regression", {"inner_steps": 3}),
    ("maml", "multitask", "classification", {"zero_head": True, "adapt": "heads"}),
    ("boil", "multitask", "regression", {"inner_steps": 2}),
    ("metasgd", "mlp", "regression", {"inner_steps": 2}),
    ("metasgd", "multitask", "classification", {"zero_head": True}),
]


@pytest.mark.parametrize(("name", "kind", "episode_kind", "options"), CASES)
def test_compiled_meta_gradient_equals_the_eager_one(name: str, kind: str, episode_kind: str,
                                                     options: dict[str, Any]) -> None:
    model = make_model(kind)
    episode = make_episode(episode_kind)
    eager = ALGORITHMS.create(name, model, inner_lr=0.3, **options)
    fast = ALGORITHMS.create(name, model, inner_lr=0.3, compiled=True, **options)
    value, want = _meta_gradient(eager, model, episode)
    got_value, got = _meta_gradient(fast, model, episode)
    assert fast._compiled is not None and fast._compiled[1].calls == 1  # the compiled function computed it
    assert eager._compiled is None
    assert got_value == pytest.approx(value, rel=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True)  # NaN: no gradient in both
    assert any(float(w.abs().max()) > 1e-3 for w in want)  # not a vacuous comparison of zeros
    # the per-task losses and accuracies it reports are the eager ones
    a, b = eager.meta_objective(model, episode), fast.meta_objective(model, episode)
    torch.testing.assert_close(b.losses, a.losses, rtol=1e-12, atol=0.0)
    if a.accuracy is not None:
        assert b.accuracy is not None and torch.equal(a.accuracy, b.accuracy)


def test_variable_ways_and_frozen_parameters() -> None:
    """A 2-way episode through a 3-output head takes the first two logits; a frozen layer gets no gradient and is
    passed to the compiled function as a constant."""
    model = make_model("mlp")
    model[0].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    xs, xq = (torch.randn(4, n, 2, generator=g, dtype=torch.float64) for n in (4, 6))
    episode = Episode(Split(xs, torch.arange(4).remainder(2).repeat(4, 1)),
                      Split(xq, torch.randint(0, 2, (4, 6), generator=g)), ways=2)
    eager, fast = MAML(model, inner_lr=0.5), MAML(model, inner_lr=0.5, compiled=True)
    _, want = _meta_gradient(eager, model, episode)
    _, got = _meta_gradient(fast, model, episode)
    assert fast._compiled is not None and fast._compiled[1].calls == 1
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_meta_step_follows_the_eager_run_and_copies() -> None:
    """Ten SGD meta-steps with the compiled gradient land where the eager ones do; the algorithm still
    deep-copies and its state dict is unchanged by the compiled function."""
    runs = []
    for flag in (False, True):
        model = make_model("mlp")
        algorithm = MAML(model, inner_lr=0.2, compiled=flag)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = [meta_step(algorithm, model, make_episode("regression", seed=s), optimizer)["loss"]
                  for s in range(10)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], algorithm))
    (eager_losses, eager_params, _), (losses, params, algorithm) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-10)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert algorithm._compiled is not None and algorithm._compiled[1].calls == 10
    assert copy.deepcopy(algorithm).compiled
    assert algorithm.state_dict().keys() == MAML(make_model("mlp")).state_dict().keys()


def test_algorithms_of_one_structure_share_one_program() -> None:
    """A second algorithm (another inner rate, a fresh model of the same layers) reuses the first one's compiled
    program without compiling again; programs of different structures compile separate code objects."""
    from torch._dynamo.utils import counters

    episode = make_episode("regression")
    first = MAML(make_model("mlp"), inner_lr=0.3, compiled=True)
    _meta_gradient(first, make_model("mlp"), episode)
    graphs = counters["stats"]["unique_graphs"]
    model = make_model("mlp", seed=5)
    second = MAML(model, inner_lr=0.1, compiled=True)
    _, got = _meta_gradient(second, model, episode)
    _, want = _meta_gradient(MAML(model, inner_lr=0.1), model, episode)
    assert first._compiled is not None and second._compiled is not None
    assert second._compiled[1]._program is first._compiled[1]._program
    assert second._compiled[1].calls == 1 and counters["stats"]["unique_graphs"] == graphs  # nothing compiled
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    names = {p.fn.__wrapped__.__code__.co_name for p in compiled_module._PROGRAMS.values()}  # type: ignore[attr-defined]
    assert len(names) == len(compiled_module._PROGRAMS)  # each program its own code object (own Dynamo cache)


def test_eager_where_the_compiled_path_does_not_apply() -> None:
    """Speed paths off, autocast, or evaluation (no grad): the eager path runs and gives the same objective."""
    model = make_model("mlp")
    episode = make_episode("regression")
    algorithm = MAML(model, inner_lr=0.3, compiled=True)
    with speed_paths(hand_gradients=False):
        value = float(algorithm.meta_objective(model, episode).objective.detach())
    with torch.no_grad():
        algorithm.meta_objective(model, episode)
    assert algorithm._compiled is None
    assert value == pytest.approx(float(MAML(model, inner_lr=0.3).meta_objective(model, episode).objective.detach()))


def test_refused_where_it_cannot_compile() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"`compiled` compiles the meta-gradient of an MLP chain.*Conv2d"):
        MAML(conv, compiled=True)
    with pytest.raises(ConfigError, match="SiLU"):  # no hand backward for SiLU
        MAML(nn.Sequential(nn.Linear(2, 3), nn.SiLU(), nn.Linear(3, 1)), compiled=True)
    with pytest.raises(ConfigError, match="`compiled` and `checkpoint_inner` do not go together"):
        MAML(make_model("mlp"), compiled=True, checkpoint_inner=True)
    with pytest.raises(ConfigError, match=r"`compiled` must be true or false. Got 'yes'"):
        MAML(make_model("mlp"), compiled="yes")  # type: ignore[arg-type]
    for name in ("maml_pp", "proto_maml"):  # they change the inner loop: not offered
        with pytest.raises(ConfigError, match="compiled"):
            ALGORITHMS.create(name, make_model("mlp"), compiled=True)


def test_a_compile_failure_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, **_: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    monkeypatch.setattr(compiled_module, "_PROGRAMS", {})  # a fresh program, built with the broken compiler
    model = make_model("mlp")
    episode = make_episode("regression")
    algorithm = MAML(model, inner_lr=0.3, compiled=True)
    with pytest.warns(RuntimeWarning, match="could not compile the meta-gradient.*InvalidCxxCompiler"):
        _, got = _meta_gradient(algorithm, model, episode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent and eager
        _, again = _meta_gradient(algorithm, model, episode)
    _, want = _meta_gradient(MAML(model, inner_lr=0.3), model, episode)
    assert algorithm._compiled is not None and algorithm._compiled[1].calls == 0
    for a, b, c in zip(got, again, want, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_a_second_derivative_through_the_compiled_gradient_is_refused() -> None:
    """The compiled meta-gradient is handed to backward() as a constant: differentiating it again would give a
    silently wrong (zero) Hessian, so autograd refuses it."""
    model = make_model("mlp")
    algorithm = MAML(model, inner_lr=0.3, compiled=True)
    objective = algorithm.meta_objective(model, make_episode("regression")).objective
    grads = torch.autograd.grad(objective, list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # once_differentiable: no graph
        torch.autograd.grad(grads[0].sum(), list(model.parameters()))


def test_bad_shapes_raise_the_eager_error_and_keep_the_program() -> None:
    """A query of the wrong width fails while tracing: no "could not compile" warning, no log noise, the eager
    path's own error; the same algorithm then compiles a good episode."""
    model = make_model("mlp")
    algorithm = MAML(model, inner_lr=0.3, compiled=True)
    good = make_episode("regression")
    bad = Episode(good.support, Split(torch.randn(4, 6, 5, dtype=torch.float64), good.query.y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as compiled_error:
            algorithm.meta_objective(model, bad)
    with pytest.raises(RuntimeError) as eager_error:
        MAML(model, inner_lr=0.3).meta_objective(model, bad)
    assert str(compiled_error.value) == str(eager_error.value)
    algorithm.meta_objective(model, good)
    assert algorithm._compiled is not None and algorithm._compiled[1].calls == 1
    assert algorithm._compiled[1].failed is None and algorithm._compiled[1]._program.failed is None
