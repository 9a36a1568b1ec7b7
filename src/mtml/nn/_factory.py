"""Build any registered architecture by name: ``build_model(tasks, "mmoe", trunk_hidden=[64], num_experts=4)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtml.errors import ConfigError
from mtml.nn._architectures import ColumnModel, ColumnTrunk, CrossStitchTrunk, ExtractionTrunk, MMoETrunk
from mtml.nn._builders import _flat_width, build_multitask_model, group_stems
from mtml.nn._minilm import minilm_model
from mtml.nn._mlp import ACTIVATIONS, mlp
from mtml.nn._model import MultiTaskModel
from mtml.registry import Registry
from mtml.tasks import Task

__all__ = ["ARCHITECTURES", "build_cgc", "build_cross_stitch", "build_hps", "build_mmoe", "build_model", "build_ple"]


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
ARCHITECTURES.register("minilm", minilm_model, help="MiniLM sentence encoder (top layers fine-tuned, option "
                       "trainable_top_layers) + MLP trunk, for token inputs (texts with inputs: tokens)")
