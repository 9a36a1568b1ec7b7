"""Multi-task architectures beyond hard parameter sharing: MMoE, CGC/PLE and cross-stitch networks.

Each is a :class:`ColumnModel` — a :class:`~mtml.nn._model.MultiTaskModel` whose trunk maps ``[batch, d_in]`` to
one representation per task, ``[batch, tasks, d]``; task t's head reads column t. The trunk is called once per
group of stem-less tasks on their concatenated rows (as ``MultiTaskModel.forward_many`` does), and treats rows
independently, so the layer-wise Gramian applies. Parameters inside the trunk that only one task can reach (its
gate, its own experts in the last extraction level) are that task's parameters, not shared ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.nn._mlp import mlp
from mtml.nn._model import MultiTaskModel

__all__ = ["CGCLevel", "ColumnModel", "CrossStitchTrunk", "ExtractionTrunk", "MMoETrunk"]


class ColumnTrunk(nn.Module):
    """A trunk ``[batch, d_in] → [batch, tasks, d]``; ``private(task)`` names its parameters only task reaches."""

    task_names: list[str]

    def private(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())


class ColumnModel(MultiTaskModel):
    """``head[t](trunk(stem[t](x))[:, t])``: the multi-task model for trunks with one output column per task."""

    trunk: ColumnTrunk

    def __init__(self, trunk: ColumnTrunk, heads: Mapping[str, nn.Module], stems: Mapping[str, nn.Module] | None = None,
                 *, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 stem_of: Mapping[str, str] | None = None) -> None:
        super().__init__(trunk, heads, stems, input_shapes=input_shapes, stem_of=stem_of)
        if list(trunk.task_names) != list(self.heads.keys()):
            raise ConfigError(f"trunk columns {trunk.task_names} must match the heads {list(self.heads.keys())}.")
        self.column = {t: i for i, t in enumerate(trunk.task_names)}

    def features(self, x: Tensor, task: str | None = None) -> Tensor:
        """``[batch, d]`` features of ``task`` (``[batch, tasks, d]`` for every task when ``task`` is None)."""
        h = super().features(x, task)
        return h[:, self.column[task]] if task is not None else h

    def forward_many(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Outputs for several tasks; one trunk call per call of :meth:`trunk_plan` (a tensor given to several
        tasks runs once: its experts, gates and columns serve every task that reads it)."""
        for task, x in inputs.items():
            self._check(x, task)
        outputs: dict[str, Tensor] = {}
        for call in self.trunk_plan(inputs):
            stem = self.stem_call(call)
            if stem is not None:
                out = self.trunk(stem(call[0][0]))
            else:
                out = self.trunk(call[0][0] if len(call) == 1 else torch.cat([x for x, _ in call]))
            parts = torch.split(out, [x.shape[0] for x, _ in call]) if len(call) > 1 else (out,)
            for (_, names), part in zip(call, parts, strict=True):
                for n in names:
                    outputs[n] = self.heads[n](part[:, self.column[n]])
        return {task: outputs[task] for task in inputs}

    def _private_ids(self) -> set[int]:
        return {id(p) for t in self.task_names for _, p in self.trunk.private(t)}

    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        private = self._private_ids()
        for name, p in self.trunk.named_parameters():
            if id(p) not in private:
                yield f"trunk.{name}", p

    def named_task_parameters(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_task_parameters(task)
        for name, p in self.trunk.private(task):
            yield f"trunk.{name}", p


def _experts(n: int, d_in: int, hidden: Sequence[int], activation: str, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(mlp(d_in, hidden, activation=activation, dropout=dropout) for _ in range(n))


def _mix(gate: Tensor, experts: Tensor) -> Tensor:
    """``gate [N, E]`` (softmaxed here), ``experts [N, E, d]`` → ``[N, d]``."""
    return torch.einsum("ne,ned->nd", torch.softmax(gate, -1), experts)


class MMoETrunk(ColumnTrunk):
    """Multi-gate mixture of experts: shared experts, one softmax gate per task over them.

    Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts", KDD 2018. Shared: the experts. Private: each task's gate ``Linear(d_in → experts)``.
    """

    def __init__(self, d_in: int, task_names: Sequence[str], *, num_experts: int, hidden: Sequence[int],
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.experts = _experts(num_experts, d_in, hidden, activation, dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(d_in, num_experts) for t in self.task_names})

    def forward(self, x: Tensor) -> Tensor:
        e = torch.stack([expert(x) for expert in self.experts], 1)  # [N, E, d]
        return torch.stack([_mix(self.gates[t](x), e) for t in self.task_names], 1)

    def private(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.gates[task].named_parameters():
            yield f"gates.{task}.{name}", p


class CGCLevel(nn.Module):
    """One customized gate control level: shared experts, per-task experts, per-task gates over (shared + own);
    with ``shared_gate`` also a gate over all experts that feeds the next level's shared path (PLE).

    Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations", RecSys 2020.
    """

    def __init__(self, d_in: int, task_names: Sequence[str], *, shared_experts: int, task_experts: int,
                 hidden: Sequence[int], shared_gate: bool, activation: str, dropout: float) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.shared = _experts(shared_experts, d_in, hidden, activation, dropout)
        self.own = nn.ModuleDict({t: _experts(task_experts, d_in, hidden, activation, dropout)
                                  for t in self.task_names})
        self.gates = nn.ModuleDict({t: nn.Linear(d_in, shared_experts + task_experts) for t in self.task_names})
        total = shared_experts + task_experts * len(self.task_names)
        self.shared_gate = nn.Linear(d_in, total) if shared_gate else None

    def _own(self, task: str) -> nn.ModuleList:
        experts = self.own[task]
        assert isinstance(experts, nn.ModuleList)
        return experts

    def forward(self, task_in: Tensor, shared_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """``task_in [N, m, d_in]``, ``shared_in [N, d_in]`` → ``([N, m, d], [N, d] | None)``."""
        shared = torch.stack([e(shared_in) for e in self.shared], 1)
        own = {t: torch.stack([e(task_in[:, i]) for e in self._own(t)], 1) for i, t in enumerate(self.task_names)}
        outs = [_mix(self.gates[t](task_in[:, i]), torch.cat([shared, own[t]], 1))
                for i, t in enumerate(self.task_names)]
        nxt = None
        if self.shared_gate is not None:
            nxt = _mix(self.shared_gate(shared_in), torch.cat([shared, *own.values()], 1))
        return torch.stack(outs, 1), nxt


class ExtractionTrunk(ColumnTrunk):
    """CGC (``levels=1``) or PLE (``levels > 1``): stacked :class:`CGCLevel` s, the shared path gated at every
    level but the last. Private: each task's gates, and its own experts in the last level (earlier levels' task
    experts also feed the shared path, so every task reaches them: they count as shared).
    """

    def __init__(self, d_in: int, task_names: Sequence[str], *, levels: int, shared_experts: int, task_experts: int,
                 hidden: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        widths = [d_in] + [hidden[-1]] * levels
        self.levels = nn.ModuleList(
            CGCLevel(widths[k], self.task_names, shared_experts=shared_experts, task_experts=task_experts,
                     hidden=hidden, shared_gate=k < levels - 1, activation=activation, dropout=dropout)
            for k in range(levels))

    def forward(self, x: Tensor) -> Tensor:
        task_in = x.unsqueeze(1).expand(-1, len(self.task_names), -1)
        shared_in: Tensor | None = x
        for level in self.levels:
            assert shared_in is not None
            task_in, shared_in = level(task_in, shared_in)
        return task_in

    def private(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        last = len(self.levels) - 1
        for k, level in enumerate(self.levels):
            assert isinstance(level, CGCLevel)
            for name, p in level.gates[task].named_parameters():
                yield f"levels.{k}.gates.{task}.{name}", p
            if k == last:
                for name, p in level.own[task].named_parameters():
                    yield f"levels.{k}.own.{task}.{name}", p


class CrossStitchTrunk(ColumnTrunk):
    """One MLP column per task; after every hidden layer a cross-stitch unit mixes the columns,
    ``h'_t = Σ_s α[t, s]·h_s`` (α learned, initialised to ``self_weight`` on the diagonal and the rest spread
    evenly). Misra, Shrivastava, Gupta & Hebert, "Cross-Stitch Networks for Multi-task Learning", CVPR 2016.
    Every column reaches every task through the stitches, so the whole trunk is shared.
    """

    def __init__(self, d_in: int, task_names: Sequence[str], *, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, self_weight: float = 0.9) -> None:
        super().__init__()
        self.task_names = list(task_names)
        m = len(self.task_names)
        if not 0.0 <= self_weight <= 1.0:
            raise ConfigError(f"`self_weight` must be in [0, 1]. Got {self_weight}.")
        off = (1.0 - self_weight) / (m - 1) if m > 1 else 0.0
        init = torch.full((m, m), off) + torch.eye(m) * (self_weight - off if m > 1 else 1.0 - off)
        widths = [d_in, *hidden]
        self.columns = nn.ModuleList(
            nn.ModuleList(mlp(widths[k], (widths[k + 1],), activation=activation, dropout=dropout)
                          for k in range(len(hidden)))
            for _ in range(m))
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in hidden)

    def _layer(self, column: int, k: int) -> nn.Module:
        col = self.columns[column]
        assert isinstance(col, nn.ModuleList)
        return col[k]

    def forward(self, x: Tensor) -> Tensor:
        h = [x] * len(self.task_names)
        for k, alpha in enumerate(self.stitches):
            out = torch.stack([self._layer(t, k)(h[t]) for t in range(len(h))], 1)  # [N, m, d]
            h = list(torch.einsum("ts,nsd->ntd", alpha, out).unbind(1))
        return torch.stack(h, 1)
