"""batched_grad: the batched backward where vmap can run it, one backward per cotangent where it cannot (a
channels-last Conv-4), with the same result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtml._batched_grad import batched_grad
from mtml.nn import build_backbone
from mtml.weighting._gramian import task_gramian, task_jacobian

torch.set_num_threads(1)


def _losses(model: nn.Module, head: nn.Module, channels: int = 1) -> torch.Tensor:
    x = torch.randn(6, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    out = head(model(x.contiguous(memory_format=torch.channels_last)))
    return torch.stack([F.mse_loss(out[2 * i : 2 * i + 2], torch.full((2, 1), float(i))) for i in range(3)])


def test_a_graph_vmap_cannot_batch_falls_back_to_a_loop_with_the_same_gradients() -> None:
    torch.manual_seed(0)
    # torch's own GroupNorm on channels-last activations: vmap refuses its backward
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(4, 1)
    params = list(model.parameters())
    losses = _losses(model, head, channels=2)
    eye = torch.eye(3)
    calls: list[bool] = []
    real = torch.autograd.grad

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor | None, ...]:
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return real(*args, **kwargs)  # type: ignore[call-overload]

    torch.autograd.grad = spy  # type: ignore[assignment]
    try:
        got = batched_grad(losses, params, eye)
    finally:
        torch.autograd.grad = real
    # (an exception escaping vmap keeps batched tensors in its traceback: a test must not hold it, so the
    # refusal is seen through the calls) the batched backward was refused, then one backward per row ran
    assert calls == [True, False, False, False]
    # (all parameters in each call: torch 2.13's channels-last group-norm backward crashes when asked for its
    # weights' gradients without the input's, which mtml.nn's GroupNorm guards against and nn.GroupNorm does not)
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(3)]
    for j in range(len(params)):
        assert got[j] is not None
        torch.testing.assert_close(got[j], torch.stack([r[j] for r in rows]))
    jac = task_jacobian(losses, params)
    torch.testing.assert_close(jac, task_jacobian(losses, params, backend="loop"))
    torch.testing.assert_close(task_gramian(losses, params), task_gramian(losses, params, backend="loop"))


def test_mtml_conv4_per_task_gradients_batched_equal_the_loop() -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", (1, 28, 28), {"width": 8, "groups": 4})
    params = list(model.parameters())
    losses = _losses(model, nn.Linear(8, 1))
    torch.testing.assert_close(task_jacobian(losses, params), task_jacobian(losses, params, backend="loop"))
    torch.testing.assert_close(task_gramian(losses, params), task_gramian(losses, params, backend="loop"))


def test_batched_path_is_kept_where_vmap_can_run_it_and_unused_inputs_stay_none() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    losses = (torch.randn(5, 4) @ w).sum(0)  # [3]
    calls = []
    real = torch.autograd.grad

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor | None, ...]:
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)  # type: ignore[call-overload]

    torch.autograd.grad = spy  # type: ignore[assignment]
    try:
        g, none = batched_grad(losses, [w, unused], torch.eye(3), allow_unused=True)
    finally:
        torch.autograd.grad = real
    assert calls == [True] and none is None and g is not None
    assert g.shape == (3, 4, 3)


def test_other_errors_are_not_swallowed() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|One of the differentiated"):
        batched_grad((w * 2).sum().unsqueeze(0), [torch.randn(3)], torch.eye(1))
