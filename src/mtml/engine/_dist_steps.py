"""Data-parallel versions of the step functions: each rank takes its share of a global batch, and the
all-reduced (summed) gradient equals the gradient of one process on the whole batch.

Every rank draws the SAME global batch or episode from the shared seeded generator and keeps its slice
(:func:`~mtml.engine._distributed.shard`). Its loss is scaled by its share of the batch, so summing gradients
over ranks gives the global mean gradient. Outside a process group both functions are the plain
:func:`~mtml.engine._joint.joint_step` and :func:`~mtml.meta.meta_step`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtml.engine._distributed import all_reduce_, is_distributed, reduce_gradients, shard, world_size
from mtml.engine._joint import Batch, StepResult, jacobian_backend, joint_step, task_losses, unpack
from mtml.engine._precision import check_scalable
from mtml.errors import ConfigError
from mtml.meta import Episode, MetaAlgorithm, meta_backward, meta_step
from mtml.nn import MultiTaskModel
from mtml.tasks import Split, Task
from mtml.weighting import JacobianWeighting, Weighting, task_jacobian

__all__ = ["shard_episode", "sharded_joint_step", "sharded_meta_step"]


def _optimized(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def shard_episode(episode: Episode) -> Episode:
    """This rank's contiguous share of the tasks of ``episode`` (``[tasks, ...]`` sliced on dim 0)."""
    part = shard(episode.num_tasks, "tasks per episode (meta_batch)")
    s, q = episode.support, episode.query
    classes = None if episode.classes is None else episode.classes[part]
    return Episode(Split(s.x[part], s.y[part]), Split(q.x[part], q.y[part]), episode.ways, classes)


def sharded_meta_step(algorithm: MetaAlgorithm, model: torch.nn.Module, episode: Episode,
                      optimizer: torch.optim.Optimizer, *,
                      scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """:func:`~mtml.meta.meta_step` on the global ``episode``, its tasks split over the ranks.

    The meta-objective of every algorithm is a mean over tasks (Reptile's gradient ``θ − φ̄`` too), so the
    local objective is scaled by ``local tasks / global tasks``. Loss and accuracy travel with the gradients
    in the same all-reduce. ``scaler`` (fp16): the gradients are of the scaled objective (see
    :func:`~mtml.meta.meta_step`); summed over ranks they stay scaled by the same factor, and a NaN or inf on one
    rank reaches every rank, so all skip the same updates.
    """
    if not is_distributed():
        return meta_step(algorithm, model, episode, optimizer, scaler=scaler)
    n = episode.num_tasks
    local = shard_episode(episode)
    optimizer.zero_grad(set_to_none=True)
    out = meta_backward(algorithm, model, local, scale=local.num_tasks / n, scaler=scaler)
    acc = out.accuracy.sum() if out.accuracy is not None else out.losses.new_zeros(())
    stats = reduce_gradients(_optimized(optimizer), torch.stack([out.losses.sum(), acc.to(out.losses)]).detach())
    assert stats is not None
    optimizer.step()
    metrics = {"loss": float(stats[0]) / n}
    if out.accuracy is not None:
        metrics["accuracy"] = float(stats[1]) / n
    return metrics


def _jacobian_backend(weighting: Weighting, gramian: str | None, device: torch.device) -> str:
    choice = gramian or str(getattr(weighting, "gramian", "auto"))
    if choice == "representation":
        raise ConfigError("training.weighting.gramian: 'representation' is not available on several ranks (its "
                          "Gramian does not add up across ranks). Use auto, loop, batched or layerwise.")
    if choice in ("loop", "batched"):
        return choice
    return "batched" if device.type == "cuda" else "loop"


def _local_losses(model: MultiTaskModel, tasks: Mapping[str, Task], batch: Batch,
                  names: list[str]) -> tuple[Tensor, list[int]]:
    """This rank's contribution to the ``[m]`` global task losses, and the tasks it contributes to.

    With at least as many tasks as ranks, and no rows shared by tasks, each rank takes whole tasks (its heads,
    stems and losses: per-task work is split too); otherwise each input's rows are split (a tensor shared by a
    task group is sliced once, so the group still makes one trunk pass per rank), and rank r's loss of task i is
    scaled by its share of that task's labelled rows.
    """
    m = len(names)
    shared = len({id(batch[n][0]) for n in names}) < m
    if m >= world_size() and not shared:
        own = list(range(m))[shard(m, "tasks")]
        mine = [names[i] for i in own]
        values = task_losses(model, tasks, {n: batch[n] for n in mine}, mine)
        index = torch.tensor(own, device=values.device)
        return values.new_zeros(m).index_add(0, index, values), own
    local: Batch = {}
    sliced: dict[int, tuple[Tensor, slice]] = {}
    shares = []
    for name in names:
        x, y, mask = unpack(batch[name])
        if id(x) not in sliced:
            part = shard(x.shape[0], f"rows in the batch of task '{name}'")
            sliced[id(x)] = (x[part], part)
        xs, part = sliced[id(x)]
        if mask is None:
            local[name] = (xs, y[part])
            shares.append((part.stop - part.start) / x.shape[0])
        else:
            local[name] = (xs, y[part], mask[part])
            shares.append(float(mask[part].sum()) / max(1, int(mask.sum())))
    losses = task_losses(model, tasks, local, names)
    return losses * torch.tensor(shares, dtype=losses.dtype, device=losses.device), list(range(m))


def sharded_joint_step(
    model: MultiTaskModel,
    tasks: Mapping[str, Task],
    batch: Batch,
    weighting: Weighting,
    optimizer: torch.optim.Optimizer,
    *,
    gramian: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """:func:`~mtml.engine._joint.joint_step` on the global ``batch``, split over the ranks.

    With at least as many tasks as ranks (and no rows shared by tasks), each rank takes whole tasks; otherwise
    each input's rows are split (a task group's rows once for the whole group), and as task losses are means over
    labelled rows, rank r's loss of task i is scaled by its share of that task's labelled rows. Either way the
    sum over ranks is the global loss vector. Weightings see the global (all-reduced) losses and, when they need
    it, the Gramian ``J Jᵀ`` of the all-reduced per-task gradient matrix ``J [m, shared parameters]`` — the same
    numbers on every rank, so every rank computes the same weights. Weightings may use the losses' values only
    (all built-in ones do); their penalty is split evenly. ``scaler`` (fp16): back-propagate the scaled loss, as
    :func:`~mtml.engine._joint.joint_step` does (weightings that take per-task gradients are refused with one).
    """
    if not is_distributed():
        return joint_step(model, tasks, batch, weighting, optimizer, gramian=gramian, scaler=scaler)
    if scaler is not None:
        check_scalable(weighting)
    names = weighting.task_names
    losses, own = _local_losses(model, tasks, batch, names)
    m = len(names)
    if isinstance(weighting, JacobianWeighting):
        return _sharded_jacobian_step(model, losses, own, weighting, optimizer, gramian)
    if weighting.needs_gramian:
        backend = _jacobian_backend(weighting, gramian, losses.device)
        jac = losses.new_zeros(m, sum(p.numel() for p in model.shared_parameters()))
        jac[own] = task_jacobian(losses[own], list(model.shared_parameters()), backend=backend)
        packed = all_reduce_(torch.cat([losses.detach()[:, None], jac], 1), "the per-task gradient all-reduce")
        global_losses, jac = packed[:, 0], packed[:, 1:]
        gram: Tensor | None = jac @ jac.T
    else:
        global_losses, gram = all_reduce_(losses.detach().clone(), "the task-loss all-reduce"), None
    w = weighting(global_losses, gram)
    penalty = weighting.penalty().to(losses)
    optimizer.zero_grad(set_to_none=True)
    local = (w * losses).sum() + penalty / world_size()
    (local if scaler is None else scaler.scale(local)).backward()
    reduce_gradients(_optimized(optimizer))
    optimizer.step()
    total = float((w.detach() * global_losses).sum() + penalty.detach())
    lv, wv = global_losses.tolist(), w.detach().tolist()
    assert len(lv) == m
    return StepResult(total, dict(zip(names, lv, strict=True)), dict(zip(names, wv, strict=True)))


def _sharded_jacobian_step(model: MultiTaskModel, losses: Tensor, own: list[int], weighting: JacobianWeighting,
                           optimizer: torch.optim.Optimizer, gramian: str | None) -> StepResult:
    """The Jacobian path on several ranks: the per-rank ``J`` (rows of this rank's tasks, or this rank's share of
    every task's rows) is all-reduced with the losses, so every rank passes the same global ``J`` to
    ``weighting.combine`` (same state, same draws) and writes the same update; the other parameters' gradients
    of ``Σ weights[i]·Lᵢ`` are all-reduced as in the plain step."""
    names, m = weighting.task_names, len(weighting.task_names)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    jac = losses.new_zeros(m, sum(p.numel() for p in shared))
    jac[own] = task_jacobian(losses[own], shared, backend=jacobian_backend(weighting, gramian, losses.device))
    packed = all_reduce_(torch.cat([losses.detach()[:, None], jac], 1), "the per-task gradient all-reduce")
    global_losses, jac = packed[:, 0], packed[:, 1:]
    out = weighting.combine(global_losses, jac)
    penalty = weighting.penalty().to(losses)
    optimizer.zero_grad(set_to_none=True)
    covered = {id(p) for p in shared}
    others = [p for p in _optimized(optimizer) if id(p) not in covered]
    local = (out.weights * losses).sum() + penalty / world_size()
    trained = [p for p in others if p.requires_grad]
    if trained and local.requires_grad:
        torch.autograd.backward(local, inputs=trained)
    reduce_gradients(others)
    weighting.write_update(shared, out.update)
    optimizer.step()
    total = float((out.weights * global_losses).sum() + penalty.detach())
    lv, wv = global_losses.tolist(), out.weights.tolist()
    return StepResult(total, dict(zip(names, lv, strict=True)), dict(zip(names, wv, strict=True)))
