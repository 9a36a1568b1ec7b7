"""Backbones: the feature extractor of a model (its trunk), chosen by name with ``model.backbone``.

Every factory takes one example's input shape and keyword-only options and returns a module
``[batch, *input_shape] → [batch, out_features]`` with an ``out_features`` attribute; a model puts a linear
(or MLP) head per task on top. ``mlp`` takes flat inputs ``(features,)``; ``conv4`` and ``resnet12`` take images
``(channels, height, width)`` (see :mod:`mtml.nn._conv`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtml.errors import ConfigError, ShapeError
from mtml.nn._conv import NORMS, Conv4, ResNet12, check_positive_ints
from mtml.nn._mlp import mlp
from mtml.registry import Registry, check_options

__all__ = ["BACKBONES", "build_backbone", "check_backbone_options", "conv4", "feature_dim", "mlp_backbone",
           "resnet12"]


def mlp_backbone(input_shape: Sequence[int], /, *, hidden: Sequence[int] = (64, 64), activation: str = "relu",
                 dropout: float = 0.0) -> nn.Module:
    """MLP on flat features (the default; widths from ``model.trunk_hidden``).

    A plain :func:`~mtml.nn.mlp` ``nn.Sequential`` (so meta-learning's MLP speed path still recognises it) with
    an ``out_features`` attribute.
    """
    if len(input_shape) != 1:
        raise ShapeError(f"the mlp backbone takes flat features, but the inputs have shape {tuple(input_shape)}; "
                         "set model.backbone: conv4 (or resnet12) for images.")
    net = mlp(int(input_shape[0]), hidden, activation=activation, dropout=dropout)
    setattr(net, "out_features", int(hidden[-1]) if len(hidden) else int(input_shape[0]))  # noqa: B010
    return net


def conv4(input_shape: Sequence[int], /, *, width: int = 64, norm: str = "group", groups: int = 8,
          blocks: int = 4) -> nn.Module:
    """Conv-4: 4 × (3×3 conv → norm → ReLU → 2×2 max-pool), MAML / ProtoNets (1×28×28 → 64, 3×84×84 → 1600)."""
    return Conv4(input_shape, width=width, norm=norm, groups=groups, blocks=blocks)


def resnet12(input_shape: Sequence[int], /, *, width: int = 64, norm: str = "group", groups: int = 8) -> nn.Module:
    """ResNet-12: residual stages width×(1, 2.5, 5, 10) (64-160-320-640, TADAM / MetaOptNet), average-pooled."""
    return ResNet12(input_shape, width=width, norm=norm, groups=groups)


BACKBONES: Registry[nn.Module] = Registry("backbone")
BACKBONES.register("mlp", mlp_backbone, help="MLP on flat features, widths model.trunk_hidden (the default)")
BACKBONES.register("conv4", conv4, help="Conv-4: 4×(3×3 conv 64 → norm → ReLU → max-pool), MAML/ProtoNets")
BACKBONES.register("resnet12", resnet12, help="ResNet-12: residual stages 64-160-320-640 (TADAM/MetaOptNet), "
                   "option width scales them")


def check_backbone_options(name: str, options: Mapping[str, Any], *, where: str = "model.backbone_options") -> None:
    """Check ``options`` of backbone ``name`` without building it: known keys, integer sizes, a known norm.

    ``mlp`` takes no options here: its widths, activation and dropout are ``model.trunk_hidden``,
    ``model.activation`` and ``model.dropout``.
    """
    factory = BACKBONES.get(name)
    if name == "mlp":
        if options:
            raise ConfigError(f"{where}: the mlp backbone takes no options (got {', '.join(options)}); set its "
                              "widths with model.trunk_hidden, and model.activation / model.dropout.")
        return
    check_options(factory, dict(options), where=where)
    try:
        check_positive_ints(**{k: v for k, v in options.items() if k in ("width", "groups", "blocks")})
        norm = options.get("norm", "group")
        if norm not in NORMS:
            raise ConfigError(f"`norm` must be one of {', '.join(NORMS)}. Got {norm!r}. BatchNorm is not offered: "
                              "its batch statistics would mix the examples of a task (and tasks) together.")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_backbone(name: str, input_shape: Sequence[int], options: Mapping[str, Any] | None = None, *,
                   where: str = "model.backbone_options") -> nn.Module:
    """The backbone ``name`` (a name in :data:`BACKBONES`) for one example of shape ``input_shape``."""
    options = dict(options or {})
    check_backbone_options(name, {} if name == "mlp" else options, where=where)
    return BACKBONES.create(name, tuple(input_shape), where=where, **options)


def feature_dim(backbone: nn.Module) -> int:
    """The width of ``backbone``'s feature vector (its ``out_features``)."""
    width = getattr(backbone, "out_features", None)
    if not isinstance(width, int):
        raise ConfigError(f"{type(backbone).__name__} has no integer `out_features`; a backbone must record the "
                          "width of the features it returns.")
    return width
