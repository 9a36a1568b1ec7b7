"""One build for every workflow: a validated :class:`~mtml.config.Config` → data, model, algorithm, weighting.

``train``, ``eval``, ``transfer``, ``rank``, ``affinity`` and ``demo`` all start here, so the rules that used to
be written in each of them live once: the dataset's split follows the run's seed unless the config gives one;
models are built under a forked RNG seeded by ``config.seed`` (building never moves the caller's global RNG);
a run's own ``config.yaml`` is re-read one way; a source run is loaded one way.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtml.config import Config
from mtml.datasets import DATASETS, FAMILIES, EpisodeSource
from mtml.engine import LossScaler, LRSchedule, Run, StopRule, Updater, load_checkpoint, restore
from mtml.errors import ConfigError
from mtml.groups import labelled_only, task_groups
from mtml.meta import ALGORITHMS, MetaAlgorithm
from mtml.nn import ARCHITECTURES, MultiTaskModel, build_backbone, build_hierarchical, feature_dim, mlp
from mtml.tasks import Task
from mtml.transfer import Source
from mtml.weighting import WEIGHTINGS, Weighting

__all__ = ["Built", "build", "dataset_tasks", "default_run_dir", "load_source", "make_weighting", "read_config",
           "resolve_device", "schedule_of", "seeded", "stop_rule", "target_tasks", "task_family", "updater_of"]


@dataclass
class Built:
    """What a config builds. Joint configs: ``tasks`` and ``weighting``; meta-learning configs: ``family``
    (the task distribution) and ``algorithm``. Both: ``model`` (for meta-learning a one-head model whose trunk
    is the meta-learner and whose head ``"task"`` is the task learner)."""

    config: Config
    model: MultiTaskModel
    tasks: list[Task] = field(default_factory=list)
    weighting: Weighting | None = None
    family: EpisodeSource | None = None
    algorithm: MetaAlgorithm | None = None

    @property
    def is_meta(self) -> bool:
        return self.algorithm is not None

    def kinds(self) -> dict[str, str]:
        """The kind of each head: ``{task: "regression" | "binary" | "multiclass" | "multilabel"}``."""
        if self.family is not None:
            return {"task": "multiclass" if self.family.kind == "classification" else self.family.kind}
        return {t.name: t.kind.value for t in self.tasks}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block on the global RNG seeded by ``seed``; the caller's RNG state is restored afterwards."""
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when there is a GPU, else CPU; anything else is checked to exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA GPU; use device: cpu.")
    return device


def dataset_tasks(config: Config) -> list[Task]:
    """The tasks of a joint config's dataset; the split follows ``config.seed`` unless ``data.options`` sets one."""
    opts = dict(config.data.options)
    if "seed" in inspect.signature(DATASETS.get(config.data.dataset)).parameters:
        opts.setdefault("seed", config.seed)
    return DATASETS.create(config.data.dataset, where="data.options", **opts)


def target_tasks(config: Config) -> list[Task]:
    """A joint config's tasks as transfer and rank targets: each is fitted and scored alone, so rows without its
    label (shared-row tasks with missing labels) are dropped."""
    return [labelled_only(t) for t in dataset_tasks(config)]


def task_family(config: Config, **override: Any) -> EpisodeSource:
    """The task family of a meta-learning config (``override``: e.g. ``shots=5`` for a meta-test protocol)."""
    opts = {"seed": config.seed, **config.data.options, **override}
    return FAMILIES.create(config.data.dataset, where="data.options", **opts)


def make_weighting(config: Config, names: list[str]) -> Weighting:
    """The config's task weighting over the tasks ``names``."""
    w = config.training.weighting
    options = {**w.options, **({"gramian": w.gramian} if w.gramian else {})}
    return WEIGHTINGS.create(w.name, names, where="training.weighting.options", **options)


def stop_rule(config: Config) -> StopRule:
    t = config.training
    return StopRule(max_steps=t.max_steps, eval_every=t.eval_every, patience=t.patience, min_delta=t.min_delta)


def schedule_of(config: Config) -> LRSchedule:
    """``training.scheduler`` as the engine's :class:`~mtml.engine.LRSchedule`."""
    return LRSchedule(**config.training.scheduler.model_dump())


def updater_of(config: Config, optimizer: torch.optim.Optimizer, *, scaler: LossScaler | None = None) -> Updater:
    """The :class:`~mtml.engine.Updater` of ``training``: its schedule, gradient clipping and accumulation (and
    fp16's gradient ``scaler``)."""
    t = config.training
    return Updater(optimizer, schedule=schedule_of(config), max_steps=t.max_steps, grad_clip=t.grad_clip,
                   accumulate=t.accumulate, min_delta=t.min_delta, scaler=scaler)


def build(config: Config, **family_override: Any) -> Built:
    """Data, model and algorithm (meta-learning) or weighting (joint) of ``config``; the model's initial
    weights follow ``config.seed``. ``family_override`` changes the task family's options (meta-learning)."""
    if config.is_meta:
        return _build_meta(config, **family_override)
    if family_override:
        raise ConfigError(f"{sorted(family_override)} apply to meta-learning configs; this config is joint.")
    tasks = dataset_tasks(config)
    task_groups(tasks)  # tasks declared on shared rows must hold the same rows: checked before any run exists
    with seeded(config.seed):
        model = _joint_model(config, tasks)
    return Built(config, model, tasks=tasks, weighting=make_weighting(config, [t.name for t in tasks]))


def _joint_model(config: Config, tasks: list[Task]) -> MultiTaskModel:
    m = config.model
    if m.head == "hierarchical" and m.share_trunk:
        return _hierarchical(config, tasks)
    extra: dict[str, Any] = {}
    if m.architecture == "hps":
        extra = {"share_trunk": m.share_trunk, "backbone": m.backbone, "backbone_options": m.backbone_options}
    elif m.architecture == "mtan" and m.backbone != "mlp":  # (model.backbone's default mlp leaves MTAN's auto)
        extra = {"backbone": m.backbone, "backbone_options": m.backbone_options}
    fixed = {"trunk_hidden", "head_hidden", "stem_width", "activation", "dropout", *extra}
    clash = sorted(fixed & set(m.options))
    if clash:
        raise ConfigError(f"model.options.{clash[0]} repeats the model key model.{clash[0]}; set it there "
                          f"(--set model.{clash[0]}=...) and drop it from model.options.")
    return ARCHITECTURES.create(m.architecture, tasks, where="model.options", trunk_hidden=m.trunk_hidden,
                                head_hidden=m.head_hidden, stem_width=m.stem_width, activation=m.activation,
                                dropout=m.dropout, **extra, **m.options)


def _hierarchical(config: Config, tasks: list[Task]) -> MultiTaskModel:
    """The hierarchical-heads model of ``config`` (hard sharing, MLP trunk); ``share_trunk: false`` (the
    single-task baseline) builds independent heads instead."""
    m = config.model
    if m.architecture != "hps" or m.backbone != "mlp" or m.head_hidden or m.options:
        raise ConfigError("model.head: hierarchical takes the hps architecture with an MLP trunk and linear heads: "
                          "remove model.architecture/backbone/head_hidden/options or use head: independent.")
    unknown = set(m.head_options) - {"random"}
    if unknown:
        raise ConfigError(f"model.head_options: unknown keys {sorted(unknown)}; the hierarchical head takes random.")
    return build_hierarchical(tasks, trunk_hidden=m.trunk_hidden, stem_width=m.stem_width, activation=m.activation,
                              dropout=m.dropout, random=m.head_options.get("random", "all"))


def _build_meta(config: Config, **family_override: Any) -> Built:
    """Task family, a one-head model (trunk = meta-learner, head = task learner) and the algorithm.

    The trunk is ``model.backbone``: an MLP of widths ``model.trunk_hidden`` on flat features (the default) or
    a convolutional backbone (``conv4``, ``resnet12``) on images ``(C, H, W)``; the head is an MLP of widths
    ``model.head_hidden`` (a linear layer by default) on the trunk's feature vector.
    """
    family = task_family(config, **family_override)
    m = config.model
    if m.backbone == "mlp" and len(family.input_shape) != 1:
        raise ConfigError(f"data.dataset '{config.data.dataset}' has inputs of shape {family.input_shape}; the "
                          "MLP meta-learner takes flat features. For images set model.backbone: conv4 (or resnet12).")
    with seeded(config.seed):
        trunk: nn.Module
        if m.backbone == "mlp":
            trunk = mlp(family.input_shape[0], m.trunk_hidden, activation=m.activation)
            width = m.trunk_hidden[-1] if m.trunk_hidden else family.input_shape[0]
        else:
            trunk = build_backbone(m.backbone, family.input_shape, m.backbone_options)
            width = feature_dim(trunk)
        head: nn.Module = mlp(width, m.head_hidden, family.num_outputs, activation=m.activation)
        model = MultiTaskModel(trunk, {"task": head}, input_shapes={"task": family.input_shape})
        t = config.training
        options = _with_num_classes(config, family, overridden=bool(family_override))
        algorithm = ALGORITHMS.create(t.algorithm, model, where="training.algorithm_options", **options)
    check_episode_memory(family, model)
    return Built(config, model, family=family, algorithm=algorithm)


def _with_num_classes(config: Config, family: EpisodeSource, *, overridden: bool = False) -> dict[str, Any]:
    """``training.algorithm_options``, plus ``num_classes`` (the training sampler's: the range of its episodes'
    global class ids) for an algorithm that takes it (the Baseline family's pre-training). A family whose episodes
    carry no global class ids is refused here when the algorithm would pre-train on them. ``overridden``: ``family``
    was built with other options (``mtml eval --shots``), which can change which classes are eligible, so the count
    is read off the config's own family, the one the run trained on (its classifier's size is in the checkpoint)."""
    t = config.training
    options = dict(t.algorithm_options)
    params = inspect.signature(ALGORITHMS.get(t.algorithm)).parameters
    if "num_classes" not in params:
        return options
    dataset = config.data.dataset
    if "num_classes" in options:
        raise ConfigError(f"training.algorithm_options.num_classes: the number of base classes comes from the data "
                          f"(data.dataset '{dataset}'); drop the option.")
    pretrain = options.get("pretrain", params["pretrain"].default if "pretrain" in params else False)
    if overridden and pretrain is True and family.kind == "classification":
        family = task_family(config)
    num_classes = getattr(family.train, "num_classes", None)
    if pretrain is True and family.kind != "classification":
        raise ConfigError(f"training.algorithm '{t.algorithm}' trains classifiers, but data.dataset '{dataset}' is "
                          f"{family.kind}; use a classification dataset, or maml or ridge for regression.")
    if pretrain is True and not isinstance(num_classes, int):
        raise ConfigError(f"training.algorithm '{t.algorithm}' pre-trains a classifier over the base classes' global "
                          f"ids (pretrain: true, its default), but data.dataset '{dataset}' gives its training "
                          "episodes none (its sampler has no num_classes); set training.algorithm_options.pretrain: "
                          "false to meta-train through the unrolled support fit, or draw the episodes with a sampler "
                          "that records them (mtml.sampling.FewShotClassification).")
    options["num_classes"] = num_classes if isinstance(num_classes, int) else None
    return options


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def episode_bytes(family: EpisodeSource, model: nn.Module) -> int:
    """A lower estimate of one training episode's float32 memory: its rows (meta-batch × ways × (shots + query
    shots)) times the input size plus one value per output of every ``Linear`` and ``Conv2d`` layer (at the
    input's resolution) that each row passes through."""
    s = family.train
    rows = (int(getattr(s, "meta_batch", 1)) * max(1, int(getattr(s, "ways", 1)))
            * (int(getattr(s, "shots", 1)) + int(getattr(s, "query_shots", 0))))
    pixels = math.prod(family.input_shape[1:]) if len(family.input_shape) == 3 else 1
    per_row = math.prod(family.input_shape) + sum(
        m.out_features if isinstance(m, nn.Linear) else m.out_channels * pixels
        for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    return 4 * rows * per_row


def check_episode_memory(family: EpisodeSource, model: nn.Module, available: int | None = None) -> None:
    """:class:`ConfigError`, before anything is allocated, when one episode would not fit in the memory that is
    available (``/proc/meminfo``'s MemAvailable, or ``available``)."""
    need, have = episode_bytes(family, model), available if available is not None else _available_bytes()
    if have is not None and need > have:
        s = family.train
        shape = " × ".join(f"{k} {getattr(s, k)}" for k in ("meta_batch", "ways", "shots", "query_shots")
                           if hasattr(s, k))
        raise ConfigError(f"one episode ({shape}) needs at least {need / 2**30:,.1f} GiB of activations but "
                          f"{have / 2**30:,.1f} GiB of memory are available; lower the shots, ways or meta_batch "
                          "(data.options, or --shots of mtml eval).")


def default_run_dir(config: Config, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (with a counter if that exists already)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.name) or "run"
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def read_config(run: Run) -> Config:
    """The resolved config a run directory was trained with."""
    return Config.from_dict(run.config(), source=str(run.path / "config.yaml"))


def load_source(path: str | Path) -> tuple[Source, Config]:
    """The model of the (joint or meta-learning) run at ``path`` with its best checkpoint loaded (and, for a
    meta-learning run, its algorithm), in eval mode, and the run's config."""
    run = Run.open(path)
    config = read_config(run)
    ckpt = load_checkpoint(run.best_checkpoint)
    built = build(config)
    modules: dict[str, nn.Module] = {"model": built.model}
    if built.algorithm is not None:
        modules["algorithm"] = built.algorithm
    restore(ckpt, modules=modules)
    built.model.eval()
    return Source(built.model, built.algorithm, built.kinds(), str(run.path)), config
