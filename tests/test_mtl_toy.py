"""The 2-D toy of CAGrad (Liu et al., NeurIPS 2021) and Nash-MTL (Navon et al., ICML 2022), benchmarks/mtl_toy.py:
the closed-form gradient against autograd, the closed-form Pareto front against a dense grid, and the papers'
published outcomes for MGDA, PCGrad, CAGrad and Nash-MTL."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mtl_toy.py"
    spec = importlib.util.spec_from_file_location("mtl_toy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the class is made)
    spec.loader.exec_module(module)
    return module


toy = _load()
NASH, CAGRAD = toy.SETTINGS["nash"], toy.SETTINGS["cagrad"]
#: the papers' full settings take 9 and 13 minutes on a 2-core machine: a reproduction, run with MTML_FULL_TOY=1
#: (the fast tests below check the same outcomes from single starts)
FULL = pytest.mark.skipif(not os.environ.get("MTML_FULL_TOY"), reason="the full toy reproduction (~22 min on 2 "
                          "cores) runs with MTML_FULL_TOY=1")


def _points() -> torch.Tensor:
    starts = torch.tensor(NASH.starts + CAGRAD.starts, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([starts, 22.0 * torch.rand(200, 2, generator=gen, dtype=torch.float64) - 11.0])


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_closed_form_gradient_equals_autograd(scale: float) -> None:
    x = _points().requires_grad_(True)
    f = toy.toy_losses(x, scale)
    auto = torch.stack([torch.autograd.grad(f[:, i].sum(), x, retain_graph=True)[0] for i in range(2)], 1)
    closed = toy.toy_jacobian(x.detach(), scale)
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)
    fast = torch.tensor([toy.toy_point(a, b, scale)[:2] for a, b in x.detach().tolist()], dtype=torch.float64)
    torch.testing.assert_close(fast, f.detach(), rtol=1e-12, atol=1e-12)
    # at the start (0, 0) both clamps sit on their bound: autograd (and the closed form) pass the gradient there,
    # which is what lets that start move at all
    j0 = toy.toy_jacobian(torch.zeros(1, 2, dtype=torch.float64), scale)[0]
    assert j0[1, 1] > 1.0 and j0[0, 1] > 0.1 * scale


def test_pareto_front_matches_a_dense_grid() -> None:
    pset = toy.pareto_set(401)
    # the x2-condition holds: d/dx2 of the multiplier-weighted loss vanishes on the set
    x = torch.from_numpy(pset).requires_grad_(True)
    alpha = torch.from_numpy((pset[:, 0] + 7.0) / 14.0)
    f = toy.toy_losses(x, 1.0)
    (grad,) = torch.autograd.grad((alpha * f[:, 0] + (1 - alpha) * f[:, 1]).sum(), x)
    assert grad.abs().max() < 1e-9
    for scale in (1.0, 0.1):
        front = toy.pareto_front(scale, 401)
        grid = toy.grid_front(scale, n=401)
        # no grid point dominates a front point, and every non-dominated grid point lies on the front
        for p in grid:
            assert np.minimum(front[:, 0] - p[0], front[:, 1] - p[1]).max() <= 1e-12
        assert toy._segment_distance(grid, front).max() < 0.05
        # the ends are the single-task minima
        assert front[:, 0].min() <= grid[:, 0].min() + 1e-9 and front[:, 1].min() <= grid[:, 1].min() + 1e-9


def _outcome(method: str, start: tuple[float, float], setting: object, steps: int | None = None) -> object:
    traj, done, stop = toy.run_one(method, start, setting, steps=steps)
    assert done == (steps or setting.steps) and stop == "steps"  # every step ran, no shortcut
    assert len(traj) >= 2 and not np.allclose(traj[0], traj[-1])  # and x moved
    outcome = toy.assess(method, start, traj, setting, 0.0)
    outcome.steps, outcome.stop = done, stop
    return outcome


# Fast: one run per published claim, with fewer steps where the outcome is already settled by then.
def test_adam_on_the_mean_loss_stalls_where_cagrad_fig1_shows_it() -> None:
    """CAGrad Fig. 1, GD panel: from (9, 9) Adam on the mean loss stops on the plateau above x₂ = 0."""
    o = _outcome("equal", (9.0, 9.0), CAGRAD, steps=30_000)
    assert not o.on_front and o.x_distance > 5.0 and o.losses[0] > 0.0 and o.losses[1] > 0.0


def test_cagrad_heads_for_the_balanced_point() -> None:
    """CAGrad Fig. 1: CAGrad ends at the minimum of L₁ + L₂ (x₁ = 0 on the Pareto set). Fast proxy: ten times
    the paper's learning rate for 3 000 steps (the slow test runs the paper's 100 000 steps at 10⁻³)."""
    o = _outcome("cagrad", (-8.5, -5.0), dataclasses.replace(CAGRAD, lr=1e-2), steps=3_000)
    assert o.on_front and abs(o.front_x1) < 0.2


def test_mgda_reaches_the_pareto_set_at_an_extreme() -> None:
    """CAGrad Fig. 1, MGDA panel: from (−8.5, −5) MGDA stops on the Pareto set at its L₂ end (x₁ ≈ −7)."""
    o = _outcome("mgda", (-8.5, -5.0), CAGRAD, steps=12_000)
    assert o.on_front and o.front_x1 < -6.5


def test_pcgrad_stalls_where_nash_mtl_fig1_shows_it() -> None:
    """Nash-MTL Fig. 1, PCGrad panel: from (9, 9) (losses (0.79, 6.69)) PCGrad stalls off the front."""
    o = _outcome("pcgrad", (9.0, 9.0), NASH, steps=15_000)
    assert not o.on_front and o.x_distance > 5.0


@pytest.mark.slow
@FULL
def test_published_outcomes_nash_setting() -> None:
    """Nash-MTL Fig. 1 (s = 0.1, five starts, 35 000 steps), per start as the figure shows: Nash-MTL and MGDA
    reach the front from every start, MGDA mostly at the L₁ end; LS, PCGrad and CAGrad stall from (9, 9)."""
    # Nash-MTL's solver is slow once the gradients are opposed (5–20 ms a step); every start is on the front
    # by step 18 500 in the benchmark run, so 20 000 steps are checked
    for o in (_outcome("nash_mtl", s, NASH, steps=20_000) for s in NASH.starts):
        assert o.on_front, o
    mgda = [_outcome("mgda", s, NASH) for s in NASH.starts]
    assert all(o.on_front for o in mgda) and sum(o.front_x1 > 0.0 for o in mgda) >= 3
    for m in ("equal", "pcgrad", "cagrad"):
        assert not _outcome(m, (9.0, 9.0), NASH).on_front, m
    for s in ((0.0, 0.0), (-7.5, -0.5), (9.0, -1.0)):
        assert _outcome("pcgrad", s, NASH).on_front, s


def _arrival_x1(o: object) -> float:
    """x₁ of the first recorded point of the run within the tolerance of the Pareto set (where it lands)."""
    pset = toy.pareto_set()
    near = np.flatnonzero(toy._segment_distance(o.trajectory, pset) < 0.05)
    assert near.size, "never reached the Pareto set"
    return float(o.trajectory[near[0], 0])


@pytest.mark.slow
@FULL
def test_published_outcomes_cagrad_setting() -> None:
    """CAGrad Fig. 1 (s = 1, three starts, 100 000 steps): CAGrad ends at the balanced point from every start;
    MGDA and PCGrad land on the Pareto set away from it (x₁ ≈ −3.3, −7, +3.3 and −2.3, −6.6, +2.7 as read off
    the figure); Adam on the mean loss stalls from (−8.5, 7.5) and (9, 9)."""
    assert all(o.on_front and abs(o.front_x1) < 0.05 for o in (_outcome("cagrad", s, CAGRAD) for s in CAGRAD.starts))
    mgda = [_outcome("mgda", s, CAGRAD) for s in CAGRAD.starts]
    np.testing.assert_allclose([_arrival_x1(o) for o in mgda], [-3.3, -7.0, 3.3], atol=0.4)
    pcgrad = [_outcome("pcgrad", s, CAGRAD) for s in CAGRAD.starts]
    assert all(o.on_front for o in pcgrad)
    np.testing.assert_allclose([o.front_x1 for o in pcgrad], [-2.3, -6.6, 2.7], atol=1.2)
    equal = [_outcome("equal", s, CAGRAD) for s in CAGRAD.starts]
    assert [o.on_front for o in equal] == [False, True, False]


@pytest.mark.slow
@FULL
@pytest.mark.xfail(strict=True, reason="mtml's MGDA keeps a ~1e-7 ridge bias toward equal weights; once on the "
                   "Pareto set Adam's normalisation turns that residual into full steps, and x drifts along the set to "
                   "the balanced point within 100 000 steps (the paper's MGDA stays where it lands)")
def test_mgda_stays_where_it_lands_cagrad_setting() -> None:
    for s, x1 in zip(CAGRAD.starts, (-3.3, -7.0, 3.3), strict=True):
        assert abs(_outcome("mgda", s, CAGRAD).front_x1 - x1) < 0.4


def test_a_method_that_cannot_run_is_listed_with_its_reason() -> None:
    outcomes, skipped = toy.run_all(NASH, ["equal", "no_such_weighting"], steps=20, verbose=False)
    assert [o.method for o in outcomes] == ["equal"] * len(NASH.starts)
    assert list(skipped) == ["no_such_weighting"] and "unknown weighting" in skipped["no_such_weighting"]
    assert "cannot run: UnknownNameError" in toy.table(outcomes, skipped, NASH)


def test_the_run_loop_is_torch_adam_on_the_weighted_loss() -> None:
    """run_one's float Adam and Σ wᵢ∇Lᵢ against torch.optim.Adam on the autograd loss (equal weights: the sum)."""
    traj, done, _ = toy.run_one("equal", (-7.5, -0.5), NASH, steps=300, record=1)
    x = torch.tensor([-7.5, -0.5], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=NASH.lr)
    for _ in range(300):
        optimizer.zero_grad()
        toy.toy_losses(x, NASH.scale).sum().backward()
        optimizer.step()
    assert done == 300 and traj.shape == (301, 2)
    np.testing.assert_allclose(traj[-1], x.detach().numpy(), rtol=0, atol=1e-12)
