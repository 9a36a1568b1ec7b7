"""Step functions any training loop can call: one outer update, and the meta-test protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtml._checks import check_int
from mtml.errors import ConfigError
from mtml.meta._base import MetaAlgorithm, MetaOutput
from mtml.meta._episode import Episode, EpisodeSampler

__all__ = ["Mapper", "mean_ci", "meta_backward", "meta_evaluate", "meta_parameters", "meta_step"]

#: ``map_fn(fn, items) -> [fn(x) for x in items]``, possibly spread over processes
#: (:func:`mtml.engine._distributed.map_ranks`).
Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]


def meta_parameters(algorithm: MetaAlgorithm, model: nn.Module) -> list[nn.Parameter]:
    """Everything the outer optimiser updates: the model's parameters and the algorithm's own (Meta-SGD rates,
    ridge regulariser), trainable ones only."""
    return [p for p in (*model.parameters(), *algorithm.parameters()) if p.requires_grad]


def meta_step(algorithm: MetaAlgorithm, model: nn.Module, episode: Episode,
              optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One outer update on ``episode``: zero the gradients, back-propagate the meta-objective, step.

    Returns ``{"loss": mean query loss after adaptation}`` plus ``"accuracy"`` for classification episodes.
    ``scaler`` (fp16): back-propagate ``scaler.scale(objective)``; the optimiser then sees scaled gradients, which
    the caller unscales before stepping (as :class:`~mtml.engine.Updater` does with a
    :class:`~mtml.engine.LossScaler`). The inner loop's gradients are of the unscaled support loss.
    """
    optimizer.zero_grad(set_to_none=True)
    out = meta_backward(algorithm, model, episode, scaler=scaler)
    optimizer.step()
    metrics = {"loss": float(out.losses.mean())}
    if out.accuracy is not None:
        metrics["accuracy"] = float(out.accuracy.mean())
    return metrics


def meta_backward(algorithm: MetaAlgorithm, model: nn.Module, episode: Episode, scale: float = 1.0, *,
                  scaler: torch.amp.GradScaler | None = None) -> MetaOutput:
    """Back-propagate ``scale ×`` the meta-objective of ``episode`` (times ``scaler``'s scale, with one) into the
    parameters' ``.grad``, in chunks of :meth:`~mtml.meta.MetaAlgorithm.backward_chunk` tasks, each chunk's
    objective weighted by its share of the tasks → the episode's detached per-task losses and accuracies, and as
    ``objective`` the detached sum of the weighted chunk objectives (unscaled; the episode's objective when that
    is a mean over tasks; for Reptile only its gradient, ``θ − φ̄``, adds up that way)."""
    n = episode.num_tasks
    chunk = max(1, min(n, algorithm.backward_chunk(episode)))
    parts: list[MetaOutput] = []
    weighted_objectives: list[Tensor] = []
    for start in range(0, n, chunk):
        part = episode if chunk == n else episode.tasks(start, min(n, start + chunk))
        out = algorithm.meta_objective(model, part)
        weighted = out.objective * (part.num_tasks / n)
        loss = weighted * scale
        (loss if scaler is None else scaler.scale(loss)).backward()
        parts.append(out)
        weighted_objectives.append(weighted.detach())
    if len(parts) == 1:
        return MetaOutput(parts[0].objective.detach(), parts[0].losses, parts[0].accuracy)
    losses = torch.cat([o.losses for o in parts])
    accuracy = None if parts[0].accuracy is None else torch.cat([o.accuracy for o in parts if o.accuracy is not None])
    return MetaOutput(torch.stack(weighted_objectives).sum(), losses, accuracy)


def mean_ci(values: Tensor, z: float = 1.959964) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval of ``values: [n]``."""
    n = values.numel()
    mean = float(values.mean())
    half = z * float(values.std()) / math.sqrt(n) if n > 1 else float("nan")
    return mean, half


def _episodes(tasks: EpisodeSampler | Iterable[Episode], generator: torch.Generator) -> Iterable[Episode]:
    if isinstance(tasks, EpisodeSampler):
        while True:
            yield tasks.sample(generator)
    else:
        yield from tasks


def meta_evaluate(
    algorithm: MetaAlgorithm,
    model: nn.Module,
    tasks: EpisodeSampler | Iterable[Episode],
    *,
    steps: Sequence[int] | None = None,
    num_tasks: int = 600,
    generator: torch.Generator | None = None,
    map_fn: Mapper | None = None,
) -> dict[str, float]:
    """The meta-test protocol: adapt on each task's support, score its query, over ``num_tasks`` tasks.

    Args:
        tasks: an episode sampler (drawn from with ``generator``) or an iterable of episodes (held-out tasks).
        steps: inner-step counts to score after; default ``(0, 1, algorithm.test_inner_steps)``. Closed-form
            algorithms (ProtoNet, R2D2) adapt exactly, so their scores are the same at every step count.
        num_tasks: tasks to score (the last episode is truncated to hit it exactly).
        generator: randomness for a sampler; default a generator seeded with 0.
        map_fn: how to map the scoring over episodes; default a plain loop. Pass
            :func:`mtml.engine._distributed.map_ranks` to spread the episodes over the ranks of a process group.

    Returns:
        ``{"loss@S": mean, "loss@S_ci95": half-width, ...}`` for each step count ``S`` (and ``accuracy@S`` for
        classification), plus ``"num_tasks"``. Means are over tasks; the CI is 1.96 standard errors.
    """
    check_int("num_tasks", num_tasks, 1, "Evaluate on at least one task (600 is the usual protocol).")
    if steps is None:
        steps = sorted({0, 1, algorithm.test_inner_steps}) if algorithm.uses_inner_steps else [0]
    steps = [check_int("steps", s, 0, "Use step counts >= 0.") for s in steps]
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def score(item: tuple[Episode, int]) -> dict[tuple[int, str], Tensor]:
        episode, keep = item
        return {(step, name): values[:keep].detach().double().cpu()
                for step, scores in algorithm.evaluate(model, episode, steps).items()
                for name, values in scores.items()}

    mapper: Mapper = map_fn or (lambda fn, items: [fn(x) for x in items])
    results = mapper(score, _upto(_episodes(tasks, generator), num_tasks))
    seen = sum(next(iter(r.values())).numel() for r in results if r)
    if seen < num_tasks:
        raise ConfigError(f"`num_tasks` is {num_tasks} but the episodes given hold only {seen} tasks; pass "
                          "more episodes or a sampler, or lower num_tasks.")
    out: dict[str, float] = {"num_tasks": float(seen)}
    for step, name in sorted(results[0]):
        out[f"{name}@{step}"], out[f"{name}@{step}_ci95"] = mean_ci(torch.cat([r[(step, name)] for r in results]))
    return out


def _upto(episodes: Iterable[Episode], num_tasks: int) -> Iterator[tuple[Episode, int]]:
    """``(episode, tasks to keep)`` until ``num_tasks`` tasks are reached (the last episode truncated)."""
    seen = 0
    for episode in episodes:
        keep = min(episode.num_tasks, num_tasks - seen)
        yield episode, keep
        seen += keep
        if seen >= num_tasks:
            return
