"""Meta-learning runs: a built config (task family, one-head model, algorithm) → :func:`~mtml.engine._fit`,
with meta-validation for early stopping and the meta-test protocol at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from mtml.datasets import EpisodeSource
from mtml.engine import (
    FitResult,
    LossScaler,
    ProgressHook,
    Run,
    autocast,
    fit,
    make_optimizer,
    map_ranks,
    sharded_meta_step,
)
from mtml.meta import Episode, MetaAlgorithm, meta_evaluate, meta_parameters
from mtml.workflows._build import Built, stop_rule, updater_of

__all__ = ["evaluate_meta", "fit_meta", "judged_steps"]


def judged_steps(algorithm: MetaAlgorithm) -> int:
    """Inner steps a meta run is validated and reported at: the test-time count (0 for closed-form methods)."""
    return algorithm.test_inner_steps if algorithm.uses_inner_steps else 0


def _parts(built: Built) -> tuple[EpisodeSource, MetaAlgorithm]:
    assert built.family is not None and built.algorithm is not None, "a meta-learning config's build"
    return built.family, built.algorithm


def fit_meta(exp: Built, run: Run | None, *, resume: bool, device: torch.device,
             progress: ProgressHook | None) -> tuple[FitResult, dict[str, float], dict[str, float]]:
    """Meta-train with early stopping on the meta-validation query loss after the test-time inner steps.

    Meta-validation scores the same ``meta_val_tasks`` tasks every time (a fixed generator), so successive
    validations are comparable. Returns the loop record and the meta-val and meta-test scores of the best state.
    """
    t, seed = exp.config.training, exp.config.seed
    family, algorithm = _parts(exp)
    exp.model.to(device)
    algorithm.to(device)
    opt = make_optimizer(t.optimizer, meta_parameters(algorithm, exp.model), lr=t.lr, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    k = judged_steps(algorithm)
    key = f"loss@{k}"

    scaler = LossScaler(device) if t.precision == "fp16" else None  # (its state is checkpointed as a module)
    updater = updater_of(exp.config, opt, scaler=scaler)
    grad_scaler = None if scaler is None else scaler.grad_scaler

    def micro(o: torch.optim.Optimizer) -> dict[str, Any]:
        episode = _to(family.train.sample(gen), device)
        with autocast(t.precision, device):
            return sharded_meta_step(algorithm, exp.model, episode, o, scaler=grad_scaler)

    def step() -> dict[str, Any]:
        return updater.step(micro)

    def score(sampler: Any, num: int, steps: list[int] | None, offset: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(seed + offset)
        with autocast(t.precision, device):
            return meta_evaluate(algorithm, exp.model, _episodes(sampler, g, device), steps=steps, num_tasks=num,
                                 map_fn=map_ranks)

    def validate() -> dict[str, Any]:
        val = score(family.val, t.meta_val_tasks, [k], 1)
        return {"objective": val[key], "meta_val": val}

    modules: dict[str, torch.nn.Module] = {"model": exp.model, "algorithm": algorithm}
    if scaler is not None:
        modules["grad_scaler"] = scaler
    result = fit(modules=modules, optimizer=opt, train_step=step,
                 validate=validate, stop=stop_rule(exp.config), generators={"sampler": gen}, run=run, resume=resume,
                 checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints, progress=progress,
                 updater=updater)
    test = per_source(family.test, lambda sampler: score(sampler, t.meta_test_tasks, None, 2))
    return result, score(family.val, t.meta_val_tasks, [k], 1), test


def per_source(sampler: Any, score: Callable[[Any], dict[str, float]]) -> dict[str, float]:
    """``score(sampler)``, plus ``"<source>/<key>"`` for each source of a multi-source sampler (one with
    ``by_source()``, e.g. ``meta_dataset``): ``glyphs/accuracy@0``, ``glyphs/accuracy@0_ci95``,
    ``glyphs/num_tasks``, each source scored on its own ``num_tasks`` tasks."""
    out = score(sampler)
    by_source = getattr(sampler, "by_source", None)
    if callable(by_source):
        for name, one in by_source().items():
            out.update({f"{name}/{key}": value for key, value in score(one).items()})
    return out


def _episodes(sampler: Any, generator: torch.Generator, device: torch.device) -> Iterator[Episode]:
    while True:
        yield _to(sampler.sample(generator), device)


def _to(episode: Episode, device: torch.device) -> Episode:
    if device.type == "cpu":
        return episode
    return episode.to(device)


def evaluate_meta(exp: Built, *, num_tasks: int, steps: list[int] | None, seed: int,
                  device: torch.device) -> dict[str, float]:
    """The meta-test protocol on the test split of ``exp``'s family (mean and 95% CI per inner-step count), per
    source too for a multi-source family (:func:`per_source`)."""
    family, algorithm = _parts(exp)
    exp.model.to(device)
    algorithm.to(device)

    def score(sampler: Any) -> dict[str, float]:
        g = torch.Generator().manual_seed(seed)
        with autocast(exp.config.training.precision, device):
            return meta_evaluate(algorithm, exp.model, _episodes(sampler, g, device), steps=steps,
                                 num_tasks=num_tasks, map_fn=map_ranks)

    return per_source(family.test, score)
