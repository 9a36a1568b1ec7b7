"""Behaviour of :mod:`mtml.weighting` that the mutation run (benchmarks/mutation_score.py) found untested: GradVac's
cosine-setting correction against a geometric oracle, and option errors (one-line ConfigErrors, not TypeErrors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from mtml.errors import ConfigError
from mtml.weighting import WEIGHTINGS
from mtml.weighting._excess_mtl import ExcessMTL


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _gain(gi: np.ndarray, gj: np.ndarray, goal: float) -> float:
    """The multiple ``k`` of ``gj`` whose addition to ``gi`` makes ``cos(gi + k·gj, gj) = goal``: found by root
    search on the cosine itself, independently of GradVac's closed form."""
    return float(brentq(lambda k: _cos(gi + k * gj, gj) - goal, 0.0, 1e3, xtol=1e-14))


def test_gradvac_sets_each_pairs_cosine_to_its_ema_target() -> None:
    gv = WEIGHTINGS.create("gradvac", ["a", "b"], beta=1.0)  # beta 1: the target becomes the last cosine seen
    losses = torch.ones(2, dtype=torch.float64)
    agree = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)]])  # cosine 0.5: above the initial target 0, unchanged
    w = gv.weights(losses, torch.from_numpy(agree @ agree.T))
    assert torch.allclose(w, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(gv.target, torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64))

    g0, g1 = np.array([2.0, 0.0]), np.array([-0.9, 1.5])  # cosine below 0.5: each is steered towards the other
    assert _cos(g0, g1) < 0.5
    w = gv.weights(losses, torch.from_numpy(np.stack([g0, g1]) @ np.stack([g0, g1]).T)).numpy()
    k0, k1 = _gain(g0, g1, 0.5), _gain(g1, g0, 0.5)  # g0 + k0·g1 and g1 + k1·g0, summed: weights (1 + k1, 1 + k0)
    assert w == pytest.approx([1.0 + k1, 1.0 + k0], rel=1e-9)
    assert _cos(g0 + (w[1] - 1.0) * g1, g1) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("rho", [math.inf, -1e-3, math.nan])
def test_modo_refuses_a_rho_that_is_not_finite_and_non_negative(rho: float) -> None:
    with pytest.raises(ConfigError, match=r"`rho` must be a finite number >= 0"):
        WEIGHTINGS.create("modo", ["a", "b"], rho=rho)


@pytest.mark.parametrize("step_size", [True, math.inf, 0.0])
def test_excess_mtl_refuses_a_bad_step_size_in_one_line(step_size: object) -> None:
    with pytest.raises(ConfigError, match=r"`step_size` must be a finite number > 0"):
        ExcessMTL(["a", "b"], step_size=step_size)  # type: ignore[arg-type]  # (the registry reads True as 1.0)


def test_excess_mtl_refuses_a_word_for_the_step_size_without_a_type_error() -> None:
    with pytest.raises(ConfigError, match=r"step_size"):
        WEIGHTINGS.create("excess_mtl", ["a", "b"], step_size="big")


def test_auto_lambda_checks_the_type_of_primary_before_building() -> None:
    """A number for ``primary`` is a one-line ConfigError from the option check (it reads the annotation
    ``Sequence[str] | None``), not a TypeError from inside the constructor."""
    with pytest.raises(ConfigError, match=r"`primary` must be"):
        WEIGHTINGS.create("auto_lambda", ["a", "b"], primary=3)
    assert WEIGHTINGS.create("auto_lambda", ["a", "b"], primary=["b"]).primary == ["b"]
