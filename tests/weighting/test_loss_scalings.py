"""GLS, SI, STCH and FairGrad: closed forms, gradients of their scalarised objectives, FairGrad's defining equation,
state across checkpoints, real training steps, and option errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtml.datasets import synthetic_linear
from mtml.engine import Run, StopRule, TaskBatcher, joint_step, train_multitask
from mtml.engine._checkpoint import load_checkpoint
from mtml.engine._joint import task_losses
from mtml.errors import ConfigError
from mtml.nn import build_multitask_model
from mtml.tasks import Split, Task
from mtml.weighting import GLS, SI, STCH, WEIGHTINGS, FairGrad, NashMTL, task_gramian
from mtml.weighting._fairgrad import alpha_fair
from mtml.weighting._solvers import nash_bargaining

F64 = torch.float64


def _names(m: int) -> list[str]:
    return [f"t{i}" for i in range(m)]


def _gram(m: int, n: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=g, dtype=F64) * torch.exp(spread * torch.randn(m, 1, generator=g, dtype=F64))
    return jac @ jac.T


# -- registry -------------------------------------------------------------------------------------------------
def test_registered_with_truthful_flags() -> None:
    for name, cls in (("gls", GLS), ("si", SI), ("stch", STCH), ("fairgrad", FairGrad)):
        assert WEIGHTINGS.get(name) is cls and WEIGHTINGS.describe()[name]
        assert cls.nonnegative and not cls.stochastic
    assert GLS.permutation_equivariant and SI.permutation_equivariant and FairGrad.permutation_equivariant
    assert not STCH.permutation_equivariant  # its nadir point is state
    assert FairGrad.needs_gramian and not (GLS.needs_gramian or SI.needs_gramian or STCH.needs_gramian)


# -- GLS ------------------------------------------------------------------------------------------------------
def test_gls_two_tasks_by_hand() -> None:
    out = GLS(["a", "b"])(torch.tensor([1.0, 4.0], dtype=F64))  # (1·4)^(1/2) = 2: w = 2/(2·1), 2/(2·4)
    torch.testing.assert_close(out, torch.tensor([2 / (2 * 1), 2 / (2 * 4)], dtype=F64), rtol=1e-7, atol=0)


def test_gls_is_the_gradient_of_the_geometric_mean() -> None:
    losses = torch.tensor([0.3, 2.0, 7.5, 0.01], dtype=F64, requires_grad=True)
    eps = 1e-3
    (grad,) = torch.autograd.grad(torch.prod(losses + eps) ** (1 / 4), losses)
    out = GLS(_names(4), eps=eps)(losses)
    assert not out.requires_grad
    torch.testing.assert_close(out, grad, rtol=1e-12, atol=0)


def test_gls_many_tasks_neither_overflow_nor_underflow() -> None:
    for value in (1e9, 1e-9):  # 64 equal losses: the float64 product over- or underflows, the weights are 1/m
        losses = torch.full((64,), value, dtype=F64)
        assert float(torch.prod(losses + 1e-8)) in (0.0, math.inf)
        torch.testing.assert_close(GLS(_names(64))(losses), torch.full((64,), 1 / 64, dtype=F64))
    a, b = 1e9, 1e-6  # half of each: geometric mean √(ab), wᵢ = √(ab)/(m·Dᵢ)
    losses = torch.tensor([a] * 32 + [b] * 32, dtype=F64)
    d = losses + 1e-8
    expected = math.sqrt((a + 1e-8) * (b + 1e-8)) / (64 * d)
    torch.testing.assert_close(GLS(_names(64))(losses), expected, rtol=1e-12, atol=0)


def test_gls_shifted_by_min_loss() -> None:
    out = GLS(["a", "b"], min_loss=-1.0, eps=1e-12)(torch.tensor([0.0, 3.0], dtype=F64))  # D = [1, 4]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.25], dtype=F64))


# -- SI -------------------------------------------------------------------------------------------------------
def test_si_is_one_over_the_loss() -> None:
    losses = torch.tensor([0.5, 2.0, 40.0])
    torch.testing.assert_close(SI(_names(3))(losses), 1 / (losses + 1e-8))
    x = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.log(x + 1e-8).sum(), x)
    torch.testing.assert_close(SI(["a", "b"])(x), grad, rtol=1e-14, atol=0)
    assert torch.isfinite(SI(["a"])(torch.zeros(1))).all() and float(SI(["a"])(torch.zeros(1))) == pytest.approx(1e8)


def test_si_min_loss_shift_and_the_guard_below_it() -> None:
    w = SI(["nll", "mse"], min_loss=-2.0, eps=1e-12)
    torch.testing.assert_close(w(torch.tensor([-1.0, 0.5], dtype=F64)), torch.tensor([1.0, 1 / 2.5], dtype=F64))
    with pytest.raises(ConfigError, match=r"^si: the loss of task 'nll' is -3, below `min_loss` = -2") as info:
        w(torch.tensor([-3.0, 0.5]))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"task 'b' is -0\.25"):
        SI(["a", "b"])(torch.tensor([1.0, -0.25]))
    assert torch.isnan(SI(["a", "b"])(torch.tensor([1.0, math.nan]))[1])  # NaN reaches the divergence check


# -- STCH -----------------------------------------------------------------------------------------------------
def _stch_objective(losses: torch.Tensor, nadir: torch.Tensor, mu: float, eps: float) -> torch.Tensor:
    """The scalarised objective written out: m·μ·log Σ exp(log((L + ε)/n)/μ)."""
    m = losses.shape[0]
    return m * mu * torch.log(torch.sum(torch.exp(torch.log((losses + eps) / nadir) / mu)))


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 3.0])
def test_stch_weights_are_the_gradient_of_its_objective_after_the_warm_up(mu: float) -> None:
    warmup, nadir_steps, m = 3, 4, 3
    w = STCH(_names(m), mu=mu, warmup=warmup, nadir_steps=nadir_steps, eps=1e-6)
    g = torch.Generator().manual_seed(0)
    stream = [torch.rand(m, generator=g, dtype=F64) * torch.tensor([1.0, 10.0, 0.1], dtype=F64) + 0.01
              for _ in range(12)]
    outs = [w(x) for x in stream]
    for t in range(warmup + nadir_steps):  # warm-up: Σ log L, weights 1/(L + ε)
        torch.testing.assert_close(outs[t], 1 / (stream[t] + 1e-6), rtol=1e-12, atol=0)
    nadir = torch.stack(stream[warmup : warmup + nadir_steps]).mean(0) + 1e-6
    torch.testing.assert_close(w.nadir, nadir, rtol=1e-12, atol=0)
    assert int(w.steps) == 12
    for t in range(warmup + nadir_steps, 12):
        x = stream[t].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_stch_objective(x, nadir, mu, 1e-6), x)
        torch.testing.assert_close(outs[t], grad, rtol=1e-10, atol=0)
        assert not torch.allclose(outs[t], 1 / (stream[t] + 1e-6))  # the STCH phase really changed the weights


def test_stch_limits_in_mu() -> None:
    losses, nadir_steps = torch.tensor([1.0, 3.0, 2.0], dtype=F64), 1
    for mu, check in ((1e-3, "max"), (1.0, "nadir")):
        w = STCH(_names(3), mu=mu, warmup=0, nadir_steps=nadir_steps)
        w(torch.tensor([1.0, 1.0, 4.0], dtype=F64))  # nadir n = [1, 1, 4]: ratios L/n = [1, 3, 0.5]
        out = w(losses)
        if check == "max":  # smooth max → the worst normalised task takes everything: w = m/L on it
            torch.testing.assert_close(out, torch.tensor([0.0, 3 / 3.0, 0.0], dtype=F64), atol=1e-12, rtol=1e-6)
        else:  # μ = 1: p ∝ L/n, so w = m/(n·Σ L/n) ∝ 1/n
            torch.testing.assert_close(out * w.nadir, (out * w.nadir)[:1].expand(3), rtol=1e-9, atol=0)


def test_stch_without_nadir_steps_normalises_by_one() -> None:
    w = STCH(["a", "b"], warmup=0, nadir_steps=0, eps=1e-12)
    x = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    out = w(x)
    assert torch.equal(w.nadir, torch.ones(2, dtype=F64))
    (grad,) = torch.autograd.grad(_stch_objective(x, torch.ones(2, dtype=F64), 1.0, 1e-12), x)
    torch.testing.assert_close(out, grad)


def test_stch_state_round_trip_across_the_phase_change() -> None:
    def make() -> STCH:
        return STCH(_names(3), mu=0.5, warmup=2, nadir_steps=3)

    g = torch.Generator().manual_seed(4)
    stream = [torch.rand(3, generator=g) + 0.1 for _ in range(10)]
    reference = make()
    expected = [reference(x) for x in stream]
    first = make()
    for x in stream[:4]:  # stop inside the averaging window
        first(x)
    saved = first.state_dict()
    assert set(saved) == {"steps", "total", "nadir"} and int(saved["steps"]) == 4
    resumed = make()
    resumed.load_state_dict(saved)
    for t in range(4, 10):
        assert torch.equal(resumed(stream[t]), expected[t]), t
    assert torch.equal(resumed.nadir, reference.nadir) and bool(resumed.nadir.all())


def test_stch_eval_mode_changes_no_state() -> None:
    w = STCH(["a", "b"], warmup=1, nadir_steps=1).eval()
    for _ in range(5):
        torch.testing.assert_close(w(torch.tensor([1.0, 4.0])), 1 / (torch.tensor([1.0, 4.0]) + 1e-8))
    assert int(w.steps) == 0 and not bool(w.nadir.any()) and float(w.total.abs().sum()) == 0.0


def test_stch_is_equivariant_given_permuted_histories() -> None:
    perm = torch.tensor([2, 0, 3, 1])
    a, b = STCH(_names(4), warmup=2, nadir_steps=2), STCH(_names(4), warmup=2, nadir_steps=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        losses = torch.rand(4, generator=g, dtype=F64) + 0.2
        torch.testing.assert_close(b(losses[perm]), a(losses)[perm], rtol=1e-12, atol=0)


# -- FairGrad -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_fairgrad_solves_its_defining_equation(alpha: float, m: int) -> None:
    gram = _gram(m, 3 * m, seed=m, spread=0.5)
    w = FairGrad(_names(m), alpha=alpha, max_norm=0.0)(torch.ones(m, dtype=F64), gram)
    assert (w > 0).all()
    torch.testing.assert_close((gram @ w) * w ** (1 / alpha), torch.ones(m, dtype=F64), rtol=0, atol=1e-8)


def test_fairgrad_alpha_one_is_nash_mtl() -> None:
    for m, seed in ((2, 0), (4, 1), (7, 2)):
        gram = _gram(m, 2 * m, seed)
        ours = FairGrad(_names(m), alpha=1.0, max_norm=0.0)(torch.ones(m, dtype=F64), gram)
        nash = NashMTL(_names(m), max_norm=0.0)(torch.ones(m, dtype=F64), gram)
        torch.testing.assert_close(ours, nash, rtol=1e-6, atol=0)
        residual = (ours * (gram @ ours) - 1).abs().max()
        assert residual < 1e-8 and residual <= (nash * (gram @ nash) - 1).abs().max()  # per-task ridge: no worse
        np.testing.assert_allclose(alpha_fair(gram.numpy(), 1.0), nash_bargaining(gram.numpy()), rtol=1e-6)


def test_fairgrad_closed_forms() -> None:
    alpha = 2.0
    a = torch.tensor([4.0, 0.25, 9.0], dtype=F64)  # orthogonal gradients: wᵢ·aᵢ = wᵢ^(−1/α)
    out = FairGrad(_names(3), alpha=alpha, max_norm=0.0)(torch.ones(3, dtype=F64), torch.diag(a))
    torch.testing.assert_close(out, a ** (-alpha / (alpha + 1)), rtol=1e-9, atol=0)
    c, m = 2.5, 4  # identical gradients, ‖g‖² = c: c·m·w = w^(−1/α)
    out = FairGrad(_names(m), alpha=alpha, max_norm=0.0)(torch.ones(m, dtype=F64), torch.full((m, m), c, dtype=F64))
    torch.testing.assert_close(out, torch.full((m,), (c * m) ** (-alpha / (alpha + 1)), dtype=F64), rtol=1e-7,
                               atol=0)
    gram = _gram(4, 6, seed=3)  # G → kG scales the weights by k^(−α/(α+1))
    one = FairGrad(_names(4), alpha=alpha, max_norm=0.0)(torch.ones(4, dtype=F64), gram)
    ten = FairGrad(_names(4), alpha=alpha, max_norm=0.0)(torch.ones(4, dtype=F64), 10 * gram)
    torch.testing.assert_close(ten, one * 10 ** (-alpha / (alpha + 1)), rtol=1e-8, atol=0)


def test_fairgrad_agrees_with_a_least_squares_solver() -> None:
    """The authors' code solves Gw − w^(−1/α) = 0 with scipy's least_squares: an independent oracle."""
    optimize = pytest.importorskip("scipy.optimize")
    for m, alpha in ((3, 2.0), (5, 0.5), (6, 4.0)):
        gram = _gram(m, 2 * m, seed=10 + m, spread=0.3)
        g = gram.numpy()
        ref = optimize.least_squares(lambda x, g=g, a=alpha: g @ x - x ** (-1 / a), np.ones(m) / m,
                                     bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x
        ours = FairGrad(_names(m), alpha=alpha, max_norm=0.0)(torch.ones(m, dtype=F64), gram).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_fairgrad_clips_the_update_norm_and_skips_zero_gradients() -> None:
    gram = _gram(3, 5, seed=5) * 1e-4  # small gradients: large weights, an update norm above 1
    free = FairGrad(_names(3), max_norm=0.0)(torch.ones(3, dtype=F64), gram)
    clipped = FairGrad(_names(3), max_norm=1.0)(torch.ones(3, dtype=F64), gram)
    assert float(free @ gram @ free) > 1.0
    assert float(clipped @ gram @ clipped) == pytest.approx(1.0)
    torch.testing.assert_close(clipped / clipped.sum(), free / free.sum())
    jac = torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=F64)
    jac[2] = 0.0
    out = FairGrad(_names(4), max_norm=0.0)(torch.ones(4, dtype=F64), jac @ jac.T)
    rest = out[[0, 1, 3]]
    sub = (jac @ jac.T)[[0, 1, 3]][:, [0, 1, 3]]
    torch.testing.assert_close((sub @ rest) * rest ** 0.5, torch.ones(3, dtype=F64), rtol=0, atol=1e-8)
    assert float(out[2]) == pytest.approx(float(rest.mean()))


# -- real training steps --------------------------------------------------------------------------------------
def _by_hand(name: str, losses: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    d = losses.detach().double() + 1e-8
    if name == "gls":
        return torch.prod(d) ** (1 / d.shape[0]) / (d.shape[0] * d)
    if name in ("si", "stch"):  # stch: the first step is the warm-up's
        return 1 / d
    assert gram is not None
    return torch.from_numpy(alpha_fair(gram.numpy(), 2.0))


@pytest.mark.parametrize("name", ["gls", "si", "stch", "fairgrad"])
def test_a_joint_step_uses_the_methods_weights(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    tasks = [Task(f"r{i}", "regression", Split(torch.randn(16, 6, generator=g, dtype=F64),
                                               scale * torch.randn(16, generator=g, dtype=F64)))
             for i, scale in enumerate((1.0, 5.0, 0.2))]  # unequal loss scales
    by_name = {t.name: t for t in tasks}
    batch = TaskBatcher(tasks, batch_size=16).sample(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(5,), activation="tanh").double()
    ref = build_multitask_model(tasks, trunk_hidden=(5,), activation="tanh").double()
    ref.load_state_dict(model.state_dict())
    options = {"max_norm": 0.0, "gramian": "loop"} if name == "fairgrad" else {}
    weighting = WEIGHTINGS.create(name, list(by_name), **options)
    losses = task_losses(ref, by_name, batch, list(by_name))
    gram = task_gramian(losses, list(ref.shared_parameters()), backend="loop") if weighting.needs_gramian else None
    expected = _by_hand(name, losses, gram)
    lr = 0.1
    result = joint_step(model, by_name, batch, weighting, torch.optim.SGD(model.parameters(), lr=lr))
    got = torch.tensor([result.weights[n] for n in by_name], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
    assert not torch.allclose(got, torch.ones(3, dtype=F64), rtol=0.05)  # not the plain sum
    if gram is not None:  # FairGrad (α = 2) on the step's own Gramian: (Gw)ᵢ·√wᵢ = 1
        torch.testing.assert_close((gram @ got) * got.sqrt(), torch.ones(3, dtype=F64), rtol=0, atol=1e-7)
    params = list(ref.parameters())
    grads = torch.autograd.grad((expected * losses).sum(), params, retain_graph=True)
    plain = torch.autograd.grad(losses.sum(), params)
    for p, q, gq in zip(model.parameters(), params, grads, strict=True):  # the update is −lr·∇Σ wᵢLᵢ
        torch.testing.assert_close(p.detach(), q.detach() - lr * gq, rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(a, b) for a, b in zip(grads, plain, strict=True))


@pytest.mark.parametrize("name", ["gls", "si", "stch", "fairgrad"])
def test_train_multitask_logs_the_methods_weights(name: str, tmp_path: Path) -> None:
    tasks = synthetic_linear(num_tasks=3, in_dim=6, latent_dim=2, n_train=20, n_val=8, n_test=8, seed=1)
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(4,), activation="tanh")
    names = [t.name for t in tasks]
    weighting = STCH(names, warmup=3, nadir_steps=3) if name == "stch" else WEIGHTINGS.create(name, names)
    run = Run.create(tmp_path / name, {})
    result = train_multitask(model, tasks, weighting=weighting, lr=1e-2, batch_size=8,
                             stop=StopRule(max_steps=20, eval_every=10, patience=0), seed=3, run=run)
    assert result.fit.steps == 20
    train = [r for r in Run.open(tmp_path / name).records() if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 10, 20]
    for r in train:
        w = torch.tensor([r["weights"][n] for n in names], dtype=F64)
        d = torch.tensor([r["task_losses"][n] for n in names], dtype=F64) + 1e-8
        assert torch.isfinite(w).all() and not torch.allclose(w, torch.ones(3, dtype=F64))
        if name == "si" or (name == "stch" and r["step"] <= 6):
            torch.testing.assert_close(w, 1 / d, rtol=1e-6, atol=0)
        elif name == "gls":
            torch.testing.assert_close(w, torch.prod(d) ** (1 / 3) / (3 * d), rtol=1e-6, atol=0)
        elif name == "stch":  # after the warm-up, μ = 1: w = m/(n·Σ D/n), so w·n is the same for every task
            assert isinstance(weighting, STCH)
            wn = w * weighting.nadir
            torch.testing.assert_close(wn, wn[:1].expand(3), rtol=1e-5, atol=0)
            assert not torch.allclose(w, 1 / d, rtol=1e-3)
    if name == "stch":  # the checkpoint carries the weighting's state
        assert isinstance(weighting, STCH)
        latest = Run.open(tmp_path / name).latest_checkpoint()
        assert latest is not None
        state = load_checkpoint(latest).module_state("weighting")
        assert int(state["steps"]) == 20 and torch.equal(state["nadir"], weighting.nadir)


# -- options --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("gls", {"eps": 0.0}, r"`eps` must be a finite number > 0\. Got 0\.0"),
    ("gls", {"min_loss": math.inf}, r"`min_loss` must be a finite number .*Got inf"),
    ("si", {"eps": -1e-3}, r"`eps` must be .*Got -0\.001"),
    ("si", {"min_loss": "low"}, r"`min_loss` must be a valid number.*Got 'low'"),
    ("stch", {"mu": 0.0}, r"`mu` must be a finite number > 0\. Got 0\.0"),
    ("stch", {"warmup": -1}, r"`warmup` must be an integer >= 0 .*Got -1"),
    ("stch", {"nadir_steps": 2.5}, r"`nadir_steps` must be a valid integer.*Got 2\.5"),
    ("fairgrad", {"alpha": 0.0}, r"`alpha` must be a finite number > 0 .*Got 0\.0"),
    ("fairgrad", {"alpha": math.nan}, r"`alpha` must be .*Got nan"),
    ("fairgrad", {"max_norm": -1.0}, r"`max_norm` must be a finite number >= 0 .*Got -1\.0"),
    ("fairgrad", {"gramian": "fast"}, "`gramian` must be one of"),
    ("fairgrad", {"alfa": 2.0}, "unknown option 'alfa'.*Did you mean 'alpha'"),
])
def test_bad_options_are_one_line_config_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        WEIGHTINGS.create(name, ["a", "b"], **kwargs)
    assert "\n" not in str(info.value)


def test_direct_construction_checks_types_too() -> None:
    """Outside the registry (no option coercion) the classes check their own options."""
    with pytest.raises(ConfigError, match=r"`warmup` must be an integer >= 0 \(training steps\)\. Got True"):
        STCH(["a"], warmup=True)
    with pytest.raises(ConfigError, match=r"`min_loss` must be a finite number .*Got 'low'"):
        SI(["a"], min_loss="low")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`nadir_steps` must be an integer >= 0 .*Got 2\.5"):
        STCH(["a"], nadir_steps=2.5)  # type: ignore[arg-type]
