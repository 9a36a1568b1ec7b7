"""Mixed precision: ``training.precision: bf16`` runs steps and evaluations under bfloat16 autocast, ``fp16``
under float16 autocast with a gradient scaler (:class:`mtml.engine.LossScaler`, applied by the Updater)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import mtml.engine._precision as precision_module
import mtml.engine._trainer as trainer
import mtml.workflows._meta as meta_workflow
from mtml.config import Config
from mtml.engine import LossScaler, LRSchedule, Run, Updater, autocast, check_precision, load_checkpoint
from mtml.errors import ConfigError, DivergedError
from mtml.meta import ALGORITHMS, Episode
from mtml.nn import MultiTaskModel, build_backbone, feature_dim
from mtml.tasks import Split
from mtml.weighting import WEIGHTINGS
from mtml.workflows import resume_run, train


@pytest.mark.parametrize(("precision", "device", "match"), [
    ("fp8", "cpu", r"must be one of fp32, bf16, fp16\. Got 'fp8'"),
    ("bf16", "meta", r"bf16 autocast runs on cpu and cuda, not meta; use fp32"),
    ("fp16", "meta", r"fp16 autocast runs on cpu and cuda, not meta; use fp32"),
])
def test_unsupported_precisions_are_refused_with_the_fix(precision: str, device: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        check_precision(precision, device)
    assert len(str(info.value).splitlines()) == 1


def test_bf16_on_a_gpu_without_bfloat16_is_refused_naming_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match=r"bf16 needs a GPU with bfloat16 arithmetic .* Tesla V100-SXM2-16GB has "
                                          r"none; use fp16 \(with its gradient scaler\) or fp32") as info:
        check_precision("bf16", "cuda")
    assert len(str(info.value).splitlines()) == 1
    check_precision("fp16", "cuda")  # float16 runs on that GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    check_precision("bf16", "cuda")


X86_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
X86_SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_tile amx_bf16\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_V1 = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp sve bf16 i8mm\n"  # Neoverse V1
ARM_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(("cpuinfo", "bf16", "fp16"), [
    (X86_ZEN4, True, False), (X86_SAPPHIRE, True, True), (X86_AVX2, False, False), (ARM_V1, True, True),
    (ARM_A72, False, False), ("", None, None),
])
def test_native_arithmetic_is_read_off_the_cpu_flags(cpuinfo: str, bf16: bool | None, fp16: bool | None) -> None:
    assert precision_module.cpu_flags_say("bf16", cpuinfo) is bf16
    assert precision_module.cpu_flags_say("fp16", cpuinfo) is fp16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_precision_emulated_on_this_cpu_warns_once_and_runs(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """An emulated format computes the same as a native one, several times slower than fp32: a warning, not a
    refusal (a config made on one machine still runs on another)."""
    precision_module._warn_emulated.cache_clear()
    monkeypatch.setattr(precision_module, "_cpuinfo", lambda: X86_AVX2)
    with pytest.warns(RuntimeWarning, match=rf"{precision} on this CPU is emulated: it has no {precision} "
                                            rf"arithmetic .* torch's CPU capability is \w+\), so {precision} runs "
                                            r"several times slower than fp32 here .*; use fp32\.$"):
        check_precision(precision, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision(precision, "cpu")  # once per process: autocast() checks at every step
        with autocast(precision, "cpu"):
            pass
        check_precision("fp32", "cpu")
    precision_module._warn_emulated.cache_clear()
    for cpuinfo in (X86_SAPPHIRE, ""):  # native, or the system does not say: nothing to warn of
        monkeypatch.setattr(precision_module, "_cpuinfo", lambda cpuinfo=cpuinfo: cpuinfo)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_precision(precision, "cpu")
    precision_module._warn_emulated.cache_clear()


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "graddrop"])
def test_fp16_is_refused_with_a_weighting_that_takes_per_task_gradients(tmp_path: Path, name: str) -> None:
    """Their per-task gradients come from backward passes of the unscaled losses: they would underflow."""
    with pytest.raises(ConfigError, match=r"fp16 cannot run with weighting '\w+': it takes per-task gradients, "
                                          r"which are computed without the loss scale .* use bf16") as info:
        check_precision("fp16", "cpu", WEIGHTINGS.create(name, ["a", "b"]))
    assert len(str(info.value).splitlines()) == 1
    check_precision("bf16", "cpu", WEIGHTINGS.create(name, ["a", "b"]))
    config = Config.from_dict({**_JOINT, "training": {**_JOINT["training"], "weighting": name,
                                                      "precision": "fp16"}})
    with pytest.raises(ConfigError, match="fp16 cannot run with weighting"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("name", ["equal", "uncertainty", "dwa"])
def test_fp16_runs_with_loss_based_weightings(name: str) -> None:
    check_precision("fp16", "cpu", WEIGHTINGS.create(name, ["a", "b"]))


def test_fp32_is_no_autocast_and_bf16_and_fp16_are() -> None:
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(precision, "cpu"):
            assert torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def _conv_case() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    trunk = build_backbone("conv4", (1, 28, 28), {"width": 64, "groups": 8})
    model = MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), 3)})
    g = torch.Generator().manual_seed(1)
    episode = Episode(Split(torch.randn(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1)),
                      Split(torch.randn(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 2)), ways=3)
    return model, episode


def _mlp_case() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    g = torch.Generator().manual_seed(1)
    support, query = (Split(torch.randn(25, 5, 1, generator=g), torch.randn(25, 5, 1, generator=g))
                      for _ in range(2))
    episode = Episode(support, query)
    return model, episode


#: (cosine >, relative error <) of the bf16 meta-gradient against float32's; measured on these cases
#: (3 Dec 2026, MAML / FOMAML / Reptile): Conv-4 width 64, one inner step at lr 0.1: cosine 0.996 / 0.992 /
#: 0.997, relative error 0.09 / 0.13 / 0.08; MLP 1-40-40-1, two steps at lr 0.01: cosine 0.998 / 0.998 / 1.000,
#: relative error 0.06 / 0.06 / 0.006
TOLERANCE = {"conv": (0.98, 0.25), "mlp": (0.99, 0.1)}


@pytest.mark.parametrize("case", ["conv", "mlp"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_bf16_meta_gradient_is_close_to_fp32(case: str, name: str) -> None:
    """bfloat16 keeps 8 significant bits, and the inner loop compounds the rounding: the meta-gradient points
    the same way as float32's and stays within a stated relative error (:data:`TOLERANCE`)."""
    model, episode = _conv_case() if case == "conv" else _mlp_case()
    lr, steps = (0.1, 1) if case == "conv" else (0.01, 2)
    algorithm = ALGORITHMS.create(name, model, inner_lr=lr, inner_steps=steps)
    params = list(model.parameters())
    full = torch.cat([g.flatten() for g in torch.autograd.grad(algorithm.meta_objective(model, episode).objective,
                                                               params)])
    with autocast("bf16", "cpu"):
        objective = algorithm.meta_objective(model, episode).objective
    half = torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])
    assert half.dtype == torch.float32  # parameters (and so their gradients) stay float32
    assert not torch.equal(half, full)  # bf16 really ran
    cosine, relative = TOLERANCE[case]
    assert float(torch.nn.functional.cosine_similarity(full, half, 0)) > cosine
    assert float((full - half).norm() / full.norm()) < relative


#: (cosine >, relative error <) of the fp16 meta-gradient against float32's, the loss scaled as a run scales it
#: (2^16, halved until the gradient is finite); measured on the cases above (4 Dec 2026, MAML / FOMAML /
#: Reptile): Conv-4: cosine 0.996 / 0.996 / 0.999, relative error 0.088 / 0.091 / 0.037 (the scale backed off to
#: 2^13 for MAML, 2^15 for FOMAML); MLP: cosine 0.998 / 0.998 / 1.000, relative error 0.057 / 0.058 / 0.0002. Both
#: are dominated by ReLU and max-pool decisions that flip (one plain query-loss gradient of the Conv-4: 0.030 in
#: fp16, 0.117 in bf16; of the MLP: 0.0009 in fp16, 0.052 in bf16), not by float16's 11 bits.
TOLERANCE_FP16 = {"conv": (0.99, 0.15), "mlp": (0.995, 0.08)}


@pytest.mark.parametrize("case", ["conv", "mlp"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_fp16_meta_gradient_with_the_loss_scale_is_close_to_fp32(case: str, name: str) -> None:
    """float16 keeps 11 significant bits but only 5 exponent bits: the meta-gradient of the scaled objective,
    unscaled, points the same way as float32's and stays within :data:`TOLERANCE_FP16`."""
    model, episode = _conv_case() if case == "conv" else _mlp_case()
    lr, steps = (0.1, 1) if case == "conv" else (0.01, 2)
    algorithm = ALGORITHMS.create(name, model, inner_lr=lr, inner_steps=steps)
    params = list(model.parameters())
    full = torch.cat([g.flatten() for g in torch.autograd.grad(algorithm.meta_objective(model, episode).objective,
                                                               params)])
    scale = 2.0 ** 16
    while True:  # as the scaler does: halve the scale until the scaled gradient is finite
        with autocast("fp16", "cpu"):
            objective = algorithm.meta_objective(model, episode).objective
        grads = torch.autograd.grad(objective * scale, params)
        if all(bool(torch.isfinite(g).all()) for g in grads):
            break
        scale /= 2
        assert scale >= 2 ** 10, "the fp16 gradient overflows at any reasonable scale"
    half = torch.cat([g.flatten() for g in grads]) / scale
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # float32 parameters; fp16 really ran
    measured = (float(torch.nn.functional.cosine_similarity(full, half, 0)), float((full - half).norm() / full.norm()))
    print(f"fp16 {case} {name}: cosine {measured[0]:.4f}, relative error {measured[1]:.4f}, scale {scale:g}")  # -s
    cosine, relative = TOLERANCE_FP16[case]
    assert measured[0] > cosine and measured[1] < relative


# -- the scaler in the Updater -------------------------------------------------------------------------------
def _tiny_loss_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Linear(16, 16)
    g = torch.Generator().manual_seed(4)
    return model, torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def _tiny_micro(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scaler: LossScaler | None,
                factor: float = 1e-8) -> Callable[[torch.optim.Optimizer], dict[str, Any]]:
    def micro(opt: torch.optim.Optimizer) -> dict[str, Any]:
        opt.zero_grad(set_to_none=True)
        with autocast("fp16", "cpu"):
            loss = nn.functional.mse_loss(model(x), y) * factor
        (loss if scaler is None else scaler.grad_scaler.scale(loss)).backward()
        opt.step()
        return {"loss": float(loss.detach())}
    return micro


def test_the_loss_scale_keeps_gradients_that_underflow_in_fp16() -> None:
    """A loss of ~1e-8: its gradient enters float16 (smallest subnormal 6e-8) as zeros unless scaled; with the
    Updater's scaler the update matches float32's."""
    model, x, y = _tiny_loss_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = torch.autograd.grad(nn.functional.mse_loss(model(x), y) * 1e-8, model.weight)[0]
    opt = torch.optim.SGD(model.parameters(), lr=1e8)  # (a step of ~1e-2: not lost to float32 rounding)
    Updater(opt, max_steps=10).step(_tiny_micro(model, x, y, None))
    assert torch.equal(model.weight, start["weight"])  # no scaler: every weight gradient underflowed to 0
    model.load_state_dict(start)
    scaler = LossScaler("cpu")
    info = Updater(opt, max_steps=10, scaler=scaler).step(_tiny_micro(model, x, y, scaler))
    step = (start["weight"] - model.weight.detach()) / 1e8
    assert info["loss_scale"] == 2.0 ** 16 and info["skipped_updates"] == 0
    assert float((step - reference).norm() / reference.norm()) < 2e-3  # float16 rounding only


def test_an_overflowing_update_is_skipped_the_scale_backs_off_and_grows_again() -> None:
    """One micro-batch of two with an inf loss: the whole update is skipped (parameters and Adam state as they
    were), the scale halves, the schedule still moves, and after growth_interval clean updates it doubles; clipping
    and the logged grad_norm see the unscaled gradient."""
    model, x, y = _tiny_loss_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    scaler = LossScaler("cpu", growth_interval=2)
    updater = Updater(opt, max_steps=10, scaler=scaler, accumulate=2, grad_clip=1e-9,
                      schedule=LRSchedule("cosine"))
    batches = iter([(x, y), (x, y), (x, y), (x * float("inf"), y), (x, y), (x, y), (x, y), (x, y)])

    def micro(o: torch.optim.Optimizer) -> dict[str, Any]:
        bx, by = next(batches)
        o.zero_grad(set_to_none=True)
        with autocast("fp16", "cpu"):
            loss = nn.functional.mse_loss(model(bx), by)
        scaler.grad_scaler.scale(loss).backward()
        o.step()
        return {"loss": float(loss.detach())}

    true_norm = float(torch.autograd.grad(nn.functional.mse_loss(model(x), y), model.weight)[0].norm())
    first = updater.step(micro)
    assert first["loss_scale"] == 2.0 ** 16 and first["skipped_updates"] == 0
    assert first["grad_norm"] == pytest.approx(true_norm, rel=0.05)  # unscaled before clipping (bias adds a bit)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    lr = updater.lr
    second = updater.step(micro)  # its second micro-batch is inf
    assert second["loss_scale"] == 2.0 ** 16 and second["skipped_updates"] == 1 and second["lr"] == lr
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert all(torch.equal(v, opt.state_dict()["state"][i][k]) for i, s in adam.items() for k, v in s.items())
    assert float(scaler.scale) == 2.0 ** 15 and updater.lr < lr  # backed off; the schedule moved on
    third, fourth = updater.step(micro), updater.step(micro)
    assert third["loss_scale"] == fourth["loss_scale"] == 2.0 ** 15 and fourth["skipped_updates"] == 1
    assert float(scaler.scale) == 2.0 ** 16  # two clean updates in a row: grown back
    assert not torch.equal(model.weight, params["weight"])


def test_a_gradient_not_finite_even_unscaled_is_divergence() -> None:
    model, x, y = _tiny_loss_problem()
    scaler = LossScaler("cpu", init_scale=4.0)
    updater = Updater(torch.optim.SGD(model.parameters(), lr=0.1), max_steps=10, scaler=scaler)
    micro = _tiny_micro(model, x * float("nan"), y, scaler)
    assert updater.step(micro)["skipped_updates"] == 1 and updater.step(micro)["skipped_updates"] == 2
    with pytest.raises(DivergedError, match=r"fp16: the gradient held NaN or inf even at loss scale 1 \(3 updates "
                                            r"skipped so far\), so it is not finite unscaled") as info:
        updater.step(micro)
    assert len(str(info.value).splitlines()) == 1


def test_the_scaler_state_round_trips_through_its_buffers() -> None:
    scaler = LossScaler("cpu", growth_interval=7)
    scaler.grad_scaler.scale(torch.ones(()))  # (the torch scaler makes its tensors on first use)
    with torch.no_grad():
        scaler.scale.fill_(1024.0)
        scaler.growth_tracker.fill_(5)
        scaler.skipped.fill_(3)
    state = {k: v.clone() for k, v in scaler.state_dict().items()}
    other = LossScaler("cpu", growth_interval=7)
    other.load_state_dict(state)
    assert other.grad_scaler.get_scale() == 1024.0 and other.grad_scaler.state_dict()["_growth_tracker"] == 5
    assert int(other.skipped) == 3 and other.log() == {"loss_scale": 1024.0, "skipped_updates": 3}


# -- runs --------------------------------------------------------------------------------------------------
def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[torch.dtype | None]:
    seen: list[torch.dtype | None] = []
    original = getattr(module, name)

    def spied(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return seen


_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_meta_run_steps_and_evaluates_under_the_configured_precision(
        tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _spy(monkeypatch, meta_workflow, "sharded_meta_step")
    scores = _spy(monkeypatch, meta_workflow, "meta_evaluate")
    config = Config.from_dict({
        "threads": 1, "data": {"dataset": "sinusoid", "options": {"shots": 3, "query_shots": 4, "meta_batch": 4}},
        "model": {"trunk_hidden": [8, 8]},
        "training": {"algorithm": "maml", "max_steps": 4, "eval_every": 2, "meta_val_tasks": 4,
                     "meta_test_tasks": 4, "precision": precision},
    })
    run, _ = train(config, tmp_path / "run")
    assert steps and scores and set(steps + scores) == {_DTYPE[precision]}
    test = next(iter(run.summary()["test"].values()))
    assert torch.isfinite(torch.tensor(test["loss@1"]))
    logged = [r for r in run.records() if r["kind"] == "train"]
    assert all(("loss_scale" in r) == (precision == "fp16") for r in logged)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_joint_run_steps_and_evaluates_under_the_configured_precision(
        tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _spy(monkeypatch, trainer, "sharded_joint_step")
    scores = _spy(monkeypatch, trainer, "evaluate")
    config = Config.from_dict({
        "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 4, "latent_dim": 2, "n_train": 8,
                                                     "n_val": 5, "n_test": 5}},
        "model": {"trunk_hidden": [4]},
        "training": {"max_steps": 4, "eval_every": 2, "precision": precision},
    })
    _, result = train(config, tmp_path / "run")
    assert steps and scores and set(steps + scores) == {_DTYPE[precision]}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.test.values())


_JOINT: dict[str, Any] = {
    "name": "fp16-joint", "seed": 4, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 3, "n_train": 40,
                                                 "n_val": 15, "n_test": 15}},
    "model": {"trunk_hidden": [12]},
    "training": {"weighting": "uncertainty", "lr": 0.02, "batch_size": 8, "max_steps": 24, "eval_every": 4,
                 "patience": 0, "keep_checkpoints": 10, "precision": "fp16", "accumulate": 2, "grad_clip": 0.5,
                 "scheduler": {"name": "cosine", "warmup": 3}},
}
_META: dict[str, Any] = {
    "name": "fp16-meta", "seed": 5, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 5, "meta_batch": 4}},
    "model": {"trunk_hidden": [16, 16]},
    "training": {"algorithm": "maml", "algorithm_options": {"inner_lr": 0.01, "inner_steps": 1}, "lr": 0.003,
                 "max_steps": 24, "eval_every": 4, "patience": 0, "meta_val_tasks": 10, "meta_test_tasks": 10,
                 "keep_checkpoints": 10, "precision": "fp16", "grad_clip": 1.0},
}


def _cut(path: Path, step: int) -> None:
    """Make a finished run look killed right after its checkpoint at ``step``."""
    for ckpt in (path / "checkpoints").glob("step-*.safetensors"):
        if int(ckpt.stem.split("-")[1]) > step:
            ckpt.unlink()
    lines = (path / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step and json.loads(line)["kind"] != "done"]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    Run.open(path).set_status("running")


def _assert_bit_identical(a: Path, b: Path, name: str) -> dict[str, torch.Tensor]:
    ca, cb = load_checkpoint(a / "checkpoints" / name), load_checkpoint(b / "checkpoints" / name)
    assert ca.tensors.keys() == cb.tensors.keys()
    for key, value in ca.tensors.items():
        assert torch.equal(value, cb.tensors[key]), key
    assert ca.meta["updates"] == cb.meta["updates"]
    return ca.tensors


@pytest.mark.parametrize("base", [_JOINT, _META], ids=["joint", "maml"])
def test_a_resumed_fp16_run_skips_and_scales_as_an_uninterrupted_one(
        tmp_path: Path, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A scaler that starts too high (2^20) and grows every 3 clean updates overflows again and again: skipped
    updates on both sides of the cut, and the resumed run still ends bit-identical, scaler state included. A
    skipped update is no divergence: the run completes with finite checkpoints."""
    eager = functools.partial(LossScaler, init_scale=2.0 ** 20, growth_interval=3)
    monkeypatch.setattr(trainer, "LossScaler", eager)
    monkeypatch.setattr(meta_workflow, "LossScaler", eager)
    config = Config.from_dict(base)
    full, _ = train(config, tmp_path / "full")
    cut, _ = train(config, tmp_path / "cut")
    _cut(cut.path, 12)
    at_cut = load_checkpoint(cut.path / "checkpoints" / "step-00000012.safetensors").tensors
    resume_run(cut.path)
    end = _assert_bit_identical(full.path, cut.path, "step-00000024.safetensors")
    assert 0 < int(at_cut["grad_scaler.skipped"]) < int(end["grad_scaler.skipped"])  # skips before and after
    assert float(at_cut["grad_scaler.scale"]) != 2.0 ** 20  # the state that travelled mattered
    assert json.loads((cut.path / "run.json").read_text())["status"] == "completed"
    logged = [r for r in full.records() if r["kind"] == "train"]
    assert logged[0]["loss_scale"] == 2.0 ** 20 and len({r["loss_scale"] for r in logged}) > 1


def _mtml(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_fp16_joint_run_end_to_end_and_resume_bit_exact(tmp_path: Path) -> None:
    cfg = tmp_path / "fp16.yaml"
    cfg.write_text(yaml.safe_dump(_JOINT, sort_keys=False))
    for name in ("full", "cut"):
        proc = _mtml("train", cfg, "--out", tmp_path / name, "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert "test metrics" in proc.stdout
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 24
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in summary["test"].values())
    _cut(tmp_path / "cut", 12)
    proc = _mtml("train", "--resume", tmp_path / "cut", "--quiet")
    assert proc.returncode == 0, proc.stderr
    end = _assert_bit_identical(tmp_path / "full", tmp_path / "cut", "step-00000024.safetensors")
    assert {"grad_scaler.scale", "grad_scaler.growth_tracker", "grad_scaler.skipped"} <= set(end)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 1 for r in records if r["kind"] == "train")


@pytest.mark.parametrize("base", [_JOINT, _META], ids=["joint", "maml"])
def test_fp16_on_two_ranks_skips_and_scales_as_one_process(tmp_path: Path, base: dict[str, Any]) -> None:
    """The sharded steps back-propagate the scaled loss; the all-reduced gradient holds a NaN/inf on every rank
    when it does on one, so the ranks skip the same updates and keep the same scale as one process."""
    cfg = tmp_path / "fp16.yaml"
    cfg.write_text(yaml.safe_dump(base, sort_keys=False))
    proc = _mtml("train", cfg, "--nproc", "2", "--out", tmp_path / "two", "--quiet")
    assert proc.returncode == 0, proc.stderr
    train(Config.from_dict(base), tmp_path / "one")
    last = "step-00000024.safetensors"
    one, two = (load_checkpoint(tmp_path / d / "checkpoints" / last).tensors for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in ("grad_scaler.scale", "grad_scaler.growth_tracker", "grad_scaler.skipped"):
        assert torch.equal(one[key], two[key]), key
    assert int(one["grad_scaler.skipped"]) >= 1  # (these configs overflow at the initial scale 2^16)
    for key, value in one.items():  # summation order differs: float16 rounding, measured below 0.5%
        if key.startswith("model.") and value.is_floating_point():
            assert float((value - two[key]).abs().max() / value.abs().max().clamp_min(1e-12)) < 0.02, key
