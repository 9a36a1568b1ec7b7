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

On the CPU both run the same function faster than the textbook ``nn.Sequential`` (measured in
``benchmarks/conv_maml.py``; see docs/backbones.md):

- activations are **channels-last** (``NHWC`` strides): PyTorch's CPU max-pool is about ten times faster on them
  and oneDNN's convolutions faster too;
- a one-channel first layer (grey images) with at least 32 filters runs as ``unfold`` + one matrix product
  (:class:`StemConv2d`, :func:`stem_pays`), writing its output channels-last: ``conv2d`` of one input channel is
  slow on the CPU and writes the default layout (a one-channel batch is both layouts at once). With fewer filters
  the whole network runs in the default layout, which measured faster there;
- group norm takes PyTorch's channels-last kernel only with enough channels per group
  (:func:`channels_last_group_norm_pays`: from 8 in float32 on AVX2, from 4 on AVX-512 and in float64), and
  otherwise normalises a default-layout copy;
- ResNet-12 (three convolutions per pool) runs channels-last only on images larger than 32×32
  (:func:`channels_last_pays`), and in the default layout throughout otherwise;
- the 2×2 max-pool runs before the ReLU (or LeakyReLU) instead of after it: both are monotone, so
  ``max(relu(x)) = relu(max(x))`` and the gradients are the same, on a quarter of the elements.

The outputs and gradients equal the textbook order's up to floating-point summation order (tested in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml.errors import ConfigError, ShapeError

__all__ = ["NORMS", "Conv4", "ConvBlock", "ResNet12", "StemConv2d", "channels_last_group_norm_pays",
           "channels_last_pays", "check_positive_ints", "conv_block", "make_norm", "stem_pays"]

NORMS = ("group", "layer", "none")


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """Group norm of a channels-last CPU batch whose backward always asks PyTorch's kernel for all three
    gradients: with ``output_mask`` leaving out the input's gradient (a backward to the norm's weights only),
    ``native_group_norm_backward`` on channels-last input crashes the process (segmentation fault, torch 2.13).
    The backward is itself differentiable (second-order MAML), through the op's own double-backward formula."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: PyTorch's own differentiable formula, in the default layout
            wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
            if not wanted:
                return None, None, None, None, None
            y = F.group_norm(x.contiguous(), ctx.groups, weight, bias, ctx.eps)
            found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
            gx, gw, gb = (next(found) if t is not None and t.requires_grad else None for t in (x, weight, bias))
            return gx, gw, gb, None, None
        n, c = x.shape[0], x.shape[1]
        grad = grad.contiguous(memory_format=torch.channels_last)  # the kernel reads grad in x's layout
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(grad, x, mean, rstd, weight, n, c, x[0, 0].numel(),
                                                               ctx.groups, [True, weight is not None, bias is not None])
        return gx, gw, gb, None, None


def channels_last_group_norm_pays(channels_per_group: int, dtype: torch.dtype) -> bool:
    """Whether PyTorch's channels-last CPU group-norm kernel (forward + backward) beats normalising a copy in the
    default layout and copying back, for groups of ``channels_per_group`` channels of ``dtype``.

    The channels-last kernel reads each position's channels of a group as one vector; with few channels per group
    it is slower than the default layout's kernel even with the two copies. Measured on ``[80, C, h, w]``
    batches (``C`` 16–128), fwd + bwd, one thread (docs/backbones.md): on AVX2 float32 it loses at 2, 4 and 6
    channels per group (0.32–0.71×) and wins from 8 (1.1–3.1×); on AVX-512 it loses at 2 (0.6–0.8×), is even at 5
    and wins at 4 and from 6 (1.2–2.7×); float64 wins from 4 on both. A fixed rule, not a timing, so a run and its
    resume take the same path (the two paths round differently)."""
    if dtype not in (torch.float32, torch.float64):
        return False
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    least = 4 if dtype == torch.float64 or avx512 else 8
    return channels_per_group >= least


class GroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` for channels-last CPU batches: float32 / float64 with enough channels per
    group (:func:`channels_last_group_norm_pays`) through PyTorch's channels-last kernel with a backward that cannot
    crash (:class:`_ChannelsLastGroupNorm`); otherwise — few channels per group, or bfloat16 / float16, where the
    channels-last kernel is about ten times slower (12 ms against 1.1 ms forward on ``[75, 64, 28, 28]``) —
    normalised in the default layout and handed back channels-last. Anything else is ``nn.GroupNorm``'s own
    path."""

    def forward(self, input: Tensor) -> Tensor:
        if not (_fast_cpu(input) and input.is_contiguous(memory_format=torch.channels_last)
                and not input.is_contiguous()):
            return super().forward(input)
        if torch.is_autocast_enabled("cpu") and input.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(input)  # (autocast would have run group_norm in its own dtype rules)
        if not channels_last_group_norm_pays(self.num_channels // self.num_groups, input.dtype):
            out = F.group_norm(input.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        out = _ChannelsLastGroupNorm.apply(input, self.weight, self.bias, self.num_groups, self.eps)
        assert isinstance(out, Tensor)
        return out


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """The per-example normalisation ``norm`` (``group``, ``layer`` or ``none``) for ``channels`` channels."""
    if norm == "group":
        if channels % groups:
            raise ConfigError(f"`groups={groups}` must divide every layer's channel count, but {channels} "
                              f"channels do not split into {groups} groups; choose a width divisible by "
                              f"{groups} or another `groups`.")
        return GroupNorm(groups, channels)
    if norm == "layer":
        return GroupNorm(1, channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"`norm` must be one of {', '.join(NORMS)}. Got {norm!r}. BatchNorm is not offered: its "
                      "batch statistics would mix examples of a task (and tasks) together.")


def check_positive_ints(**values: object) -> None:
    """:class:`ConfigError` naming the first of ``values`` that is not an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"`{name}` must be an integer >= 1. Got {value!r}.")


STEM_MAX_PATCH = 32
"""Largest ``in_channels · kh · kw`` for which :class:`StemConv2d` may run on the CPU as ``unfold`` + matmul."""
STEM_MIN_OUT_CHANNELS = 32
"""Fewest output channels for which :class:`StemConv2d` runs a one-channel convolution as ``unfold`` + matmul."""


def stem_pays(in_channels: int, out_channels: int, patch: int) -> bool:
    """Whether :class:`StemConv2d` computes a convolution (``patch = in_channels · kh · kw``) as ``unfold`` + one
    matrix product rather than ``conv2d``: on one input channel with at least :data:`STEM_MIN_OUT_CHANNELS`
    outputs. Measured over a whole second-order MAML step (docs/backbones.md, one thread): on 1×28×28 the matmul
    form is 0.94–1.2× at width 32–128 and 0.74–0.8× at width 16 (there ``conv2d``'s output, and so the whole
    network, stays in the default layout, which is faster at that width); on three channels (3×32×32, 3×84×84)
    ``conv2d`` on channels-last input is faster (the matmul form 0.87–0.99×), so it keeps ``conv2d``."""
    return in_channels == 1 and out_channels >= STEM_MIN_OUT_CHANNELS and patch <= STEM_MAX_PATCH


def conv_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` (stride 1, no dilation, one group) as im2col and one matrix
    product: ``x: [b, c, h, w]``, ``weight: [o, c, kh, kw]`` → ``[b, o, h', w']`` with channels-last strides."""
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    patches = F.unfold(x, (kh, kw), padding=padding).transpose(1, 2).reshape(b * ho * wo, -1)
    # a row-major [c·kh·kw, o] operand: autograd then forms the weight gradient as patchesᵀ · grad (several times
    # faster here than the transposed product it picks for a column-major operand)
    w_mat = weight.reshape(o, -1).t().contiguous()
    out = patches @ w_mat if bias is None else torch.addmm(bias, patches, w_mat)
    return out.view(b, ho, wo, o).permute(0, 3, 1, 2)


class StemConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` that, on the CPU where :func:`stem_pays` (one input channel, enough outputs; stride
    1, one group, no dilation, zero padding), computes the same convolution as :func:`conv_as_matmul`, with a
    channels-last output: PyTorch's CPU ``conv2d`` of one input channel runs at a few GFLOP/s and writes the
    default layout. Anything else takes ``nn.Conv2d``'s own path."""

    matmul = True
    """Whether the matmul form may run at all (a model that keeps the default layout throughout sets False)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (self.matmul and _fast_cpu(input) and weight.dim() == 4 and self.groups == 1
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)
                and stem_pays(weight.shape[1], weight.shape[0], weight[0].numel())):
            return conv_as_matmul(input, weight, bias, (int(self.padding[0]), int(self.padding[1])))
        return super()._conv_forward(input, weight, bias)


def _fast_cpu(x: Tensor) -> bool:
    """Whether ``x`` is a batch of images on the CPU outside any ``torch.func`` transform: ``vmap`` refuses
    channels-last strides in ``group_norm`` (and mtml's vmap engine keeps the textbook path)."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return x.dim() == 4 and x.device.type == "cpu" and level is not None and level() is None


def channels_last_pays(model: str, input_shape: Sequence[int]) -> bool:
    """Whether ``model`` (``"conv4"`` or ``"resnet12"``) runs channels-last on the CPU for one example of shape
    ``input_shape = (C, H, W)``; otherwise it keeps the default layout throughout (no matmul stem either, since
    that writes channels-last). Conv-4 pools after every convolution, and the pool is where channels-last wins
    most: always. ResNet-12 has three convolutions per pool: measured over whole second-order MAML steps
    (docs/backbones.md, ``benchmarks/conv_layout_rules.py``, AVX-512), the default layout was 1.14× faster on
    1×28×28 images, the two were within ±5 % on 3×32×32 (either won, run to run), and channels-last was
    1.09–1.11× faster on 3×84×84: so only above 32×32."""
    if model == "resnet12":
        return int(input_shape[1]) * int(input_shape[2]) > 32 * 32
    if model == "conv4":
        return True
    raise ValueError(f"channels_last_pays knows 'conv4' and 'resnet12', not {model!r}")


def channels_last(x: Tensor) -> Tensor:
    """``x`` with channels-last strides when it is a batch of images on the CPU (else ``x`` itself)."""
    return x.contiguous(memory_format=torch.channels_last) if _fast_cpu(x) else x


class _Layout(nn.Module):
    channels_last: bool
    """Whether the model runs channels-last on the CPU (set at construction by :func:`channels_last_pays`)."""

    def set_channels_last(self, on: bool) -> None:
        """Run channels-last on the CPU (``True``) or in the default layout throughout (``False``, with no matmul
        stem): the same function either way."""
        self.channels_last = on
        for m in self.modules():
            if isinstance(m, StemConv2d):
                m.matmul = on


class ConvBlock(nn.Sequential):
    """``conv → norm → act → 2×2 max-pool`` (its modules, in that order), run as ``act(pool(norm(conv(x))))``:
    ``act`` is monotone (ReLU), so this is the same function and gradient with the activation on a quarter of the
    elements."""

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, act, pool = self
        return act(pool(norm(conv(x))))


def conv_block(in_channels: int, out_channels: int, norm: str, groups: int) -> ConvBlock:
    """``3×3 conv (padding 1) → norm → ReLU → 2×2 max-pool``: ``[b, in, h, w] → [b, out, h//2, w//2]``."""
    return ConvBlock(StemConv2d(in_channels, out_channels, 3, padding=1), make_norm(norm, out_channels, groups),
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


class Conv4(nn.Sequential, _Layout):
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
        self.set_channels_last(channels_last_pays("conv4", self.input_shape))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(channels_last(x) if self.channels_last else x)


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
            layers += [StemConv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=bias),
                       make_norm(norm, out_channels, groups)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.main = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(StemConv2d(in_channels, out_channels, 1, bias=bias),
                                      make_norm(norm, out_channels, groups))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pool(self.main(x) + self.shortcut(x)))  # = pool(act(·)): LeakyReLU is monotone


class ResNet12(_Layout):
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
        self.set_channels_last(channels_last_pays("resnet12", self.input_shape))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.stages(channels_last(x) if self.channels_last else x).mean(dim=(2, 3)), 1)
