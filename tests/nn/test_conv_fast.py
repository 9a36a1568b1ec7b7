"""The CPU execution of Conv-4 / ResNet-12 (channels-last, matmul first layer, pool before the activation,
bf16 group norm in the default layout) against the textbook modules: same function, same gradients, to second
order; and each fast path asserted to have run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mtml.nn import build_backbone, feature_dim
from mtml.nn._conv import (
    ConvBlock,
    GroupNorm,
    ResidualBlock,
    StemConv2d,
    channels_last_group_norm_pays,
    channels_last_pays,
    conv_as_matmul,
    stem_pays,
)

torch.set_num_threads(1)


def _plain(m: nn.Module) -> nn.Module:
    """The textbook twin of mtml's module ``m`` (plain torch modules, conv → norm → act → pool), same weights."""
    if isinstance(m, StemConv2d):
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,  # type: ignore[arg-type]
                         bias=m.bias is not None)
        conv.load_state_dict(m.state_dict())
        return conv
    if isinstance(m, GroupNorm):
        norm = nn.GroupNorm(m.num_groups, m.num_channels)
        norm.load_state_dict(m.state_dict())
        return norm
    if isinstance(m, ConvBlock):
        return nn.Sequential(*(_plain(c) for c in m))
    for name, child in list(m.named_children()):
        setattr(m, name, _plain(child))
    return m


class _TextbookResidual(nn.Module):
    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        return b.pool(b.act(b.main(x) + b.shortcut(x)))


def textbook(model: nn.Module) -> nn.Module:
    twin = _plain(copy.deepcopy(model))
    if hasattr(twin, "stages"):
        stages = nn.Sequential(*(_TextbookResidual(s) for s in twin.stages))  # type: ignore[union-attr]

        class _Res(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stages = stages

            def forward(self, x: Tensor) -> Tensor:
                return torch.flatten(self.stages(x).mean(dim=(2, 3)), 1)

        return _Res()
    return nn.Sequential(*twin.children())


CASES = [("conv4", (1, 28, 28), {"width": 16, "groups": 4}), ("conv4", (3, 32, 32), {"width": 16, "groups": 4}),
         ("conv4", (1, 28, 28), {"width": 32, "groups": 8}), ("conv4", (3, 32, 32), {"width": 16, "groups": 8}),
         ("conv4", (1, 28, 28), {"width": 8, "norm": "none"}), ("conv4", (3, 32, 32), {"width": 8, "norm": "layer"}),
         ("resnet12", (3, 32, 32), {"width": 8, "groups": 4}), ("resnet12", (1, 28, 28), {"width": 8, "groups": 4}),
         ("resnet12", (3, 36, 36), {"width": 8, "groups": 4})]


def _second_order(model: nn.Module, head: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    full = nn.Sequential(model, head)
    params: dict[str, Tensor] = dict(full.named_parameters())
    support = F.cross_entropy(functional_call(full, params, (x[:3],)), y[:3])
    grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
    fast = {k: v - 0.4 * g for (k, v), g in zip(params.items(), grads, strict=True)}
    query = F.cross_entropy(functional_call(full, fast, (x[3:],)), y[3:])
    return list(torch.autograd.grad(query, list(params.values())))


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_fast_cpu_execution_equals_the_textbook_module(name: str, shape: tuple[int, ...],
                                                         options: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, shape, options).double()
    twin = textbook(model).double()
    assert not any(isinstance(m, StemConv2d | ConvBlock | GroupNorm) for m in twin.modules())
    x = torch.randn(6, *shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # the paths the rules choose ran: a model that runs channels-last is so from the first conv on when its input
    # has several channels (made channels-last, conv2d keeps it) or its one-channel first conv is a matmul
    first = next(m for m in model.modules() if isinstance(m, StemConv2d))
    assert model.channels_last == channels_last_pays(name, shape)  # (False: the default layout throughout)
    last = model.channels_last and (
        shape[0] > 1 or stem_pays(first.in_channels, first.out_channels, first.weight[0].numel()))
    layouts: list[bool] = []
    convs = [m for m in model.modules() if isinstance(m, StemConv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: layouts.append(
        o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous())) for c in convs]
    kernels: list[tuple[bool, bool]] = []  # (channels-last kernel expected, ran)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    hooks += [n.register_forward_hook(lambda m, i, o: kernels.append(
        (last and channels_last_group_norm_pays(m.num_channels // m.num_groups, torch.float64),
         type(o.grad_fn).__name__ == "_ChannelsLastGroupNormBackward"))) for n in norms]
    out = model(x)
    for h in hooks:
        h.remove()
    assert layouts == [last] * len(convs), layouts
    assert len(kernels) == len(norms) and all(want == ran for want, ran in kernels), kernels
    assert out.is_contiguous()  # features come back in the usual layout
    torch.testing.assert_close(out, twin(x), rtol=0, atol=1e-12)
    head = nn.Linear(feature_dim(model), 3).double()
    for a, b in zip(_second_order(model, head, x, y), _second_order(twin, head, x, y), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_activations_are_channels_last_and_the_first_layer_is_a_matmul() -> None:
    model = build_backbone("conv4", (1, 28, 28), {"width": 32, "groups": 4})
    seen: dict[str, Tensor] = {}
    blocks = list(model.children())
    stem, conv2 = blocks[0][0], blocks[1][0]  # type: ignore[index]
    assert isinstance(stem, StemConv2d) and isinstance(conv2, StemConv2d)
    stem.register_forward_hook(lambda m, i, o: seen.setdefault("stem", o))
    conv2.register_forward_hook(lambda m, i, o: seen.setdefault("conv2", o))
    calls = []
    real = conv_as_matmul.__globals__["F"].unfold

    def counting_unfold(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    conv_as_matmul.__globals__["F"].unfold = counting_unfold
    try:
        model(torch.randn(2, 1, 28, 28))
    finally:
        conv_as_matmul.__globals__["F"].unfold = real
    assert calls == [1]  # the first layer only: 32 input channels · 9 > 32
    for key in ("stem", "conv2"):
        assert seen[key].is_contiguous(memory_format=torch.channels_last) and not seen[key].is_contiguous()


def test_the_layout_rules_follow_the_measured_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert channels_last_pays("conv4", (1, 28, 28)) and channels_last_pays("conv4", (3, 32, 32))
    assert not channels_last_pays("resnet12", (1, 28, 28)) and not channels_last_pays("resnet12", (3, 32, 32))
    assert channels_last_pays("resnet12", (3, 84, 84)) and channels_last_pays("resnet12", (3, 33, 32))
    with pytest.raises(ValueError, match="'resnet18'"):
        channels_last_pays("resnet18", (3, 84, 84))
    assert stem_pays(1, 32, 9) and stem_pays(1, 64, 1) and not stem_pays(1, 16, 9)
    assert not stem_pays(3, 64, 27) and not stem_pays(1, 64, 49)  # three channels: conv2d; a 7×7 patch: conv2d
    for capability, least32 in (("AVX2", 8), ("AVX512", 4), ("DEFAULT", 8)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert [channels_last_group_norm_pays(d, torch.float32) for d in (least32 - 1, least32)] == [False, True]
        assert [channels_last_group_norm_pays(d, torch.float64) for d in (3, 4)] == [False, True]
        assert not channels_last_group_norm_pays(64, torch.bfloat16)


@pytest.mark.parametrize("groups", [8, 2])
def test_group_norm_with_few_channels_per_group_normalises_a_default_layout_copy(groups: int) -> None:
    torch.manual_seed(0)
    norm = GroupNorm(groups, 16).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = norm(x)
    kernel = type(y.grad_fn).__name__ == "_ChannelsLastGroupNormBackward"
    assert kernel == channels_last_group_norm_pays(16 // groups, torch.float64) == (groups == 2)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    ref = F.group_norm(x.contiguous(), groups, norm.weight, norm.bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, norm.weight, norm.bias), g),
                    torch.autograd.grad(ref, (x, norm.weight, norm.bias), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cin", "k", "padding", "bias"), [(1, 3, 1, True), (3, 3, 1, False), (3, 1, 0, False),
                                                            (2, 5, 2, True), (1, 3, 0, True)])
def test_conv_as_matmul_equals_conv2d(cin: int, k: int, padding: int, bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, cin, 11, 9, dtype=torch.float64)
    w = torch.randn(5, cin, k, k, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if bias else None
    torch.testing.assert_close(conv_as_matmul(x, w, b, (padding, padding)), F.conv2d(x, w, b, padding=padding),
                               rtol=0, atol=1e-12)


def test_stem_conv_falls_back_where_the_matmul_form_does_not_apply() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    for conv in (StemConv2d(4, 3, 3, padding=1, stride=2), StemConv2d(4, 3, 3, padding=1, dilation=2),
                 StemConv2d(4, 4, 3, padding=1, groups=2), StemConv2d(4, 3, 3, padding="same"),
                 StemConv2d(8, 3, 3, padding=1)):
        inp = x if conv.in_channels == 4 else torch.randn(2, 8, 9, 9)
        out = conv(inp)
        assert out.is_contiguous()  # nn.Conv2d's path (the matmul form writes channels-last)
        torch.testing.assert_close(out, nn.Conv2d.forward(conv, inp))


def test_vmap_takes_the_textbook_path() -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", (1, 28, 28), {"width": 8, "groups": 4})
    params = {k: torch.stack([v, v + 0.01]) for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 1, 28, 28)
    out = vmap(lambda p, xt: functional_call(model, p, (xt,)))(params, x)
    for t in range(2):
        one = functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],))
        torch.testing.assert_close(out[t], one, rtol=1e-5, atol=1e-6)


def test_bf16_group_norm_runs_in_the_default_layout() -> None:
    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    x = torch.randn(3, 16, 10, 10).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    seen = []
    real = F.group_norm

    def spy(inp: Tensor, *args: object, **kwargs: object) -> Tensor:
        seen.append(inp.is_contiguous())
        return real(inp, *args, **kwargs)  # type: ignore[arg-type]

    F.group_norm = spy  # type: ignore[assignment]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
    finally:
        F.group_norm = real
    assert seen == [True]
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 4, norm.weight, norm.bias), rtol=0.02, atol=0.02)


def test_keep_freed_memory_sets_glibc_thresholds_once_and_can_be_declined() -> None:
    code = "from mtml._allocator import keep_freed_memory as k; print(k(), k())"
    env = {**os.environ}
    env.pop("MTML_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "True"]  # this machine runs glibc
    env["MTML_MALLOC"] = "default"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]


def test_group_norm_on_channels_last_is_exact_to_second_order_and_safe_for_weight_only_gradients() -> None:
    torch.manual_seed(0)
    norm = GroupNorm(2, 8).double()  # 4 channels per group: the channels-last kernel pays in float64
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_ChannelsLastGroupNormBackward"
    # the input needs no gradient here: torch 2.13's own kernel crashes the process on this (segfault)
    (gw,) = torch.autograd.grad((y**2).sum(), [norm.weight])
    ref = F.group_norm(x.contiguous(), 2, norm.weight, norm.bias)
    torch.testing.assert_close(gw, torch.autograd.grad((ref**2).sum(), [norm.weight])[0])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: norm(x_.contiguous(memory_format=torch.channels_last)), (x,))
    assert torch.autograd.gradgradcheck(lambda x_: norm(x_.contiguous(memory_format=torch.channels_last)), (x,))


def test_norm_only_adaptation_on_conv4_runs_and_matches_the_textbook_model() -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", (1, 28, 28), {"width": 8, "groups": 4}).double()
    twin = textbook(model).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    grads = []
    for m in (model, twin):
        norms = [p for n, p in m.named_parameters() if n.endswith(("1.weight", "1.bias"))]
        assert len(norms) == 8
        grads.append(torch.autograd.grad(m(x).square().sum(), norms))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
