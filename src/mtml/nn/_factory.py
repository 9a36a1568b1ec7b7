"""Build any registered architecture by name: ``build_model(tasks, "mmoe", trunk_hidden=[64], num_experts=4)``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtml.errors import ConfigError
from mtml.nn._architectures import ColumnModel, ColumnTrunk, CrossStitchTrunk, ExtractionTrunk, MMoETrunk
from mtml.nn._backbones import check_backbone_options
from mtml.nn._builders import ImageStem, _flat_width, build_multitask_model, group_stems
from mtml.nn._dselect_k import GATES, DSelectKModel, DSelectKTrunk
from mtml.nn._minilm import minilm_model
from mtml.nn._mlp import ACTIVATIONS, mlp
from mtml.nn._model import MultiTaskModel
from mtml.nn._mtan import MTANMLPTrunk, MTANTrunk
from mtml.registry import Registry
from mtml.tasks import Task

__all__ = ["ARCHITECTURES", "build_cgc", "build_cross_stitch", "build_dselect_k", "build_hps", "build_mmoe",
           "build_model", "build_mtan", "build_ple"]


def _check_count(name: str, value: int, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"`{name}` must be an integer >= {low}. Got {value!r}.")


def _column_model(tasks: Sequence[Task], trunk_hidden: Sequence[int], head_hidden: Sequence[int],
                  stem_width: int | None, activation: str, make: Any) -> ColumnModel:
    if not tasks:
        raise ConfigError("an architecture needs at least one task.")
    if not trunk_hidden or any(h <= 0 for h in trunk_hidden):
        raise ConfigError(f"`trunk_hidden` must be a non-empty list of widths > 0. Got {list(trunk_hidden)}.")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"`activation` must be one of {', '.join(ACTIVATIONS)}. Got {activation!r}.")
    widths = {t.name: _flat_width(t) for t in tasks}
    first = widths[tasks[0].name]
    needs_stem = stem_width is not None or len(set(widths.values())) > 1
    d_in = (stem_width or first) if needs_stem else first
    stems: dict[str, nn.Module] = {}
    stem_of: dict[str, str] = {}
    if needs_stem:  # one stem per task group
        stems, stem_of = group_stems(tasks, lambda t: mlp(widths[t.name], (), d_in, activation=activation,
                                                          final_activation=True))
    trunk: ColumnTrunk = make(d_in, [t.name for t in tasks])
    heads = {t.name: mlp(trunk_hidden[-1], head_hidden, t.num_outputs, activation=activation) for t in tasks}
    return ColumnModel(trunk, heads, stems, input_shapes={t.name: t.input_shape for t in tasks},
                       stem_of=stem_of or None)


def build_hps(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64), head_hidden: Sequence[int] = (),
              stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0,
              share_trunk: bool = True, backbone: str = "mlp",
              backbone_options: Mapping[str, Any] | None = None) -> MultiTaskModel:
    """Hard parameter sharing: one shared trunk (an MLP, or a conv ``backbone`` for images), one head per task
    (Caruana, "Multitask Learning", 1997)."""
    return build_multitask_model(tasks, trunk_hidden=trunk_hidden, head_hidden=head_hidden, stem_width=stem_width,
                                 activation=activation, dropout=dropout, share_trunk=share_trunk, backbone=backbone,
                                 backbone_options=backbone_options)


def build_mmoe(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64), head_hidden: Sequence[int] = (),
               stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0,
               num_experts: int = 4) -> ColumnModel:
    """MMoE: ``num_experts`` shared MLP experts (widths ``trunk_hidden``), a softmax gate per task (Ma et al. 2018)."""
    _check_count("num_experts", num_experts)
    return _column_model(tasks, trunk_hidden, head_hidden, stem_width, activation, lambda d, names: MMoETrunk(
        d, names, num_experts=num_experts, hidden=trunk_hidden, activation=activation, dropout=dropout))


def build_ple(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64), head_hidden: Sequence[int] = (),
              stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0, levels: int = 2,
              shared_experts: int = 2, task_experts: int = 1) -> ColumnModel:
    """PLE: ``levels`` CGC extraction levels with a gated shared path between them (Tang et al. 2020)."""
    for key, value in (("levels", levels), ("shared_experts", shared_experts), ("task_experts", task_experts)):
        _check_count(key, value)
    return _column_model(tasks, trunk_hidden, head_hidden, stem_width, activation, lambda d, names: ExtractionTrunk(
        d, names, levels=levels, shared_experts=shared_experts, task_experts=task_experts, hidden=trunk_hidden,
        activation=activation, dropout=dropout))


def build_cgc(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64), head_hidden: Sequence[int] = (),
              stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0,
              shared_experts: int = 2, task_experts: int = 1) -> ColumnModel:
    """CGC: shared + per-task experts, per-task gates (one PLE level; Tang et al. 2020)."""
    return build_ple(tasks, trunk_hidden=trunk_hidden, head_hidden=head_hidden, stem_width=stem_width,
                     activation=activation, dropout=dropout, levels=1, shared_experts=shared_experts,
                     task_experts=task_experts)


def build_cross_stitch(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64),
                       head_hidden: Sequence[int] = (), stem_width: int | None = None, activation: str = "relu",
                       dropout: float = 0.0, self_weight: float = 0.9) -> ColumnModel:
    """Cross-stitch: a column per task, learned linear mixing after each layer (Misra et al. 2016)."""
    return _column_model(tasks, trunk_hidden, head_hidden, stem_width, activation, lambda d, names: CrossStitchTrunk(
        d, names, hidden=trunk_hidden, activation=activation, dropout=dropout, self_weight=self_weight))


def _check_real(name: str, value: float, low: float, *, strict: bool) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (strict and value == low):
        raise ConfigError(f"`{name}` must be a number {'>' if strict else '>='} {low:g}. Got {value!r}.")


def build_dselect_k(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64),
                    head_hidden: Sequence[int] = (), stem_width: int | None = None, activation: str = "relu",
                    dropout: float = 0.0, num_experts: int = 4, k: int = 2, gamma: float = 1.0,
                    gate: str = "per_example", entropy_reg: float = 0.0) -> ColumnModel:
    """DSelect-k (Hazimeh et al., NeurIPS 2021): ``num_experts`` shared MLP experts as in MMoE, each task's gate a
    differentiable selector of at most ``k`` of them (smooth-step width ``gamma``; ``gate`` ``per_example`` or
    ``static``); ``entropy_reg > 0`` adds that multiple of the selectors' entropy to each task's training loss."""
    _check_count("num_experts", num_experts)
    _check_count("k", k)
    if k > num_experts:
        raise ConfigError(f"`k` must be <= num_experts ({num_experts}): a gate selects at most every expert. Got {k}.")
    _check_real("gamma", gamma, 0.0, strict=True)
    _check_real("entropy_reg", entropy_reg, 0.0, strict=False)
    if gate not in GATES:
        raise ConfigError(f"`gate` must be one of {', '.join(GATES)}. Got {gate!r}.")
    model = _column_model(tasks, trunk_hidden, head_hidden, stem_width, activation, lambda d, names: DSelectKTrunk(
        d, names, num_experts=num_experts, k=k, hidden=trunk_hidden, gamma=float(gamma), gate=gate,
        activation=activation, dropout=dropout))
    if not entropy_reg:
        return model  # no regulariser: a plain ColumnModel, which keeps the engine's own loss paths
    assert isinstance(model.trunk, DSelectKTrunk)
    return DSelectKModel(model.trunk, dict(model.heads), dict(model.stems), entropy_reg=float(entropy_reg),
                         input_shapes=model.input_shapes, stem_of=model.stem_of or None)


MTAN_BACKBONES = ("auto", "conv4", "mlp")


def build_mtan(tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (64, 64), head_hidden: Sequence[int] = (),
               stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0, backbone: str = "auto",
               backbone_options: Mapping[str, Any] | None = None) -> ColumnModel:
    """MTAN (Liu, Johns & Davison, CVPR 2019): per-task attention masks on a shared trunk's features at every
    stage. ``backbone`` ``conv4`` (images ``(C, H, W)``; ``backbone_options`` are Conv-4's: width, blocks, norm,
    groups) is the paper's design; ``mlp`` is its analogue for flat inputs (widths ``trunk_hidden``); ``auto``
    picks conv4 when every task has image inputs and mlp when every task has flat ones. With conv4,
    ``trunk_hidden`` and ``dropout`` are not used (as for :func:`build_hps` with a conv backbone)."""
    if backbone not in MTAN_BACKBONES:
        raise ConfigError(f"`backbone` must be one of {', '.join(MTAN_BACKBONES)}. Got {backbone!r}.")
    if not tasks:
        raise ConfigError("an architecture needs at least one task.")
    images = [len(t.input_shape) == 3 for t in tasks]
    if backbone == "auto":
        if any(images) and not all(images):
            raise ConfigError("mtan shares one trunk, but some tasks have images and some flat inputs ("
                              f"{', '.join(f'{t.name} {t.input_shape}' for t in tasks)}); give every task images "
                              "[C, H, W] (backbone conv4) or flat features (backbone mlp).")
        backbone = "conv4" if all(images) else "mlp"
    if backbone == "mlp":
        if backbone_options:
            raise ConfigError(f"`backbone_options` are Conv-4's; the mlp backbone takes none (got "
                              f"{', '.join(backbone_options)}): set its widths with trunk_hidden.")
        return _column_model(tasks, trunk_hidden, head_hidden, stem_width, activation, lambda d, names: MTANMLPTrunk(
            d, names, hidden=trunk_hidden, activation=activation, dropout=dropout))
    if not all(images):
        flat = next(t for t, image in zip(tasks, images, strict=True) if not image)
        raise ConfigError(f"mtan's conv4 backbone takes images [C, H, W], but task '{flat.name}' has inputs of shape "
                          f"{flat.input_shape}; load images unflattened (e.g. data.options.flatten: false) or use "
                          "backbone: mlp (the MLP analogue).")
    return _mtan_images(tasks, dict(backbone_options or {}), head_hidden, stem_width, activation)


def _mtan_images(tasks: Sequence[Task], options: dict[str, Any], head_hidden: Sequence[int], stem_width: int | None,
                 activation: str) -> ColumnModel:
    """MTAN on Conv-4 for the first task's image shape; image tasks of another shape get an :class:`ImageStem`."""
    if stem_width is not None:
        raise ConfigError("`stem_width` adapts flat inputs to an MLP trunk; mtan's conv4 backbone takes the images "
                          "directly. Remove stem_width.")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"`activation` must be one of {', '.join(ACTIVATIONS)}. Got {activation!r}.")
    check_backbone_options("conv4", options, where="backbone_options")
    shape = tasks[0].input_shape
    odd = {t.name for t in tasks if t.input_shape != shape}
    stems, stem_of = group_stems(tasks, lambda t: ImageStem(t.input_shape, shape), lambda t: t.name in odd)
    trunk = MTANTrunk(shape, [t.name for t in tasks], **options)
    heads = {t.name: mlp(trunk.out_features, head_hidden, t.num_outputs, activation=activation) for t in tasks}
    return ColumnModel(trunk, heads, stems, input_shapes={t.name: t.input_shape for t in tasks},
                       stem_of=stem_of or None)


def build_model(tasks: Sequence[Task], architecture: str = "hps", **options: Any) -> MultiTaskModel:
    """The model of ``architecture`` (a name in :data:`mtml.nn.ARCHITECTURES`) for ``tasks``; options are the
    builder's keywords (``trunk_hidden``, ``head_hidden``, ``stem_width``, ``activation``, ``dropout`` and the
    architecture's own, e.g. ``num_experts``)."""
    return ARCHITECTURES.create(architecture, tasks, where="model", **options)


ARCHITECTURES: Registry[MultiTaskModel] = Registry("architecture")
ARCHITECTURES.register("hps", build_hps, help="hard parameter sharing: shared MLP trunk + a head per task "
                       "(Caruana 1997)")
ARCHITECTURES.register("mmoe", build_mmoe, help="multi-gate mixture of experts (Ma et al. KDD 2018)")
ARCHITECTURES.register("cgc", build_cgc, help="customized gate control: shared + task experts (Tang et al. 2020)")
ARCHITECTURES.register("ple", build_ple, help="progressive layered extraction: stacked CGC levels (Tang et al. 2020)")
ARCHITECTURES.register("cross_stitch", build_cross_stitch, help="a column per task mixed by learned cross-stitch "
                       "units (Misra et al. CVPR 2016)")
ARCHITECTURES.register("mtan", build_mtan, help="multi-task attention network: per-task attention masks on a "
                       "shared Conv-4 (images) or MLP (flat inputs) at every stage (Liu et al. CVPR 2019)")
ARCHITECTURES.register("dselect_k", build_dselect_k, help="MMoE experts with differentiable k-sparse DSelect-k gates "
                       "(Hazimeh et al. NeurIPS 2021)")
ARCHITECTURES.register("minilm", minilm_model, help="MiniLM sentence encoder (top layers fine-tuned, option "
                       "trainable_top_layers) + MLP trunk, for token inputs (texts with inputs: tokens)")
