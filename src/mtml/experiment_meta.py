"""Meta-learning runs from a config: task family → single-head model → algorithm → :func:`~mtml.engine.fit`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtml.config import Config
from mtml.datasets import FAMILIES, EpisodeSource
from mtml.engine import FitResult, ProgressHook, Run, StopRule, fit, make_optimizer
from mtml.engine.dist_steps import sharded_meta_step
from mtml.engine.distributed import map_ranks
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, Episode, MetaAlgorithm, meta_evaluate, meta_parameters
from mtml.nn import MultiTaskModel, build_backbone, feature_dim, mlp

__all__ = ["MetaExperiment", "build_meta", "evaluate_meta", "fit_meta", "judged_steps"]


@dataclass
class MetaExperiment:
    config: Config
    source: EpisodeSource
    model: MultiTaskModel
    algorithm: MetaAlgorithm

    @property
    def family(self) -> str:
        return self.config.data.dataset


def _source(config: Config, **override: Any) -> EpisodeSource:
    opts = {"seed": config.seed, **config.data.options, **override}
    return FAMILIES.create(config.data.dataset, where="data.options", **opts)


def build_meta(config: Config, **data_override: Any) -> MetaExperiment:
    """Task family, a one-head model (trunk = meta-learner, head = task learner) and the algorithm.

    The trunk is ``model.backbone``: an MLP of widths ``model.trunk_hidden`` on flat features (the default) or
    a convolutional backbone (``conv4``, ``resnet12``) on images ``(C, H, W)``; the head is an MLP of widths
    ``model.head_hidden`` (a linear layer by default) on the trunk's feature vector.
    """
    source = _source(config, **data_override)
    m = config.model
    if m.backbone == "mlp" and len(source.input_shape) != 1:
        raise ConfigError(f"data.dataset '{config.data.dataset}' has inputs of shape {source.input_shape}; the "
                          "MLP meta-learner takes flat features. For images set model.backbone: conv4 (or resnet12).")
    torch.manual_seed(config.seed)
    trunk: nn.Module
    if m.backbone == "mlp":
        trunk = mlp(source.input_shape[0], m.trunk_hidden, activation=m.activation)
        width = m.trunk_hidden[-1] if m.trunk_hidden else source.input_shape[0]
    else:
        trunk = build_backbone(m.backbone, source.input_shape, m.backbone_options)
        width = feature_dim(trunk)
    head: nn.Module = mlp(width, m.head_hidden, source.num_outputs, activation=m.activation)
    model = MultiTaskModel(trunk, {"task": head}, input_shapes={"task": source.input_shape})
    t = config.training
    algorithm = ALGORITHMS.create(t.algorithm, model, where="training.algorithm_options", **t.algorithm_options)
    return MetaExperiment(config, source, model, algorithm)


def judged_steps(algorithm: MetaAlgorithm) -> int:
    """Inner steps a meta run is validated and reported at: the test-time count (0 for closed-form methods)."""
    return algorithm.test_inner_steps if algorithm.uses_inner_steps else 0


def fit_meta(exp: MetaExperiment, run: Run | None, *, resume: bool, device: torch.device,
             progress: ProgressHook | None) -> tuple[FitResult, dict[str, float], dict[str, float]]:
    """Meta-train with early stopping on the meta-validation query loss after the test-time inner steps.

    Meta-validation scores the same ``meta_val_tasks`` tasks every time (a fixed generator), so successive
    validations are comparable. Returns the loop record and the meta-val and meta-test scores of the best state.
    """
    t, seed = exp.config.training, exp.config.seed
    exp.model.to(device)
    exp.algorithm.to(device)
    opt = make_optimizer(t.optimizer, meta_parameters(exp.algorithm, exp.model), lr=t.lr, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    k = judged_steps(exp.algorithm)
    key = f"loss@{k}"

    def step() -> dict[str, Any]:
        return sharded_meta_step(exp.algorithm, exp.model, _to(exp.source.train.sample(gen), device), opt)

    def score(sampler: Any, num: int, steps: list[int] | None, offset: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(seed + offset)
        return meta_evaluate(exp.algorithm, exp.model, _episodes(sampler, g, device), steps=steps, num_tasks=num,
                             map_fn=map_ranks)

    def validate() -> dict[str, Any]:
        val = score(exp.source.val, t.meta_val_tasks, [k], 1)
        return {"objective": val[key], "meta_val": val}

    stop = StopRule(max_steps=t.max_steps, eval_every=t.eval_every, patience=t.patience, min_delta=t.min_delta)
    result = fit(modules={"model": exp.model, "algorithm": exp.algorithm}, optimizer=opt, train_step=step,
                 validate=validate, stop=stop, generators={"sampler": gen}, run=run, resume=resume,
                 checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints, progress=progress)
    return result, score(exp.source.val, t.meta_val_tasks, [k], 1), score(exp.source.test, t.meta_test_tasks, None, 2)


def _episodes(sampler: Any, generator: torch.Generator, device: torch.device) -> Iterator[Episode]:
    while True:
        yield _to(sampler.sample(generator), device)


def _to(episode: Episode, device: torch.device) -> Episode:
    if device.type == "cpu":
        return episode
    return Episode(episode.support.to(device), episode.query.to(device), episode.ways)


def evaluate_meta(exp: MetaExperiment, *, num_tasks: int, steps: list[int] | None, seed: int,
                  device: torch.device) -> dict[str, float]:
    """The meta-test protocol on the test split of ``exp``'s family (mean and 95% CI per inner-step count)."""
    g = torch.Generator().manual_seed(seed)
    exp.model.to(device)
    exp.algorithm.to(device)
    episodes = _episodes(exp.source.test, g, device)
    return meta_evaluate(exp.algorithm, exp.model, episodes, steps=steps, num_tasks=num_tasks, map_fn=map_ranks)
