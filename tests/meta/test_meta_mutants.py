"""Tests written against the survivors of the sampled mutation run of ``src/mtml/meta`` (docs/testing.md,
*Mutation testing*): each pins a behaviour the rest of ``tests/meta`` left open."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from torch import nn

import mtml.meta as meta
from mtml.errors import ConfigError
from mtml.meta import FineTunedHead, linear_chain, task_gradients
from mtml.meta._mlp import Layer, Linear
from mtml.tasks import Split

from .conftest import PathSpy


def _weights(chain: list[Layer] | None) -> list[str]:
    assert chain is not None
    return [layer.weight for layer in chain if isinstance(layer, Linear)]


def test_a_dropout_of_zero_is_part_of_an_mlp_chain_and_any_other_dropout_is_not() -> None:
    body = [nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 2)]
    assert _weights(linear_chain(nn.Sequential(*body))) == ["0.weight", "3.weight"]
    assert linear_chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2))) is None

    class MyDropout(nn.Dropout):  # a subclass may do anything in forward: not flattened
        pass

    assert linear_chain(nn.Sequential(nn.Linear(3, 4), MyDropout(0.0), nn.Linear(4, 2))) is None


def test_leaky_relu_with_a_negative_slope_takes_the_hand_gradients_to_second_order(path_spy: PathSpy) -> None:
    # the hand-written backward passes the pre-activation to PyTorch's kernel; with a negative slope only that
    # form is defined (the kernel refuses to recover the input from the output)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(-0.3), nn.Linear(5, 4), nn.LeakyReLU(-0.3),
                          nn.Linear(4, 2)).double()
    tasks = 3
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    fast = {n: p + 0.1 * torch.randn(tasks, *p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    support = Split(torch.randn(tasks, 6, 3, generator=g, dtype=torch.float64),
                    torch.randn(tasks, 6, 2, generator=g, dtype=torch.float64))
    chain = linear_chain(model)
    assert chain is not None
    path_spy.reset()
    hand = task_gradients(model, {}, fast, support, chain=chain, create_graph=True)
    assert path_spy.ran() == {"chain_gradients"}
    auto = task_gradients(model, {}, fast, support, chain=None, create_graph=True)
    for n in fast:
        torch.testing.assert_close(hand[n], auto[n], rtol=1e-10, atol=1e-12)
    probe = [torch.cos(torch.arange(hand[n].numel(), dtype=torch.float64)).view_as(hand[n]) for n in fast]
    second_hand = torch.autograd.grad(torch.stack([(hand[n] * c).sum() for n, c in zip(fast, probe, strict=True)])
                                      .sum(), list(fast.values()))
    second_auto = torch.autograd.grad(torch.stack([(auto[n] * c).sum() for n, c in zip(fast, probe, strict=True)])
                                      .sum(), list(fast.values()))
    for a, b in zip(second_hand, second_auto, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _public_callables() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [(f"ALGORITHMS[{name!r}]", meta.ALGORITHMS.get(name))
                                     for name in meta.ALGORITHMS.names()]
    out += [(name, getattr(meta, name)) for name in meta.__all__
            if inspect.isclass(getattr(meta, name)) or inspect.isfunction(getattr(meta, name))]
    return out


@pytest.mark.parametrize(("name", "factory"), _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_signature_of_meta_has_annotations_that_resolve(name: str, factory: object) -> None:
    # the registry validates config options against the factory's annotations (typing.get_type_hints); one that
    # does not evaluate silently drops the type check of every option of that factory
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)  # raises on an annotation that does not evaluate
    assert set(getattr(target, "__annotations__", {})) <= set(hints), name


def test_fine_tuned_head_pre_trains_by_default() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    head = FineTunedHead(model, num_classes=7)
    assert head.pretrain is True
    assert isinstance(head.classifier, nn.Linear) and head.classifier.out_features == 7
    with pytest.raises(ConfigError, match="num_classes"):
        FineTunedHead(model)  # pre-training is the default, and it needs the base-class count
    assert FineTunedHead(model, pretrain=False).classifier is None


def test_a_module_used_twice_in_a_sequential_is_run_twice_by_the_chain(path_spy: PathSpy) -> None:
    # ``act = nn.ReLU(); nn.Sequential(l1, act, l2, act, l3)``: named_children() lists ``act`` once, and the chain
    # once dropped its second use (hand gradients 0.3-1.0 off the autograd ones); a tied Linear leaves the chain
    torch.manual_seed(0)
    act = nn.LeakyReLU(0.3)
    model = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 2)).double()
    assert _weights(linear_chain(model)) == ["0.weight", "2.weight", "4.weight"]
    g = torch.Generator().manual_seed(1)
    fast = {n: p + 0.1 * torch.randn(3, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    support = Split(torch.randn(3, 6, 3, generator=g, dtype=torch.float64),
                    torch.randn(3, 6, 2, generator=g, dtype=torch.float64))
    hand = task_gradients(model, {}, fast, support, chain=linear_chain(model))
    assert path_spy.ran() == {"chain_gradients"}
    auto = task_gradients(model, {}, fast, support, chain=None)
    for n in fast:
        torch.testing.assert_close(hand[n], auto[n], rtol=1e-10, atol=1e-12)
    tied = nn.Linear(4, 4)
    assert linear_chain(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), tied, nn.Tanh(), tied)) is None
