"""Convolutional backbones for images: Conv-4 and ResNet-12, with per-example normalisation only.

Both map ``x: [batch, channels, height, width]`` to a feature vector ``[batch, out_features]`` and treat every
example on its own: there is no BatchNorm, so no running statistics are shared across tasks and, in a
meta-learning episode, no query example's output depends on the other query examples (no transductive
batch statistics). The normalisation is one of

- ``"group"``: ``GroupNorm(groups, C)`` — each example's channels in ``groups`` contiguous groups, normalised over
  the group's channels and all positions (Wu & He, ECCV 2018);
- ``"layer"``: ``GroupNorm(1, C)`` — layer normalisation over channels and space of each example, with a scale
  and shift per channel;
- ``"none"``: no normalisation (the convolution's bias is kept).

Conv-4 (Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017): four ``3×3 conv(width) → norm → ReLU →
2×2 max-pool`` blocks; 1×28×28 → 64 features, 3×84×84 → 1600 at ``width=64``.
ResNet-12 (Oreshkin et al. 2018, TADAM; Lee et al. 2019, MetaOptNet): four residual stages of widths
``width × (1, 2.5, 5, 10)`` (64-160-320-640 at ``width=64``), each three ``3×3 conv → norm → LeakyReLU(0.1)``
(the last activation after the sum) plus a ``1×1 conv → norm`` shortcut, then a 2×2 max-pool; features are the
global average of the last stage (640 at ``width=64``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, ShapeError

__all__ = ["NORMS", "Conv4", "ResNet12", "check_positive_ints", "conv_block", "make_norm"]

NORMS = ("group", "layer", "none")


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """The per-example normalisation ``norm`` (``group``, ``layer`` or ``none``) for ``channels`` channels."""
    if norm == "group":
        if channels % groups:
            raise ConfigError(f"`groups={groups}` must divide every layer's channel count, but {channels} "
                              f"channels do not split into {groups} groups; choose a width divisible by "
                              f"{groups} or another `groups`.")
        return nn.GroupNorm(groups, channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"`norm` must be one of {', '.join(NORMS)}. Got {norm!r}. BatchNorm is not offered: its "
                      "batch statistics would mix examples of a task (and tasks) together.")


def check_positive_ints(**values: object) -> None:
    """:class:`ConfigError` naming the first of ``values`` that is not an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"`{name}` must be an integer >= 1. Got {value!r}.")


def conv_block(in_channels: int, out_channels: int, norm: str, groups: int) -> nn.Sequential:
    """``3×3 conv (padding 1) → norm → ReLU → 2×2 max-pool``: ``[b, in, h, w] → [b, out, h//2, w//2]``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), make_norm(norm, out_channels, groups),
                         nn.ReLU(), nn.MaxPool2d(2))


def _pooled(size: int, times: int) -> int:
    for _ in range(times):
        size //= 2
    return size


def _check_image(shape: Sequence[int], in_channels: int, blocks: int, what: str) -> tuple[int, int]:
    if len(shape) != 3 or shape[0] != in_channels:
        raise ShapeError(f"{what} takes images [channels={in_channels}, height, width]; got an input shape "
                         f"{tuple(shape)}. Give inputs as [batch, {in_channels}, H, W].")
    h, w = _pooled(int(shape[1]), blocks), _pooled(int(shape[2]), blocks)
    if h < 1 or w < 1:
        raise ShapeError(f"{what}: {blocks} 2×2 max-pools need images of at least {2 ** blocks}×{2 ** blocks}; "
                         f"got {shape[1]}×{shape[2]}. Use fewer blocks or larger images.")
    return h, w


class Conv4(nn.Sequential):
    """Conv-4: ``blocks`` × (3×3 conv → norm → ReLU → 2×2 max-pool), then flatten.

    ``x: [batch, in_channels, H, W] → [batch, width · ⌊H/2^blocks⌋ · ⌊W/2^blocks⌋]``; ``out_features`` is that
    width for ``input_shape = (in_channels, H, W)``: 64 for 1×28×28 and 1600 for 3×84×84 at ``width=64``.

    Args:
        input_shape: one example's shape ``(channels, height, width)``.
        width: filters of every convolution (64 in MAML and ProtoNets; 32 in MAML's MiniImagenet model).
        blocks: number of conv blocks (4).
        norm: ``"group"``, ``"layer"`` or ``"none"`` (see the module docstring).
        groups: groups of ``"group"`` normalisation; must divide ``width``.
    """

    def __init__(self, input_shape: Sequence[int], *, width: int = 64, blocks: int = 4, norm: str = "group",
                 groups: int = 8) -> None:
        in_channels = int(input_shape[0]) if len(input_shape) else 0
        check_positive_ints(in_channels=in_channels, width=width, blocks=blocks, groups=groups)
        h, w = _check_image(input_shape, in_channels, blocks, "Conv4")
        widths = [in_channels] + [width] * blocks
        super().__init__(*[conv_block(widths[i], widths[i + 1], norm, groups) for i in range(blocks)], nn.Flatten())
        self.input_shape = tuple(int(s) for s in input_shape)
        self.out_features = width * h * w


class ResidualBlock(nn.Module):
    """One ResNet-12 stage: ``[b, in, h, w] → [b, out, h//2, w//2]``.

    ``pool(act(main(x) + shortcut(x)))`` with ``main`` = three 3×3 convs (norm after each, LeakyReLU(0.1) after
    the first two) and ``shortcut`` = 1×1 conv → norm.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, groups: int) -> None:
        super().__init__()
        bias = norm == "none"  # a bias right before a normalisation's shift is redundant
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=bias),
                       make_norm(norm, out_channels, groups)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.main = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias),
                                      make_norm(norm, out_channels, groups))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.main(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 (TADAM, MetaOptNet): four residual stages, then a global average pool.

    ``x: [batch, in_channels, H, W] → [batch, out_features]`` with ``out_features = round(10 · width)``.

    Args:
        input_shape: one example's shape ``(channels, height, width)``; at least 16×16.
        width: channels of the first stage; the stages have ``width × (1, 2.5, 5, 10)`` channels
            (64-160-320-640 at 64, as in the papers; 16 gives 16-40-80-160, affordable on a CPU).
        norm: ``"group"``, ``"layer"`` or ``"none"``.
        groups: groups of ``"group"`` normalisation; must divide every stage width.
    """

    def __init__(self, input_shape: Sequence[int], *, width: int = 64, norm: str = "group", groups: int = 8) -> None:
        super().__init__()
        in_channels = int(input_shape[0]) if len(input_shape) else 0
        check_positive_ints(in_channels=in_channels, width=width, groups=groups)
        _check_image(input_shape, in_channels, 4, "ResNet12")
        widths = [in_channels] + [round(width * f) for f in (1.0, 2.5, 5.0, 10.0)]
        self.stages = nn.Sequential(*[ResidualBlock(widths[i], widths[i + 1], norm, groups) for i in range(4)])
        self.input_shape = tuple(int(s) for s in input_shape)
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.stages(x).mean(dim=(2, 3)), 1)
