"""Mixed precision: ``training.precision`` as an autocast context for the steps and evaluations of a run, and
the gradient scaler that ``fp16`` needs.

``bf16`` runs matrix products and convolutions in bfloat16 under :func:`torch.autocast` (on CPUs with AMX or
AVX-512 BF16, and on CUDA GPUs that support it), keeping parameters, optimiser state, losses and reductions in
float32; bfloat16 has float32's range, so no gradient scaling is needed.

``fp16`` runs them in float16 (on CUDA, and on the CPU, where torch's float16 autocast works too, if slowly
without native float16 arithmetic). float16's smallest normal number is 6e-5, so small gradients would underflow
to zero in the backward pass: the loss is multiplied by a :class:`LossScaler`'s scale (2¹⁶ at first) before
``backward``, and the :class:`~mtml.engine.Updater` divides the summed gradient by it again before clipping and
stepping. An update whose gradient holds NaN or inf (the scale was too large) is skipped: the parameters and the
optimiser state stay as they were, the scale halves, and the update still counts as one of ``max_steps`` (the
schedule moves on, as with torch's own recipe). After 2000 updates in a row without one the scale doubles. The
scaler's state lives in buffers (checkpointed as the module ``grad_scaler``), so a resumed run continues
bit-identically. A scale that would fall below 1 after a skipped update means the gradient is not finite even
unscaled: the run has diverged (:class:`~mtml.errors.DivergedError`).

Weightings that take per-task gradients (a Gramian or a Jacobian: MGDA, PCGrad, …) get them from their own
backward passes of the unscaled task losses, so in float16 they would underflow unseen; ``fp16`` is refused with
them (:func:`check_precision`). The inner loops of meta-learning algorithms (MAML's adaptation steps) are not
scaled either: their gradients are of the unscaled support loss, so their accuracy under fp16 is what the tests
of ``tests/engine/test_precision.py`` measure.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, DivergedError

__all__ = ["PRECISIONS", "LossScaler", "Precision", "autocast", "check_precision", "check_scalable"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str, weighting: nn.Module | None = None) -> None:
    """:class:`ConfigError` unless ``precision`` can run on ``device`` (and, for ``fp16``, with ``weighting``)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}. Got {precision!r}.")
    if precision == "fp32":
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training.precision: {precision} autocast runs on cpu and cuda, not {device.type}; use "
                          "fp32.")
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_available() and not _cuda_bf16(device):
        raise ConfigError(f"training.precision: bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0, "
                          f"Ampere, or newer), and {torch.cuda.get_device_name(device)} has none; use fp16 (with "
                          "its gradient scaler) or fp32.")
    if device.type == "cpu" and cpu_arithmetic(precision) is False:
        _warn_emulated(precision)
    if precision == "fp16" and weighting is not None:
        check_scalable(weighting)


# /proc/cpuinfo flags of native arithmetic: x86 AVX512-BF16 / AMX-BF16, AVX512-FP16 / AMX-FP16; Arm FEAT_BF16,
# half-precision SIMD
_NATIVE_FLAGS = {"bf16": frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"}),
                 "fp16": frozenset({"avx512_fp16", "amx_fp16", "asimdhp", "fphp"})}
_FEATURES = {"bf16": "AVX512-BF16, AMX-BF16 or Arm BF16", "fp16": "AVX512-FP16, AMX-FP16 or Arm FP16"}


def cpu_flags_say(precision: str, cpuinfo: str) -> bool | None:
    """Whether a ``/proc/cpuinfo`` text names native arithmetic for ``precision`` (``None``: it lists no flags)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & _NATIVE_FLAGS[precision]) if flags else None


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_arithmetic(precision: str) -> bool | None:
    """Whether this CPU computes in ``precision`` (``bf16``/``fp16``) natively; ``None`` where the system does
    not say (no ``/proc/cpuinfo``). Without it torch emulates the format through float32, several times slower."""
    return cpu_flags_say(precision, _cpuinfo())


@functools.cache  # once per process and precision: autocast() checks its precision at every step
def _warn_emulated(precision: str) -> None:
    warnings.warn(f"mtml: training.precision: {precision} on this CPU is emulated: it has no {precision} "
                  f"arithmetic (no {_FEATURES[precision]} in /proc/cpuinfo; torch's CPU capability is "
                  f"{torch.backends.cpu.get_cpu_capability()}), so {precision} runs several times slower than fp32 "
                  "here (docs/training.md, Mixed precision); use fp32.", RuntimeWarning, stacklevel=3)


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def check_scalable(weighting: nn.Module) -> None:
    """:class:`ConfigError` for a weighting that takes per-task gradients (a Gramian or a Jacobian): they come from
    backward passes of the unscaled task losses, which float16 would underflow without a trace."""
    if getattr(weighting, "needs_gramian", False) or getattr(weighting, "needs_jacobian", False):
        raise ConfigError(f"training.precision: fp16 cannot run with weighting '{type(weighting).__name__}': it "
                          "takes per-task gradients, which are computed without the loss scale and would underflow "
                          "in float16; use bf16 (float32's range, no scaler needed) or fp32, or a loss-based "
                          "weighting (equal, uncertainty, dwa, ...).")


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager[object]:
    """The context a step or an evaluation runs in: ``torch.autocast`` to bfloat16 for ``bf16`` or to float16
    for ``fp16``, nothing for ``fp32``."""
    check_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


class LossScaler(nn.Module):
    """The gradient scaler of ``fp16`` training: a :class:`torch.amp.GradScaler` (:attr:`grad_scaler`) whose
    state is mirrored in buffers, so a checkpoint carries it and a resumed run scales exactly as before.

    Step functions back-propagate ``grad_scaler.scale(loss)``; the :class:`~mtml.engine.Updater` given this
    scaler calls :meth:`unscale_` on the optimiser once the update's gradient is complete (before clipping) and
    :meth:`step` in place of ``optimizer.step()``. Buffers: ``scale`` (the scale of the next update),
    ``growth_tracker`` (updates since the scale last changed), ``skipped`` (updates skipped so far).

    Args:
        device: where the losses live (``cpu`` or ``cuda``).
        init_scale, growth_interval: as :class:`torch.amp.GradScaler`'s.
    """

    scale: Tensor
    growth_tracker: Tensor
    skipped: Tensor

    def __init__(self, device: torch.device | str, *, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000) -> None:
        super().__init__()
        kind = torch.device(device).type
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"the fp16 gradient scaler runs on cpu and cuda, not {kind}; use fp32.")
        self.grad_scaler = torch.amp.GradScaler(kind, init_scale=init_scale, growth_interval=growth_interval)
        self.register_buffer("scale", torch.tensor(float(init_scale), dtype=torch.float32))
        self.register_buffer("growth_tracker", torch.zeros((), dtype=torch.int64))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.int64))
        self.register_load_state_dict_post_hook(_into_scaler)
        self.last_scale = float(init_scale)  # the scale of the last update (what its log shows)
        self.last_skipped = False

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by the scale (and note whether any is NaN/inf)."""
        self.grad_scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` unless a gradient is NaN or inf, then the next scale (half after a skipped
        update): :class:`~mtml.errors.DivergedError` when that falls below 1."""
        before = float(self.scale)
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        state = self.grad_scaler.state_dict()
        after = float(state["scale"])
        self.last_scale, self.last_skipped = before, after < before
        with torch.no_grad():
            self.scale.fill_(after)
            self.growth_tracker.fill_(int(state["_growth_tracker"]))
            if self.last_skipped:
                self.skipped += 1
        if self.last_skipped and after < 1:
            raise DivergedError(f"fp16: the gradient held NaN or inf even at loss scale {before:g} "
                                f"({int(self.skipped)} updates skipped so far), so it is not finite unscaled: "
                                "training diverged. Lower training.lr, or use bf16 (float32's range) if the values "
                                "overflow float16 (above 65504).")

    def log(self) -> dict[str, Any]:
        """What an update's log shows: the scale it used and how many updates were skipped so far."""
        return {"loss_scale": self.last_scale, "skipped_updates": int(self.skipped)}


def _into_scaler(module: nn.Module, incompatible: Any) -> None:
    """After loading the buffers, hand them to the torch scaler (its scale and growth counter)."""
    assert isinstance(module, LossScaler)
    s = module.grad_scaler
    module.grad_scaler.load_state_dict({
        "scale": float(module.scale), "_growth_tracker": int(module.growth_tracker),
        "growth_factor": s.get_growth_factor(), "backoff_factor": s.get_backoff_factor(),
        "growth_interval": s.get_growth_interval()})
    module.last_scale = float(module.scale)
