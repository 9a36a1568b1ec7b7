"""The speed path (hand-differentiated batched MLPs) against the general vmap + autograd path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtml.meta import batched_forward, linear_chain, parameter_filter, task_gradients
from mtml.meta._mlp import Linear
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split

from .conftest import PathSpy

TASKS = 3
ACTIVATIONS = [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.2), nn.GELU(), nn.GELU("tanh"), nn.SiLU()]


def chain_model(act: nn.Module, out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(6, 5), act)
    return nn.Sequential(nn.Linear(3, 6), act, inner, nn.Linear(5, out)).double()


def per_task(model: nn.Module, names: list[str], tied: set[str]) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(4)
    params = dict(model.named_parameters())
    fast = {}
    for n in names:
        p = params[n]
        fast[n] = p if n in tied else p + 0.1 * torch.randn(TASKS, *p.shape, generator=g, dtype=p.dtype)
    return {n: p for n, p in params.items() if n not in fast}, fast


def test_chain_detection() -> None:
    assert linear_chain(mlp(3, (4, 4), 2)) is not None
    model = MultiTaskModel(mlp(4, (5,)), {"t": nn.Linear(5, 1)}, {"t": mlp(3, (), 4, final_activation=True)})
    chain = linear_chain(model)
    assert chain is not None
    assert [layer.weight for layer in chain if isinstance(layer, Linear)] == [
        "stems.t.0.weight", "trunk.0.weight", "heads.t.weight"]
    assert linear_chain(nn.Sequential(nn.Conv1d(1, 1, 3))) is None
    assert linear_chain(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) is None


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
@pytest.mark.parametrize("subset", ["all", "heads", "trunk"])
def test_speed_path_matches_vmap_and_autograd(act: nn.Module, subset: str, path_spy: PathSpy) -> None:
    model = chain_model(act)
    keep = parameter_filter(model, subset)
    names = [n for n, _ in model.named_parameters() if keep(n)]
    shared, fast = per_task(model, names, tied={names[0]})
    g = torch.Generator().manual_seed(5)
    support = Split(torch.randn(TASKS, 4, 3, generator=g, dtype=torch.float64),
                    torch.randn(TASKS, 4, 2, generator=g, dtype=torch.float64))
    chain = linear_chain(model)
    torch.testing.assert_close(batched_forward(model, shared, fast, support.x, chain=chain),
                               batched_forward(model, shared, fast, support.x, chain=None))
    path_spy.reset()
    fast_grads = task_gradients(model, shared, fast, support, chain=chain, create_graph=True)
    # SiLU has no differentiable ATen backward: its chain takes autograd through the batched forward instead
    assert path_spy.ran() == ({"chain_forward"} if isinstance(act, nn.SiLU) else {"chain_gradients"})
    path_spy.reset()
    slow_grads = task_gradients(model, shared, fast, support, chain=None, create_graph=True)
    assert path_spy.ran() == {"_vmap_forward"}
    probe = sum((fast_grads[n] * torch.cos(torch.arange(fast_grads[n].numel(), dtype=torch.float64))
                 .view_as(fast_grads[n])).sum() for n in names)
    probe_slow = sum((slow_grads[n] * torch.cos(torch.arange(slow_grads[n].numel(), dtype=torch.float64))
                      .view_as(slow_grads[n])).sum() for n in names)
    for n in names:
        torch.testing.assert_close(fast_grads[n], slow_grads[n])
    params = list(model.parameters())
    second = torch.autograd.grad(probe, params, allow_unused=True)
    second_slow = torch.autograd.grad(probe_slow, params, allow_unused=True)
    for a, b in zip(second, second_slow, strict=True):
        if a is None or b is None:
            assert (a if a is not None else b) is None or (a if a is not None else b).abs().max() < 1e-12
        else:
            torch.testing.assert_close(a, b)


def test_classification_gradients_match(path_spy: PathSpy) -> None:
    model = chain_model(nn.ReLU(), out=4)
    shared, fast = per_task(model, [n for n, _ in model.named_parameters()], tied=set())
    g = torch.Generator().manual_seed(6)
    support = Split(torch.randn(TASKS, 8, 3, generator=g, dtype=torch.float64),
                    torch.randint(0, 4, (TASKS, 8), generator=g))
    a = task_gradients(model, shared, fast, support, chain=linear_chain(model))
    assert path_spy.ran() == {"chain_gradients"}
    b = task_gradients(model, shared, fast, support, chain=None)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
