"""The second-order MAML meta-gradient against finite differences (torch.autograd.gradcheck)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtml.meta import MAML, Episode, MetaSGD
from mtml.tasks import Split

from .conftest import NotAChain


def tiny_episode() -> Episode:
    g = torch.Generator().manual_seed(3)

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return Episode(Split(t(2, 3, 2), t(2, 3, 3)), Split(t(2, 4, 2), t(2, 4, 3)))


class Objective(nn.Module):
    """Wraps (algorithm, model) so that functional_call can feed gradcheck's inputs in as the parameters."""

    def __init__(self, algorithm: MAML, model: nn.Module, episode: Episode) -> None:
        super().__init__()
        self.algorithm, self.model, self.episode = algorithm, model, episode

    def forward(self) -> Tensor:
        return self.algorithm.meta_objective(self.model, self.episode).objective


def meta_loss_fn(algorithm: MAML, model: nn.Module) -> tuple[object, tuple[Tensor, ...]]:
    wrapper = Objective(algorithm, model, tiny_episode())
    names = [n for n, _ in wrapper.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for _, p in wrapper.named_parameters())

    def f(*values: Tensor) -> Tensor:
        return functional_call(wrapper, dict(zip(names, values, strict=True)), ())

    return f, inputs


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()


@pytest.mark.parametrize("make_model", [smooth_mlp, lambda: NotAChain().double()], ids=["speed-path", "vmap"])
def test_second_order_maml_passes_gradcheck(make_model) -> None:  # type: ignore[no-untyped-def]
    model = make_model()
    f, inputs = meta_loss_fn(MAML(model, inner_lr=0.4, inner_steps=2), model)
    assert torch.autograd.gradcheck(f, inputs)


def test_metasgd_rates_pass_gradcheck() -> None:
    model = smooth_mlp()
    algorithm = MetaSGD(model, inner_lr=0.3, inner_steps=2).double()
    f, inputs = meta_loss_fn(algorithm, model)
    assert torch.autograd.gradcheck(f, inputs)


def test_first_order_maml_fails_gradcheck() -> None:
    """First-order MAML drops the second-order terms, so finite differences must disagree with it."""
    model = smooth_mlp()
    f, inputs = meta_loss_fn(MAML(model, inner_lr=0.4, inner_steps=2, first_order=True), model)
    assert not torch.autograd.gradcheck(f, inputs, raise_exception=False)
