"""Inter-task affinity by lookahead (TAG: Fifty et al. 2021, "Efficiently Identifying Task Groupings for
Multi-Task Learning").

At a joint training step with shared parameters θ_s, task i takes a lookahead SGD step on the shared
parameters using only its own loss, ``θ_s⁺ⁱ = θ_s − η ∇_{θ_s} L_i``; its affinity onto task j is the relative
drop of j's loss on the same batch, ``A[i, j] = 1 − L_j(θ_s⁺ⁱ, θ_j) / L_j(θ_s, θ_j)``. Positive: i's update helps
j; negative: it hurts j. :class:`AffinityAccumulator` averages A over the steps where it is recorded, and
:class:`TagRecorder` is the hook that records it during joint training. Pure torch: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtml._batched_grad import batched_grad
from mtml.errors import ConfigError, DataError
from mtml.nn import MultiTaskModel
from mtml.tasks import Task

__all__ = ["AffinityAccumulator", "TagRecorder", "lookahead_affinity", "negative_transfer"]

Batch = Mapping[str, tuple[Tensor, ...]]  # (x, y) or (x, y, mask), as mtml.engine._joint's batches


class _ManyLosses(nn.Module):
    """``[m]`` task losses of a batch as a module forward, so ``functional_call`` can swap the trunk."""

    def __init__(self, model: MultiTaskModel, tasks: Mapping[str, Task], names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.tasks, self.names = model, tasks, list(names)

    def forward(self, batch: Batch) -> Tensor:
        out = self.model.forward_many({n: batch[n][0] for n in self.names})
        return torch.stack([self.tasks[n].compute_loss(out[n], batch[n][1], batch[n][2] if len(batch[n]) > 2 else None)
                            for n in self.names])


def _task_grads(losses: Tensor, params: list[Tensor], vectorize: bool) -> list[Tensor]:
    """Per-task gradients ``[m, *p.shape]`` of ``losses: [m]`` for each of ``params`` (zeros where unused)."""
    m = losses.shape[0]
    if vectorize:
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        batched = batched_grad(losses, params, eye, allow_unused=True)
        return [g if g is not None else torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device)
                for g, p in zip(batched, params, strict=True)]
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True) for i in range(m)]
    return [torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
            for k, p in enumerate(params)]


def lookahead_affinity(
    model: MultiTaskModel, tasks: Mapping[str, Task], batch: Batch, *, lr: float,
    names: Sequence[str] | None = None, vectorize: bool = True,
) -> Tensor:
    """TAG affinity ``[m, m]`` on one batch (``{task: (x, y)}``): ``A[i, j] = 1 − L_j(θ_s⁺ⁱ)/L_j(θ_s)``.

    ``lr`` is the lookahead step η; task order is ``names`` (default: the batch's). The model is evaluated in
    eval mode (no dropout noise, no random numbers drawn), and its parameters and mode are left as they were.
    ``vectorize`` computes the m per-task gradients in one batched backward and the m lookahead losses in
    one ``vmap``-ed forward; ``False`` loops (the oracle for the fast path).
    """
    if not lr > 0:
        raise ConfigError(f"the lookahead `lr` must be > 0. Got {lr}.")
    names = list(names or batch)
    missing = [n for n in names if n not in batch or n not in tasks]
    if missing:
        raise DataError(f"tasks {missing} have no batch or no Task; give both for every task in `names`.")
    losses_of = _ManyLosses(model, tasks, names)
    shared = dict(model.named_shared_parameters())
    if not shared:
        raise ConfigError("the model has no shared (trunk) parameters, so tasks cannot affect each other.")
    keys = [f"model.{k}" for k in shared]
    was_training = model.training
    model.eval()
    try:
        losses = losses_of(batch)
        grads = _task_grads(losses, list(shared.values()), vectorize)
        with torch.no_grad():
            stepped = {k: p.detach() - lr * g for k, p, g in zip(keys, shared.values(), grads, strict=True)}
            after = _lookahead_losses(losses_of, stepped, batch, len(names), vectorize)  # [i, j]
            before = losses.detach().clamp_min(torch.finfo(losses.dtype).tiny)
            return 1.0 - after / before[None, :]
    finally:
        model.train(was_training)


def _lookahead_losses(losses_of: _ManyLosses, stepped: dict[str, Tensor], batch: Batch, m: int,
                      vectorize: bool) -> Tensor:
    """Row i: the m task losses with the shared parameters of lookahead i (``stepped[k]: [m, *shape]``)."""
    def one(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(losses_of, params, (batch,), strict=False)

    if vectorize:
        try:
            return torch.func.vmap(one)(stepped)
        except RuntimeError:  # a custom loss or layer without a batching rule: the loop gives the same values
            pass
    return torch.stack([one({k: v[i] for k, v in stepped.items()}) for i in range(m)])


class AffinityAccumulator:
    """Running mean and standard error of affinity matrices ``[m, m]`` over recorded steps (float64)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        m = len(self.names)
        self.count = 0
        self._sum = torch.zeros(m, m, dtype=torch.float64)
        self._sq = torch.zeros(m, m, dtype=torch.float64)

    def update(self, affinity: Tensor) -> None:
        a = affinity.detach().to("cpu", torch.float64)
        if a.shape != self._sum.shape:
            raise DataError(f"affinity has shape {tuple(a.shape)}; this accumulator holds {tuple(self._sum.shape)}.")
        if not bool(torch.isfinite(a).all()):
            raise DataError("a non-finite affinity was recorded; lower the lookahead lr or check the task losses.")
        self.count += 1
        self._sum += a
        self._sq += a * a

    def mean(self) -> Tensor:
        """``[m, m]`` mean affinity (``A[i, j]``: task i onto task j)."""
        if self.count == 0:
            raise DataError("no affinity recorded yet; train for at least one recording step.")
        return self._sum / self.count

    def stderr(self) -> Tensor:
        """``[m, m]`` standard error of the mean (steps treated as independent, so it is optimistic)."""
        if self.count < 2:
            return torch.full_like(self._sum, float("inf"))
        var = (self._sq - self._sum**2 / self.count) / (self.count - 1)
        return (var.clamp_min(0.0) / self.count).sqrt()


def negative_transfer(mean: Tensor, stderr: Tensor, *, z: float = 1.96) -> Tensor:
    """``[m, m]`` boolean: pairs ``i → j`` (i ≠ j) whose affinity or gain is below 0 beyond doubt — the upper
    end of the ``mean ± z·stderr`` interval (95% for z = 1.96) is below 0."""
    if mean.shape != stderr.shape or mean.ndim != 2 or mean.shape[0] != mean.shape[1]:
        raise DataError(f"mean {tuple(mean.shape)} and stderr {tuple(stderr.shape)} must be the same square shape.")
    flag = (mean + z * stderr) < 0
    return flag & ~torch.eye(mean.shape[0], dtype=torch.bool, device=mean.device)


class TagRecorder:
    """Hook for joint training: called with each step's batch (before the update), records the lookahead
    affinity every ``every``-th call into :attr:`accumulator`. Draws no random numbers, so training with
    the hook follows exactly the same trajectory as without it."""

    def __init__(self, model: MultiTaskModel, tasks: Sequence[Task], *, lr: float, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"`every` must be >= 1. Got {every}.")
        if not lr > 0:
            raise ConfigError(f"the lookahead `lr` must be > 0. Got {lr}.")
        self.model, self.lr, self.every = model, lr, every
        self.tasks = {t.name: t for t in tasks}
        self.accumulator = AffinityAccumulator(list(self.tasks))
        self.calls = 0

    def __call__(self, batch: Batch) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every == 0:
            a = lookahead_affinity(self.model, self.tasks, batch, lr=self.lr, names=self.accumulator.names)
            self.accumulator.update(a)
