"""The grouped-convolution path: Conv-4-like trunks run with per-task weights as one grouped convolution.

A model that is a chain of ``nn.Conv2d`` (stride 1, no dilation, one group), ``nn.GroupNorm``, element-wise
activations and ``nn.MaxPool2d`` (kernel = stride), then ``nn.Flatten`` and an MLP chain (nested
``nn.Sequential`` such as :class:`~mtml.nn._conv.Conv4`, or a single-head :class:`~mtml.nn.MultiTaskModel` of
those) is flattened into :data:`Step` s by :func:`conv_chain`. :func:`conv_forward` runs it on
``x: [tasks, n, C, H, W]`` where every parameter is either shared (its own shape) or per task
(``[tasks, *shape]``):

- while every parameter met so far is shared, the tasks are stacked along the batch: ``[tasks·n, C, H, W]``,
  one ordinary convolution for all of them;
- from the first per-task parameter on, the tasks are folded into the channels, ``[n, tasks·C, H, W]``, and a
  convolution with per-task weights ``[tasks, O, C, k, k]`` is one ``conv2d`` of weight ``[tasks·O, C, k, k]``
  with ``groups=tasks``; a group norm of ``G`` groups is one ``group_norm`` of ``tasks·G`` groups (a task's
  channels are contiguous), with its scale and shift laid out the same way; max-pooling and activations act
  per channel, so they are unchanged (a ``ReLU → max-pool`` pair runs as ``max-pool → ReLU``, which is equal
  and touches a quarter of the values);
- ``Flatten`` returns to ``[tasks, n, features]`` and the MLP part runs through the MLP speed path.

Gradients come from autograd (grouped convolutions are differentiable to any order), so second-order MAML
back-propagates through the inner loop as on the general ``vmap`` path, whose results this path equals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml.meta._mlp import Activation, Layer, Linear, _activation, chain_forward, linear_chain, single_head
from mtml.nn import MultiTaskModel

__all__ = ["Conv", "ConvChain", "Flatten", "Norm", "Pool", "conv_chain", "conv_forward"]


@dataclass(frozen=True)
class Conv:
    """One ``nn.Conv2d`` (stride 1, dilation 1, one group) by parameter name."""

    weight: str
    bias: str | None
    padding: tuple[int, int]


@dataclass(frozen=True)
class Norm:
    """One ``nn.GroupNorm`` by parameter name (``None`` without affine parameters)."""

    weight: str | None
    bias: str | None
    groups: int
    eps: float


@dataclass(frozen=True)
class Pool:
    """``nn.MaxPool2d`` with kernel = stride, no padding, no dilation."""

    kernel: tuple[int, int]


@dataclass(frozen=True)
class Flatten:
    """``nn.Flatten()``: images → feature vectors; the MLP part follows."""


Step = Conv | Norm | Pool | Activation


@dataclass(frozen=True)
class ConvChain:
    """A convolutional chain: image ``steps``, then (after a flatten) the MLP ``head`` chain."""

    steps: list[Step]
    head: list[Layer]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _conv_step(module: nn.Module, prefix: str) -> Step | None:
    kind = type(module)
    if kind is nn.Conv2d:
        assert isinstance(module, nn.Conv2d)
        plain = (module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
                 and module.padding_mode == "zeros" and not isinstance(module.padding, str))
        if not plain:
            return None
        return Conv(prefix + "weight", prefix + "bias" if module.bias is not None else None,
                    _pair(module.padding))  # type: ignore[arg-type]
    if kind is nn.GroupNorm:
        assert isinstance(module, nn.GroupNorm)
        affine = module.affine
        return Norm(prefix + "weight" if affine else None, prefix + "bias" if affine else None,
                    module.num_groups, module.eps)
    if kind is nn.MaxPool2d:
        assert isinstance(module, nn.MaxPool2d)
        k, s = _pair(module.kernel_size), _pair(module.stride)
        plain = k == s and _pair(module.padding) == (0, 0) and _pair(module.dilation) == (1, 1)
        return Pool(k) if plain and not module.ceil_mode and not module.return_indices else None
    return _activation(module)


_Item = Step | Flatten | tuple[str, nn.Module]


def _walk(module: nn.Module, prefix: str, out: list[_Item]) -> bool:
    """Flatten ``module`` into ``out``: image steps, a :class:`Flatten`, then ``(prefix, module)`` of the MLP
    part (which :func:`~mtml.meta._mlp.linear_chain` flattens)."""
    if any(isinstance(s, Flatten) for s in out):  # after the flatten: the rest must be an MLP chain
        out.append((prefix, module))
        return True
    if _is_plain_sequential(module):
        return all(_walk(child, f"{prefix}{name}.", out) for name, child in module.named_children())
    if type(module) is MultiTaskModel:
        assert isinstance(module, MultiTaskModel)
        task = single_head(module)
        key = module.stem_of.get(task)
        parts = [(f"stems.{key}.", module.stems[key])] if key is not None else []
        parts += [("trunk.", module.trunk), (f"heads.{task}.", module.heads[task])]
        return all(_walk(m, prefix + p, out) for p, m in parts)
    if type(module) is nn.Flatten:
        assert isinstance(module, nn.Flatten)
        out.append(Flatten())
        return module.start_dim == 1 and module.end_dim == -1
    if type(module) is nn.Identity:
        return True
    step = _conv_step(module, prefix)
    if step is not None:
        out.append(step)
    return step is not None


def conv_chain(model: nn.Module) -> ConvChain | None:
    """The model as a :class:`ConvChain`, or ``None`` if it is not a conv chain followed by an MLP chain."""
    out: list[_Item] = []
    if not _walk(model, "", out):
        return None
    cut = next((i for i, s in enumerate(out) if isinstance(s, Flatten)), None)
    if cut is None:
        return None
    steps = _pool_first([s for s in out[:cut] if isinstance(s, Conv | Norm | Pool | Activation)])
    if not any(isinstance(s, Conv) for s in steps):
        return None
    head: list[Layer] = []
    for item in out[cut + 1:]:
        assert isinstance(item, tuple)
        part = linear_chain(item[1])
        if part is None:
            return None
        head += [_renamed(layer, item[0]) for layer in part]
    return ConvChain(steps, head)


def _pool_first(steps: list[Step]) -> list[Step]:
    """``ReLU → max-pool`` reordered to ``max-pool → ReLU``: equal values (ReLU is monotone, so it commutes with
    a maximum) and equal gradients (both route to the window's maximum, zero where it is negative), on a
    tensor a quarter the size."""
    out = list(steps)
    for i in range(len(out) - 1):
        step = out[i]
        if isinstance(step, Activation) and step.forward is torch.relu and isinstance(out[i + 1], Pool):
            out[i], out[i + 1] = out[i + 1], step
    return out


def _renamed(layer: Layer, prefix: str) -> Layer:
    if isinstance(layer, Activation):
        return layer
    return Linear(prefix + layer.weight, None if layer.bias is None else prefix + layer.bias)


def _folded(p: Tensor | None, tasks: int, ndim: int) -> Tensor | None:
    """A parameter laid out for the folded channels: per task ``[tasks, O, ...]`` → ``[tasks·O, ...]``;
    shared ``[O, ...]`` → repeated ``tasks`` times."""
    if p is None:
        return None
    if p.ndim > ndim:
        return p.reshape(p.shape[0] * p.shape[1], *p.shape[2:])
    return p.repeat(tasks, *([1] * (ndim - 1)))


def _fold(h: Tensor, tasks: int) -> Tensor:
    """``[tasks·n, C, H, W] → [n, tasks·C, H, W]``."""
    n = h.shape[0] // tasks
    return h.reshape(tasks, n, *h.shape[1:]).transpose(0, 1).reshape(n, tasks * h.shape[1], *h.shape[2:])


def _param(params: Mapping[str, Tensor], name: str | None) -> Tensor | None:
    return None if name is None else params[name]


def conv_forward(chain: ConvChain, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The chain on ``x: [tasks, n, C, H, W]`` → ``[tasks, n, outputs]``.

    Each parameter is shared (its own shape) or per task (``[tasks, *shape]``), told apart by its number of
    dimensions (a convolution weight has 4, a norm's scale 1).
    """
    tasks, n = x.shape[0], x.shape[1]
    h, folded = x.reshape(tasks * n, *x.shape[2:]), False
    for step in chain.steps:
        if isinstance(step, Conv | Norm):
            w, b = _param(params, step.weight), _param(params, step.bias)
            rank = 4 if isinstance(step, Conv) else 1
            if not folded and any(p is not None and p.ndim > rank for p in (w, b)):
                h, folded = _fold(h, tasks), True
            if folded:
                w, b = _folded(w, tasks, rank), _folded(b, tasks, 1)
            if isinstance(step, Conv):
                assert w is not None
                h = F.conv2d(h, w, b, padding=step.padding, groups=tasks if folded else 1)
            else:
                h = F.group_norm(h, step.groups * (tasks if folded else 1), w, b, step.eps)
        elif isinstance(step, Pool):
            h = F.max_pool2d(h, step.kernel)
        else:
            h = step.forward(h)
    # folded: [n, tasks·C, H, W] → [tasks, n, C·H·W]; stacked: [tasks·n, C, H, W] → the same
    feats = h.reshape(n, tasks, -1).transpose(0, 1) if folded else h.reshape(tasks, n, -1)
    return chain_forward(chain.head, params, feats)
