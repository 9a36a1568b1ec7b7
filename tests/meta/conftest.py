"""Small float64 models and episodes shared by the meta-learning tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtml.meta import Episode
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

