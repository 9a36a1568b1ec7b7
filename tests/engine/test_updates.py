"""Learning-rate schedules, gradient clipping and accumulation (:class:`mtml.engine.Updater`): oracles against
plain arithmetic and torch's own schedulers, exact resume through checkpoints, and refusals of bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mtml.config import Config
from mtml.engine import LRSchedule, Run, Updater, joint_step, load_checkpoint
from mtml.errors import ConfigError
from mtml.workflows import resume_run, train


def _linear_problem(seed: int = 0) -> tuple[torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    batches = [(torch.randn(5, 3, generator=g, dtype=torch.float64),
                torch.randn(5, 2, generator=g, dtype=torch.float64) * 4) for _ in range(3)]
    return model, batches


def _micro_over(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):  # type: ignore[no-untyped-def]
    it = iter(batches)

    def micro(opt: torch.optim.Optimizer) -> dict[str, Any]:
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "parts": {"a": float(loss.detach()) * 2}, "name": "x"}

    return micro


def _mean_loss_gradient(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    params = list(model.parameters())
    loss = torch.stack([torch.nn.functional.mse_loss(model(x), y) for x, y in batches]).mean()
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def test_accumulated_micro_batches_make_one_step_on_their_mean_loss() -> None:
    model, batches = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    grads = _mean_loss_gradient(model, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    original = opt.step
    opt.step = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    info = Updater(opt, max_steps=10, accumulate=3).step(_micro_over(model, batches))
    assert calls == [1]  # the real optimiser stepped once, after the third micro-batch
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=0, atol=1e-12)
    losses = [float(torch.nn.functional.mse_loss(torch.nn.functional.linear(x, before[0], before[1]), y))
              for x, y in batches]  # micro-batches 2 and 3 see the same (not yet updated) parameters
    assert info["loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert info["parts"]["a"] == pytest.approx(2 * sum(losses) / 3, rel=1e-12) and info["name"] == "x"
    assert info["lr"] == 0.1 and "grad_norm" not in info


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clipping_scales_the_mean_gradient_to_the_norm(clip: float) -> None:
    model, batches = _linear_problem(1)
    before = [p.detach().clone() for p in model.parameters()]
    grads = _mean_loss_gradient(model, batches[:2])
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    info = Updater(opt, max_steps=10, accumulate=2, grad_clip=clip).step(_micro_over(model, batches[:2]))
    assert info["grad_norm"] == pytest.approx(norm, rel=1e-9)
    scale = min(1.0, clip / (norm + 1e-6))  # torch's clip_grad_norm_ adds 1e-6 to the norm
    assert (scale < 1) == (clip < 1)  # the first case clips, the second does not
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.5 * scale * g, rtol=0, atol=1e-9)


def test_one_micro_batch_without_clipping_hands_the_step_function_the_optimiser_itself() -> None:
    model, batches = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[torch.optim.Optimizer] = []

    def micro(o: torch.optim.Optimizer) -> dict[str, Any]:
        seen.append(o)
        return _micro_over(model, batches)(o)

    Updater(opt, max_steps=3).step(micro)
    Updater(opt, max_steps=3, grad_clip=1.0).step(micro)
    assert seen[0] is opt and seen[1] is not opt


def _lrs(schedule: LRSchedule, steps: int, base: float = 0.2,
         objectives: dict[int, float] | None = None) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=base)
    up = Updater(opt, schedule=schedule, max_steps=steps)

    def micro(o: torch.optim.Optimizer) -> dict[str, Any]:
        o.zero_grad()
        p.sum().backward()
        o.step()
        return {"loss": 0.0}

    out = []
    for i in range(steps):
        out.append(up.step(micro)["lr"])
        if objectives and i + 1 in objectives:
            up.validated(objectives[i + 1])
    return out


def test_schedules_follow_their_closed_forms_and_torchs_schedulers() -> None:
    n, base = 40, 0.2
    p = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.SGD([p], lr=base)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=n, eta_min=0.01)
    expected = []
    for _ in range(n):
        expected.append(ref.param_groups[0]["lr"])
        ref.step()
        cos.step()
    assert _lrs(LRSchedule("cosine", min_lr=0.01), n) == pytest.approx(expected, rel=1e-9)
    ref2 = torch.optim.SGD([p], lr=base)
    step = torch.optim.lr_scheduler.StepLR(ref2, step_size=7, gamma=0.5)
    expected = []
    for _ in range(n):
        expected.append(ref2.param_groups[0]["lr"])
        ref2.step()
        step.step()
    assert _lrs(LRSchedule("step", every=7, gamma=0.5), n) == pytest.approx(expected, rel=1e-12)
    # warmup, written out: update s < w uses base·(s+1)/w, then the schedule runs over the remaining updates
    w = 5
    warm = _lrs(LRSchedule("cosine", warmup=w), n)
    plain = [base * (s + 1) / w for s in range(w)] + [
        base * 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w))) for s in range(w, n)]
    assert warm == pytest.approx(plain, rel=1e-12, abs=1e-15)
    assert _lrs(LRSchedule("constant", warmup=4), 8) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2, 0.2])
    assert _lrs(LRSchedule(), 3) == [base] * 3


def test_plateau_lowers_the_rate_after_patience_validations_without_improvement() -> None:
    # validations after updates 2, 4, ...: objective 5, 4, 4, 4, 3, 3, 3 with patience 1 → cut after the 3rd and 6th
    objectives = {2 * (i + 1): v for i, v in enumerate([5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0])}
    lrs = _lrs(LRSchedule("plateau", factor=0.5, patience=1), 14, objectives=objectives)
    assert lrs == pytest.approx([0.2] * 6 + [0.1] * 2 + [0.05] * 4 + [0.025] * 2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "cosinus"}, "unknown learning-rate schedule 'cosinus'"),
    ({"name": "step"}, "needs every"),
    ({"name": "plateau", "warmup": 3}, "takes no warmup"),
    ({"name": "step", "every": 2, "gamma": 0.0}, "gamma must be in"),
])
def test_bad_schedules_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LRSchedule(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"accumulate": 0}, "accumulate must be a whole number"), ({"accumulate": 1.5}, "accumulate must be"),
    ({"grad_clip": 0.0}, "grad_clip must be a finite norm"), ({"grad_clip": math.inf}, "grad_clip must be"),
    ({"grad_clip": math.nan}, "grad_clip must be"),
])
def test_bad_updates_are_refused(kwargs: dict[str, Any], match: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=match):
        Updater(opt, max_steps=3, **kwargs)


def test_a_step_function_that_does_not_step_is_caught() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(RuntimeError, match=r"called optimizer.step\(\) 0 times in 2 micro-batches"):
        Updater(opt, max_steps=3, accumulate=2).step(lambda o: {"loss": 0.0})


def test_joint_step_accumulated_equals_one_joint_step_on_the_concatenated_batch() -> None:
    """With equal micro-batches and per-task mean losses, k accumulated joint steps = one on all the rows."""
    from mtml.datasets import synthetic_linear
    from mtml.nn import build_multitask_model
    from mtml.weighting import WEIGHTINGS

    tasks = synthetic_linear(num_tasks=3, in_dim=6, latent_dim=2, n_train=24, n_val=6, n_test=6, seed=2)
    by_name = {t.name: t for t in tasks}
    torch.manual_seed(0)
    a = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh").double()
    b = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh").double()
    b.load_state_dict(a.state_dict())
    names = [t.name for t in tasks]
    chunks = [{t.name: (t.train.x[i * 8:(i + 1) * 8].double(), t.train.y[i * 8:(i + 1) * 8].double())
               for t in tasks} for i in range(3)]
    whole = {n: (torch.cat([c[n][0] for c in chunks]), torch.cat([c[n][1] for c in chunks])) for n in names}
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    it = iter(chunks)
    Updater(opt_a, max_steps=1, accumulate=3).step(
        lambda o: joint_step(a, by_name, next(it), WEIGHTINGS.create("equal", names), o).as_dict())
    joint_step(b, by_name, whole, WEIGHTINGS.create("equal", names), torch.optim.SGD(b.parameters(), lr=0.05))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-12, msg=k)


# -- exact resume through checkpoints, joint and meta ----------------------------------------------------------
JOINT: dict[str, Any] = {
    "name": "updates-joint", "seed": 4, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 3, "n_train": 40,
                                                 "n_val": 15, "n_test": 15}},
    "model": {"trunk_hidden": [12]},
    "training": {"weighting": "uncertainty", "lr": 0.02, "batch_size": 8, "max_steps": 24, "eval_every": 4,
                 "patience": 0, "keep_checkpoints": 10},
}
META: dict[str, Any] = {
    "name": "updates-meta", "seed": 5, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 5, "meta_batch": 4}},
    "model": {"trunk_hidden": [16, 16]},
    "training": {"algorithm": "maml", "algorithm_options": {"inner_lr": 0.01, "inner_steps": 1},
                 "lr": 0.003, "max_steps": 24, "eval_every": 4, "patience": 0, "meta_val_tasks": 10,
                 "meta_test_tasks": 10, "keep_checkpoints": 10},
}
UPDATES = {
    "cosine-warmup-clip-accumulate": {"scheduler": {"name": "cosine", "warmup": 6, "min_lr": 1e-4},
                                      "grad_clip": 0.3, "accumulate": 3},
    "step-accumulate": {"scheduler": {"name": "step", "every": 5, "gamma": 0.5}, "accumulate": 2},
    "plateau-clip": {"scheduler": {"name": "plateau", "patience": 1, "factor": 0.5}, "grad_clip": 0.05,
                     "min_delta": 10.0},  # (no validation counts as an improvement: the rate is cut at each)
}


def _cut(path: Path, step: int) -> None:
    """Make a finished run look killed right after its checkpoint at ``step``: later checkpoints and records
    gone, status ``running``."""
    for ckpt in (path / "checkpoints").glob("step-*.safetensors"):
        if int(ckpt.stem.split("-")[1]) > step:
            ckpt.unlink()
    lines = (path / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step and json.loads(line)["kind"] != "done"]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    Run.open(path).set_status("running")


def _train_log(path: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.mark.parametrize("updates", list(UPDATES), ids=list(UPDATES))
@pytest.mark.parametrize("base", [JOINT, META], ids=["joint", "maml"])
def test_a_run_resumed_from_a_checkpoint_takes_the_same_rates_and_ends_bit_identical(
        tmp_path: Path, base: dict[str, Any], updates: str) -> None:
    config = Config.from_dict({**base, "training": {**base["training"], **UPDATES[updates]}})
    full, _ = train(config, tmp_path / "full")
    cut, _ = train(config, tmp_path / "cut")
    _cut(cut.path, 12)
    resume_run(cut.path)
    last = "step-00000024.safetensors"
    a = load_checkpoint(full.path / "checkpoints" / last)
    b = load_checkpoint(cut.path / "checkpoints" / last)
    assert a.tensors.keys() == b.tensors.keys()
    for key, value in a.tensors.items():
        assert torch.equal(value, b.tensors[key]), key
    assert a.meta["updates"] == b.meta["updates"]
    ran, again = _train_log(full.path), _train_log(cut.path)
    assert set(ran) == set(again) and all(ran[s]["lr"] == again[s]["lr"] for s in ran)
    lrs = [ran[s]["lr"] for s in sorted(ran)]
    assert len(set(lrs)) > 1 or updates == "plateau-clip"  # the schedule moved the rate (logged every 10 steps)
    if "grad_clip" in UPDATES[updates]:
        assert all("grad_norm" in r for r in ran.values())
    if updates == "plateau-clip":  # lowered at least once: the state that travelled mattered
        assert b.meta["updates"]["state"]["_last_lr"][0] == pytest.approx(config.training.lr * 0.5 ** 5)


# -- the config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("training", "match"), [
    ({"scheduler": "cosinus"}, r"training\.scheduler\.name: Input should be 'constant', 'step', 'cosine' or "
                               r"'plateau' \(got 'cosinus'\)"),
    ({"scheduler": {"name": "step"}}, r"training\.scheduler: the step schedule needs every: N"),
    ({"scheduler": {"name": "cosine", "every": 3}}, r"the cosine schedule takes min_lr, warmup, not every; remove it"),
    ({"scheduler": {"name": "cosine", "warmup": 2000}}, r"scheduler\.warmup \(2000\) must be below max_steps"),
    ({"scheduler": {"name": "plateau", "patience": 10}}, r"scheduler\.patience \(10\) must be below the early"),
    ({"accumulate": 0}, r"training\.accumulate: Input should be greater than 0 \(got 0\)"),
    ({"grad_clip": -1.0}, r"training\.grad_clip: Input should be greater than 0"),
    ({"scheduler": {"name": "cosine", "warmpu": 3}}, r"training\.scheduler\.warmpu: unknown key\. Did you mean "
                                                     r"'warmup'\?"),
])
def test_bad_training_updates_in_a_config_get_one_line_naming_the_key(training: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        Config.from_dict({"training": training})
    assert len(str(info.value).splitlines()) == 2  # the file, then the one problem


def test_the_scheduler_shorthand_and_defaults() -> None:
    t = Config.from_dict({"training": {"scheduler": "cosine"}}).training
    assert t.scheduler.name == "cosine" and t.scheduler.warmup == 0 and t.accumulate == 1 and t.grad_clip is None
    assert Config.from_dict({}).training.scheduler.name == "constant"
