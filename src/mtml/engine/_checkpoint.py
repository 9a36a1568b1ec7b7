"""Checkpoints as safetensors files: tensors plus JSON metadata in the header, never pickle.

A checkpoint holds the state of named modules (model, weighting, meta-algorithm), an optimiser, random
generators and a small JSON-able ``meta`` dict (step, early-stopping state). Loading one can never run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mtml.atomic import atomic_write_bytes
from mtml.errors import CheckpointError, DivergedError

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "mtml-checkpoint-1"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: every tensor by key plus the JSON metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        start = f"{prefix}."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slot in state["state"].items():
        for key, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    info = ckpt.meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in ckpt.module_state("optim").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in info["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write one checkpoint atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    header: dict[str, Any] = {"format": FORMAT, "modules": sorted(modules), **(meta or {})}
    if optimizer is not None:
        opt_tensors, header["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    for name, gen in (generators or {}).items():
        tensors[f"rng.{name}"] = gen.get_state()
    bad = _first_non_finite(tensors)
    if bad is not None:
        raise DivergedError(f"not writing checkpoint {Path(path).name}: {bad} holds NaN or inf, so the run has "
                            "diverged; the checkpoints already written are kept. Lower training.lr (or change the "
                            "weighting) and restart.")
    data = st_save(tensors, metadata={"mtml": json.dumps(header)})
    atomic_write_bytes(path, data)


def _first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf (random-generator states are bytes)."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a missing, truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header = _read_header(raw)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({exc}). Delete it to fall back to an earlier "
            "checkpoint, or start a new run."
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mtml checkpoint (format {header.get('format')!r}).")
    bad = _first_non_finite(tensors)
    if bad is not None:  # written before mtml refused to write them
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {bad} (its run had diverged); delete it to "
                              "fall back to an earlier checkpoint, or start a new run.")
    return Checkpoint(tensors, header)


def _read_header(raw: bytes) -> dict[str, Any]:
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["mtml"])
    if not isinstance(meta, dict):
        raise ValueError(f"its mtml metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)`` (strict), without its cost quadratic in the number of submodules (each
    child scans every key for its prefix: 4 s for 2,000 task heads): when the keys and shapes match and no module
    customises loading, every tensor is copied in place; otherwise, or on any mismatch, ``load_state_dict``
    itself runs (and raises its own error)."""
    targets = module.state_dict(keep_vars=True)
    plain = all(type(m)._load_from_state_dict is nn.Module._load_from_state_dict and not m._load_state_dict_pre_hooks
                and not m._load_state_dict_post_hooks for m in module.modules())
    if not plain or targets.keys() != state.keys() or any(
            targets[k].shape != v.shape for k, v in state.items()):
        module.load_state_dict(state)
        return
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)


def restore(
    ckpt: Checkpoint,
    *,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Load a checkpoint's state into live objects; a mismatch names the module and the keys."""
    for name, module in modules.items():
        state = ckpt.module_state(name)
        try:
            load_state(module, state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint does not fit module '{name}': {first}. Was it written by a run with another "
                "model or task set?"
            ) from None
    if optimizer is not None and "optimizer" in ckpt.meta:
        _restore_optimizer(optimizer, ckpt)
    for name, gen in (generators or {}).items():
        key = f"rng.{name}"
        if key in ckpt.tensors:
            gen.set_state(ckpt.tensors[key])
