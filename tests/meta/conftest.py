"""Small float64 models and episodes shared by the meta-learning tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from mtml.meta import Episode, speed_paths
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

TASKS, IN, OUT, WAYS = 4, 2, 3, 3


class NotAChain(nn.Module):
    """A module the speed path cannot flatten (a skip connection), so it runs through vmap."""

    def __init__(self, out: int = OUT) -> None:
        super().__init__()
        self.body = nn.Linear(IN, 5)
        self.head = nn.Linear(5, out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h + 0.5 * h.square())


def make_model(kind: str, out: int = OUT, seed: int = 0) -> nn.Module:
    """``mlp`` (speed path), ``multitask`` (speed path, MultiTaskModel) or ``vmap`` (general path)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(IN, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                                         nn.Linear(4, out))
    elif kind == "multitask":
        trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.LeakyReLU(0.1))
        stem = nn.Sequential(nn.Linear(IN, 4), nn.Sigmoid())
        model = MultiTaskModel(trunk, {"task": nn.Linear(4, out)}, {"task": stem})
    else:
        model = NotAChain(out)
    return model.double()


def make_episode(kind: str, shots: int = 5, query: int = 6, seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(TASKS, shots, IN, generator=g, dtype=torch.float64)
    xq = torch.randn(TASKS, query, IN, generator=g, dtype=torch.float64)
    if kind == "regression":
        ys = torch.randn(TASKS, shots, OUT, generator=g, dtype=torch.float64)
        yq = torch.randn(TASKS, query, OUT, generator=g, dtype=torch.float64)
        return Episode(Split(xs, ys), Split(xq, yq))
    ys = torch.arange(shots).remainder(WAYS).repeat(TASKS, 1)
    yq = torch.randint(0, WAYS, (TASKS, query), generator=g)
    return Episode(Split(xs, ys), Split(xq, yq), ways=WAYS)


@pytest.fixture(params=["mlp", "multitask", "vmap"])
def model_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["regression", "classification"])
def episode_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)



#: the speed-path settings an oracle runs under: name → switches turned off (see :func:`mtml.meta.speed_paths`)
PATHS = {"fast": {}, "autograd": {"hand_gradients": False}, "vmap": {"mlp_chain": False, "task_loop": False}}


class PathSpy:
    """Counts the engine calls of :mod:`mtml.meta._functional` so a test can assert which path ran."""

    ENGINES = ("chain_forward", "chain_gradients", "_loop_forward", "_vmap_forward")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import mtml.meta._functional as functional

        self.calls = dict.fromkeys(self.ENGINES, 0)
        for name in self.ENGINES:
            original = getattr(functional, name)

            def counted(*args: object, _name: str = name, _original: object = original, **kwargs: object) -> object:
                self.calls[_name] += 1
                return _original(*args, **kwargs)  # type: ignore[operator]

            monkeypatch.setattr(functional, name, counted)

    def ran(self) -> set[str]:
        return {name for name, count in self.calls.items() if count}

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.ENGINES, 0)


def expected_engines(model_kind: str, paths: str, *, gradients: bool = True) -> set[str]:
    """What :class:`PathSpy` must see for a model of ``model_kind`` (see :func:`make_model`) under ``paths``;
    ``gradients``: the run takes inner-loop gradients (not only forward passes)."""
    if model_kind == "vmap" or paths == "vmap":
        return {"_vmap_forward"}
    if paths == "autograd" or not gradients:
        return {"chain_forward"}
    return {"chain_forward", "chain_gradients"}


@pytest.fixture
def path_spy(monkeypatch: pytest.MonkeyPatch) -> PathSpy:
    return PathSpy(monkeypatch)


@pytest.fixture(params=list(PATHS))
def paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each speed-path setting of :data:`PATHS`; the test runs inside it."""
    with speed_paths(**PATHS[str(request.param)]):
        yield str(request.param)
