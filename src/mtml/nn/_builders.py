"""Builders for trunks, heads, stems and whole multi-task models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.groups import task_groups
from mtml.nn._backbones import build_backbone, feature_dim
from mtml.nn._mlp import mlp
from mtml.nn._model import MultiTaskModel
from mtml.tasks import Task

__all__ = ["ImageStem", "build_multitask_model", "group_stems"]

def _flat_width(task: Task) -> int:
    if len(task.input_shape) != 1:
        raise ConfigError(
            f"task '{task.name}' has inputs of shape {task.input_shape}; MLP models take flat features. "
            "Flatten the inputs or use a convolutional trunk (model.backbone: conv4 or resnet12, with "
            "model.architecture: hps)."
        )
    return task.input_shape[0]


def build_multitask_model(
    tasks: Sequence[Task],
    *,
    trunk_hidden: Sequence[int] = (64, 64),
    head_hidden: Sequence[int] = (),
    stem_width: int | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    share_trunk: bool = True,
    backbone: str = "mlp",
    backbone_options: Mapping[str, Any] | None = None,
) -> MultiTaskModel:
    """An MLP multi-task model for tasks with flat inputs, or a conv trunk for image tasks.

    Tasks whose input width differs from the first task's (or every task, when ``stem_width`` is set) get a
    ``Linear(width → stem_width) → act`` stem in front of the shared trunk, one per task group (tasks on the same
    rows share their stem, so the group makes one stem and one trunk pass). With ``share_trunk=False`` every
    task gets its own copy of the trunk instead (as its stem, in front of an identity trunk): the single-task
    baseline with the same architecture, trainable in the same loop.

    ``backbone`` other than ``"mlp"`` (a name in :data:`mtml.nn.BACKBONES`, e.g. ``"conv4"``) makes the trunk that
    backbone, built with ``backbone_options``, for the first task's image shape ``(C, H, W)``; an image task of
    another shape gets an :class:`ImageStem` (1×1 conv, then centred zero padding or a resize) into it. Each head
    is then an MLP (``head_hidden``) on the backbone's feature vector, and ``trunk_hidden`` is not used.
    """
    if not tasks:
        raise ConfigError("build_multitask_model needs at least one task.")
    if backbone != "mlp":
        return _backbone_model(tasks, backbone, backbone_options or {}, head_hidden=head_hidden,
                               activation=activation, share_trunk=share_trunk, stem_width=stem_width)
    widths = {t.name: _flat_width(t) for t in tasks}
    first = widths[tasks[0].name]
    needs_stem = stem_width is not None or len(set(widths.values())) > 1
    d_in = (stem_width or first) if needs_stem else first
    d_feat = trunk_hidden[-1] if trunk_hidden else d_in

    def trunk() -> nn.Module:
        return mlp(d_in, trunk_hidden, activation=activation, dropout=dropout)

    stems: dict[str, nn.Module] = {}
    stem_of: dict[str, str] = {}
    if not share_trunk:  # the single-task baseline: every task its own (stem and) trunk
        for t in tasks:
            own = mlp(widths[t.name], (), d_in, activation=activation, final_activation=True) if needs_stem else None
            stems[t.name] = nn.Sequential(own, trunk()) if own is not None else trunk()
    elif needs_stem:  # one stem per task group: tasks on the same rows share it (one stem and trunk pass)
        stems, stem_of = group_stems(tasks, lambda t: mlp(widths[t.name], (), d_in, activation=activation,
                                                          final_activation=True))
    heads = {t.name: mlp(d_feat, head_hidden, t.num_outputs, activation=activation) for t in tasks}
    shared: nn.Module = trunk() if share_trunk else nn.Identity()
    return MultiTaskModel(shared, heads, stems, input_shapes={t.name: t.input_shape for t in tasks},
                          stem_of=stem_of or None)


def group_stems(tasks: Sequence[Task], make: Callable[[Task], nn.Module],
                only: Callable[[Task], bool] = lambda t: True) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """One stem (``make(first task)``) per task group whose tasks pass ``only``, named after the group (a task
    with rows of its own: after the task), and the task → stem map for :class:`MultiTaskModel`."""
    stems: dict[str, nn.Module] = {}
    stem_of: dict[str, str] = {}
    for group in task_groups(tasks):
        members = [t for t in group.tasks if only(t)]
        if not members:
            continue
        key = members[0].name if len(members) == 1 else group.name
        if key in stems or (key != members[0].name and key in {t.name for t in tasks}):
            key = members[0].name  # a group named like another task: name its stem after its first task
        stems[key] = make(members[0])
        stem_of.update({t.name: key for t in members})
    return stems, stem_of


class ImageStem(nn.Module):
    """Adapts images of one shape to a conv trunk's input shape: a learned 1×1 convolution (channels in → out,
    started as the identity when they match), then zero padding centred to the trunk's height and width, or, for
    a larger image, an antialiased bilinear resize to it.

    ``x: [batch, *in_shape] → [batch, *out_shape]`` with shapes ``(channels, height, width)``. Padding (rather
    than resizing) keeps a small image's pixels as they are, the way the trunk sees every other task's pixels.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise ConfigError(f"an image stem maps (channels, height, width) to (channels, height, width); got "
                              f"{tuple(in_shape)} → {tuple(out_shape)}. Give image inputs as [batch, C, H, W].")
        self.in_shape, self.out_shape = tuple(map(int, in_shape)), tuple(map(int, out_shape))
        self.mix = nn.Conv2d(self.in_shape[0], self.out_shape[0], 1)
        if self.in_shape[0] == self.out_shape[0]:
            nn.init.dirac_(self.mix.weight)
            nn.init.zeros_(self.mix.get_parameter("bias"))

    def forward(self, x: Tensor) -> Tensor:
        x = self.mix(x)
        (h, w), (th, tw) = self.in_shape[1:], self.out_shape[1:]
        if h <= th and w <= tw:
            return F.pad(x, ((tw - w) // 2, tw - w - (tw - w) // 2, (th - h) // 2, th - h - (th - h) // 2))
        return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)


def _backbone_model(tasks: Sequence[Task], backbone: str, options: Mapping[str, Any], *, head_hidden: Sequence[int],
                    activation: str, share_trunk: bool, stem_width: int | None) -> MultiTaskModel:
    """A multi-task model whose trunk is the backbone ``backbone`` (see :func:`build_multitask_model`)."""
    shape = tasks[0].input_shape
    odd = [t for t in tasks if t.input_shape != shape]
    if odd and (len(shape) != 3 or any(len(t.input_shape) != 3 for t in odd)):
        raise ConfigError(f"backbone '{backbone}' is shared by every task, so they need one input shape (image tasks "
                          "of other sizes get an image stem); got "
                          f"{', '.join(f'{t.name} {t.input_shape}' for t in tasks)}. Resize the inputs to one shape.")
    if stem_width is not None:
        raise ConfigError(f"model.stem_width adapts flat inputs to an MLP trunk; backbone '{backbone}' takes the "
                          "images directly. Remove stem_width.")

    def trunk() -> nn.Module:
        return build_backbone(backbone, shape, options)

    # share_trunk=False: every task's own backbone is its stem (after its image stem), in front of an identity trunk
    shared = trunk() if share_trunk else nn.Identity()
    odd_names = {t.name for t in odd}
    stem_of: dict[str, str] = {}
    if share_trunk:  # an image stem per task group of another shape
        stems, stem_of = group_stems(tasks, lambda t: ImageStem(t.input_shape, shape), lambda t: t.name in odd_names)
    else:
        stems = {t.name: nn.Sequential(ImageStem(t.input_shape, shape), trunk()) if t.name in odd_names else trunk()
                 for t in tasks}
    # without sharing, the first task's own backbone (its shape is the trunk's, so it has no image stem)
    width = feature_dim(shared if share_trunk else stems[tasks[0].name])
    heads = {t.name: mlp(width, head_hidden, t.num_outputs, activation=activation) for t in tasks}
    return MultiTaskModel(shared, heads, stems, input_shapes={t.name: t.input_shape for t in tasks},
                          stem_of=stem_of or None)
