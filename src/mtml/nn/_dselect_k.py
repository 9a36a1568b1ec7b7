"""DSelect-k: MMoE's softmax gates replaced by a differentiable k-sparse selector over the same shared experts.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k: Differentiable Selection in the
Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021.

One task's gate over ``n`` experts holds ``k`` *single-expert selectors*. Selector i has ``b = ⌈log₂ n⌉`` logits
``z_i`` (a binary code); with the smooth-step ``S`` (``0`` below ``-γ/2``, ``1`` above ``γ/2``, the cubic
``-2t³/γ³ + 3t/(2γ) + 1/2`` between), code ``c`` gets the weight ``r_i(c) = Π_j S(z_ij)^{c_j} (1 - S(z_ij))^{1 - c_j}``,
a distribution over the ``2^b`` codes. The gate is ``q = Σ_i softmax(α)_i r_i``. Once every ``S(z_ij)`` is 0 or 1
each ``r_i`` is one-hot, so ``q`` has at most ``k`` nonzero weights. ``per_example`` gates compute ``z`` and ``α``
from the input (``Linear(d_in → k·b)`` and ``Linear(d_in → k)``), ``static`` gates learn them as free parameters.

When ``n`` is not a power of two the codes ``c ≥ n`` reach no expert; here code ``c`` weighs expert ``c mod n``
(folding), so the gate is a distribution over the ``n`` experts for every parameter value and stays exactly
k-sparse when saturated. (The authors' code instead leaves those codes' mass out and adds a ``1/Σ`` penalty.)

The optional entropy regulariser ``λ·Σ_i H(r_i)`` (mean over the task's rows) pushes each selector towards one
expert; :class:`DSelectKModel` adds it to each task's training loss (the gates are that task's own parameters,
so the Gramian over shared parameters is unchanged by it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.nn._architectures import ColumnModel, ColumnTrunk, _experts
from mtml.tasks import Task

__all__ = ["GATES", "DSelectKGate", "DSelectKModel", "DSelectKTrunk", "smooth_step"]

GATES = ("per_example", "static")


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step: exactly 0 for ``t ≤ -γ/2``, exactly 1 for ``t ≥ γ/2``, ``-2t³/γ³ + 3t/(2γ) + 1/2``
    in between (continuous with a continuous derivative)."""
    inner = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), inner))


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate: ``x [N, d_in] → weights [N, experts]`` (non-negative, rows summing to 1).

    Args:
        d_in: width of the gate's input (the trunk's input).
        num_experts: ``n ≥ 1`` experts to choose from.
        k: number of single-expert selectors, ``1 ≤ k ≤ n``: at most k experts get weight once saturated.
        gamma: width ``γ > 0`` of the smooth-step's cubic region.
        gate: ``"per_example"`` (z and α linear in x) or ``"static"`` (z and α free parameters).
    """

    def __init__(self, d_in: int, num_experts: int, k: int, *, gamma: float = 1.0, gate: str = "per_example") -> None:
        super().__init__()
        if gate not in GATES:
            raise ConfigError(f"`gate` must be one of {', '.join(GATES)}. Got {gate!r}.")
        self.num_experts, self.k, self.gamma, self.gate = num_experts, k, float(gamma), gate
        self.bits = max(1, math.ceil(math.log2(num_experts)))
        codes = torch.arange(2**self.bits)
        # constants, not buffers (a buffer restored in place by a row-coupling probe would break saved graphs):
        # bit j of code c, most significant first, [codes, bits]; and the expert code c weighs (c mod n)
        self._constants = {torch.device("cpu"): (
            (codes[:, None] >> torch.arange(self.bits - 1, -1, -1)) & 1 == 1, codes % num_experts)}
        # z starts in the cubic region near 0 (every code about equally likely), α near 0 (selectors equal)
        self.z: nn.Linear | nn.Parameter
        self.alpha: nn.Linear | nn.Parameter
        if gate == "per_example":
            self.z, self.alpha = nn.Linear(d_in, k * self.bits), nn.Linear(d_in, k)
        else:
            self.z, self.alpha = nn.Parameter(torch.empty(k, self.bits)), nn.Parameter(torch.empty(k))
        with torch.no_grad():
            for p in _params(self.z):
                p.uniform_(-self.gamma / 100, self.gamma / 100)
            for p in _params(self.alpha):
                p.uniform_(-0.05, 0.05)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z [N, k, bits], α [N, k])`` for the rows of ``x``."""
        n = x.shape[0]
        if isinstance(self.z, nn.Linear) and isinstance(self.alpha, nn.Linear):
            return self.z(x).reshape(n, self.k, self.bits), self.alpha(x)
        assert isinstance(self.z, nn.Parameter) and isinstance(self.alpha, nn.Parameter)
        return self.z.expand(n, -1, -1), self.alpha.expand(n, -1)

    def selectors(self, x: Tensor) -> Tensor:
        """``[N, k, experts]``: each single-expert selector's distribution over the experts."""
        return self._selectors(self.logits(x)[0])

    def _selectors(self, z: Tensor) -> Tensor:
        s = smooth_step(z, self.gamma).unsqueeze(2)  # [N, k, 1, bits]
        codes, expert_of = self._on(s.device)
        per_code = torch.where(codes, s, 1.0 - s).prod(-1)  # [N, k, codes]
        out = per_code.new_zeros(*per_code.shape[:2], self.num_experts)
        return out.index_add(2, expert_of, per_code)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            codes, expert_of = self._constants[torch.device("cpu")]
            self._constants[device] = (codes.to(device), expert_of.to(device))
        return self._constants[device]

    def forward(self, x: Tensor) -> Tensor:
        z, alpha = self.logits(x)
        return torch.einsum("nk,nke->ne", torch.softmax(alpha, -1), self._selectors(z))

    def entropy(self, x: Tensor) -> Tensor:
        """``[N]``: the summed entropies ``Σ_i H(r_i)`` of the k selectors on each row (0 when all are one-hot)."""
        r = self.selectors(x)
        return -(r * torch.log(r.clamp_min(1e-12))).sum((1, 2))


def _params(p: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [p] if isinstance(p, nn.Parameter) else list(p.parameters())


class DSelectKTrunk(ColumnTrunk):
    """Shared MLP experts (as in MMoE) and one :class:`DSelectKGate` per task over them:
    ``[batch, d_in] → [batch, tasks, hidden[-1]]``. Shared: the experts. Private: each task's gate."""

    def __init__(self, d_in: int, task_names: Sequence[str], *, num_experts: int, k: int, hidden: Sequence[int],
                 gamma: float = 1.0, gate: str = "per_example", activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.experts = _experts(num_experts, d_in, hidden, activation, dropout)
        self.gates = nn.ModuleDict({t: DSelectKGate(d_in, num_experts, k, gamma=gamma, gate=gate)
                                    for t in self.task_names})

    def forward(self, x: Tensor) -> Tensor:
        e = torch.stack([expert(x) for expert in self.experts], 1)  # [N, E, d]
        return torch.stack([torch.einsum("ne,ned->nd", self.gates[t](x), e) for t in self.task_names], 1)

    def private(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.gates[task].named_parameters():
            yield f"gates.{task}.{name}", p


class DSelectKModel(ColumnModel):
    """A :class:`ColumnModel` on a :class:`DSelectKTrunk` whose training losses carry the entropy regulariser:
    task t's loss is its task loss plus ``entropy_reg`` × the mean over its rows of its gate's selector entropy
    (:meth:`training_losses`, which :func:`mtml.engine._joint.task_losses` calls). Predictions are unchanged."""

    trunk: DSelectKTrunk

    def __init__(self, trunk: DSelectKTrunk, heads: Mapping[str, nn.Module],
                 stems: Mapping[str, nn.Module] | None = None, *, entropy_reg: float,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 stem_of: Mapping[str, str] | None = None) -> None:
        super().__init__(trunk, heads, stems, input_shapes=input_shapes, stem_of=stem_of)
        self.entropy_reg = float(entropy_reg)

    def gate_entropy(self, x: Tensor, task: str) -> Tensor:
        """``[N]`` selector entropies of ``task``'s gate on ``x`` (through ``task``'s stem, if any)."""
        stem = self.stem(task)
        gate = self.trunk.gates[task]
        assert isinstance(gate, DSelectKGate)
        return gate.entropy(stem(x) if stem is not None else x)

    def training_losses(self, tasks: Mapping[str, Task], batch: Mapping[str, tuple[Tensor, ...]],
                        names: Sequence[str]) -> Tensor:
        """``[m]``: ``L_t + entropy_reg · mean_rows H_t`` for ``names`` on ``batch`` (``{task: (x, y[, mask])}``),
        the task losses from one :meth:`forward_many` pass (its usual trunk calls)."""
        outputs = self.forward_many({n: batch[n][0] for n in names})
        losses = []
        for n in names:
            x, y, mask = batch[n][0], batch[n][1], (batch[n][2] if len(batch[n]) > 2 else None)
            reg = self.gate_entropy(x, n)
            reg = reg[mask] if mask is not None and bool(mask.any()) else reg
            losses.append(tasks[n].compute_loss(outputs[n], y, mask) + self.entropy_reg * reg.mean())
        return torch.stack(losses)
