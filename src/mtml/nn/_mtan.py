"""MTAN: a shared trunk and, per task, soft attention masks on the trunk's features at every stage.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.

The shared trunk is mtml's Conv-4 (:class:`~mtml.nn.Conv4`); stage j is its block j, whose features before the
2×2 max-pool are ``s_j = ReLU(norm(conv(h_j)))``. Task t's attention module at stage j is
``1×1 conv → norm → ReLU → 1×1 conv → sigmoid``: it reads ``s_j`` (stage 0) or ``[s_j ; r_{j-1}^t]`` (later
stages, channels concatenated) and gives a mask ``a_j^t ∈ (0, 1)`` of ``s_j``'s shape; the task-attended features
are ``â_j^t = a_j^t ⊙ s_j``. Between stages a shared ``3×3 conv → norm → ReLU → 2×2 max-pool`` block (the
paper's attention block ``f``, one per stage, used by every task) maps ``â_j^t`` to ``r_j^t`` at the next stage's
resolution. Task t's head reads ``flatten(max-pool(â_J^t))`` of the last stage, which has Conv-4's width: with
every mask equal to 1 it *is* Conv-4's output. In Conv-4 a stage has one convolution, so the mask's input and
the features it multiplies are the same ``s_j`` (the paper, on SegNet, takes them from two convolutions of a
block).

:class:`MTANMLPTrunk` is the analogue for flat inputs (not in the paper): stage k is the MLP trunk's layer k,
``s_k = act(W_k h_k)``, the attention modules are ``Linear → LayerNorm → ReLU → Linear → sigmoid`` (feature-wise
masks) and the shared bridges ``Linear → act``.

Shared parameters: the trunk and the bridges (every task's path runs through them). Private: each task's
attention modules. Every module treats rows independently (GroupNorm / LayerNorm only), so rows of several
tasks can share a trunk call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtml.nn._architectures import ColumnTrunk
from mtml.nn._conv import Conv4, conv_block, make_norm
from mtml.nn._mlp import ACTIVATIONS, mlp

__all__ = ["MTANMLPTrunk", "MTANTrunk"]


class _AttentionTrunk(ColumnTrunk, ABC):
    """The MTAN forward pass over ``_stages`` (shared features per stage) with per-task ``attention`` and
    shared ``bridges``; ``backbone`` is the plain shared trunk (what every task reads when all masks are 1)."""

    backbone: nn.Sequential
    attention: nn.ModuleDict  # task → ModuleList, one module per stage
    bridges: nn.ModuleList  # stage j → j + 1
    out_features: int

    @abstractmethod
    def _stages(self, x: Tensor) -> list[Tensor]:
        """The shared trunk's features after each stage (conv blocks, or MLP layers)."""

    @abstractmethod
    def _finish(self, attended: Tensor) -> Tensor:
        """A task's attended last-stage features → its flat representation."""

    def _module(self, task: str, stage: int) -> nn.Module:
        modules = self.attention[task]
        assert isinstance(modules, nn.ModuleList)
        return modules[stage]

    def masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Every task's attention masks, stage by stage (``[N, C_j, H_j, W_j]`` or ``[N, d_k]``)."""
        return {t: masks for t, (_, masks) in self._attend(x).items()}

    def _attend(self, x: Tensor) -> dict[str, tuple[Tensor, list[Tensor]]]:
        shared = self._stages(x)
        out: dict[str, tuple[Tensor, list[Tensor]]] = {}
        for t in self.task_names:
            r: Tensor | None = None
            masks: list[Tensor] = []
            attended = shared[0]
            for j, s in enumerate(shared):
                mask = self._module(t, j)(s if r is None else torch.cat([s, r], 1))
                attended = mask * s
                masks.append(mask)
                if j < len(shared) - 1:
                    r = self.bridges[j](attended)
            out[t] = (self._finish(attended), masks)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``[N, *input] → [N, tasks, out_features]``."""
        return torch.stack([feats for feats, _ in self._attend(x).values()], 1)

    def shared_features(self, x: Tensor) -> Tensor:
        """``[N, out_features]``: the shared trunk alone (no attention)."""
        return self.backbone(x)

    def private(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.attention[task].named_parameters():
            yield f"attention.{task}.{name}", p


class MTANTrunk(_AttentionTrunk):
    """MTAN on a Conv-4 trunk for images: ``[N, C, H, W] → [N, tasks, out_features]`` (Conv-4's feature width,
    ``width · ⌊H/2^blocks⌋ · ⌊W/2^blocks⌋``). Options are Conv-4's (:class:`~mtml.nn.Conv4`); the attention
    modules' hidden width is the stage's channel count and their norm is the trunk's."""

    def __init__(self, input_shape: Sequence[int], task_names: Sequence[str], *, width: int = 64, blocks: int = 4,
                 norm: str = "group", groups: int = 8) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.backbone = Conv4(input_shape, width=width, blocks=blocks, norm=norm, groups=groups)
        self.out_features = self.backbone.out_features
        self.blocks = blocks

        def attention(c_in: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, width, 1), make_norm(norm, width, groups), nn.ReLU(),
                                 nn.Conv2d(width, width, 1), nn.Sigmoid())

        self.attention = nn.ModuleDict({t: nn.ModuleList(attention(width if j == 0 else 2 * width)
                                                         for j in range(blocks)) for t in self.task_names})
        self.bridges = nn.ModuleList(conv_block(width, width, norm, groups) for _ in range(blocks - 1))

    def _block(self, j: int) -> nn.Sequential:
        block = self.backbone[j]
        assert isinstance(block, nn.Sequential)
        return block

    def _stages(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        h = x
        for j in range(self.blocks):
            conv, norm, act, pool = self._block(j)
            out.append(act(norm(conv(h))))
            h = pool(out[-1])
        return out

    def _finish(self, attended: Tensor) -> Tensor:
        return torch.flatten(self._block(self.blocks - 1)[3](attended), 1)


class MTANMLPTrunk(_AttentionTrunk):
    """The MLP analogue of MTAN for flat inputs: ``[N, d_in] → [N, tasks, hidden[-1]]``, feature-wise masks on
    each hidden layer of a shared :func:`~mtml.nn.mlp` trunk."""

    def __init__(self, d_in: int, task_names: Sequence[str], *, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        widths = [int(h) for h in hidden]
        self.backbone = mlp(d_in, widths, activation=activation, dropout=dropout)
        self.per_layer = 3 if dropout else 2  # Linear, activation (, Dropout)
        self.out_features = widths[-1]

        def attention(c_in: int, c: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(c_in, c), nn.LayerNorm(c), nn.ReLU(), nn.Linear(c, c), nn.Sigmoid())

        self.attention = nn.ModuleDict({t: nn.ModuleList(attention(w if k == 0 else 2 * w, w)
                                                         for k, w in enumerate(widths)) for t in self.task_names})
        self.bridges = nn.ModuleList(nn.Sequential(nn.Linear(widths[k], widths[k + 1]), ACTIVATIONS[activation]())
                                     for k in range(len(widths) - 1))

    def _stages(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        layers = list(self.backbone)
        for k in range(0, len(layers), self.per_layer):
            for layer in layers[k : k + self.per_layer]:
                x = layer(x)
            out.append(x)
        return out

    def _finish(self, attended: Tensor) -> Tensor:
        return attended
