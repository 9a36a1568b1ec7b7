"""Does a trunk treat the rows of its batch independently? Row-wise Gramian shortcuts depend on it.

A module that mixes rows (BatchNorm in training mode, or without running statistics) makes row r's output
depend on other rows, so one backward of ``Σ L_t`` no longer splits into per-task gradients by rows. Known
torch modules are judged by type; any other module is checked once by a probe: change one row of a few input
rows and see whether another row's output moves (buffers, RNG state and modes are restored afterwards).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["row_coupling"]

_INDEPENDENT: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.PReLU, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Sequential, nn.ModuleList, nn.ModuleDict,
)
_probed: weakref.WeakKeyDictionary[nn.Module, dict[bool, str | None]] = weakref.WeakKeyDictionary()


def _by_type(trunk: nn.Module) -> tuple[str | None, bool]:
    """(name of the first row-coupling module, whether every module's type is known)."""
    known = True
    for name, mod in trunk.named_modules():
        if isinstance(mod, _BatchNorm) and (mod.training or not mod.track_running_stats):
            return f"{name or 'trunk'} ({type(mod).__name__} in training mode)", True
        if not isinstance(mod, (*_INDEPENDENT, _BatchNorm)):
            known = False
    return None, known


@torch.no_grad()
def _probe(trunk: nn.Module, x: Tensor) -> bool:
    """True when changing row 0 of ``x[:4]`` changes the trunk's output on another row."""
    rows = x[: min(4, x.shape[0])].detach()
    if rows.shape[0] < 2:
        return False
    other = rows.clone()
    other[0] = other[0] * -1.5 + 0.25 if rows.is_floating_point() else other[1]
    saved = [(b, b.clone()) for _, b in trunk.named_buffers()]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        seed = 12345
        torch.manual_seed(seed)
        first = trunk(rows)
        torch.manual_seed(seed)
        second = trunk(other)
    for buffer, value in saved:  # undo running-statistics updates of the probe
        buffer.copy_(value)
    if not isinstance(first, Tensor) or not isinstance(second, Tensor):
        return True  # unknown output structure: do not assume independence
    return not torch.allclose(first[1:], second[1:], rtol=1e-5, atol=1e-6)


def row_coupling(trunk: nn.Module, example: Tensor | None) -> str | None:
    """A description of what in ``trunk`` mixes rows, or None when every output row depends on its input row only.

    ``example`` (some input rows of the trunk) is needed for modules whose behaviour is not known by type; without
    it such a trunk counts as coupling rows. Probe results are cached per trunk and mode.
    """
    name, known = _by_type(trunk)
    if name is not None or known:
        return name
    cache = _probed.setdefault(trunk, {})
    if trunk.training not in cache:
        if example is None:
            return f"trunk ({type(trunk).__name__}: no example rows to check it)"
        coupled = _probe(trunk, example)
        cache[trunk.training] = f"trunk ({type(trunk).__name__}: changing one row changed others)" if coupled else None
    return cache[trunk.training]
