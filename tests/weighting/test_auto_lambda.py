"""Auto-Lambda (Liu et al., TMLR 2022): the look-ahead hypergradient against exact autograd, the trainer's
validation batches, exact resume, option errors and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

import mtml.engine._trainer as trainer_module
from mtml.datasets import synthetic_linear
from mtml.engine import Run, StopRule, joint_step, load_checkpoint, train_multitask
from mtml.errors import ConfigError
from mtml.nn import build_multitask_model
from mtml.tasks import Task
from mtml.weighting import WEIGHTINGS, AutoLambda, BilevelWeighting, Equal

ROOT = Path(__file__).resolve().parents[2]


def test_registered_as_a_bilevel_weighting() -> None:
    w = WEIGHTINGS.create("auto_lambda", ["a", "b"])
    assert isinstance(w, AutoLambda) and isinstance(w, BilevelWeighting) and w.needs_validation
    assert not w.needs_gramian and not w.needs_jacobian
    torch.testing.assert_close(w(torch.tensor([3.0, 0.5])), torch.tensor([0.1, 0.1]))  # the paper's init


# -- the hypergradient against a hand-written float64 look-ahead -----------------------------------------------
class _Tiny(nn.Module):
    """A tanh trunk with one linear head per task, and a buffer counting forward passes."""

    calls: Tensor

    def __init__(self, m: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.7)
        self.heads = nn.Parameter(torch.randn(m, 6, generator=g, dtype=torch.float64) * 0.7)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))


def _losses(trunk: Tensor, heads: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``[m]`` mean squared errors of every task on shared rows ``x [n, 4]``, ``y [n, m]``."""
    x, y = batch
    return ((torch.tanh(x @ trunk.T) @ heads.T - y) ** 2).mean(0)


def _exact(model: _Tiny, lam: Tensor, mask: Tensor, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
           lr: float) -> Tensor:
    """d/dλ of Σ_{i∈P} Lᵢ(θ − lr·∇θ Σ λⱼ Lⱼ(θ; train); val) by autograd through the virtual step."""
    lam = lam.clone().requires_grad_(True)
    theta = [model.trunk.detach().clone().requires_grad_(True), model.heads.detach().clone().requires_grad_(True)]
    grads = torch.autograd.grad((lam * _losses(*theta, train)).sum(), theta, create_graph=True)
    ahead = [p - lr * g for p, g in zip(theta, grads, strict=True)]
    (out,) = torch.autograd.grad((mask * _losses(*ahead, val)).sum(), lam)
    return out


def _data(m: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, m, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("m", "primary", "lr"), [(3, None, 0.1), (3, ["t1"], 0.3), (5, ["t0", "t3"], 0.05)])
def test_hypergradient_equals_the_exact_look_ahead_within_the_finite_difference_error(
        m: int, primary: list[str] | None, lr: float) -> None:
    """The central difference along ``d`` with ‖εd‖ = 0.01 has error O(‖εd‖²): measured on these cases, at
    most 1.3e-4 of a component and 9.6e-5 of the largest one; the tolerance is rtol 1e-3 (atol 1e-9) per component
    and 2e-4 of the largest, while a wrong sign, factor or step fails by O(1)."""
    model = _Tiny(m, seed=m)
    w = AutoLambda([f"t{i}" for i in range(m)], primary=primary, init=0.3)
    w.lambdas.copy_(torch.linspace(0.1, 0.9, m, dtype=torch.float64))  # unequal weights: the order matters
    train, val = _data(m, 24, seed=1), _data(m, 17, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    passes: list[int] = []

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        model.calls += 1
        passes.append(batch[0].shape[0])
        return _losses(model.trunk, model.heads, batch)

    got = w.hypergradient(model, train, val, loss_fn, lr)
    mask = torch.tensor([float(primary is None or f"t{i}" in primary) for i in range(m)], dtype=torch.float64)
    exact = _exact(model, w.lambdas, mask, train, val, lr)
    assert exact.abs().min() > 1e-6  # a non-trivial case
    torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-9)
    assert float((got - exact).abs().max()) < 2e-4 * float(exact.abs().max())  # the error is second order
    for key, value in model.state_dict().items():  # parameters and buffers (the call counter) restored exactly
        assert torch.equal(value, before[key]), key
    assert int(model.calls) == 0 and passes == [24, 17, 24, 24]  # train, val at θ', train at θ ± εd


def test_update_is_one_adam_step_along_the_hypergradient() -> None:
    m, lr, meta_lr = 3, 0.2, 1e-2
    model = _Tiny(m, seed=0)
    w = AutoLambda(["a", "b", "c"], lr=meta_lr)
    train, val = _data(m, 20, seed=3), _data(m, 20, seed=4)
    loss_fn = lambda b: _losses(model.trunk, model.heads, b)  # noqa: E731
    lam0 = w.lambdas.clone()
    g1 = w.hypergradient(model, train, val, loss_fn, lr)
    w.update(model, train, val, loss_fn, lr)
    # Adam's first step moves every coordinate by lr·g/(|g| + eps): by meta_lr against the sign of g
    torch.testing.assert_close(w.lambdas, lam0 - meta_lr * g1 / (g1.abs() + 1e-8), rtol=0, atol=1e-12)
    g2 = w.hypergradient(model, train, val, loss_fn, lr)
    w.update(model, train, val, loss_fn, lr)
    ref = nn.Parameter(lam0.clone())
    opt = torch.optim.Adam([ref], lr=meta_lr)
    for g in (g1, g2):
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.lambdas, ref.detach(), rtol=0, atol=1e-12)
    assert int(w.adam.steps) == 2


def test_zero_validation_gradient_leaves_lambda_unchanged() -> None:
    model = _Tiny(2, seed=0)
    w = AutoLambda(["a", "b"])
    x, _ = _data(2, 10, seed=0)
    pred = torch.tanh(x @ model.trunk.T) @ model.heads.T
    lam0 = w.lambdas.clone()
    w.update(model, (x, torch.randn(10, 2, dtype=torch.float64)), (x, pred.detach()),
             lambda b: _losses(model.trunk, model.heads, b), 0.0)  # lr 0: θ' = θ, a perfect fit on val: d = 0
    assert torch.equal(w.lambdas, lam0)


# -- the engine ------------------------------------------------------------------------------------------------
def _tasks() -> list[Task]:
    return synthetic_linear(num_tasks=3, in_dim=8, latent_dim=2, n_train=30, n_val=25, n_test=20, seed=4)


def _rows_of(x: Tensor, table: Tensor) -> bool:
    """Every row of ``x`` is a row of ``table``."""
    return bool((x[:, None, :] == table[None]).all(-1).any(1).all())


def test_joint_step_with_a_val_batch_updates_lambda_first_then_steps_with_it(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    tasks = _tasks()
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(6,), activation="tanh").double()
    names = [t.name for t in tasks]
    batch = {t.name: (t.train.x.double(), t.train.y.double()) for t in tasks}
    val = {t.name: (t.val.x.double(), t.val.y.double()) for t in tasks}
    w = AutoLambda(names, lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = joint_step(model, {t.name: t for t in tasks}, batch, w, opt, val_batch=val)
    assert int(w.adam.steps) == 1 and not torch.equal(w.lambdas, torch.full((3,), 0.1, dtype=torch.float64))
    assert list(out.weights.values()) == w.lambdas.tolist()  # the step used the updated λ
    with pytest.raises(TypeError, match="BilevelWeighting"):
        joint_step(model, {t.name: t for t in tasks}, batch, Equal(names), opt, val_batch=val)


@pytest.mark.parametrize(("update_every", "accumulate", "expected"), [(1, 1, 10), (3, 1, 4), (3, 2, 4)])
def test_train_multitask_updates_every_k_steps_from_val_rows_never_test_rows(
        update_every: int, accumulate: int, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks()
    by_name = {t.name: t for t in tasks}
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []
    real = AutoLambda.update

    def spy(self: AutoLambda, model: nn.Module, train: Any, val: Any, loss_fn: Any, lr: float) -> None:
        seen.append((dict(train), dict(val)))
        real(self, model, train, val, loss_fn, lr)

    monkeypatch.setattr(AutoLambda, "update", spy)
    torch.manual_seed(1)
    model = build_multitask_model(tasks, trunk_hidden=(6,), activation="tanh")
    w = AutoLambda([t.name for t in tasks], update_every=update_every, lr=1e-2)
    result = train_multitask(model, tasks, weighting=w, lr=1e-2, batch_size=8, accumulate=accumulate,
                             stop=StopRule(max_steps=10, eval_every=5, patience=0), seed=0)
    assert result.fit.steps == 10 and len(seen) == expected  # steps 1, 4, 7, 10 for k = 3
    for train, val in seen:
        for name, task in by_name.items():
            assert val[name][0].shape[0] == 8 and _rows_of(val[name][0], task.val.x)
            assert not _rows_of(val[name][0][:1], task.test.x) and not _rows_of(val[name][0][:1], task.train.x)
            assert _rows_of(train[name][0], task.train.x)
    assert len({tuple(v[tasks[0].name][1].flatten().tolist()) for _, v in seen}) == len(seen)  # fresh draws
    assert int(w.steps) == 10


def _train(tmp: Path, max_steps: int, resume: bool = False) -> tuple[dict[str, Tensor], Tensor, list[Any]]:
    tasks = _tasks()
    torch.manual_seed(11 if resume else 7)  # a resumed model must not depend on its fresh initialisation
    model = build_multitask_model(tasks, trunk_hidden=(6,), activation="tanh")
    w = AutoLambda([t.name for t in tasks], update_every=2, lr=3e-2)
    run = Run.open(tmp) if resume else Run.create(tmp, {})
    train_multitask(model, tasks, weighting=w, lr=3e-2, batch_size=8,
                    stop=StopRule(max_steps=max_steps, eval_every=5, patience=0), seed=5, run=run, resume=resume)
    weights = [r["weights"] for r in Run.open(tmp).records() if r["kind"] == "train"]
    return {k: v.clone() for k, v in model.state_dict().items()}, w.lambdas.clone(), weights


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    """λ, its Adam moments, the step counter and the validation generator travel in the checkpoint."""
    full, full_lam, full_weights = _train(tmp_path / "full", 14)
    _train(tmp_path / "cut", 7)  # the last checkpoint is at step 5: steps 6-14 are redone
    resumed, lam, weights = _train(tmp_path / "cut", 14, resume=True)
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key
    assert torch.equal(lam, full_lam) and not torch.equal(lam, torch.full((3,), 0.1, dtype=torch.float64))
    assert weights[-1] == full_weights[-1]
    ckpt = load_checkpoint(Run.open(tmp_path / "cut").latest_checkpoint())
    assert {"rng.sampler", "rng.validation", "weighting.lambdas", "weighting.adam.exp_avg",
            "weighting.steps"} <= set(ckpt.tensors)


def test_other_weightings_keep_their_checkpoints(tmp_path: Path) -> None:
    tasks = _tasks()
    model = build_multitask_model(tasks, trunk_hidden=(6,))
    run = Run.create(tmp_path / "eq", {})
    train_multitask(model, tasks, weighting="equal", batch_size=8, stop=StopRule(max_steps=5, eval_every=5), run=run)
    ckpt = load_checkpoint(run.latest_checkpoint())
    assert "rng.sampler" in ckpt.tensors and "rng.validation" not in ckpt.tensors


# -- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "needle"), [
    ({"init": -1.0}, "`init` must be a finite number > 0. Got -1.0"),
    ({"lr": 0}, "`lr` must be a finite number > 0. Got 0"),
    ({"fd_scale": float("inf")}, "`fd_scale` must be a finite number > 0. Got inf"),
    ({"update_every": 0}, "`update_every` must be an integer >= 1"),
    ({"update_every": 1.5}, "Got 1.5"),
    ({"primary": ["nope"]}, "`primary` must be a non-empty list of task names (of a, b). Got ['nope']"),
    ({"primary": []}, "Got []"),
])
def test_bad_options_are_one_line_config_errors(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        WEIGHTINGS.create("auto_lambda", ["a", "b"], **options)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_primary_may_name_one_task() -> None:
    w = AutoLambda(["a", "b", "c"], primary="b")
    assert w.primary == ["b"] and w.primary_mask.tolist() == [0.0, 1.0, 0.0]


def test_a_process_group_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "is_distributed", lambda: True)
    tasks = _tasks()
    with pytest.raises(ConfigError, match="runs in one process only") as info:
        train_multitask(build_multitask_model(tasks), tasks, weighting="auto_lambda")
    assert "\n" not in str(info.value)


# -- the CLI ---------------------------------------------------------------------------------------------------
def test_mtml_train_on_penguins_end_to_end(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "examples/configs/penguins.yaml").read_text())
    config["training"].update({"weighting": {"name": "auto_lambda", "options": {"update_every": 2, "lr": 1e-3}},
                               "max_steps": 30, "eval_every": 10})
    path = tmp_path / "penguins.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mtml", "train", str(path), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test"]) == {"species", "body_mass"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["step"] == 30 and all(abs(v - 0.1) > 1e-4 for v in last["weights"].values())  # λ moved
    bad = tmp_path / "bad.yaml"
    config["training"]["weighting"]["options"] = {"update_every": 0}
    bad.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "mtml", "train", str(bad), "--out", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "`update_every` must be" in proc.stderr
