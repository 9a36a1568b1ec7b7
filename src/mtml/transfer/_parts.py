"""Pieces the transfer strategies share: the source, heads, trunk blocks and closed-form ridge regression.

Pure torch, no I/O. See :mod:`mtml.transfer._strategies` for the strategies themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, UnknownNameError
from mtml.meta import MetaAlgorithm
from mtml.nn import MultiTaskModel
from mtml.tasks import Task, TaskKind

__all__ = ["Source", "check_source", "features", "head_prior", "linear_prior", "loo_ridge", "new_head", "reset",
           "ridge_fit", "ridge_targets", "seed_from", "trunk_blocks"]


@dataclass(frozen=True)
class Source:
    """A trained source: its model, for meta-learned sources the algorithm it was meta-trained with, the kind of
    each head (``{"species": "multiclass", ...}``) and a label naming it in messages (its run directory)."""

    model: MultiTaskModel
    algorithm: MetaAlgorithm | None = None
    kinds: Mapping[str, str] = field(default_factory=dict)
    label: str = "the source"

    def classification_head(self, name: str | None = None) -> str | None:
        """``name`` (checked), else the first binary or multiclass head, else ``None``."""
        if name is not None:
            if name not in self.kinds:
                raise UnknownNameError(f"source run {self.label} has no head '{name}'; its heads: "
                                       f"{', '.join(self.kinds)}.")
            return name
        return next((n for n, k in self.kinds.items() if k in ("binary", "multiclass")), None)


def seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def reset(module: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters``, reproducibly from ``seed``."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()


def _heads(model: MultiTaskModel) -> list[nn.Module]:
    """The model's task heads; for hierarchical heads, their shared mean as one linear head."""
    mean_head = getattr(model, "mean_head", None)
    return [mean_head()] if callable(mean_head) else list(model.heads.values())


def new_head(model: MultiTaskModel, num_outputs: int, seed: int) -> nn.Module:
    """A freshly initialised head shaped like ``model``'s first head, with ``num_outputs`` outputs.

    The head's last ``nn.Linear`` is rebuilt when its width differs from ``num_outputs``.
    """
    head = copy.deepcopy(_heads(model)[0])
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
    reset(head, seed)
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
    heads = _heads(source.model)
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


def ridge_targets(task: Task, y: Tensor) -> Tensor:
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
def features(trunk: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    trunk.eval()
    return torch.cat([trunk(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def check_source(source: Source, task: Task) -> None:
    if source.model.stems:
        raise ConfigError("the source model has per-task stems (tasks of different input widths, or "
                          "share_trunk: false), so it has no single trunk input to transfer; train the source "
                          "with one input width and a shared trunk.")
    want = {source.model.input_shapes[n] for n in source.model.task_names if n in source.model.input_shapes}
    if want and task.input_shape not in want:
        raise ConfigError(f"target task '{task.name}' has inputs of shape {task.input_shape} but the source "
                          f"model takes {sorted(want)[0]}; transfer needs the same input features.")


# -- strategies --------------------------------------------------------------------------------------------------
def linear_prior(source: Source, task: Task, feats: Tensor) -> Tensor:
    """``W₀ [d, o]``: the source's mean head when it is one ``nn.Linear`` and the target is a regression, else 0."""
    prior = head_prior(source, task) if task.kind is TaskKind.REGRESSION else None
    layers = [m for m in prior.modules() if isinstance(m, nn.Linear)] if prior is not None else []
    parametrised = [m for m in prior.modules() if any(True for _ in m.parameters(recurse=False))] if prior else []
    if len(layers) == 1 and parametrised == layers:
        return layers[0].weight.detach().double().T
    return torch.zeros(feats.shape[1], task.num_outputs, dtype=torch.float64, device=feats.device)
