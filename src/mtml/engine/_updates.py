"""What happens around an optimiser update: the learning-rate schedule, gradient clipping and accumulation.

An :class:`Updater` wraps a training loop's optimiser. Its :meth:`~Updater.step` runs a step function (any of
:func:`~mtml.engine.joint_step`, :func:`~mtml.engine.sharded_joint_step`, :func:`~mtml.meta.meta_step`, …, which
only call ``zero_grad``, ``step`` and read ``param_groups``) ``accumulate`` times on fresh micro-batches, with an
optimiser that collects each micro-batch's gradient instead of applying it; after the last one the gradient is the
mean over the micro-batches (the gradient of the mean loss), clipped to ``grad_clip`` in global norm, and the real
optimiser steps once. Then the schedule sets the learning rate of the next update. In a process group the step
functions all-reduce each micro-batch's gradient before ``step``, so every rank collects the same sums.

Schedules (``step`` counts optimiser updates from 0; ``warmup`` updates ramp linearly up to the base rate first):

- ``constant``: the base rate;
- ``step``: the rate times ``gamma`` after every ``every`` updates (after warmup);
- ``cosine``: from the base rate down to ``min_lr`` at ``max_steps`` along half a cosine (after warmup);
- ``plateau``: the rate times ``factor`` (not below ``min_lr``) at the ``patience``-th validation in a row that
  did not lower the best objective by more than ``min_delta``, as early stopping counts them (then the count
  starts again; :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`, fed by :meth:`Updater.validated`).

Everything the schedule holds is in :meth:`Updater.state_dict`, which the fit loop saves in each checkpoint, so a
resumed run takes the same rates as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from mtml.errors import ConfigError

if TYPE_CHECKING:
    from mtml.engine._precision import LossScaler

__all__ = ["SCHEDULES", "LRSchedule", "Updater"]

ScheduleName = Literal["constant", "step", "cosine", "plateau"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule (see the module docstring); ``every`` is required for ``step``."""

    name: str = "constant"
    warmup: int = 0
    every: int | None = None
    gamma: float = 0.1
    min_lr: float = 0.0
    factor: float = 0.1
    patience: int = 5

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.name!r}; use one of {', '.join(SCHEDULES)}.")
        if self.warmup < 0:
            raise ConfigError(f"schedule warmup must be >= 0 updates. Got {self.warmup}.")
        if self.name == "plateau" and self.warmup:
            raise ConfigError("the plateau schedule lowers the rate from validations and takes no warmup; remove "
                              "warmup or use cosine/step/constant.")
        if self.name == "step" and (self.every is None or self.every < 1):
            raise ConfigError(f"the step schedule needs every: N >= 1 (updates between decays). Got {self.every}.")
        if not 0 < self.gamma <= 1 or not 0 < self.factor < 1:
            raise ConfigError(f"schedule gamma must be in (0, 1] and factor in (0, 1). Got gamma {self.gamma}, "
                              f"factor {self.factor}.")
        if not self.min_lr >= 0 or self.patience < 1:
            raise ConfigError(f"schedule min_lr must be >= 0 and patience >= 1. Got {self.min_lr}, {self.patience}.")

    def factor_at(self, step: int, max_steps: int, base_lr: float) -> float:
        """Multiplier of ``base_lr`` for update ``step`` (0-based) of ``max_steps`` (1 for ``plateau``: its
        reductions come from validations)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = step - self.warmup
        if self.name == "step":
            assert self.every is not None
            return float(self.gamma ** (t // self.every))
        if self.name == "cosine":
            span = max(1, max_steps - self.warmup)
            floor = min(1.0, self.min_lr / base_lr)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / span)))
        return 1.0


class _Collector(torch.optim.Optimizer):
    """The optimiser a step function sees while gradients accumulate: ``step`` hands the gradients to the
    :class:`Updater` (which applies them after the last micro-batch) instead of updating the parameters."""

    def __init__(self, owner: Updater) -> None:
        super().__init__([{"params": g["params"]} for g in owner.optimizer.param_groups], {})
        self.owner = owner

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        self.owner._collect()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # always to None: the Updater keeps the first micro-batch's gradient tensors (no copy), which zeroing in
        # place would wipe
        super().zero_grad(set_to_none=True)


class Updater:
    """One optimiser update at a time: ``accumulate`` micro-batches, the mean gradient clipped to ``grad_clip``
    (global L2 norm, None: no clipping), then ``optimizer.step()`` and the ``schedule``'s next rate. A plateau
    schedule counts a validation as an improvement when it lowers the best objective by more than ``min_delta``
    (the early-stopping rule's). With a ``scaler`` (fp16, :class:`~mtml.engine.LossScaler`) the step functions'
    gradients are of the scaled loss: the update's gradient is unscaled before clipping, and the update is skipped
    when it holds NaN or inf (it still counts, and the schedule still moves)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, schedule: LRSchedule | None = None, max_steps: int,
                 grad_clip: float | None = None, accumulate: int = 1, min_delta: float = 0.0,
                 scaler: LossScaler | None = None) -> None:
        if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
            raise ConfigError(f"accumulate must be a whole number of micro-batches >= 1. Got {accumulate!r}.")
        if grad_clip is not None and not (isinstance(grad_clip, int | float) and 0 < grad_clip < math.inf):
            raise ConfigError(f"grad_clip must be a finite norm > 0 (or None: no clipping). Got {grad_clip!r}.")
        if max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1. Got {max_steps}.")
        self.optimizer, self.max_steps = optimizer, max_steps
        self.schedule = schedule or LRSchedule()
        self.grad_clip, self.accumulate, self.scaler = grad_clip, accumulate, scaler
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._sums: list[Tensor | None] = []
        self._micro = 0
        self._norm: float | None = None
        self._plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._lambda: torch.optim.lr_scheduler.LambdaLR | None = None
        s = self.schedule
        if s.name == "plateau":
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=s.factor, patience=s.patience - 1, threshold=min_delta,
                threshold_mode="abs", min_lr=s.min_lr)
        elif s.name != "constant" or s.warmup:
            bases = [float(g["lr"]) for g in optimizer.param_groups]
            self._lambda = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [_Factor(s, max_steps, b) for b in bases])
        wrapped = accumulate > 1 or grad_clip is not None or scaler is not None
        self._collector = _Collector(self) if wrapped else None

    @property
    def lr(self) -> float:
        """The learning rate of the next update (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, micro: Callable[[torch.optim.Optimizer], Mapping[str, Any]]) -> dict[str, Any]:
        """One update: ``micro(optimizer)`` runs one step function on a fresh micro-batch, ``accumulate`` times;
        returns its logged values averaged over the micro-batches, with ``lr`` (the rate this update used) and,
        when clipping, ``grad_norm`` (the mean gradient's norm before clipping)."""
        lr = self.lr
        if self._collector is None:
            info = dict(micro(self.optimizer))
        else:
            self._micro, self._sums = 0, [None] * len(self.params)
            infos = []
            for _ in range(self.accumulate):
                infos.append(micro(self._collector))
            if self._micro != self.accumulate:
                raise RuntimeError(f"a step function called optimizer.step() {self._micro} times in "
                                   f"{self.accumulate} micro-batches; it must call it once per micro-batch.")
            info = _mean(infos)
            if self._norm is not None:
                info["grad_norm"] = self._norm
        if self.scaler is not None:
            info.update(self.scaler.log())
        if self._lambda is not None:
            with warnings.catch_warnings():  # (torch warns when the first update was skipped by the scaler)
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                self._lambda.step()
        info["lr"] = lr
        return info

    def _collect(self) -> None:
        self._micro += 1
        if self.accumulate == 1:  # clipping only: the gradient is already the update's
            self._apply()
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            total = self._sums[i]
            self._sums[i] = p.grad.detach() if total is None else total.add_(p.grad)
            p.grad = None  # the sum owns the first tensor now
        if self._micro < self.accumulate:
            return
        for p, total in zip(self.params, self._sums, strict=True):
            p.grad = None if total is None else total.div_(self.accumulate)
        self._sums = []
        self._apply()

    def _apply(self) -> None:
        if self.scaler is not None:  # the true gradient from here on: clipping and grad_norm see it
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            grads = [p for p in self.params if p.grad is not None]
            self._norm = float(torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)) if grads else 0.0
        if self.scaler is None:
            self.optimizer.step()
        else:  # skipped when the gradient holds NaN or inf
            self.scaler.step(self.optimizer)

    def validated(self, objective: float) -> None:
        """Feed a validation objective to the ``plateau`` schedule (a no-op for the others)."""
        if self._plateau is not None:
            self._plateau.step(objective)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (JSON-safe): saved in each checkpoint."""
        sched = self._plateau if self._plateau is not None else self._lambda
        if sched is None:
            return {}
        state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        return {"schedule": self.schedule.name, "state": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sched = self._plateau if self._plateau is not None else self._lambda
        if sched is None and not state:
            return
        if sched is None or state.get("schedule") != self.schedule.name:
            raise ConfigError(f"the checkpoint's learning-rate schedule ({state.get('schedule', 'constant')}) is "
                              f"not this run's ({self.schedule.name}); resume it with its own config.")
        saved = dict(state["state"])
        if self._lambda is not None:
            saved["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        sched.load_state_dict(saved)


@dataclass(frozen=True)
class _Factor:
    schedule: LRSchedule
    max_steps: int
    base_lr: float

    def __call__(self, step: int) -> float:
        return self.schedule.factor_at(step, self.max_steps, self.base_lr)


def _mean(infos: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Numbers averaged over ``infos`` key by key (nested mappings too); anything else from the last."""
    out: dict[str, Any] = {}
    for key, last in infos[-1].items():
        values = [i.get(key) for i in infos]
        if isinstance(last, Mapping):
            out[key] = _mean([v for v in values if isinstance(v, Mapping)])
        elif isinstance(last, int | float) and not isinstance(last, bool) and all(
                isinstance(v, int | float) for v in values):
            out[key] = math.fsum(float(v) for v in values if isinstance(v, int | float)) / len(values)
        else:
            out[key] = last
    return out
