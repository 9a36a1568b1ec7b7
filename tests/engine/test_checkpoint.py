"""Checkpoints: exact round trip of model, optimiser and generator state; bad files raise CheckpointError."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mtml.engine import load_checkpoint, restore, save_checkpoint
from mtml.errors import CheckpointError


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, torch.Generator().manual_seed(seed + 100)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen)
        loss = (model(x) - x[:, :2]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_round_trip_continues_identically(tmp_path: Path) -> None:
    model, opt, gen = _setup(0)
    _steps(model, opt, gen, 5)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, modules={"model": model}, optimizer=opt, generators={"sampler": gen},
                    meta={"step": 5, "fit": {"best": 1.5}})
    expected = _steps(model, opt, gen, 7)

    other, other_opt, other_gen = _setup(1)  # different initial weights and generator
    ckpt = load_checkpoint(path)
    assert ckpt.meta["step"] == 5 and ckpt.meta["fit"] == {"best": 1.5} and ckpt.meta["modules"] == ["model"]
    restore(ckpt, modules={"model": other}, optimizer=other_opt, generators={"sampler": other_gen})
    assert _steps(other, other_opt, other_gen, 7) == expected
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert int(other.state_dict()["1.num_batches_tracked"]) == 12


def test_no_pickle_and_no_temp_files(tmp_path: Path) -> None:
    model, opt, _gen = _setup(0)
    save_checkpoint(tmp_path / "a.safetensors", modules={"model": model}, optimizer=opt)
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert (tmp_path / "a.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, not a pickle


def _write_good(path: Path) -> None:
    model, opt, gen = _setup(0)
    _steps(model, opt, gen, 1)
    save_checkpoint(path, modules={"model": model}, optimizer=opt, generators={"g": gen})


@pytest.mark.parametrize("cut", [0.5, 0.99, 10, 4])
def test_truncated_file(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "step-00000010.safetensors"
    _write_good(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if cut < 1 else int(cut)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, os.urandom(256), b"\xff" * 8 + b"{}"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_foreign_safetensors_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError, match=re.escape(str(plain))):
        load_checkpoint(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"mtml": json.dumps({"format": "someone-else-2"})})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(other)
    assert str(other) in str(info.value) and "not an mtml checkpoint" in str(info.value)
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(3)}, str(odd), metadata={"mtml": "[1, 2]"})
    with pytest.raises(CheckpointError, match=re.escape(str(odd))):
        load_checkpoint(odd)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_restore_into_another_architecture_names_the_module(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _write_good(path)
    with pytest.raises(CheckpointError, match="module 'model'"):
        restore(load_checkpoint(path), modules={"model": nn.Linear(4, 2)})
