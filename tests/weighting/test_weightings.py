"""Weightings: a property suite over every registered name, closed-form checks, and the Gramian oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError, ShapeError
from mtml.weighting import DWA, WEIGHTINGS, Fixed, JacobianWeighting, Uncertainty, Weighting, task_gramian

NAMES = WEIGHTINGS.names()
#: Methods that combine the per-task gradient matrix J themselves: the suite calls ``combine(losses, J)``.
JACOBIAN_NAMES = [n for n in NAMES if getattr(WEIGHTINGS.get(n), "needs_jacobian", False)]
#: Options the suite needs for some m (a trimmed mean needs m >= 2·trim + 1 tasks).
SUITE_OPTIONS = {"trimmed_mean": lambda m: {"trim": min(1, (m - 1) // 2)}}


def _make(name: str, m: int) -> Weighting:
    options = SUITE_OPTIONS[name](m) if name in SUITE_OPTIONS else {}
    return WEIGHTINGS.create(name, [f"t{i}" for i in range(m)], **options)


def _gramian(m: int, g: torch.Generator, identical: bool = False) -> torch.Tensor:
    v = torch.randn(1, 5, generator=g).expand(m, 5) if identical else torch.randn(m, 5, generator=g)
    return v @ v.T


def _jacobian(m: int, g: torch.Generator, identical: bool = False) -> torch.Tensor:
    return torch.randn(1, 5, generator=g).expand(m, 5) if identical else torch.randn(m, 5, generator=g)


def _call(w: Weighting, losses: torch.Tensor, g: torch.Generator, identical: bool = False) -> torch.Tensor:
    if isinstance(w, JacobianWeighting):  # its own interface: the weights of the losses, the update checked here
        jac = _jacobian(losses.shape[0], g, identical)
        out = w.combine(losses, jac)
        assert out.update.shape == (5,) and torch.isfinite(out.update).all(), out.update
        return out.weights
    gram = _gramian(losses.shape[0], g, identical) if w.needs_gramian else None
    return w(losses, gram)


def _drive(w: Weighting, steps: int, m: int, seed: int) -> list[torch.Tensor]:
    """Feed ``steps`` random loss vectors in training mode, returning the weights."""
    g = torch.Generator().manual_seed(seed)
    w.train()
    return [_call(w, torch.rand(m, generator=g) * 3 + 0.1, g).detach().clone() for _ in range(steps)]


def test_registry_lists_the_builtin_weightings() -> None:
    assert {"equal", "fixed", "uncertainty", "dwa"} <= set(NAMES)


# -- properties of every registered weighting -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_finite_weights_of_shape_m(name: str, m: int) -> None:
    w = _make(name, m)
    assert w.num_tasks == m and w.task_names == [f"t{i}" for i in range(m)]
    for out in _drive(w, 130, m, seed=m):
        assert out.shape == (m,)
        assert torch.isfinite(out).all()
        if getattr(w, "nonnegative", True):  # methods that may weigh a task negatively declare it
            assert (out >= 0).all(), out
    assert torch.isfinite(w.penalty()).all() and w.penalty().shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_identical_tasks_get_identical_weights(name: str) -> None:
    """Deterministic methods cannot tell identical tasks apart; random ones (declared ``stochastic``) may, but
    must then be reproducible: two fresh instances draw the same weights."""
    m = 4
    w, twin = _make(name, m), _make(name, m)
    g, g_twin = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(130):
        losses = torch.full((m,), float(torch.rand(1, generator=g)) + 0.5)
        out = _call(w, losses, g, identical=True)
        torch.rand(1, generator=g_twin)
        assert torch.equal(out, _call(twin, losses.clone(), g_twin, identical=True))
        if not getattr(w, "stochastic", False):
            torch.testing.assert_close(out, out[:1].expand(m))


@pytest.mark.parametrize("name", NAMES)
def test_zero_losses_give_finite_weights(name: str) -> None:
    w = _make(name, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(130):
        out = _call(w, torch.zeros(3), g)
        assert torch.isfinite(out).all()
    if isinstance(w, JacobianWeighting):  # zero losses AND zero gradients: finite, and no move from a fresh start
        out = w.combine(torch.zeros(3), torch.zeros(3, 5))
        assert torch.isfinite(out.weights).all() and torch.isfinite(out.update).all()
        fresh = _make(name, 3)
        assert isinstance(fresh, JacobianWeighting)
        for _ in range(3):
            out = fresh.combine(torch.zeros(3), torch.zeros(3, 5))
            assert torch.isfinite(out.weights).all() and torch.equal(out.update, torch.zeros(5))
        return
    zero_gram = torch.zeros(3, 3) if w.needs_gramian else None
    assert torch.isfinite(w(torch.zeros(3), zero_gram)).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    m = 3
    w = _make(name, m)
    _drive(w, 77, m, seed=1)
    with torch.no_grad():
        for p in w.parameters():  # as if an optimiser had moved them
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    fresh = _make(name, m)
    fresh.load_state_dict(w.state_dict())
    for key, value in w.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]) or (value.isnan() == fresh.state_dict()[key].isnan()).all()
    a, b = _drive(w, 60, m, seed=3), _drive(fresh, 60, m, seed=3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_state_is_finite_at_every_step_so_a_checkpoint_can_be_written(name: str, steps: int) -> None:
    """A checkpoint holding NaN or inf is refused as diverged, so no placeholder state may be NaN (DWA's history
    and STCH's nadir were, until their first period ended: a run validated before then stopped as diverged)."""
    w = _make(name, 3)
    _drive(w, steps, 3, seed=5)
    for key, value in w.state_dict().items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), (name, steps, key)


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_detached_unless_learned(name: str) -> None:
    w = _make(name, 3)
    losses = torch.rand(3, requires_grad=True)
    out = _call(w, losses, torch.Generator().manual_seed(0))
    if not list(w.parameters()):
        assert not out.requires_grad
    else:
        assert out.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_and_empty_task_list(name: str) -> None:
    w = _make(name, 3)
    if isinstance(w, JacobianWeighting):
        with pytest.raises(ShapeError, match=r"\[3\]"):
            w.combine(torch.zeros(2), torch.zeros(2, 4))
        with pytest.raises(ShapeError, match=r"\[3, d\]"):
            w.combine(torch.zeros(3), torch.zeros(2, 4))
        with pytest.raises(ShapeError):
            w.combine(torch.zeros(3), torch.zeros(12))
        with pytest.raises(TypeError, match="combine"):  # no weights without the Jacobian
            w(torch.zeros(3))
        with pytest.raises(ConfigError, match="at least one task"):
            WEIGHTINGS.create(name, [])
        return
    with pytest.raises(ShapeError, match=r"\[3\]"):
        w(torch.zeros(2), torch.zeros(2, 2))
    with pytest.raises(ShapeError):
        w(torch.zeros(3, 1), torch.zeros(3, 3))
    if w.needs_gramian:
        with pytest.raises(ValueError, match="Gramian"):
            w(torch.zeros(3))
        with pytest.raises(ShapeError):
            w(torch.zeros(3), torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="at least one task"):
        WEIGHTINGS.create(name, [])


@pytest.mark.parametrize("name", JACOBIAN_NAMES)
def test_jacobian_methods_state_dict_round_trip_continues_the_updates(name: str) -> None:
    """The update itself (not only the weights) continues identically from a state dict, gradient-sized
    buffers included, loaded into a fresh instance that has not seen a Jacobian yet."""
    m, g = 3, torch.Generator().manual_seed(4)
    w = _make(name, m)
    assert isinstance(w, JacobianWeighting)
    for _ in range(9):
        w.combine(torch.rand(m, generator=g) + 0.1, _jacobian(m, g))
    fresh = _make(name, m)
    assert isinstance(fresh, JacobianWeighting)
    fresh.load_state_dict(w.state_dict())
    for _ in range(9):
        losses, jac = torch.rand(m, generator=g) + 0.1, _jacobian(m, g)
        a, b = w.combine(losses, jac), fresh.combine(losses.clone(), jac.clone())
        assert torch.equal(a.update, b.update) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("name", JACOBIAN_NAMES)
def test_jacobian_methods_one_task_move_along_its_gradient(name: str) -> None:
    """With one task and a fixed gradient every method's update is a non-negative multiple of that gradient
    (tracked estimates included)."""
    w = _make(name, 1)
    assert isinstance(w, JacobianWeighting)
    g = torch.Generator().manual_seed(5)
    jac = torch.randn(1, 6, generator=g, dtype=torch.float64)
    for _ in range(5):
        out = w.combine(torch.rand(1, generator=g, dtype=torch.float64), jac)
        scale = float(out.update @ jac[0]) / float(jac[0] @ jac[0])
        assert scale >= 0
        torch.testing.assert_close(out.update, scale * jac[0], rtol=1e-10, atol=1e-12)


# -- closed forms -------------------------------------------------------------------------------------------
def test_equal_is_ones() -> None:
    w = _make("equal", 4)
    assert torch.equal(w(torch.tensor([3.0, 0.0, 1e6, 2.0])), torch.ones(4))


def test_fixed_mapping_list_and_default() -> None:
    names = ["a", "b", "c"]
    assert Fixed(names)(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
    assert Fixed(names, weights={"b": 2.5}, default=0.5)(torch.ones(3)).tolist() == [0.5, 2.5, 0.5]
    assert Fixed(names, weights=[0.0, 1.0, 3.0])(torch.ones(3)).tolist() == [0.0, 1.0, 3.0]
    out = Fixed(names, weights=[1, 2, 3])(torch.ones(3, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert WEIGHTINGS.create("fixed", names, weights={"c": 4})(torch.ones(3)).tolist() == [1.0, 1.0, 4.0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weights": {"d": 1.0}}, r"unknown tasks \['d'\]"),
    ({"weights": [1.0, 2.0]}, "got 2 weights for 3 tasks"),
    ({"weights": [1.0, -1.0, 2.0]}, "finite and >= 0. Got -1.0"),
    ({"weights": [1.0, math.inf, 2.0]}, "finite and >= 0. Got inf"),
    ({"weights": {"a": math.nan}}, "finite and >= 0. Got nan"),
    ({"default": -2.0}, "finite and >= 0. Got -2.0"),
])
def test_fixed_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Fixed(["a", "b", "c"], **kwargs)


def test_uncertainty_objective_gradient_matches_analytic() -> None:
    torch.manual_seed(0)
    w = Uncertainty(["a", "b", "c"], init_log_var=0.3)
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([-1.0, 0.2, 1.5]))
    losses = torch.tensor([0.7, 2.0, 0.1], requires_grad=True)
    weights = w(losses)
    objective = (weights * losses).sum() + w.penalty()
    objective.backward()
    s, L = w.log_var.detach(), losses.detach()
    torch.testing.assert_close(weights.detach(), 0.5 * torch.exp(-s))
    torch.testing.assert_close(objective.detach(), (0.5 * torch.exp(-s) * L + 0.5 * s).sum())
    torch.testing.assert_close(w.log_var.grad, -0.5 * torch.exp(-s) * L + 0.5)
    torch.testing.assert_close(losses.grad, 0.5 * torch.exp(-s))
    # the stationary point of the objective in s is s = log L
    with torch.no_grad():
        w.log_var.copy_(L.log())
    w.log_var.grad = None
    ((w(L) * L).sum() + w.penalty()).backward()
    torch.testing.assert_close(w.log_var.grad, torch.zeros(3), atol=1e-6, rtol=0)


def test_uncertainty_initial_value() -> None:
    w = Uncertainty(["a", "b"], init_log_var=math.log(2.0))
    torch.testing.assert_close(w(torch.ones(2)).detach(), torch.full((2,), 0.25))


def test_dwa_weights_after_two_periods_by_hand() -> None:
    period, temperature = 3, 2.0
    w = DWA(["a", "b", "c"], temperature=temperature, period=period)
    g = torch.Generator().manual_seed(0)
    losses = [torch.rand(3, generator=g, dtype=torch.float64) * 4 + 0.1 for _ in range(4 * period)]
    out = [w(x.float()).double() for x in losses]
    for t in range(2 * period):  # the first two periods have no ratio yet
        assert torch.equal(out[t], torch.ones(3, dtype=torch.float64)), t
    mean = [torch.stack(losses[k * period : (k + 1) * period]).mean(0) for k in range(3)]
    m = 3
    by_hand = [m * torch.softmax((mean[k + 1] / mean[k]) / temperature, 0) for k in range(2)]
    for t in range(2 * period, 3 * period):
        torch.testing.assert_close(out[t], by_hand[0], rtol=1e-6, atol=1e-6)
    for t in range(3 * period, 4 * period):
        torch.testing.assert_close(out[t], by_hand[1], rtol=1e-6, atol=1e-6)
    assert float(out[-1].sum()) == pytest.approx(m)


def test_dwa_does_not_observe_in_eval_mode() -> None:
    w = DWA(["a", "b"], period=1)
    w.eval()
    for _ in range(5):
        assert torch.equal(w(torch.tensor([1.0, 5.0])), torch.ones(2))
    assert int(w.count) == 0 and not bool(w.history.any())


@pytest.mark.parametrize(("kwargs", "match"), [({"temperature": 0.0}, "temperature"), ({"period": 0}, "period")])
def test_dwa_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DWA(["a"], **kwargs)


# -- the Gramian --------------------------------------------------------------------------------------------
def test_task_gramian_matches_a_per_task_loop() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    unused = nn.Parameter(torch.randn(2, dtype=torch.float64))  # reached by no loss
    partial = nn.Parameter(torch.randn(3, dtype=torch.float64))  # reached by task 1 only
    x = torch.randn(5, 4, dtype=torch.float64)
    h = trunk(x)
    losses = torch.stack([h.square().mean(), (h @ partial).sin().sum(), h[:, 0].exp().mean(), h.sum() * 0.0])
    params = [*trunk.parameters(), unused, partial]
    gram = task_gramian(losses, params)
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params, strict=True)]))
    jac = torch.stack(rows)
    torch.testing.assert_close(gram, jac @ jac.T, rtol=1e-12, atol=1e-12)
    assert gram.shape == (4, 4) and torch.equal(gram, gram.T)
    assert float(gram[3].abs().sum()) == 0.0
    # the graph stays alive for the weighted backward that follows
    (losses.sum()).backward()
    assert trunk[0].weight.grad is not None


def test_task_gramian_without_reachable_parameters_is_zero() -> None:
    p = torch.randn(3, requires_grad=True)
    q = torch.randn(2, requires_grad=True)
    losses = torch.stack([p.square().sum(), p.sum()])
    assert torch.equal(task_gramian(losses, [q]), torch.zeros(2, 2))
    assert torch.equal(task_gramian(losses, []), torch.zeros(2, 2))
