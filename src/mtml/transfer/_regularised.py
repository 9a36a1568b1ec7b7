"""The pieces of the regularised fine-tuning strategies (``delta``, ``bss``, ``co_tuning``, ``stochnorm``,
``lwf`` in :mod:`mtml.transfer._strategies`): their penalties and losses as functions of tensors, so that each
can be checked against a hand computation, and the modules they train with.

- :func:`feature_map_distance`, :func:`channel_attention` — DELTA (Li, Xiong, Wang, Huan, Xu & Chen, "DELTA:
  DEep Learning Transfer using Feature Map with Attention for Convolutional Networks", ICLR 2019): the distance
  of the trunk's block outputs to the source trunk's, channels weighted by the supervised attention.
- :func:`bss_penalty` — Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang, "Catastrophic Forgetting Meets
  Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning", NeurIPS 2019): ``Σ_{i≤k} σ²_{−i}(F)``.
- :func:`category_relationship` — Co-Tuning (You, Kou, Jiang & Wang, "Co-Tuning for Transfer Learning",
  NeurIPS 2020): ``p(y_s | y_t)`` from the source head's predictions on the target examples.
- :class:`StochNormLayer` — StochNorm (Kou, You, Long & Wang, "Stochastic Normalization", NeurIPS 2020): a
  BatchNorm mixing batch and moving statistics per channel.
- :func:`distillation_loss` — Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017): the old-task
  loss on the recorded outputs, with temperature.

Pure torch, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mtml.errors import ConfigError
from mtml.tasks import Task, TaskKind
from mtml.transfer._parts import Source

__all__ = [
    "StochNormLayer",
    "bss_penalty",
    "category_relationship",
    "channel_attention",
    "distillation_loss",
    "feature_map_distance",
]


def _nonneg(name: str, value: float, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ConfigError(f"`{name}` must be a finite number >= 0. Got {value!r}. {fix}")
    return float(value)


def _frozen(module: nn.Module) -> nn.Module:
    """A frozen copy in eval mode: the anchor a regulariser compares against (the source itself is untouched)."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def _head_pull(head: nn.Module, head0: Sequence[Tensor]) -> Tensor:
    """``‖θ_head − θ_head⁰‖²`` (``head0``: the head's start when it came from the source, else zeros)."""
    return sum((p - a).square().sum() for p, a in zip(head.parameters(), head0, strict=True))  # type: ignore[return-value]


@contextmanager
def _tapped(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Records each module's output (in order) while the block runs; the hooks are gone afterwards."""
    out: list[Tensor] = [torch.empty(0)] * len(modules)

    def hook(i: int) -> Callable[[nn.Module, object, Tensor], None]:
        def record(_: nn.Module, __: object, output: Tensor) -> None:
            out[i] = output.clone()  # a later in-place activation must not change what was recorded

        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _switched_off(module: nn.Module, channel: int) -> Iterator[None]:
    """While the block runs, ``module``'s output channel ``channel`` (dimension 1) is zero."""

    def zero(_: nn.Module, __: object, output: Tensor) -> Tensor:
        keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
        keep[channel] = 0
        return output * keep.reshape(1, -1, *([1] * (output.ndim - 2)))

    handle = module.register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()


# -- DELTA -------------------------------------------------------------------------------------------------------
def channel_attention(drops: Tensor, temperature: float = 5.0) -> Tensor:
    """DELTA's channel weights of one layer from the loss increase of switching off each channel ``drops: [c]``:
    ``c · softmax(z / T)`` with ``z`` the drops standardised over the layer's channels (mean 0, population
    std 1; all equal → uniform). The weights average 1, so the weighted distance has the unweighted one's scale."""
    d = drops.double()
    std = d.std(correction=0) if d.numel() > 1 else d.new_zeros(())
    z = (d - d.mean()) / std if float(std) > 0 else torch.zeros_like(d)
    return (d.numel() * torch.softmax(z / temperature, 0)).to(drops.dtype)


def feature_map_distance(maps: Sequence[Tensor], anchors: Sequence[Tensor],
                         weights: Sequence[Tensor] | None = None) -> Tensor:
    """``(1/n) Σᵢ Σ_l Σ_j w_lj · mean_positions (FM_lj(xᵢ) − FM*_lj(xᵢ))²``, DELTA's behavioural distance.

    ``maps``/``anchors``: per layer ``[n, c_l, *positions]`` (``[n, c_l]`` for an MLP block); ``weights``: per
    layer ``[c_l]`` (:func:`channel_attention`), or ``None`` for 1 everywhere (the paper's unweighted variant).
    """
    total = maps[0].new_zeros(())
    for i, (fm, anchor) in enumerate(zip(maps, anchors, strict=True)):
        sq = (fm - anchor.detach()).square().reshape(fm.shape[0], fm.shape[1], -1).mean(2)  # [n, c]
        total = total + (sq * weights[i]).sum(1).mean() if weights is not None else total + sq.sum(1).mean()
    return total


# -- BSS ---------------------------------------------------------------------------------------------------------
def bss_penalty(feats: Tensor, k: int = 1) -> Tensor:
    """``Σ_{i≤k} σ²_{−i}``: the ``k`` smallest squared singular values of the batch's feature matrix ``[b, d]``
    (rows flattened). At most ``min(b, d) − 1`` of them: the largest singular value is never penalised."""
    f = feats.reshape(feats.shape[0], -1)
    s = torch.linalg.svdvals(f)  # descending, min(b, d) values
    k = min(k, s.numel() - 1)
    return s[s.numel() - k :].square().sum() if k > 0 else f.sum() * 0.0


# -- Co-Tuning ---------------------------------------------------------------------------------------------------
def _class_ids(task: Task, y: Tensor) -> Tensor:
    """Target class ids ``[n]`` of a binary or multiclass target."""
    return y.long() if task.kind is TaskKind.MULTICLASS else y.reshape(y.shape[0], -1)[:, 0].round().long()


def _log_probs(outputs: Tensor, kind: str) -> Tensor:
    """Log class probabilities ``[n, c_s]`` of a classification head's outputs (a binary head's single logit
    becomes two classes, ``[log(1 − p), log p]``)."""
    if kind == "binary":
        z = outputs.reshape(outputs.shape[0], -1)[:, :1]
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], 1)
    return torch.log_softmax(outputs, 1)


def category_relationship(source_probs: Tensor, labels: Tensor, classes: int) -> Tensor:
    """Co-Tuning's target → source relationship ``[classes, c_s]``: row ``t`` is the mean of the source head's
    probabilities over the target examples of class ``t`` (the paper's direct approach), so each row sums to 1;
    a class without examples gets the uniform row."""
    p = source_probs.double()
    onehot = F.one_hot(labels.long(), classes).double()  # [n, C]
    counts = onehot.sum(0)[:, None]
    rows = onehot.T @ p / counts.clamp_min(1)
    uniform = torch.full_like(rows, 1.0 / p.shape[1])
    return torch.where(counts > 0, rows, uniform)


# -- StochNorm ---------------------------------------------------------------------------------------------------
class StochNormLayer(nn.Module):
    """A BatchNorm whose training-mode normalisation uses, per channel, the batch's statistics or — with
    probability ``p``, drawn afresh each call — the moving ones (before this batch updates them). The moving
    statistics update as BatchNorm's; in eval mode it is the BatchNorm. A batch with one value per channel has
    no batch statistics, so it is normalised with the moving ones."""

    def __init__(self, bn: _BatchNorm, p: float, seed: int) -> None:
        super().__init__()
        self.bn, self.p, self.seed = bn, p, seed
        self._generator: torch.Generator | None = None

    def _draw(self, channels: int, device: torch.device) -> Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return (torch.rand(channels, generator=self._generator, device=device) < self.p)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if not self.training or bn.running_mean is None or bn.running_var is None:
            return bn(x)
        assert bn.num_batches_tracked is not None
        moving = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)
        if x.numel() // x.shape[1] <= 1:
            return self._affine(moving)
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        batch = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, True, factor, bn.eps)
        use_moving = self._draw(x.shape[1], x.device).reshape(1, -1, *([1] * (x.ndim - 2)))
        return self._affine(torch.where(use_moving, moving, batch))

    def _affine(self, z: Tensor) -> Tensor:
        bn = self.bn
        if bn.weight is None or bn.bias is None:
            return z
        shape = (1, -1, *([1] * (z.ndim - 2)))
        return z * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def _batchnorms(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


# -- LwF ---------------------------------------------------------------------------------------------------------
def distillation_loss(outputs: Tensor, recorded: Tensor, kind: str, temperature: float = 2.0) -> Tensor:
    """LwF's loss for one old head, mean over the batch (and any middle dimensions, e.g. stacked heads):
    multiclass — the cross-entropy ``−Σ_c softmax(r/T)_c log softmax(o/T)_c``; binary — the same for the two
    classes of a logit, ``BCE(σ(o/T), σ(r/T))``; multilabel — that per label, averaged over labels; regression
    (or a head of unknown kind) — the squared difference of the outputs averaged over them (temperature has no
    meaning there; it is the large-T limit of distillation, logit matching)."""
    if kind == "multiclass":
        soft = torch.softmax(recorded / temperature, -1)
        return -(soft * torch.log_softmax(outputs / temperature, -1)).sum(-1).mean()
    if kind in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(outputs / temperature, torch.sigmoid(recorded / temperature))
    return (outputs - recorded).square().mean()


class _OldHeads(nn.Module):
    """Trainable copies of the source heads, grouped so that plain linear heads of one kind and width run as one
    stacked ``nn.Linear`` (a multi-task source may have a hundred): ``forward(f)`` → per group
    ``(kind, outputs [n, heads in the group, width])``."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        heads = source.model.heads
        stackable: dict[tuple[str, int, bool], list[nn.Linear]] = {}
        others: list[tuple[str, nn.Module]] = []
        for name, head in heads.items():
            kind, lin = source.kinds.get(name, "regression"), _single_linear(head)
            if lin is not None:
                stackable.setdefault((kind, lin.out_features, lin.bias is not None), []).append(lin)
            else:
                others.append((kind, head))
        self.kinds: list[str] = []
        self.widths: list[int] = []  # 0: a head of its own, outputs [n, width] read as one head
        self.groups = nn.ModuleList()
        for (kind, width, bias), lins in stackable.items():
            first = lins[0]
            stacked = nn.Linear(first.in_features, width * len(lins), bias=bias)
            stacked.to(first.weight.device, first.weight.dtype)
            with torch.no_grad():
                stacked.weight.copy_(torch.cat([m.weight for m in lins]))
                if stacked.bias is not None:
                    stacked.bias.copy_(torch.cat([m.bias for m in lins if m.bias is not None]))
            self.groups.append(stacked)
            self.kinds.append(kind)
            self.widths.append(width)
        for kind, head in others:
            self.groups.append(copy.deepcopy(head))
            self.kinds.append(kind)
            self.widths.append(0)
        self.count = len(heads)

    def forward(self, feats: Tensor) -> list[tuple[str, Tensor]]:
        out = []
        for kind, group, width in zip(self.kinds, self.groups, self.widths, strict=True):
            o = group(feats)
            out.append((kind, o.reshape(o.shape[0], -1, width) if width else o.reshape(o.shape[0], 1, -1)))
        return out


def _single_linear(head: nn.Module) -> nn.Linear | None:
    """The head's one ``nn.Linear`` when it is that Linear (alone or in a ``Sequential``), else ``None``."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential) and len(head) == 1 and isinstance(head[0], nn.Linear):
        return head[0]
    return None
