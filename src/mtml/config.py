"""Experiment configuration: a YAML file validated by pydantic.

Every error names the key path (``training.lr``), what is wrong and what is allowed, for example::

    training.lrr: unknown key. Did you mean 'lr'? Allowed keys: optimizer, lr, weight_decay, ...
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtml._yaml import load_yaml
from mtml.datasets import DATASETS, FAMILIES
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS
from mtml.nn import ARCHITECTURES, BACKBONES, check_backbone_options
from mtml.registry import Registry, check_options
from mtml.weighting import WEIGHTINGS

__all__ = ["Config", "DataConfig", "LoggingConfig", "ModelConfig", "SchedulerConfig", "TrainingConfig",
           "WeightingConfig", "apply_overrides", "load_config", "parse_overrides"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class DataConfig(_Strict):
    dataset: str = Field("penguins", description="name in `mtml list` (datasets)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the dataset")


class ModelConfig(_Strict):
    architecture: str = Field("hps", description="hps, mmoe, cgc, ple, cross_stitch, mtan, dselect_k or minilm "
                                                 "(see `mtml list`)")
    options: dict[str, Any] = Field(default_factory=dict, description="architecture options, e.g. num_experts")
    trunk_hidden: list[int] = Field(default_factory=lambda: [64, 64], description="shared MLP widths")
    head_hidden: list[int] = Field(default_factory=list, description="hidden widths of each task head")
    head: Literal["independent", "hierarchical"] = Field(
        "independent", description="independent: a head per task; hierarchical: linear heads = shared mean + task "
        "deviation with learned variance (a linear mixed model on the trunk's features; regression tasks)")
    head_options: dict[str, Any] = Field(default_factory=dict, description="hierarchical head options: random "
                                         "(all, or feature indices and 'intercept' whose coefficients vary by task)")
    stem_width: int | None = Field(None, gt=0, description="per-task input stem width (auto when widths differ)")
    activation: Literal["relu", "gelu", "tanh", "silu", "linear"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    share_trunk: bool = Field(True, description="false trains one trunk per task: the single-task baseline")
    backbone: str = Field("mlp", description="feature extractor: mlp (flat inputs, widths trunk_hidden), conv4 or "
                          "resnet12 (images [C, H, W]); see `mtml list`")
    backbone_options: dict[str, Any] = Field(default_factory=dict, description="options of a conv backbone: width, "
                                             "norm (group, layer or none), groups; conv4 also blocks")

    @field_validator("trunk_hidden", "head_hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h <= 0 for h in v):
            raise ValueError(f"layer widths must be > 0, got {v}")
        return v


class WeightingConfig(_Strict):
    name: str = "equal"
    options: dict[str, Any] = Field(default_factory=dict)
    gramian: Literal["auto", "loop", "batched", "layerwise", "rows", "representation"] | None = Field(
        None, description="how gradient-based weightings get per-task gradients (default: the method's own)")


class SchedulerConfig(_Strict):
    """``training.scheduler``: a name (``scheduler: cosine``) or a mapping with the schedule's options."""

    name: Literal["constant", "step", "cosine", "plateau"] = Field(
        "constant", description="constant, step (× gamma every N updates), cosine (down to min_lr at max_steps) or "
        "plateau (× factor after patience validations without improvement)")
    warmup: int = Field(0, ge=0, description="updates ramping linearly up to training.lr first (not for plateau)")
    every: int | None = Field(None, gt=0, description="step: updates between decays (required)")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: the rate's multiplier at each decay")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the final rate; plateau: the lowest rate")
    factor: float = Field(0.1, gt=0.0, lt=1.0, description="plateau: the rate's multiplier at each reduction")
    patience: int = Field(5, ge=1, description="plateau: the rate is cut at the patience-th validation in a row "
                          "without improvement")

    @model_validator(mode="after")
    def _options_of_name(self) -> SchedulerConfig:
        applies = {"constant": {"warmup"}, "step": {"warmup", "every", "gamma"}, "cosine": {"warmup", "min_lr"},
                   "plateau": {"factor", "patience", "min_lr"}}[self.name]
        # (a saved config.yaml holds every key at its default: only a changed one is a mistake)
        fields = type(self).model_fields
        extra = sorted(k for k in fields if k != "name" and k not in applies and getattr(self, k) != fields[k].default)
        if extra:
            raise ValueError(f"the {self.name} schedule takes {', '.join(sorted(applies))}, not "
                             f"{', '.join(extra)}; remove {'them' if len(extra) > 1 else 'it'}")
        if self.name == "step" and self.every is None:
            raise ValueError("the step schedule needs every: N (updates between decays)")
        return self


class TrainingConfig(_Strict):
    algorithm: str = Field("joint", description="joint (multi-task) or a meta-learning algorithm from `mtml list`")
    algorithm_options: dict[str, Any] = Field(default_factory=dict, description="options of a meta algorithm")
    meta_val_tasks: int = Field(200, gt=0, description="held-out tasks per meta-validation")
    meta_test_tasks: int = Field(600, gt=0, description="held-out tasks of the final meta-test")
    weighting: WeightingConfig = Field(default_factory=lambda: WeightingConfig())
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(64, gt=0)
    max_steps: int = Field(1000, gt=0)
    eval_every: int = Field(50, gt=0)
    patience: int = Field(10, ge=0, description="validations without improvement before stopping (0: never)")
    min_delta: float = Field(0.0, ge=0.0)
    stop_per_task: bool = Field(False, description="early-stop every task on its own validation loss and restore "
                                "each from its own best step (tasks sharing no trained parameters: "
                                "model.share_trunk: false)")
    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints (default: eval_every)")
    keep_checkpoints: int = Field(3, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or bf16 / fp16 autocast for "
                                                       "steps and evaluations (fp16 with a gradient scaler)")
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig(),
                                       description="learning-rate schedule: constant, step, cosine or plateau")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient's global L2 norm to this (none: "
                                    "no clipping)")
    accumulate: int = Field(1, gt=0, description="micro-batches (of batch_size, or meta_batch tasks) averaged into "
                            "each update; max_steps counts updates")

    @field_validator("weighting", mode="before")
    @classmethod
    def _weighting_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _per_task_is_joint(self) -> TrainingConfig:
        if self.stop_per_task and self.algorithm != "joint":
            raise ValueError("stop_per_task applies to joint training only; remove it for a meta-learning "
                             "algorithm")
        s = self.scheduler
        if s.warmup and s.warmup >= self.max_steps:
            raise ValueError(f"scheduler.warmup ({s.warmup}) must be below max_steps ({self.max_steps}), or the rate "
                             "never reaches training.lr")
        if s.name == "plateau" and self.patience and s.patience >= self.patience:
            raise ValueError(f"scheduler.patience ({s.patience}) must be below the early-stopping patience "
                             f"({self.patience}), or the run stops before the rate is ever lowered")
        return self


class LoggingConfig(_Strict):
    """``logging``: where a run's records go besides metrics.jsonl (optional extras; see docs/training.md)."""

    tensorboard: bool = Field(False, description="TensorBoard event files in RUN/tensorboard/ (mtml[tensorboard])")
    mlflow: bool = Field(False, description="an MLflow run per run directory (mtml[mlflow])")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                   "sqlite:///<folder of the run>/mlflow.db)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the config's name)")


class Config(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**31, description="seed of every random draw of the run (0 to 2**31 - 1)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig())
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        """Validate ``data``; problems raise one :class:`ConfigError` listing every bad key path."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}.")
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            lines = [_describe(err) for err in exc.errors()]
            raise ConfigError(f"{source} is not valid:\n  " + "\n  ".join(lines)) from None
        cfg.check_names()
        return cfg

    @property
    def is_meta(self) -> bool:
        """True when ``training.algorithm`` is a meta-learning algorithm (not joint training)."""
        return self.training.algorithm != "joint"

    def check_names(self) -> None:
        """Check registry names (dataset, algorithm, weighting) and their options against what is registered."""
        t = self.training
        if t.algorithm != "joint" and t.algorithm not in ALGORITHMS:
            near = difflib.get_close_matches(t.algorithm, ["joint", *ALGORITHMS.names()], n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"training.algorithm: unknown algorithm '{t.algorithm}'.{hint} Valid: joint, "
                              f"{', '.join(ALGORITHMS.names())}.")
        data_registry: Registry[Any] = FAMILIES if self.is_meta else DATASETS
        other: Registry[Any] = DATASETS if self.is_meta else FAMILIES
        if self.data.dataset in other and self.data.dataset not in data_registry:
            use = "a meta-learning algorithm" if not self.is_meta else "training.algorithm: joint"
            raise ConfigError(f"data.dataset: '{self.data.dataset}' is a {other.kind}, which needs {use}; with "
                              f"training.algorithm '{t.algorithm}' use one of {', '.join(data_registry.names())}.")
        checks: list[tuple[str, Registry[Any], str, dict[str, Any]]] = [
            ("data.dataset", data_registry, self.data.dataset, self.data.options),
            ("training.weighting.name", WEIGHTINGS, t.weighting.name, t.weighting.options),
            ("model.architecture", ARCHITECTURES, self.model.architecture, self.model.options),
        ]
        if t.weighting.gramian is not None and getattr(WEIGHTINGS.get(t.weighting.name), "needs_jacobian", False):
            raise ConfigError(f"training.weighting.gramian: weighting '{t.weighting.name}' combines the per-task "
                              "gradients themselves and uses no Gramian; remove the key (its option "
                              "training.weighting.options.jacobian picks auto, loop or batched).")
        if t.weighting.gramian is not None and not getattr(WEIGHTINGS.get(t.weighting.name), "needs_gramian", False):
            raise ConfigError(f"training.weighting.gramian: weighting '{t.weighting.name}' uses no per-task "
                              "gradients; remove the key or choose a gradient method (mgda, pcgrad, cagrad, …).")
        if self.model.architecture != "hps" and not self.model.share_trunk:
            raise ConfigError("model.share_trunk: false is hard sharing's single-task baseline; use it with "
                              "model.architecture: hps.")
        self._check_backbone()
        if self.is_meta:
            checks.append(("training.algorithm", ALGORITHMS, t.algorithm, t.algorithm_options))
        for path, registry, name, options in checks:
            try:
                factory = registry.get(name)
            except ConfigError as exc:
                raise type(exc)(f"{path}: {exc}") from None
            where = path.rsplit(".", 1)[0] + ".options"
            if path == "training.algorithm":
                where = "training.algorithm_options"
            check_options(factory, options, where=where)

    def _check_backbone(self) -> None:
        m = self.model
        try:
            BACKBONES.get(m.backbone)
        except ConfigError as exc:
            raise type(exc)(f"model.backbone: {exc}") from None
        check_backbone_options(m.backbone, m.backbone_options, where="model.backbone_options")
        if m.backbone != "mlp" and not self.is_meta and m.architecture not in ("hps", "mtan"):
            raise ConfigError(f"model.backbone: {m.backbone} is a trunk for hard parameter sharing or MTAN; use it "
                              f"with model.architecture: hps or mtan (got '{m.architecture}'), or backbone: mlp.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        near = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        return f"{path}: unknown key.{hint} Allowed keys: {', '.join(allowed)}."
    given = err.get("input")
    shown = "" if isinstance(given, dict) or "got" in err["msg"] else f" (got {given!r})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{path}: {msg}{shown}."


def _allowed_keys(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """``["training.lr=0.01", "model.trunk_hidden=[32,32]"]`` → ``[(["training", "lr"], 0.01), ...]``.

    Values are parsed as YAML (numbers, lists, mappings, ``null``); a value that is not valid YAML stays a string.
    """
    out: list[tuple[list[str], Any]] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, for example --set training.lr=0.01.")
        try:
            value = load_yaml(raw, f"--set {pair!r}")
        except ConfigError:
            value = raw
        out.append((parts, value))
    return out


def apply_overrides(data: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``KEY=VALUE`` of ``pairs`` set; the value replaces what was there."""
    result = copy.deepcopy(data)
    for parts, value in parse_overrides(pairs):
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' holds a value, not a "
                                  "section of keys.")
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``--set`` overrides and validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file; give the path of a .yaml file (to continue "
                          "a run directory use `mtml train --resume`).")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Example configs are in examples/configs/ "
                          "(or run `mtml demo`).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}.") from None
    data = load_yaml(text, str(path))
    if data is None and not overrides:  # an empty (or all-comment) file: a truncated save, not "all defaults"
        raise ConfigError(f"{path} is empty (no keys); a config names at least its data (data.dataset). Start "
                          "from one in examples/configs/ (mtml list shows the datasets).")
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}.")
    return Config.from_dict(apply_overrides(data, overrides or []), source=str(path))
