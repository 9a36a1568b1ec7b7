"""Transfer strategies: from a trained source model to a predictor for a new target task.

Every strategy turns a :class:`Source` (a trained :class:`~mtml.nn.MultiTaskModel`, plus the meta-algorithm
for meta-learned sources) and a target :class:`~mtml.tasks.Task` — whose ``train`` split holds the few target
examples — into a predictor ``x: [n, *input] → [n, outputs]`` scored with the task's own metrics:

- ``scratch`` — the baseline: the source's architecture re-initialised, trained on the target examples only;
- ``linear_probe`` — closed-form ridge regression on frozen source features (one-hot ±1 targets for classes),
  λ chosen by exact leave-one-out error over a grid;
- ``finetune_head`` / ``finetune_last`` / ``finetune_all`` — a fresh head trained on frozen features, with the
  last ``k`` trunk blocks, or with the whole trunk;
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, DivergedError
from mtml.meta import MetaAlgorithm
from mtml.meta.base import check_int, check_positive
from mtml.nn.model import MultiTaskModel
from mtml.registry import Registry
from mtml.tasks import Split, Task, TaskKind

__all__ = [
    "L2SP",
    "STRATEGIES",
    "FineTune",
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


@dataclass(frozen=True)
class Source:
    """A trained source: its model and, for meta-learned sources, the algorithm it was meta-trained with."""

    model: MultiTaskModel
    algorithm: MetaAlgorithm | None = None


class Strategy(ABC):
    """Turns a source and a target task's training examples into a predictor (a module in eval mode)."""

    needs_algorithm: bool = False

    @abstractmethod
    def fit(self, source: Source, task: Task, *, generator: torch.Generator) -> nn.Module:
        """A predictor ``x: [n, *task.input_shape] → [n, task.num_outputs]`` fitted on ``task.train``."""


# -- shared pieces ---------------------------------------------------------------------------------------------
def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _reset(module: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters``, reproducibly from ``seed``."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()


def new_head(model: MultiTaskModel, num_outputs: int, seed: int) -> nn.Module:
    """A freshly initialised head shaped like ``model``'s first head, with ``num_outputs`` outputs.

    The head's last ``nn.Linear`` is rebuilt when its width differs from ``num_outputs``.
    """
    head = copy.deepcopy(next(iter(model.heads.values())))
    linears = [name for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"the source head {type(head).__name__} has no nn.Linear output layer, so a head with "
                          f"{num_outputs} outputs cannot be made from it; give the source model linear heads.")
    last: nn.Linear = head.get_submodule(linears[-1])  # type: ignore[assignment]
    if last.out_features != num_outputs:
        fresh = nn.Linear(last.in_features, num_outputs, bias=last.bias is not None)
        fresh.to(last.weight.device, last.weight.dtype)
        parent, _, leaf = linears[-1].rpartition(".")
        if not leaf:  # the head is itself a Linear
            head = fresh
        else:
            setattr(head.get_submodule(parent), leaf, fresh)
    _reset(head, seed)
    return head


def head_prior(source: Source, task: Task) -> nn.Module | None:
    """The source's own task learner as a starting head for ``task``, or ``None`` when it has none that fits.

    A meta-learned source's head is its meta-learned initialisation; a multi-task source contributes the mean
    of its heads. Used for regression targets (the source heads predict the same kind of quantity) and for
    meta-learned sources (their head was trained to start any task of the family), when the heads have the
    target's output width; a classification target of a multi-task source gets a fresh head instead, since
    its classes mean something else than the source tasks' classes.
    """
    if task.kind is not TaskKind.REGRESSION and source.algorithm is None:
        return None
    heads = list(source.model.heads.values())
    shapes = [[tuple(p.shape) for p in h.parameters()] for h in heads]
    if any(s != shapes[0] for s in shapes):
        return None
    out = copy.deepcopy(heads[0])
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(torch.stack([h.get_parameter(name) for h in heads]).mean(0))
    probe = torch.zeros(1, *task.input_shape, device=task.train.x.device, dtype=task.train.x.dtype)
    with torch.no_grad():
        width = int(out(source.model.trunk.eval()(probe)).shape[-1])
    return out if width == task.num_outputs else None


def trunk_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's blocks, input to output: the children that hold parameters.

    For an :func:`~mtml.nn.mlp` trunk these are its ``nn.Linear`` layers; for an ``nn.Sequential`` of conv
    blocks, each block. Parameter-free children (activations, pooling) belong to no block and stay as they are.
    """
    return [child for child in trunk.children() if any(True for _ in child.parameters())]


def _targets(task: Task, y: Tensor) -> Tensor:
    """Ridge targets ``[n, outputs]``: regression values, ±1 codes for labels (sign or arg-max decides)."""
    if task.kind is TaskKind.REGRESSION:
        return y
    if task.kind is TaskKind.MULTICLASS:
        return 2 * torch.nn.functional.one_hot(y, task.num_outputs).to(torch.float64) - 1
    return 2 * y.reshape(y.shape[0], -1).to(torch.float64) - 1


def ridge_fit(feats: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unpenalised intercept: ``(W [d, o], b [o])`` minimising
    ``‖Y − F W − b‖² + l2·‖W‖²`` for ``feats: [n, d]``, ``y: [n, o]`` (float64 SVD of the centred features)."""
    f, t = feats.double(), y.double()
    fm, tm = f.mean(0), t.mean(0)
    u, s, vh = torch.linalg.svd(f - fm, full_matrices=False)
    w = vh.T @ ((s / (s.square() + l2)).unsqueeze(1) * (u.T @ (t - tm)))
    return w, tm - fm @ w


def loo_ridge(feats: Tensor, y: Tensor, grid: Sequence[float]) -> tuple[float, Tensor]:
    """The ``l2`` of ``grid`` with the lowest exact leave-one-out squared error, and the errors ``[len(grid)]``.

    For ridge with an unpenalised intercept the hat matrix is ``H = 11ᵀ/n + U diag(s²/(s²+λ)) Uᵀ`` and the
    leave-one-out residual of example ``i`` is ``(yᵢ − ŷᵢ)/(1 − Hᵢᵢ)``, so no refit is needed. With one
    example every ``l2`` predicts its target (the fit is the mean), and the first grid value is returned.
    """
    f, t = feats.double(), y.double()
    n = f.shape[0]
    u, s, _ = torch.linalg.svd(f - f.mean(0), full_matrices=False)
    tc = t - t.mean(0)
    proj = u.T @ tc  # [r, o]
    errors = []
    for l2 in grid:
        shrink = s.square() / (s.square() + l2)  # [r]
        resid = tc - u @ (shrink.unsqueeze(1) * proj)
        lev = 1.0 / n + (u.square() * shrink).sum(1)
        errors.append(((resid / (1 - lev).clamp_min(1e-12).unsqueeze(1)).square()).mean())
    err = torch.stack(errors) if n > 1 else torch.zeros(len(grid), dtype=torch.float64)
    return float(grid[int(torch.argmin(err))]), err


@torch.no_grad()
def _features(trunk: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    trunk.eval()
    return torch.cat([trunk(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _check_source(source: Source, task: Task) -> None:
    if source.model.stems:
        raise ConfigError("the source model has per-task stems (tasks of different input widths, or "
                          "share_trunk: false), so it has no single trunk input to transfer; train the source "
                          "with one input width and a shared trunk.")
    want = {source.model.input_shapes[n] for n in source.model.task_names if n in source.model.input_shapes}
    if want and task.input_shape not in want:
        raise ConfigError(f"target task '{task.name}' has inputs of shape {task.input_shape} but the source "
                          f"model takes {sorted(want)[0]}; transfer needs the same input features.")


# -- strategies --------------------------------------------------------------------------------------------------
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
        _check_source(source, task)
        trunk = copy.deepcopy(source.model.trunk)
        feats = _features(trunk, task.train.x)
        y = _targets(task, task.train.y)
        w0 = _linear_prior(source, task, feats)
        y = y - feats.double() @ w0
        l2 = self.l2 if self.l2 is not None else loo_ridge(feats, y, self.grid)[0]
        w, b = ridge_fit(feats, y, l2)
        w = w + w0
        head = nn.Linear(feats.shape[1], w.shape[1]).to(feats.device, feats.dtype)
        with torch.no_grad():
            head.weight.copy_(w.T)
            head.bias.copy_(b)
        return nn.Sequential(trunk, head).eval()


def _linear_prior(source: Source, task: Task, feats: Tensor) -> Tensor:
    """``W₀ [d, o]``: the source's mean head when it is one ``nn.Linear`` and the target is a regression, else 0."""
    prior = head_prior(source, task) if task.kind is TaskKind.REGRESSION else None
    layers = [m for m in prior.modules() if isinstance(m, nn.Linear)] if prior is not None else []
    parametrised = [m for m in prior.modules() if any(True for _ in m.parameters(recurse=False))] if prior else []
    if len(layers) == 1 and parametrised == layers:
        return layers[0].weight.detach().double().T
    return torch.zeros(feats.shape[1], task.num_outputs, dtype=torch.float64, device=feats.device)


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
        _check_source(source, task)
        trunk = self._trunk(source, _seed(generator))
        head, from_source = self._head(source, task, _seed(generator))
        head0 = [p.detach().clone() if from_source else torch.zeros_like(p) for p in head.parameters()]
        train = self._trainable(trunk)
        trunk.requires_grad_(False).eval()
        for module in train:
            module.requires_grad_(True).train()
        if not train:  # frozen trunk: its features once, then the head alone
            feats = _features(trunk, task.train.x)
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
        _reset(trunk, seed)
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
        _check_source(source, task)
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
STRATEGIES.register("finetune_head", _finetune_head, help="a new head trained on the frozen source trunk")
STRATEGIES.register("finetune_last", _finetune_last, help="a new head + the last k trunk blocks trained")
STRATEGIES.register("finetune_all", _finetune_all, help="a new head + the whole source trunk trained")
STRATEGIES.register("l2sp", L2SP, help="fine-tune all with α‖θ−θ_source‖² + β‖θ_head‖² (Li et al. 2018)")
STRATEGIES.register("meta_adapt", MetaAdapt, help="the source meta-algorithm's own test-time adaptation")
