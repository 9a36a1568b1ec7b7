"""Jacobian weightings (GradDrop, MoCo, ExcessMTL, trimmed mean): closed forms, loop oracles, TorchJD's recorded
outputs, the engine's Jacobian path (spied on), exact resume, two ranks = one process, and option errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mtml.engine._joint as joint_module
from mtml.config import Config
from mtml.datasets import synthetic_linear
from mtml.engine import Run, StopRule, evaluate, joint_step, load_checkpoint, objective, train_multitask
from mtml.engine._dist_launch import free_port
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, build_multitask_model
from mtml.tasks import Task
from mtml.weighting import (
    WEIGHTINGS,
    Equal,
    ExcessMTL,
    Fixed,
    GradDrop,
    JacobianWeighting,
    MoCo,
    TrimmedMean,
    Weighting,
)
from mtml.weighting._graddrop import drop_signs, sign_purity
from mtml.weighting._simplex import simplex_projection as project_simplex
from mtml.weighting._solvers import min_norm_simplex

DATA = json.loads((Path(__file__).parent / "data" / "torchjd_jacobian.json").read_text())
JACOBIAN_NAMES = ["excess_mtl", "graddrop", "moco", "trimmed_mean"]
F64 = torch.float64


def _names(m: int) -> list[str]:
    return [f"t{i}" for i in range(m)]


def _jac(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_the_four_methods_are_registered_as_jacobian_weightings() -> None:
    for name in JACOBIAN_NAMES:
        cls = WEIGHTINGS.get(name)
        assert isinstance(cls, type) and issubclass(cls, JacobianWeighting)
        assert cls.needs_jacobian and not cls.needs_gramian
    assert not Equal.needs_jacobian and not WEIGHTINGS.get("pcgrad").needs_jacobian  # type: ignore[attr-defined]


# -- GradDrop -------------------------------------------------------------------------------------------------
def test_graddrop_purity_mask_and_leak_by_hand() -> None:
    jac = torch.tensor([[1.0, -2.0, 3.0, 0.0], [1.0, 2.0, -1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(sign_purity(jac), torch.tensor([1.0, 0.5, 0.75, 0.5], dtype=F64))
    uniform = torch.tensor([0.3, 0.6, 0.8, 0.1], dtype=F64)
    # col 0: P=1 > U keeps both positives; col 1: P=.5 < .6 keeps the negative; col 2: P=.75 < .8 keeps the negative
    no_leak = drop_signs(jac, uniform, torch.zeros(2, dtype=F64))
    torch.testing.assert_close(no_leak, torch.tensor([2.0, -2.0, -1.0, 0.0], dtype=F64))
    # task 0 leaks half of what it loses (its +3 in col 2)
    leaky = drop_signs(jac, uniform, torch.tensor([0.5, 0.0], dtype=F64))
    torch.testing.assert_close(leaky, torch.tensor([2.0, -2.0, 0.5, 0.0], dtype=F64))
    torch.testing.assert_close(drop_signs(jac, uniform, torch.ones(2, dtype=F64)), jac.sum(0))


def test_graddrop_vectorised_equals_a_coordinate_loop() -> None:
    rng = np.random.default_rng(0)
    for m, d in ((2, 40), (3, 50), (6, 60)):
        jac = rng.standard_normal((m, d)) * rng.uniform(0.1, 3, (m, 1))
        jac[:, :5] = np.abs(jac[:, :5])  # some one-sign columns
        jac[0, 7] = 0.0
        u, leak = rng.uniform(size=d), rng.uniform(size=m)
        expected = np.zeros(d)
        for k in range(d):
            col = jac[:, k]
            purity = 0.5 * (1 + col.sum() / np.abs(col).sum())
            for i in range(m):
                kept = (purity > u[k] and col[i] > 0) or (purity < u[k] and col[i] < 0)
                expected[k] += (leak[i] + (1 - leak[i]) * kept) * col[i]
        ours = drop_signs(torch.from_numpy(jac), torch.from_numpy(u), torch.from_numpy(leak))
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(len(DATA["graddrop"])))
def test_graddrop_matches_torchjd_on_one_sign_columns(case: int) -> None:
    """No draw matters when every column has one sign: TorchJD's GradDrop and ours must agree exactly."""
    rec = DATA["graddrop"][case]
    jac = torch.tensor(rec["jacobian"], dtype=F64)
    m = jac.shape[0]
    for seed in (0, 1, 2):
        leak = 0.0 if rec["leak"] is None else rec["leak"]
        out = GradDrop(_names(m), leak=leak, seed=seed).combine(torch.ones(m, dtype=F64), jac)
        torch.testing.assert_close(out.update, torch.tensor(rec["update"], dtype=F64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.update, jac.sum(0), rtol=1e-12, atol=1e-12)  # nothing dropped
        assert torch.equal(out.weights, torch.ones(m, dtype=F64))


def test_graddrop_keeps_the_positive_side_with_probability_purity() -> None:
    """A column (3, −1) has purity ¾: over many coordinates about ¾ keep +3 and ¼ keep −1."""
    d = 4000
    jac = torch.tensor([[3.0], [-1.0]], dtype=F64).expand(2, d).contiguous()
    out = GradDrop(["a", "b"], seed=7).combine(torch.ones(2, dtype=F64), jac).update
    assert set(out.unique().tolist()) == {3.0, -1.0}
    assert abs(float((out == 3.0).double().mean()) - 0.75) < 0.03


def test_graddrop_draws_are_seeded_counted_and_fresh_each_step() -> None:
    jac = _jac(3, 200, 0)
    a, b, other = GradDrop(_names(3), seed=3), GradDrop(_names(3), seed=3), GradDrop(_names(3), seed=4)
    ones = torch.ones(3, dtype=F64)
    first = [a.combine(ones, jac).update for _ in range(3)]
    assert all(torch.equal(x, b.combine(ones, jac).update) for x in first)
    assert not torch.equal(first[0], first[1])  # a new draw every step
    assert not torch.equal(first[0], other.combine(ones, jac).update)
    assert int(a.draws.count) == 3 and "draws.count" in a.state_dict()


# -- trimmed mean ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(len(DATA["trimmed_mean"])))
def test_trimmed_mean_matches_torchjd(case: int) -> None:
    rec = DATA["trimmed_mean"][case]
    jac = torch.tensor(rec["jacobian"], dtype=F64)
    m = jac.shape[0]
    out = TrimmedMean(_names(m), trim=rec["trim"]).combine(torch.ones(m, dtype=F64), jac)
    torch.testing.assert_close(out.update, torch.tensor(rec["update"], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.weights, torch.full((m,), 1.0 / m, dtype=F64))


def test_trimmed_mean_equals_a_column_loop_and_ignores_task_order() -> None:
    m, d, trim = 7, 13, 2
    jac = _jac(m, d, 3)
    jac[4] *= 100.0  # an outlying task
    expected = torch.tensor([sum(sorted(jac[:, k].tolist())[trim : m - trim]) / (m - 2 * trim) for k in range(d)],
                            dtype=F64)
    w = TrimmedMean(_names(m), trim=trim)
    out = w.combine(torch.ones(m, dtype=F64), jac)
    torch.testing.assert_close(out.update, expected, rtol=1e-12, atol=1e-12)
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    torch.testing.assert_close(w.combine(torch.ones(m, dtype=F64), jac[perm]).update, out.update)
    rest = torch.cat([jac[:4], jac[5:]])  # the outlier never sets a coordinate beyond the others' range
    assert bool((out.update <= rest.max(0).values).all() and (out.update >= rest.min(0).values).all())
    torch.testing.assert_close(TrimmedMean(_names(m), trim=0).combine(torch.ones(m, dtype=F64), jac).update,
                               jac.mean(0))


# -- MoCo -----------------------------------------------------------------------------------------------------
def _simplex_by_bisection(v: np.ndarray) -> np.ndarray:
    """Oracle: the projection is max(v − τ, 0) with τ such that it sums to 1 (found by bisection)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        lo, hi = (tau, hi) if np.maximum(v - tau, 0).sum() > 1 else (lo, tau)
    return np.maximum(v - 0.5 * (lo + hi), 0)


def test_simplex_projection_matches_bisection() -> None:
    rng = np.random.default_rng(1)
    for m in (1, 2, 3, 6, 10):
        for scale in (0.1, 1.0, 10.0):
            v = rng.standard_normal(m) * scale
            ours = project_simplex(torch.from_numpy(v)).numpy()
            np.testing.assert_allclose(ours, _simplex_by_bisection(v), atol=1e-12)
            assert abs(ours.sum() - 1) < 1e-12 and (ours >= 0).all()
    on = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    torch.testing.assert_close(project_simplex(on), on)


def _moco_by_hand(jacs: list[np.ndarray], beta: float, beta_decay: float, gamma: float, gamma_decay: float,
                  rho: float) -> list[tuple[np.ndarray, np.ndarray]]:
    m, d = jacs[0].shape
    y, lam, out = np.zeros((m, d)), np.full(m, 1.0 / m), []
    for k, g in enumerate(jacs, start=1):
        y = y - beta / k**beta_decay * (y - g)
        lam = _simplex_by_bisection(lam - gamma / k**gamma_decay * ((y @ y.T + rho * np.eye(m)) @ lam))
        out.append((y.T @ lam, lam.copy()))
    return out


@pytest.mark.parametrize(("beta", "beta_decay", "gamma", "gamma_decay", "rho"),
                         [(0.5, 0.5, 0.1, 0.5, 0.0), (0.9, 0.0, 0.3, 0.0, 0.2), (1.0, 1.0, 1.0, 0.25, 0.0)])
def test_moco_steps_by_hand(beta: float, beta_decay: float, gamma: float, gamma_decay: float, rho: float) -> None:
    jacs = [_jac(3, 5, 20 + t).numpy() * (1 + t) for t in range(6)]
    w = MoCo(_names(3), beta=beta, beta_decay=beta_decay, gamma=gamma, gamma_decay=gamma_decay, rho=rho)
    for (update, lam), jac in zip(_moco_by_hand(jacs, beta, beta_decay, gamma, gamma_decay, rho), jacs,
                                  strict=True):
        out = w.combine(torch.ones(3, dtype=F64), torch.from_numpy(jac))
        np.testing.assert_allclose(out.update.numpy(), update, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.weights.numpy(), lam, rtol=1e-10, atol=1e-12)
    assert int(w.count) == 6 and w.y.shape == (3, 5)


def test_moco_with_a_fixed_jacobian_converges_to_the_min_norm_weights() -> None:
    """Noise-free, β = 1 and a constant step: λ's projected-gradient iteration converges to MGDA's min-norm
    point of the convex hull of the gradients."""
    jac = _jac(3, 6, 5)
    jac[1] = -0.6 * jac[0] + 0.4 * jac[1]  # conflicting: an interior min-norm point
    gram = (jac @ jac.T).numpy()
    step = 1.0 / float(np.linalg.eigvalsh(gram).max())
    w = MoCo(_names(3), beta=1.0, beta_decay=0.0, gamma=step, gamma_decay=0.0)
    for _ in range(4000):
        out = w.combine(torch.ones(3, dtype=F64), jac)
    np.testing.assert_allclose(out.weights.numpy(), min_norm_simplex(gram, ridge=0.0), atol=1e-6)


def test_moco_loss_normalisation_scales_each_gradient_to_its_loss() -> None:
    jac, losses = _jac(3, 5, 9), torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    w = MoCo(_names(3), beta=1.0, normalize="loss")
    w.combine(losses, jac)
    torch.testing.assert_close(w.y.norm(dim=1), losses, rtol=1e-6, atol=0)


# -- ExcessMTL ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(len(DATA["excess_mtl"])))
def test_excess_mtl_matches_torchjd_call_by_call(case: int) -> None:
    rec = DATA["excess_mtl"][case]
    jacs = [torch.tensor(j, dtype=F64) for j in rec["jacobians"]]
    m = jacs[0].shape[0]
    w = ExcessMTL(_names(m), step_size=rec["step_size"], warmup=rec["warmup"])
    for t, jac in enumerate(jacs):
        out = w.combine(torch.ones(m, dtype=F64), jac)
        torch.testing.assert_close(out.weights, torch.tensor(rec["weights"][t], dtype=F64), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.update, torch.tensor(rec["updates"][t], dtype=F64), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out.weights, torch.full((m,), 1.0 / m, dtype=F64))  # the weights did move


def test_excess_mtl_two_steps_by_hand() -> None:
    g1, g2 = _jac(2, 4, 1).numpy(), _jac(2, 4, 2).numpy()
    w = ExcessMTL(["a", "b"], step_size=0.7)
    first = w.combine(torch.ones(2, dtype=F64), torch.from_numpy(g1))
    np.testing.assert_allclose(first.weights.numpy(), [0.5, 0.5])  # the baseline step keeps uniform weights
    e1 = (g1**2 / np.sqrt(g1**2 + 1e-7)).sum(1)
    e2 = (g2**2 / np.sqrt(g1**2 + g2**2 + 1e-7)).sum(1)
    raw = 0.5 * np.exp(0.7 * e2 / (e1 + 1e-7))
    second = w.combine(torch.ones(2, dtype=F64), torch.from_numpy(g2))
    np.testing.assert_allclose(second.weights.numpy(), raw / raw.sum(), rtol=1e-12)
    np.testing.assert_allclose(second.update.numpy(), (raw / raw.sum()) @ g2, rtol=1e-12)


# -- the engine's Jacobian path -------------------------------------------------------------------------------
def _tasks() -> list[Task]:
    return synthetic_linear(num_tasks=4, in_dim=10, latent_dim=3, n_train=30, n_val=30, n_test=20, seed=2)


def _model(tasks: list[Task], seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh").double()


def _one_step(weighting: Weighting, backend: str | None = None) -> dict[str, torch.Tensor]:
    tasks = [t for t in _tasks()]
    model = _model(tasks)
    batch = {t.name: (t.train.x.double(), t.train.y.double()) for t in tasks}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    joint_step(model, {t.name: t for t in tasks}, batch, weighting, opt, gramian=backend)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("jacobian", "baseline"), [
    (lambda n: TrimmedMean(n, trim=0), lambda n: Fixed(n, weights=[0.25] * 4)),  # the mean
    (lambda n: GradDrop(n, leak=1.0), Equal),  # everything leaks: the sum
    (lambda n: ExcessMTL(n), lambda n: Fixed(n, weights=[0.25] * 4)),  # the baseline step: uniform 1/m
    (lambda n: MoCo(n, beta=1.0, gamma=1e-12), lambda n: Fixed(n, weights=[0.25] * 4)),  # y = g, λ ≈ 1/m
])
def test_jacobian_step_equals_the_weighted_step_where_the_method_reduces_to_weights(
        jacobian: Callable[[list[str]], Weighting], baseline: Callable[[list[str]], Weighting],
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = [t.name for t in _tasks()]
    calls: list[int] = []
    real = joint_module.task_jacobian
    monkeypatch.setattr(joint_module, "task_jacobian", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ours = _one_step(jacobian(names))
    assert calls == [1]  # the Jacobian path ran, once
    expected = _one_step(baseline(names))
    assert calls == [1]  # and the plain path does not use it
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", JACOBIAN_NAMES)
def test_loop_and_batched_jacobians_give_the_same_step(name: str) -> None:
    names = [t.name for t in _tasks()]
    loop = _one_step(WEIGHTINGS.create(name, names, jacobian="loop"))
    batched = _one_step(WEIGHTINGS.create(name, names, jacobian="batched"))
    overridden = _one_step(WEIGHTINGS.create(name, names), backend="batched")
    for key, value in loop.items():
        torch.testing.assert_close(batched[key], value, rtol=1e-9, atol=1e-11, msg=key)
        torch.testing.assert_close(overridden[key], value, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("name", JACOBIAN_NAMES)
def test_train_multitask_runs_the_jacobian_path_and_the_loss_goes_down(name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks()
    torch.manual_seed(1)
    model = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh")
    before = objective(evaluate(model, tasks, "val"))
    combined: list[int] = []
    real = JacobianWeighting.combine
    monkeypatch.setattr(JacobianWeighting, "combine", lambda self, *a: (combined.append(1), real(self, *a))[1])
    result = train_multitask(model, tasks, weighting=name, lr=3e-2, batch_size=16,
                             stop=StopRule(max_steps=60, eval_every=20, patience=0), seed=0)
    assert len(combined) == result.fit.steps == 60
    after = objective(result.val)
    assert after < 0.6 * before, (before, after)


def _train(tmp: Path, max_steps: int, weighting: str, resume: bool = False) -> dict[str, torch.Tensor]:
    tasks = _tasks()
    torch.manual_seed(11 if resume else 7)  # a resumed model must not depend on its fresh initialisation
    model = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh")
    run = Run.open(tmp) if resume else Run.create(tmp, {})
    train_multitask(model, tasks, weighting=weighting, lr=3e-2, batch_size=8,
                    stop=StopRule(max_steps=max_steps, eval_every=5, patience=0), seed=5, run=run, resume=resume)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["moco", "graddrop", "excess_mtl"])
def test_resume_continues_exactly(tmp_path: Path, name: str) -> None:
    """Gradient-sized buffers (MoCo's Y, ExcessMTL's Σg²) and the draw counter travel in the checkpoint."""
    full = _train(tmp_path / "full", 14, name)
    _train(tmp_path / "cut", 5, name)
    resumed = _train(tmp_path / "cut", 14, name, resume=True)
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


# -- two ranks = one process ---------------------------------------------------------------------------------
def _config(name: str) -> dict[str, Any]:
    return {"name": f"dist-{name}", "seed": 2, "threads": 1,
            "data": {"dataset": "synthetic", "options": {"num_tasks": 4, "in_dim": 8, "latent_dim": 3, "n_train": 30,
                                                         "n_val": 15, "n_test": 15}},
            "model": {"trunk_hidden": [12]},
            "training": {"weighting": {"name": name}, "lr": 0.01, "batch_size": 11, "max_steps": 6, "eval_every": 3,
                         "patience": 0}}


def _final_state(config: dict[str, Any], out: str) -> dict[str, list[float]]:
    from mtml.workflows import train

    train(Config.from_dict(config), out)
    last = sorted((Path(out) / "checkpoints").iterdir())[-1]
    return {k: v.reshape(-1).tolist() for k, v in load_checkpoint(last).tensors.items() if v.is_floating_point()}


def _rank(r: int, port: int, queue: Any, config: dict[str, Any], out: str) -> None:
    os.environ.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import mtml.engine._dist_steps as dist_steps

    calls: list[int] = []
    real = dist_steps._sharded_jacobian_step
    dist_steps._sharded_jacobian_step = lambda *a: (calls.append(1), real(*a))[1]  # type: ignore[assignment]
    try:
        state = _final_state(config, out)
        queue.put((r, {**state, "sharded_jacobian_steps": [float(len(calls))]}))
    except BaseException as exc:  # report, never hang the parent
        queue.put((r, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("name", ["moco", "graddrop"])
def test_two_ranks_end_with_the_parameters_of_one_process(tmp_path: Path, name: str) -> None:
    config = _config(name)
    one = {**_final_state(config, str(tmp_path / "one")), "sharded_jacobian_steps": [6.0]}  # 6 steps per rank
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue, config, str(tmp_path / "two"))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for r in range(2):
        two = results[r]
        assert isinstance(two, dict), two
        assert two.keys() == one.keys()
        for key, value in one.items():
            np.testing.assert_allclose(two[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    if name == "moco":  # the tracked gradients travelled in the checkpoint and were compared above
        assert len(one["weighting.y"]) == 4 * (8 * 12 + 12)


# -- options and config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("graddrop", {"leak": 1.5}, r"`leak` values must be numbers in \[0, 1\]. Got 1.5"),
    ("graddrop", {"leak": [0.1, 0.2]}, "got 2 values for 3 tasks"),
    ("graddrop", {"seed": -1}, "`seed` must be an integer >= 0"),
    ("graddrop", {"jacobian": "rows"}, "`jacobian` must be one of auto, loop, batched. Got 'rows'"),
    ("trimmed_mean", {"trim": 2}, "trim=2 needs at least 5 tasks, got 3; use trim <= 1"),
    ("trimmed_mean", {"trim": -1}, "`trim` must be an integer >= 0. Got -1"),
    ("moco", {"beta": 0.0}, r"`beta` must be a number in \(0, 1\]. Got 0.0"),
    ("moco", {"gamma": -1.0}, "`gamma` must be a number"),
    ("moco", {"rho": -0.1}, "`rho` must be a finite number >= 0"),
    ("moco", {"normalize": "l2"}, "`normalize` must be one of none, loss. Got 'l2'"),
    ("excess_mtl", {"step_size": 0}, "`step_size` must be a finite number > 0. Got 0"),
    ("excess_mtl", {"warmup": 0}, "`warmup` must be an integer >= 1"),
])
def test_bad_options_are_one_line_config_errors(name: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        WEIGHTINGS.create(name, ["a", "b", "c"], **kwargs)
    assert "\n" not in str(info.value)


def test_a_gramian_key_with_a_jacobian_weighting_is_refused_at_config_time() -> None:
    config = _config("graddrop")
    config["training"]["weighting"]["gramian"] = "loop"
    with pytest.raises(ConfigError, match="'graddrop' combines the per-task gradients themselves") as info:
        Config.from_dict(config)
    assert "\n" not in str(info.value)
    config["training"]["weighting"] = {"name": "moco", "options": {"jacobian": "batched", "beta": 0.3}}
    assert Config.from_dict(config).training.weighting.options["jacobian"] == "batched"


def test_changed_shared_parameters_are_a_clear_error() -> None:
    for cls in (MoCo, ExcessMTL):
        w = cls(["a", "b"])
        w.combine(torch.ones(2), torch.ones(2, 5))
        with pytest.raises(Exception, match="shared parameters changed"):
            w.combine(torch.ones(2), torch.ones(2, 6))
