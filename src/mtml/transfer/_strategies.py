"""Transfer strategies: from a trained source model to a predictor for a new target task.

Every strategy turns a :class:`Source` (a trained :class:`~mtml.nn.MultiTaskModel`, plus the meta-algorithm
for meta-learned sources) and a target :class:`~mtml.tasks.Task` — whose ``train`` split holds the few target
examples — into a predictor ``x: [n, *input] → [n, outputs]`` scored with the task's own metrics:

- ``scratch`` — the baseline: the source's architecture re-initialised, trained on the target examples only;
- ``linear_probe`` — closed-form ridge regression on frozen source features (one-hot ±1 targets for classes),
  λ chosen by exact leave-one-out error over a grid;
- ``finetune_head`` / ``finetune_last`` / ``finetune_all`` — the head trained alone on frozen features, with
  the last ``k`` trunk blocks, or with the whole trunk (the head starts from the source's heads where they fit
  the target, see :func:`~mtml.transfer._parts.head_prior`, else fresh);
- ``l2sp`` — fine-tuning everything with the L2-SP penalty towards the source weights (Li, Grandvalet &
  Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018);
- ``meta_adapt`` — the source meta-algorithm's own test-time adaptation on the target examples.

Strategies never modify the source; gradient-based ones train a copy with Adam for a fixed number of steps
(there is no validation split to stop on when only a few target examples are labelled).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtml._checks import check_int, check_positive
from mtml.errors import ConfigError, DivergedError
from mtml.meta import MetaAlgorithm
from mtml.nn import HierarchicalHeads, HierarchicalModel
from mtml.registry import Registry
from mtml.tasks import Split, Task, TaskKind
from mtml.transfer._parts import (
    Source,
    check_source,
    features,
    head_prior,
    linear_prior,
    loo_ridge,
    new_head,
    reset,
    ridge_fit,
    ridge_targets,
    seed_from,
    trunk_blocks,
)

__all__ = [
    "L2SP",
    "STRATEGIES",
    "FineTune",
    "HierarchicalBLUP",
    "LinearProbe",
    "MetaAdapt",
    "Scratch",
    "Source",
    "Strategy",
    "loo_ridge",
    "new_head",
    "ridge_fit",
    "trunk_blocks",
]


class Strategy(ABC):
    """Turns a source and a target task's training examples into a predictor (a module in eval mode)."""

    needs_algorithm: bool = False
    needs_hierarchy: bool = False

    @abstractmethod
    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        """A predictor ``x: [n, *task.input_shape] → [n, task.num_outputs]`` fitted on ``task.train``."""


# -- shared pieces ---------------------------------------------------------------------------------------------
class LinearProbe(Strategy):
    """Closed-form ridge regression on the frozen source trunk's features.

    For a regression target whose source heads are linear, the ridge shrinks towards the source's mean head
    (:func:`head_prior`) rather than towards 0: ``min ‖Y − F W − b‖² + l2·‖W − W₀‖²``.

    Args:
        l2: a fixed ridge penalty; ``None`` (default) picks it from ``grid`` by exact leave-one-out error.
        grid: candidate penalties for the leave-one-out choice.
    """

    def __init__(self, *, l2: float | None = None, grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0,
                                                                            1000.0)) -> None:
        self.l2 = None if l2 is None else check_positive("l2", l2, "Use a ridge penalty such as 1.0, or omit it.")
        if isinstance(grid, str) or not list(grid):
            raise ConfigError(f"`grid` must be a non-empty list of penalties > 0. Got {grid!r}.")
        self.grid = [check_positive("grid", g, "Use penalties > 0 such as [0.01, 1, 100].") for g in grid]

    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        check_source(source, task)
        trunk = copy.deepcopy(source.model.trunk)
        feats = features(trunk, task.train.x)
        y = ridge_targets(task, task.train.y)
        w0 = linear_prior(source, task, feats)
        y = y - feats.double() @ w0
        l2 = self.l2 if self.l2 is not None else loo_ridge(feats, y, self.grid)[0]
        w, b = ridge_fit(feats, y, l2)
        w = w + w0
        head = nn.Linear(feats.shape[1], w.shape[1]).to(feats.device, feats.dtype)
        with torch.no_grad():
            head.weight.copy_(w.T)
            head.bias.copy_(b)
        return nn.Sequential(trunk, head).eval()


class FineTune(Strategy):
    """A head on the source trunk (from :func:`head_prior`, else fresh), trained with Adam on the target examples.

    Args:
        part: what trains besides the head: ``"head"`` (nothing: the trunk is frozen), ``"last"`` (the last
            ``k`` trunk blocks, see :func:`trunk_blocks`) or ``"all"``.
        k: trunk blocks to train with ``part="last"``.
        steps, lr, batch_size, weight_decay: the Adam loop (full batch when the target has ≤ ``batch_size``
            examples).
    """

    def __init__(self, *, part: str = "all", k: int = 1, steps: int = 100, lr: float = 0.01,
                 batch_size: int = 64, weight_decay: float = 0.0) -> None:
        if part not in ("head", "last", "all"):
            raise ConfigError(f"`part` must be 'head', 'last' or 'all'. Got {part!r}.")
        self.part = part
        self.k = check_int("k", k, 1, "Train at least the last block (k=1).")
        self.steps = check_int("steps", steps, 1, "Use at least one training step, e.g. 100.")
        self.lr = check_positive("lr", lr, "Use a step size such as 0.01.")
        self.batch_size = check_int("batch_size", batch_size, 1, "Use a batch size such as 64.")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or not weight_decay >= 0:
            raise ConfigError(f"`weight_decay` must be a number >= 0. Got {weight_decay!r}.")
        self.weight_decay = float(weight_decay)

    def _trunk(self, source: Source, seed: int) -> nn.Module:
        return copy.deepcopy(source.model.trunk)

    def _trainable(self, trunk: nn.Module) -> list[nn.Module]:
        """The trunk modules that train (the rest are frozen and kept in eval mode)."""
        if self.part == "all":
            return [trunk]
        if self.part == "head":
            return []
        blocks = trunk_blocks(trunk)
        if self.k > len(blocks):
            raise ConfigError(f"`k={self.k}` but the source trunk has only {len(blocks)} blocks; use k <= "
                              f"{len(blocks)} (or finetune_all).")
        return blocks[len(blocks) - self.k :]

    def _head(self, source: Source, task: Task, seed: int) -> tuple[nn.Module, bool]:
        """The starting head, and whether it comes from the source (:func:`head_prior`)."""
        prior = head_prior(source, task)
        return (prior, True) if prior is not None else (new_head(source.model, task.num_outputs, seed), False)

    def penalty(self, trunk: nn.Module, head: nn.Module, source: Source, head0: list[Tensor]) -> Tensor | None:
        """An extra term added to the training loss (none here; L2-SP overrides it). ``head0``: the head's
        starting weights when they come from the source, else zeros."""
        return None

    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        check_source(source, task)
        trunk = self._trunk(source, seed_from(generator))
        head, from_source = self._head(source, task, seed_from(generator))
        head0 = [p.detach().clone() if from_source else torch.zeros_like(p) for p in head.parameters()]
        train = self._trainable(trunk)
        trunk.requires_grad_(False).eval()
        for module in train:
            module.requires_grad_(True).train()
        if not train:  # frozen trunk: its features once, then the head alone
            feats = features(trunk, task.train.x)
            _train(head, list(head.parameters()), task, Split(feats, task.train.y), self, generator, None)
        else:
            model = nn.Sequential(trunk, head)
            params = [p for p in model.parameters() if p.requires_grad]
            _train(model, params, task, task.train, self, generator, lambda: self.penalty(trunk, head, source, head0))
        return nn.Sequential(trunk, head).requires_grad_(False).eval()


def _train(module: nn.Module, params: list[nn.Parameter], task: Task, data: Split, opts: FineTune,
           generator: torch.Generator, penalty: Callable[[], Tensor | None] | None) -> None:
    """``opts.steps`` Adam steps on ``task``'s loss of ``module`` over ``data`` (+ ``penalty()``)."""
    opt = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    n = len(data)
    for step in range(opts.steps):
        x, y = data.x, data.y
        if n > opts.batch_size:
            idx = torch.randperm(n, generator=generator)[: opts.batch_size].to(x.device)
            x, y = x[idx], y[idx]
        loss = task.compute_loss(module(x), y)
        extra = penalty() if penalty is not None else None
        total = loss + extra if extra is not None else loss
        if not torch.isfinite(total):
            raise DivergedError(f"transfer to task '{task.name}' diverged at step {step} (loss {float(total)}); "
                                f"lower `lr` (now {opts.lr}).")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()


class Scratch(FineTune):
    """The baseline: the source architecture re-initialised (source weights unused), trained on the target."""

    def __init__(self, *, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                 weight_decay: float = 0.0) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)

    def _trunk(self, source: Source, seed: int) -> nn.Module:
        trunk = copy.deepcopy(source.model.trunk)
        reset(trunk, seed)
        return trunk

    def _head(self, source: Source, task: Task, seed: int) -> tuple[nn.Module, bool]:
        return new_head(source.model, task.num_outputs, seed), False


class L2SP(FineTune):
    """Fine-tune everything with ``α/2·‖θ_trunk − θ_source‖² + β/2·‖θ_head − θ_head⁰‖²`` added to the loss.

    Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
    ICML 2018: the shared weights are pulled towards the source (the starting point), the new head towards 0.
    Here a head that starts from the source's heads (:func:`head_prior`) is pulled towards that start instead.

    Args:
        alpha: strength of the pull to the source weights (paper: 0.1).
        beta: weight decay of the new head (paper: 0.01).
    """

    def __init__(self, *, alpha: float = 0.1, beta: float = 0.01, steps: int = 100, lr: float = 0.01,
                 batch_size: int = 64) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size)
        self.alpha = check_positive("alpha", alpha, "Use a pull to the source such as 0.1.")
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < float("inf"):
            raise ConfigError(f"`beta` must be a finite number >= 0. Got {beta!r}. Use 0.01, or 0 for none.")
        self.beta = float(beta)

    def penalty(self, trunk: nn.Module, head: nn.Module, source: Source, head0: list[Tensor]) -> Tensor:
        anchor = source.model.trunk.parameters()  # the source is never trained, so its weights are the anchor
        pull = sum((p - a.detach()).square().sum() for p, a in zip(trunk.parameters(), anchor, strict=True))
        decay = sum((p - a).square().sum() for p, a in zip(head.parameters(), head0, strict=True))
        return 0.5 * self.alpha * pull + 0.5 * self.beta * decay  # type: ignore[return-value]


class _Adapted(nn.Module):
    """A meta-algorithm's adapted state for one task, as a predictor ``[n, *input] → [n, outputs]``."""

    def __init__(self, algorithm: MetaAlgorithm, model: nn.Module, adapted: Any) -> None:
        super().__init__()
        self.algorithm, self.model, self.adapted = algorithm, model, adapted

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.algorithm.predict(self.model, self.adapted, x.unsqueeze(0))[0]


class MetaAdapt(Strategy):
    """The source meta-algorithm's test-time adaptation (``adapt(..., train=False)``) on the target examples.

    Needs a meta-learned source (``Source.algorithm``) and a regression or multiclass target; MAML-family
    sources also need as many classes as their head has outputs.
    """

    needs_algorithm = True

    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        alg = source.algorithm
        if alg is None:
            raise ConfigError("meta_adapt needs a meta-learned source (a run trained with a meta-learning "
                              "algorithm); this source was trained jointly. Use the fine-tuning strategies.")
        check_source(source, task)
        if task.kind not in (TaskKind.REGRESSION, TaskKind.MULTICLASS):
            raise ConfigError(f"meta_adapt handles regression and multiclass targets; task '{task.name}' is "
                              f"{task.kind.value}.")
        model = source.model.eval()
        if alg.uses_inner_steps:
            width = int(model(task.train.x[:1], model.task_names[0]).shape[-1])
            if width != task.num_outputs:
                raise ConfigError(f"meta_adapt: the source head has {width} outputs but target task "
                                  f"'{task.name}' has {task.num_outputs}; meta-train the source with "
                                  f"{task.num_outputs} ways (or use the fine-tuning strategies).")
        ways = task.num_outputs if task.kind is TaskKind.MULTICLASS else 0
        support = Split(task.train.x.unsqueeze(0), task.train.y.unsqueeze(0))
        adapted = alg.adapt(model, support, ways=ways, train=False)
        return _Adapted(alg, model, adapted).eval()


class _GroupPredictor(nn.Module):
    """Trunk features → the new task's hierarchical prediction ``zβ + z_R u``."""

    def __init__(self, trunk: nn.Module, heads: HierarchicalHeads) -> None:
        super().__init__()
        self.trunk, self.heads = trunk, heads

    def forward(self, x: Tensor) -> Tensor:
        return self.heads.predict(self.trunk(x), 0)


class HierarchicalBLUP(Strategy):
    """A hierarchical-heads source's prediction for a new group: the shared mean ``β`` plus the new task's BLUP
    from its few rows, with the source's learned variance components (the mixed model's prediction for a group it
    has not seen; no training). Needs a source trained with ``model.head: hierarchical``.
    """

    needs_hierarchy = True

    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        model = source.model
        if not isinstance(model, HierarchicalModel):
            raise ConfigError("strategy 'blup' needs a source trained with model.head: hierarchical; this source has "
                              "independent heads. Drop blup from the strategies.")
        if task.kind is not TaskKind.REGRESSION:
            raise ConfigError(f"strategy 'blup' predicts regression targets; task '{task.name}' is {task.kind.value}.")
        src = model.hierarchy
        if task.num_outputs != src.out:
            raise ConfigError(f"strategy 'blup': the source heads have {src.out} outputs, target task '{task.name}' "
                              f"has {task.num_outputs}.")
        check_source(source, task)
        trunk = copy.deepcopy(model.trunk).eval()
        heads = HierarchicalHeads(src.d, 1, src.out, random=src.random.tolist()).to(src.mean.device, src.mean.dtype)
        with torch.no_grad():
            heads.load_state_dict({k: v for k, v in src.state_dict().items() if k != "deviation"}, strict=False)
            h = trunk(task.train.x.to(src.mean.dtype))
            heads.refit(h, task.train.y.to(h.dtype), torch.zeros(len(h), dtype=torch.long, device=h.device))
        return _GroupPredictor(trunk, heads).eval()


def _finetune_head(*, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                   weight_decay: float = 0.0) -> FineTune:
    return FineTune(part="head", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)


def _finetune_last(*, k: int = 1, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                   weight_decay: float = 0.0) -> FineTune:
    return FineTune(part="last", k=k, steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)


def _finetune_all(*, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                  weight_decay: float = 0.0) -> FineTune:
    return FineTune(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)


STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.register("scratch", Scratch, help="baseline: the source architecture re-initialised, target data only")
STRATEGIES.register("linear_probe", LinearProbe, help="closed-form ridge on frozen source features (λ by LOO)")
STRATEGIES.register("finetune_head", _finetune_head, help="the head alone trained, on the frozen source trunk")
STRATEGIES.register("finetune_last", _finetune_last, help="the head + the last k trunk blocks trained")
STRATEGIES.register("finetune_all", _finetune_all, help="the head + the whole source trunk trained")
STRATEGIES.register("l2sp", L2SP, help="fine-tune all with α‖θ−θ_source‖² + β‖θ_head−θ_head⁰‖² (Li et al. 2018)")
STRATEGIES.register("meta_adapt", MetaAdapt, help="the source meta-algorithm's own test-time adaptation")
STRATEGIES.register("blup", HierarchicalBLUP, help="a hierarchical-heads source's mixed-model prediction for a new "
                    "group: shared mean + the group's BLUP from its rows (no training)")
