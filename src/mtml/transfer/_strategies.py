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
- ``meta_adapt`` — the source meta-algorithm's own test-time adaptation on the target examples;
- ``delta``, ``bss``, ``co_tuning``, ``stochnorm``, ``lwf`` — regularised fine-tuning: everything trains, with a
  term that keeps the model close to what the source knew or that shrinks what would not transfer (DELTA, Batch
  Spectral Shrinkage, Co-Tuning, StochNorm, Learning without Forgetting; their penalties and modules are in
  :mod:`mtml.transfer._regularised`).

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
from torch.nn.modules.batchnorm import _BatchNorm

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
from mtml.transfer._regularised import (
    StochNormLayer,
    _batchnorms,
    _class_ids,
    _frozen,
    _head_pull,
    _log_probs,
    _nonneg,
    _OldHeads,
    _switched_off,
    _tapped,
    bss_penalty,
    category_relationship,
    channel_attention,
    distillation_loss,
    feature_map_distance,
)

__all__ = [
    "BSS",
    "DELTA",
    "L2SP",
    "STRATEGIES",
    "CoTuning",
    "FineTune",
    "HierarchicalBLUP",
    "LinearProbe",
    "LwF",
    "MetaAdapt",
    "Scratch",
    "Source",
    "StochNorm",
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

    def refusal(self, source: Source, task: Task) -> str | None:
        """Why this strategy cannot serve ``source`` → ``task`` (a one-line message naming the fix), else ``None``.

        :meth:`fit` raises it as a :class:`~mtml.errors.ConfigError`; callers may ask first, before any work.
        """
        return None


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

    def objective(self, trunk: nn.Module, head: nn.Module, source: Source, task: Task, head0: list[Tensor],
                  generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list[nn.Parameter]]:
        """The loss of a batch ``(x, y)`` when the trunk trains, and the parameters it trains besides the trunk's
        and the head's: here the task's loss of ``head(trunk(x))`` plus :meth:`penalty`, and none. Regularised
        fine-tuning strategies (:mod:`mtml.transfer._regularised`) override it."""

        def loss(x: Tensor, y: Tensor) -> Tensor:
            value = task.compute_loss(head(trunk(x)), y)
            extra = self.penalty(trunk, head, source, head0)
            return value + extra if extra is not None else value

        return loss, []

    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        check_source(source, task)
        refusal = self.refusal(source, task)
        if refusal is not None:
            raise ConfigError(refusal)
        trunk = self._trunk(source, seed_from(generator))
        head, from_source = self._head(source, task, seed_from(generator))
        head0 = [p.detach().clone() if from_source else torch.zeros_like(p) for p in head.parameters()]
        train = self._trainable(trunk)
        trunk.requires_grad_(False).eval()
        for module in train:
            module.requires_grad_(True).train()
        if not train:  # frozen trunk: its features once, then the head alone
            feats = features(trunk, task.train.x)
            _train(list(head.parameters()), task, Split(feats, task.train.y), self, generator,
                   lambda x, y: task.compute_loss(head(x), y))
        else:
            loss, extra = self.objective(trunk, head, source, task, head0, generator)
            params = [p for p in nn.Sequential(trunk, head).parameters() if p.requires_grad]
            _train(params + extra, task, task.train, self, generator, loss)
        return nn.Sequential(trunk, head).requires_grad_(False).eval()


def _train(params: list[nn.Parameter], task: Task, data: Split, opts: FineTune, generator: torch.Generator,
           objective: Callable[[Tensor, Tensor], Tensor]) -> None:
    """``opts.steps`` Adam steps on ``objective(x, y)`` over batches of ``data`` (full batch when it fits)."""
    opt = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    n = len(data)
    for step in range(opts.steps):
        x, y = data.x, data.y
        if n > opts.batch_size:
            idx = torch.randperm(n, generator=generator)[: opts.batch_size].to(x.device)
            x, y = x[idx], y[idx]
        total = objective(x, y)
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


# -- regularised fine-tuning (their penalties and modules: mtml.transfer._regularised) -----------------------------
class DELTA(FineTune):
    """Fine-tune everything with ``α/2·Σ_l Σ_j W_lj ‖FM_lj(x) − FM*_lj(x)‖² + β/2·‖θ_head − θ_head⁰‖²``.

    Li, Xiong, Wang, Huan, Xu & Chen, "DELTA: DEep Learning Transfer using Feature Map with Attention for
    Convolutional Networks", ICLR 2019. ``FM_l`` are the outputs of the trunk's blocks (:func:`trunk_blocks`:
    an MLP's ``Linear`` layers, Conv-4's conv blocks) on the batch, ``FM*_l`` the frozen source trunk's on the
    same inputs (mean over spatial positions, mean over the batch). The supervised attention ``W``: a copy of the
    starting head is trained on the frozen source features (as ``finetune_head``, ``steps`` Adam steps), then
    each channel of each block is switched off in turn and the rise of the target loss on the training examples
    gives :func:`channel_attention`. ``attention=False`` is the paper's unweighted variant (``W = 1``).

    Args:
        alpha: weight of the feature-map distance (tllib's default, 0.01).
        beta: weight of the head's pull to its start (0.01).
        attention: weight channels by the supervised attention (``True``) or not.
        temperature: the attention softmax's temperature (5, as in the reference implementation).
    """

    def __init__(self, *, alpha: float = 0.01, beta: float = 0.01, attention: bool = True, temperature: float = 5.0,
                 steps: int = 100, lr: float = 0.01, batch_size: int = 64) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size)
        self.alpha = check_positive("alpha", alpha, "Use a feature-map weight such as 0.01.")
        self.beta = _nonneg("beta", beta, "Use 0.01, or 0 for no pull on the head.")
        if not isinstance(attention, bool):
            raise ConfigError(f"`attention` must be true or false. Got {attention!r}.")
        self.attention = attention
        self.temperature = check_positive("temperature", temperature, "Use a softmax temperature such as 5.")
        self.weights: list[Tensor] | None = None  # the last fit's channel attention, per block (for inspection)

    def refusal(self, source: Source, task: Task) -> str | None:
        if not trunk_blocks(source.model.trunk):
            return (f"strategy 'delta' regularises the trunk's feature maps, but {source.label}'s trunk has no "
                    "layers with parameters; use linear_probe or finetune_head.")
        return None

    def attention_weights(self, source: Source, task: Task, head: nn.Module,
                          generator: torch.Generator) -> list[Tensor]:
        """Per trunk block ``[c_l]``: :func:`channel_attention` of the loss rise when each channel is off."""
        trunk = _frozen(source.model.trunk)
        probe = copy.deepcopy(head).requires_grad_(True).train()
        feats = features(trunk, task.train.x)
        _train(list(probe.parameters()), task, Split(feats, task.train.y), self, generator,
               lambda f, y: task.compute_loss(probe(f), y))
        probe.requires_grad_(False).eval()
        x, y = task.train.x, task.train.y
        weights = []
        with torch.no_grad():
            base = task.compute_loss(probe(trunk(x)), y)
            for block in trunk_blocks(trunk):
                with _tapped([block]) as out:
                    trunk(x[:1])
                drops = []
                for j in range(out[0].shape[1]):
                    with _switched_off(block, j):
                        drops.append(task.compute_loss(probe(trunk(x)), y) - base)
                weights.append(channel_attention(torch.stack(drops), self.temperature))
        return weights

    def objective(self, trunk: nn.Module, head: nn.Module, source: Source, task: Task, head0: list[Tensor],
                  generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list[nn.Parameter]]:
        anchor = _frozen(source.model.trunk)
        blocks, anchor_blocks = trunk_blocks(trunk), trunk_blocks(anchor)
        weights = self.attention_weights(source, task, head, generator) if self.attention else None
        self.weights = weights  # for inspection; the loss below keeps its own

        def loss(x: Tensor, y: Tensor) -> Tensor:
            with _tapped(blocks) as maps:
                value = task.compute_loss(head(trunk(x)), y)
            with torch.no_grad(), _tapped(anchor_blocks) as anchors:
                anchor(x)
            distance = feature_map_distance(maps, anchors, weights)
            return value + 0.5 * self.alpha * distance + 0.5 * self.beta * _head_pull(head, head0)

        return loss, []


class BSS(FineTune):
    """Fine-tune everything with ``η·Σ_{i≤k} σ²_{−i}(F)`` added to the loss, ``F`` the batch's trunk features.

    Chen, Wang, Fu, Long & Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for
    Safe Transfer Learning", NeurIPS 2019 (:func:`bss_penalty`). With few examples the batch is the whole
    training set, so ``F`` has ``min(n, d)`` singular values; the largest is never penalised.

    Args:
        k: how many of the smallest singular values to shrink (paper: 1).
        eta: the penalty's weight (paper: 0.001).
        steps, lr, batch_size, weight_decay: as ``finetune_all``.
    """

    def __init__(self, *, k: int = 1, eta: float = 0.001, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                 weight_decay: float = 0.0) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
        self.k_smallest = check_int("k", k, 1, "Shrink at least the smallest singular value (k=1).")
        self.eta = check_positive("eta", eta, "Use a penalty weight such as 0.001.")

    def objective(self, trunk: nn.Module, head: nn.Module, source: Source, task: Task, head0: list[Tensor],
                  generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list[nn.Parameter]]:
        def loss(x: Tensor, y: Tensor) -> Tensor:
            feats = trunk(x)
            return task.compute_loss(head(feats), y) + self.eta * bss_penalty(feats, self.k_smallest)

        return loss, []


class CoTuning(FineTune):
    """Fine-tune everything, training the source head on the translated soft labels alongside the new head:
    ``L(head(f), y) + λ·CE(p(y_s | y), source_head(f))``.

    You, Kou, Jiang & Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020. Before training, the frozen source
    (trunk + its classification head) predicts the target's training examples; :func:`category_relationship`
    averages those predictions per target class into ``p(y_s | y_t)``. During training a copy of the source
    head, on the fine-tuned trunk, is fitted to ``p(y_s | y)`` of each example's label by cross-entropy. The
    predictor is the new head only. Needs a binary or multiclass target and a source with a classification head
    (``Source.kinds``); for regression targets there is no category to translate, so it refuses.

    Args:
        trade_off: ``λ``, the weight of the source-head loss (2.3, the reference implementation's default).
        source_task: the source head to use (default: the first binary or multiclass one).
        steps, lr, batch_size, weight_decay: as ``finetune_all``.
    """

    def __init__(self, *, trade_off: float = 2.3, source_task: str | None = None, steps: int = 100,
                 lr: float = 0.01, batch_size: int = 64, weight_decay: float = 0.0) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
        self.trade_off = check_positive("trade_off", trade_off, "Use a source-head weight such as 2.3.")
        if source_task is not None and not isinstance(source_task, str):
            raise ConfigError(f"`source_task` must be the name of a source head. Got {source_task!r}.")
        self.source_task = source_task
        self.relationship: Tensor | None = None  # the last fit's p(y_s | y_t) [target classes, source classes]

    def refusal(self, source: Source, task: Task) -> str | None:
        if task.kind not in (TaskKind.BINARY, TaskKind.MULTICLASS):
            return (f"strategy 'co_tuning' translates target categories into source ones, but task '{task.name}' is "
                    f"{task.kind.value} (no categories); use l2sp, delta or lwf for it.")
        if source.classification_head(self.source_task) is None:
            return (f"strategy 'co_tuning' needs a binary or multiclass head on the source, and {source.label} has "
                    f"none (heads: {', '.join(source.kinds) or 'kinds unknown'}); use l2sp, delta or lwf.")
        return None

    def objective(self, trunk: nn.Module, head: nn.Module, source: Source, task: Task, head0: list[Tensor],
                  generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list[nn.Parameter]]:
        name = source.classification_head(self.source_task)
        assert name is not None  # refusal() said so otherwise
        kind = source.kinds[name]
        src_head = copy.deepcopy(source.model.heads[name]).requires_grad_(True).train()
        with torch.no_grad():
            anchor = _frozen(nn.Sequential(source.model.trunk, source.model.heads[name]))
            probs = _log_probs(anchor(task.train.x), kind).exp()
        classes = 2 if task.kind is TaskKind.BINARY else task.num_outputs
        relation = category_relationship(probs, _class_ids(task, task.train.y), classes).to(probs.dtype)
        self.relationship = relation

        def loss(x: Tensor, y: Tensor) -> Tensor:
            feats = trunk(x)
            soft = relation[_class_ids(task, y)]
            source_loss = -(soft * _log_probs(src_head(feats), kind)).sum(1).mean()
            return task.compute_loss(head(feats), y) + self.trade_off * source_loss

        return loss, list(src_head.parameters())


class StochNorm(FineTune):
    """Fine-tune everything with each BatchNorm of the trunk replaced by a :class:`StochNormLayer`.

    Kou, You, Long & Wang, "Stochastic Normalization", NeurIPS 2020. It applies only to trunks with BatchNorm
    layers (with moving statistics): mtml's own trunks — MLPs, and Conv-4 / ResNet-12 with per-example group or
    layer normalisation — have none, and it refuses them; a source model built in Python with
    ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in its trunk qualifies. The predictor keeps the layers, which in eval
    mode are the BatchNorms with their (fine-tuned) moving statistics.

    Args:
        p: the probability of normalising a channel with the moving statistics (paper: 0.5).
        steps, lr, batch_size, weight_decay: as ``finetune_all``.
    """

    def __init__(self, *, p: float = 0.5, steps: int = 100, lr: float = 0.01, batch_size: int = 64,
                 weight_decay: float = 0.0) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ConfigError(f"`p` must be a probability in [0, 1]. Got {p!r}. Use 0.5 (the paper's).")
        self.p = float(p)

    def refusal(self, source: Source, task: Task) -> str | None:
        if not _batchnorms(source.model.trunk):
            return (f"strategy 'stochnorm' replaces BatchNorm layers, and {source.label}'s trunk has none (mtml's mlp, "
                    "conv4 and resnet12 trunks normalise each example on its own); use finetune_all or l2sp, or a "
                    "source whose trunk has nn.BatchNorm1d/2d layers.")
        return None

    def _trunk(self, source: Source, seed: int) -> nn.Module:
        trunk = copy.deepcopy(source.model.trunk)
        for i, name in enumerate(_batchnorms(trunk)):
            parent, _, leaf = name.rpartition(".")
            owner, bn = (trunk.get_submodule(parent) if parent else trunk), trunk.get_submodule(name)
            assert isinstance(bn, _BatchNorm)
            layer = StochNormLayer(bn, self.p, (seed + 7919 * i) % 2**62)
            if not leaf:  # the trunk is itself one BatchNorm
                return layer
            setattr(owner, leaf, layer)
        return trunk


class LwF(FineTune):
    """Fine-tune everything while the source heads keep their outputs on the target inputs:
    ``L(head(f), y) + λ·mean_heads L_old(source_headₕ(f), recordedₕ)``.

    Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017. The recorded outputs are the frozen
    source model's on the batch; the old heads are trainable copies of the source heads on the fine-tuned trunk
    (as in the paper); :func:`distillation_loss` compares them (temperature ``T`` for class outputs). With many
    source heads (a multi-task source) the old-task term is their mean, so ``λ`` keeps the paper's meaning of
    the weight of one old task. A head's kind comes from ``Source.kinds`` (regression when unknown).

    Args:
        trade_off: ``λ_o``, the weight of the old-task term (paper: 1).
        temperature: ``T`` (paper: 2).
        steps, lr, batch_size, weight_decay: as ``finetune_all``.
    """

    def __init__(self, *, trade_off: float = 1.0, temperature: float = 2.0, steps: int = 100, lr: float = 0.01,
                 batch_size: int = 64, weight_decay: float = 0.0) -> None:
        super().__init__(part="all", steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
        self.trade_off = check_positive("trade_off", trade_off, "Use an old-task weight such as 1.")
        self.temperature = check_positive("temperature", temperature, "Use a distillation temperature such as 2.")

    def objective(self, trunk: nn.Module, head: nn.Module, source: Source, task: Task, head0: list[Tensor],
                  generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list[nn.Parameter]]:
        old = _OldHeads(source).requires_grad_(True).train()
        recorder = _OldHeads(source).requires_grad_(False).eval()
        anchor = _frozen(source.model.trunk)

        def loss(x: Tensor, y: Tensor) -> Tensor:
            feats = trunk(x)
            with torch.no_grad():
                recorded = recorder(anchor(x))
            kept = feats.new_zeros(())
            for (kind, out), (_, rec) in zip(old(feats), recorded, strict=True):
                kept = kept + out.shape[1] * distillation_loss(out, rec, kind, self.temperature)
            return task.compute_loss(head(feats), y) + self.trade_off * kept / old.count

        return loss, list(old.parameters())


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

STRATEGIES.register("delta", DELTA, help="fine-tune all, pulling the trunk's feature maps to the source's, channels "
                    "weighted by supervised attention (Li et al., ICLR 2019)")
STRATEGIES.register("bss", BSS, help="fine-tune all with η·(k smallest σ² of the batch features) (Batch Spectral "
                    "Shrinkage, Chen et al., NeurIPS 2019)")
STRATEGIES.register("co_tuning", CoTuning, help="fine-tune all, the source head trained on target labels translated "
                    "to soft source labels (You et al., NeurIPS 2020); classification targets")
STRATEGIES.register("stochnorm", StochNorm, help="fine-tune all with BatchNorms mixing batch and moving statistics "
                    "per channel (Kou et al., NeurIPS 2020); trunks with BatchNorm only")
STRATEGIES.register("lwf", LwF, help="fine-tune all while the source heads keep their outputs on the target inputs "
                    "(Learning without Forgetting, Li & Hoiem, ECCV 2016)")
