"""The weighting interface: per-task losses (and optionally their gradient Gramian) → task weights."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, ShapeError

__all__ = ["GRAMIAN_BACKENDS", "JACOBIAN_BACKENDS", "BilevelWeighting", "GramianWeighting", "JacobianUpdate",
           "JacobianWeighting", "Weighting"]

#: How the step computes the task Gramian (see :mod:`mtml.weighting._gramian`).
GRAMIAN_BACKENDS = ("auto", "loop", "batched", "layerwise", "rows", "representation")
#: How the step computes the per-task gradient matrix of a :class:`JacobianWeighting`.
JACOBIAN_BACKENDS = ("auto", "loop", "batched")


class Weighting(nn.Module):
    """Turns per-task losses into task weights; the training objective is ``Σ wᵢ·Lᵢ + penalty()``.

    Subclasses implement :meth:`weights`. Methods that need the per-task gradients set ``needs_gramian = True``
    and receive ``gramian[i, j] = ⟨∇Lᵢ, ∇Lⱼ⟩`` over the shared parameters, computed by the step function in one
    pass. Learned or stateful weightings keep their state in parameters and buffers so checkpoints carry it.
    Returned weights are detached unless the method learns through them (uncertainty weighting does).

    Args:
        task_names: the tasks, in the order of the loss vector.
    """

    needs_gramian: ClassVar[bool] = False
    #: True for a :class:`JacobianWeighting`: the method combines the per-task gradients itself.
    needs_jacobian: ClassVar[bool] = False
    #: False for methods whose weights may be negative by design (IMTL-G, Aligned-MTL).
    nonnegative: ClassVar[bool] = True
    #: True for methods that draw random weights or orders (RLW, PCGrad, GradVac): identical tasks may then get
    #: different weights, and permuting tasks permutes the weights only in distribution.
    stochastic: ClassVar[bool] = False
    #: True when ``weights(P·losses, P·G·Pᵀ) = P·weights(losses, G)`` for every permutation P, without state.
    permutation_equivariant: ClassVar[bool] = False

    def __init__(self, task_names: Sequence[str], /) -> None:
        super().__init__()
        if len(task_names) == 0:
            raise ConfigError("a weighting needs at least one task.")
        self.task_names = list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def forward(self, losses: Tensor, gramian: Tensor | None = None) -> Tensor:
        """``losses: [m]`` (and ``gramian: [m, m]``) → ``weights: [m]``."""
        m = self.num_tasks
        if losses.shape != (m,):
            raise ShapeError(f"{type(self).__name__}: expected losses of shape [{m}] (one per task), "
                             f"got {tuple(losses.shape)}.")
        if self.needs_gramian:
            if gramian is None:
                raise ValueError(f"{type(self).__name__} needs the Gramian of per-task gradients; pass gramian=.")
            if gramian.shape != (m, m):
                raise ShapeError(f"{type(self).__name__}: expected gramian [{m}, {m}], got {tuple(gramian.shape)}.")
        return self.weights(losses, gramian)

    @abstractmethod
    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        """The method itself: ``losses: [m]``, ``gramian: [m, m] | None`` → ``weights: [m]``."""

    def penalty(self) -> Tensor:
        """A term added to the weighted loss (learned weightings regularise their parameters here)."""
        return torch.zeros(())


class GramianWeighting(Weighting):
    """A weighting computed from the Gramian of per-task gradients (``needs_gramian = True``).

    Args:
        gramian: how the step computes the Gramian: ``auto`` (the fastest exact way for the model, see
            :mod:`mtml.weighting._gramian`), ``loop``, ``batched``, ``layerwise``, ``rows`` (layer-wise with one
            backward split by rows; needs every row read by one task and a trunk that keeps rows apart) or
            ``representation`` (gradients
            with respect to the shared representation instead of the shared parameters: cheaper, not exact).
    """

    needs_gramian: ClassVar[bool] = True

    def __init__(self, task_names: Sequence[str], /, *, gramian: str = "auto") -> None:
        super().__init__(task_names)
        if gramian not in GRAMIAN_BACKENDS:
            raise ConfigError(f"`gramian` must be one of {', '.join(GRAMIAN_BACKENDS)}. Got {gramian!r}.")
        self.gramian = gramian

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, gramian={self.gramian}"


class JacobianUpdate(NamedTuple):
    """What a :class:`JacobianWeighting` returns: the shared parameters' update and the task-loss weights."""

    #: ``[d]``: written into the ``.grad`` of the shared parameters (flattened in ``shared_parameters()`` order).
    update: Tensor
    #: ``[m]``: weights of the task losses for every other parameter (heads, task stems) and for the log.
    weights: Tensor


class JacobianWeighting(Weighting):
    """A method that is no linear combination of the task gradients fixed by their Gramian: it acts per
    coordinate (GradDrop, trimmed mean) or keeps gradient-sized memory (MoCo, ExcessMTL), so it receives the
    per-task gradient matrix ``J [m, d]`` of the shared parameters (``needs_jacobian = True``).

    Subclasses implement :meth:`aggregate`; the step calls :meth:`combine` once per update, writes
    :attr:`JacobianUpdate.update` into the shared parameters' ``.grad`` and backpropagates
    ``Σ weights[i]·Lᵢ`` into every other parameter. ``J`` costs one backward per task (``loop``) or one batched
    backward (``batched``) and ``m × d`` memory. State (draw counters, gradient-sized buffers) lives in buffers;
    buffers listed in :attr:`lazy_buffers` take their shape from the first ``J`` and from a loaded state dict.
    Calling the module like a loss weighting (``w(losses)``) is an error: there are no weights without ``J``.

    Args:
        jacobian: how the step computes ``J``: ``auto`` (``batched`` on GPU, ``loop`` on CPU), ``loop``,
            ``batched``.
    """

    needs_jacobian: ClassVar[bool] = True
    #: Buffers whose shape is set by the first call (e.g. ``[m, d]`` memory) and by ``load_state_dict``.
    lazy_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, task_names: Sequence[str], /, *, jacobian: str = "auto") -> None:
        super().__init__(task_names)
        if jacobian not in JACOBIAN_BACKENDS:
            raise ConfigError(f"`jacobian` must be one of {', '.join(JACOBIAN_BACKENDS)}. Got {jacobian!r}.")
        self.jacobian = jacobian

    def backend(self, device: torch.device) -> str:
        """The ``task_jacobian`` backend for ``device`` (``auto``: batched on GPU, loop elsewhere)."""
        if self.jacobian != "auto":
            return self.jacobian
        return "batched" if device.type == "cuda" else "loop"

    def combine(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        """``losses: [m]`` and ``jacobian: [m, d]`` (row i = ``∇Lᵢ`` over the shared parameters) → the update."""
        m = self.num_tasks
        if losses.shape != (m,):
            raise ShapeError(f"{type(self).__name__}: expected losses of shape [{m}] (one per task), "
                             f"got {tuple(losses.shape)}.")
        if jacobian.dim() != 2 or jacobian.shape[0] != m:
            raise ShapeError(f"{type(self).__name__}: expected a jacobian of shape [{m}, d] (one row per task), "
                             f"got {tuple(jacobian.shape)}.")
        out = self.aggregate(losses.detach(), jacobian.detach())
        return JacobianUpdate(out.update.to(jacobian.dtype), out.weights.detach().to(losses.dtype))

    @abstractmethod
    def aggregate(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        """The method itself on detached inputs: ``losses [m]``, ``jacobian [m, d]`` → update ``[d]`` and
        weights ``[m]``."""

    def forward(self, losses: Tensor, gramian: Tensor | None = None) -> Tensor:
        raise TypeError(f"{type(self).__name__} combines the per-task gradients themselves: call "
                        "combine(losses, jacobian) with jacobian [m, d], not the weighting.")

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no weights from a Gramian; use combine(losses, jacobian).")

    @staticmethod
    def write_update(params: Sequence[Tensor], update: Tensor) -> None:
        """Add ``update [Σ numel]`` (split in ``params`` order) to the ``.grad`` of ``params``; frozen parameters
        are skipped (their columns are not in ``J``)."""
        trained = [p for p in params if p.requires_grad]
        for p, g in zip(trained, update.split([p.numel() for p in trained]), strict=True):
            g = g.to(p.dtype).reshape(p.shape)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.lazy_buffers:
            saved = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if isinstance(saved, Tensor) and current is not None and (saved.shape, saved.dtype) != (current.shape,
                                                                                                  current.dtype):
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, jacobian={self.jacobian}"


class BilevelWeighting(Weighting):
    """A weighting whose weights are learned on held-out data (``needs_validation = True``): every
    ``update_every``-th training update, before it, the step calls :meth:`update` with the training batch and a
    batch drawn from the tasks' ``val`` splits; the weights stay fixed in between.

    :meth:`weights` returns the current weights (detached: they are no parameters of the training objective); the
    weights and any state of their own optimiser live in buffers, so checkpoints carry them. ``steps`` (a buffer)
    counts the training updates seen through :meth:`tick`, so a resumed run updates on the same steps.

    Args:
        update_every: update the weights before every ``update_every``-th training update (the first included).
    """

    #: True for a :class:`BilevelWeighting`: the trainer draws validation batches for it.
    needs_validation: ClassVar[bool] = True
    steps: Tensor

    def __init__(self, task_names: Sequence[str], /, *, update_every: int = 1) -> None:
        super().__init__(task_names)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"`update_every` must be an integer >= 1 (training updates between weight updates). "
                              f"Got {update_every!r}.")
        self.update_every = update_every
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def tick(self) -> bool:
        """Count one training update; whether the weights are updated before it."""
        due = int(self.steps) % self.update_every == 0
        self.steps += 1
        return due

    @abstractmethod
    def update(self, model: nn.Module, train_batch: Any, val_batch: Any, loss_fn: Callable[[Any], Tensor],
               lr: float) -> None:
        """Update the weights from ``train_batch`` and ``val_batch`` (``{task: (x, y[, mask])}``);
        ``loss_fn(batch)`` gives the ``[m]`` task losses of ``model`` on a batch and ``lr`` is the optimiser's
        current learning rate. ``model`` must be left as it was (parameters and buffers)."""

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, update_every={self.update_every}"
