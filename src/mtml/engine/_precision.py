"""Mixed precision: ``training.precision`` as an autocast context for the steps and evaluations of a run.

``bf16`` runs matrix products and convolutions in bfloat16 under :func:`torch.autocast` (on CPUs with AMX or
AVX-512 BF16, and on CUDA), keeping parameters, optimiser state, losses and reductions in float32; bfloat16 has
float32's range, so no gradient scaling is needed. ``fp16`` needs a gradient scaler, which mtml does not have
yet: it is refused with a message rather than run without one.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch

from mtml.errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "autocast", "check_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str, device: torch.device | str) -> None:
    """:class:`ConfigError` unless ``precision`` can run on ``device``."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}. Got {precision!r}.")
    if precision == "fp16":
        raise ConfigError("training.precision: fp16 needs a gradient scaler, which mtml does not have yet; use "
                          "bf16 (float32's range, no scaler needed) or fp32.")
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training.precision: bf16 autocast runs on cpu and cuda, not {device.type}; use fp32.")


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager[object]:
    """The context a step or an evaluation runs in: ``torch.autocast`` to bfloat16 for ``bf16``, nothing for
    ``fp32``."""
    check_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
