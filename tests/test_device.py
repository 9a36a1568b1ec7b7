"""The device-relevant paths, run on ``MTML_TEST_DEVICE`` (default ``cpu``) and compared with the CPU.

Run on a GPU with ``MTML_TEST_DEVICE=cuda pytest tests/test_device.py``. On the CPU (what CI has) each test
still runs its path end to end, and the comparison is against a second CPU run. Covered: joint training with a
loss weighting, a Gramian method and a Jacobian method; second-order MAML on a Conv-4 episode (the task loop)
and ProtoNets / ridge on an MLP (vmap); bf16 autocast; a checkpoint written on the device and loaded on the CPU;
``mtml.workflows.train`` with ``device:`` from a config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtml.config import Config
from mtml.datasets import synthetic_linear
from mtml.engine import StopRule, load_checkpoint, train_multitask
from mtml.meta import ALGORITHMS, Episode
from mtml.nn import BACKBONES, MultiTaskModel, build_multitask_model
from mtml.tasks import Split, Task
from mtml.workflows import evaluate_run, train

CPU = torch.device("cpu")


def _tasks() -> list[Task]:
    return synthetic_linear(num_tasks=3, in_dim=8, latent_dim=2, n_train=32, n_val=16, n_test=16, seed=0)


def _trained(device: torch.device, weighting: str, precision: str = "fp32") -> tuple[MultiTaskModel, float]:
    tasks = _tasks()
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(16,))
    result = train_multitask(model, tasks, weighting=weighting, lr=1e-2, batch_size=16, seed=0, device=device,
                             stop=StopRule(max_steps=30, eval_every=10, patience=0), precision=precision)
    return model.to(CPU), float(result.fit.best_objective)


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad", "nash_mtl", "graddrop"])
def test_joint_training_on_the_device_follows_the_cpu(test_device: torch.device, weighting: str) -> None:
    on_device, objective = _trained(test_device, weighting)
    on_cpu, cpu_objective = _trained(CPU, weighting)
    assert objective == pytest.approx(cpu_objective, rel=1e-3)
    for (name, a), (_, b) in zip(on_device.state_dict().items(), on_cpu.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_bf16_autocast_stays_near_fp32(test_device: torch.device) -> None:
    _, fp32 = _trained(test_device, "equal")
    _, bf16 = _trained(test_device, "equal", precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=0.05)


def _conv_episode(device: torch.device, tasks: int = 2, ways: int = 3) -> Episode:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(tasks, ways, 1, 28, 28, generator=g)
    xq = torch.randn(tasks, 2 * ways, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat(tasks, 1)
    yq = torch.arange(ways).repeat(tasks, 2)
    return Episode(Split(xs.to(device), ys.to(device)), Split(xq.to(device), yq.to(device)), ways=ways)


def _conv_model(ways: int = 3) -> MultiTaskModel:
    torch.manual_seed(0)
    trunk = BACKBONES.create("conv4", (1, 28, 28), width=8, groups=2)
    with torch.no_grad():
        width = trunk(torch.zeros(1, 1, 28, 28)).shape[-1]
    return MultiTaskModel(trunk, {"task": nn.Linear(width, ways)})


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "ridge"])
def test_meta_gradients_on_the_device_equal_the_cpus(test_device: torch.device, algorithm: str) -> None:
    grads = []
    for device in (test_device, CPU):
        model = _conv_model().to(device)
        options = {"inner_lr": 0.4, "inner_steps": 1} if algorithm == "maml" else {}
        method = ALGORITHMS.create(algorithm, model, **options).to(device)
        out = method.meta_objective(model, _conv_episode(device))
        out.objective.backward()
        grads.append([p.grad.to(CPU) if p.grad is not None else torch.zeros_like(p, device=CPU)
                      for p in model.parameters()])
    scale = max(float(g.abs().max()) for g in grads[1])
    assert scale > 0
    for a, b in zip(*grads, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * scale


def test_a_run_trained_on_the_device_is_read_back_on_the_cpu(test_device: torch.device, tmp_path: Path) -> None:
    config = Config.from_dict({
        "name": "device", "seed": 0, "device": str(test_device),
        "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 6, "latent_dim": 2, "n_train": 20,
                                                     "n_val": 10, "n_test": 10}},
        "model": {"trunk_hidden": [8]},
        "training": {"lr": 0.01, "batch_size": 10, "max_steps": 20, "eval_every": 10, "patience": 0},
    })
    run, result = train(config, tmp_path / "run")
    ckpt = load_checkpoint(run.best_checkpoint)  # tensors come back on the CPU whatever they were saved from
    assert ckpt.module_state("model") and all(t.device == CPU for t in ckpt.tensors.values())
    again = evaluate_run(run.path, "test")
    for task, metrics in result.test.items():
        assert again[task]["loss"] == pytest.approx(metrics["loss"], rel=1e-4)
