"""The two-objective 2-D toy of CAGrad and Nash-MTL: which weighting reaches the Pareto front from which start.

Usage:  .venv/bin/python benchmarks/mtl_toy.py [--setting nash|cagrad] [--methods mgda pcgrad ...] [--steps N]
                [--max-seconds S] [--patience N] [--figure docs/img/mtl_toy.png] [--fronts docs/img/mtl_toy_fronts.png]
                [--panels equal mgda ...] [--json out.json]
        .venv/bin/python benchmarks/mtl_toy.py --from-json a.json b.json [--figure ...]   (merge saved runs)

Prints a Markdown table (method, start, steps, final (L1, L2), distance to the front in x and in loss space, x₁ of
the nearest Pareto point, on front?, the published outcome from that start) and a per-method summary. Every run
takes the paper's step count unless ``--max-seconds`` (wall-clock cap per run) or ``--patience`` (a screening
shortcut: stop once x moved < 0.002 in that many steps; it can cut a run that lingers on a ridge and then leaves)
ends it first; the table says which.

The problem (facts from the papers' public code, written here afresh): x ∈ R², ``s`` the scale of the first loss,

    a₁ = −(x₁ + 7)/2 + tanh x₂,   a₂ = 3.5 − x₁/2 − tanh x₂,    hᵢ = log max(|aᵢ|, 5·10⁻⁶) + 6
    q₁ = ((x₁ − 7)² + 0.1(x₂ + 8)²)/10 − 20,   q₂ = ((x₁ + 7)² + 0.1(x₂ + 8)²)/10 − 20
    c₊ = max(tanh(x₂/2), 0),   c₋ = max(tanh(−x₂/2), 0)
    L₁ = s·(c₊h₁ + c₋q₁),   L₂ = c₊h₂ + c₋q₂

Two settings, each as its paper's code runs it (Adam on x, lr 10⁻³, x starts at each point):

* ``cagrad`` — Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
  Fig. 1 (repository Cranial-XIX/CAGrad, ``toy.py``): s = 1, starts (−8.5, 7.5), (−8.5, −5), (9, 9), 100 000 steps,
  CAGrad c = 0.5 with the update divided by 1 + c (``rescale=2``).
* ``nash`` (default) — Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
  Bargaining Game", ICML 2022, Fig. 1 (repository AvivNavon/nash-mtl, ``experiments/toy``): s = 0.1 (the first
  loss's gradient is ten times smaller), five starts (−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5), (9, −1), 35 000
  steps, CAGrad c = 0.4 (that code's default, ``rescale=1``). FAMO (Liu et al., NeurIPS 2023) reuses this setting
  with γ = 0 and the losses shifted by their lower bound 21·sᵢ; FAMO runs here that way.

Every name in ``mtml.weighting.WEIGHTINGS`` is run (read at run time, so weightings added later are covered); one
that cannot be built or stepped is listed with the reason. Each step is the training step of
:func:`mtml.engine.joint_step` on a model whose only shared parameter is x: the weighting gets the losses shifted
by 21·sᵢ (positive, as loss-based methods need; no gradient changes) and the Gramian ``G = J Jᵀ`` of the two exact
2-D gradients; x's gradient is ``Σ wᵢ∇Lᵢ``, and a weighting with learned parameters (uncertainty, IMTL-L) has
them trained by the same Adam through ``Σ wᵢLᵢ + penalty``.

The Pareto front is known up to a 1-D root. Below x₂ = 0 only the quadratic branch is active (c₊ = 0), and above
it both losses stay above −6.2·sᵢ, far above the front, so the front lies in x₂ < 0. There ``∂Lᵢ/∂x₁ ∝ x₁ ∓ 7``,
so a Pareto-stationary point has x₁ ∈ [−7, 7] and multipliers α = (x₁ + 7)/14 on L₁/s, 1 − α on L₂; the
x₂-condition then says x₂ minimises ``tanh(−x₂/2)·((49 − x₁²)/10 + 0.01(x₂ + 8)² − 20)``, whose derivative has
one root in x₂ ∈ (−14, −8) (Brent's method). :func:`pareto_set` returns that curve; :func:`check_front` checks
it against the non-dominated points of a dense grid. A run *reaches the front* when its final x lies within
``--tol`` (default 0.05) of the Pareto set in x; the table gives that distance, the distance in loss space, and
x₁ of the nearest Pareto point (−7: best L₂, +7: best L₁, 0: the minimum of L₁ + L₂ when s = 1). The published
outcomes (:data:`PUBLISHED`) are read off the papers' figures, per start.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from mtml.weighting import WEIGHTINGS, JacobianWeighting

LOWER = 5e-6  # the clamp inside the logarithms
SHIFT = 21.0  # losses are fed as Lᵢ + 21·sᵢ > 0 (FAMO's toy code: min_losses = −21·sᵢ)
TASKS = ("L1", "L2")


@dataclass(frozen=True)
class Setting:
    """One paper's toy run: first-loss scale, starts, Adam steps and learning rate, per-method options."""

    name: str
    scale: float
    starts: tuple[tuple[float, float], ...]
    steps: int
    lr: float
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


SETTINGS = {
    "cagrad": Setting("cagrad", 1.0, ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)), 100_000, 1e-3,
                      {"cagrad": {"c": 0.5, "rescale": 2}, "famo": {"gamma": 0.0}}),
    "nash": Setting("nash", 0.1, ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)), 35_000, 1e-3,
                    {"cagrad": {"c": 0.4, "rescale": 1}, "famo": {"gamma": 0.0}}),
}

#: What each paper's Fig. 1 shows, per start (in :data:`SETTINGS` order), read off the figures in the papers'
#: repositories (CAGrad: ``misc/cagrad.gif``, last frame, x-space; Nash-MTL: ``misc/toy_pareto_2d.png`` and FAMO:
#: ``misc/fig.png``, loss space).
#: Positions are read by eye: ±0.3 in x₁, ±0.1 in L₁, ±0.5 in L₂.
PUBLISHED: dict[str, dict[str, tuple[str, ...]]] = {
    "cagrad": {
        "equal": ("stalls near (−5, 3)", "front at ★ (x₁ = 0)", "stalls near (5, 3)"),
        "mgda": ("front, x₁ ≈ −3.3", "front, x₁ ≈ −7", "front, x₁ ≈ +3.3"),
        "pcgrad": ("front, x₁ ≈ −2.3", "front, x₁ ≈ −6.6", "front, x₁ ≈ +2.7"),
        "cagrad": ("front at ★ (x₁ = 0)",) * 3,
    },
    "nash": {
        "equal": ("late: lingers near (0.1, 5.5), ends just short of (−0.4, −19.8)", "front at (−0.4, −19.8)",
                  "stalls: descends along L1 ≈ 0.75 to L2 ≈ −6", "front at (−0.4, −19.8)", "front at (−0.4, −19.8)"),
        "mgda": ("front ≈ (−1.2, −17.4), after lingering near (0, 5)", "front at the L1 end ≈ (−2, −1…−3)",
                 "front at the L1 end ≈ (−2, −1…−3)", "front ≈ (−0.75, −18.7)", "front at the L1 end ≈ (−2, −0.3)"),
        "pcgrad": ("front ≈ (−0.7…−0.95, −19), after lingering near (0.1, 6)", "front ≈ (−0.7…−0.95, −19)",
                   "stalls: oscillates at L1 0.25…0.75, L2 −4…2", "front ≈ (−0.7…−0.95, −19)",
                   "front at the L1 end ≈ (−1.95, −5)"),
        "cagrad": ("front near (−0.4…−0.7, −19.5), late, after lingering near (0.1, 6)",
                   "front near (−0.4…−0.7, −19.5)", "stalls: oscillates at L1 0.35…0.75, L2 −5…0",
                   "front near (−0.4…−0.7, −19.5)", "front near (−0.4…−0.7, −19.5)"),
        "nash_mtl": ("front from every start; the five ends ≈ (−1.95, −4), (−1.8, −8.5), (−1.5, −13.5), "
                     "(−1.05, −18), (−0.95, −18.5) (which start ends where is not readable)",) * 5,
        # FAMO (Liu, Liang, Gong, Lv, Stone & Liu, NeurIPS 2023): repository Cranial-XIX/FAMO, misc/fig.png
        "famo": ("front from every start (FAMO's figure); the ends cluster ≈ (−1.3…−1.6, −14…−17)",) * 5,
    },
}


def published(setting: str, method: str, start_index: int) -> str:
    """The published outcome of ``method`` from the ``start_index``-th start of ``setting`` ("—" if not shown)."""
    row = PUBLISHED.get(setting, {}).get(method)
    return row[start_index] if row else "—"


# ----------------------------------------------------------------------------------------------------- the toy


def toy_losses(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x [..., 2] → [..., 2]``: the two losses (L₁ scaled by ``scale``), differentiable by autograd."""
    x1, x2 = x[..., 0], x[..., 1]
    h1 = torch.log(torch.clamp((-0.5 * (x1 + 7.0) + torch.tanh(x2)).abs(), min=LOWER)) + 6.0
    h2 = torch.log(torch.clamp((3.5 - 0.5 * x1 - torch.tanh(x2)).abs(), min=LOWER)) + 6.0
    q1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    q2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    up = torch.clamp(torch.tanh(0.5 * x2), min=0.0)
    down = torch.clamp(torch.tanh(-0.5 * x2), min=0.0)
    return torch.stack([scale * (up * h1 + down * q1), up * h2 + down * q2], -1)


def toy_point(x1: float, x2: float, scale: float = 1.0) -> tuple[float, float, float, float, float, float]:
    """The losses and their closed-form gradients at one point, in plain floats (the fast path of the runs):
    ``(L₁, L₂, ∂L₁/∂x₁, ∂L₁/∂x₂, ∂L₂/∂x₁, ∂L₂/∂x₂)``.

    At a kink it takes the one-sided derivative autograd takes: a clamp passes the gradient when its input equals
    the bound (so at x₂ = 0 both branches contribute), ``|a|`` has derivative ``sign(a)`` (0 at 0).
    """
    t = math.tanh(x2)
    sech2 = 1.0 - t * t
    a1, a2 = -0.5 * (x1 + 7.0) + t, 3.5 - 0.5 * x1 - t
    h1 = math.log(max(abs(a1), LOWER)) + 6.0
    h2 = math.log(max(abs(a2), LOWER)) + 6.0
    # d log max(|a|, LOWER) = da / a while |a| >= LOWER (zero below the clamp)
    r1 = 1.0 / a1 if abs(a1) >= LOWER else 0.0
    r2 = 1.0 / a2 if abs(a2) >= LOWER else 0.0
    q1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    q2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    th = math.tanh(0.5 * x2)
    up, down = max(th, 0.0), max(-th, 0.0)
    half_sech2 = 0.5 * (1.0 - th * th)
    dup = half_sech2 if th >= 0.0 else 0.0
    ddown = -half_sech2 if -th >= 0.0 else 0.0
    dq2 = 0.02 * (x2 + 8.0)
    l1 = up * h1 + down * q1
    l2 = up * h2 + down * q2
    g11 = up * (-0.5 * r1) + down * (x1 - 7.0) / 5.0
    g12 = dup * h1 + up * sech2 * r1 + ddown * q1 + down * dq2
    g21 = up * (-0.5 * r2) + down * (x1 + 7.0) / 5.0
    g22 = dup * h2 - up * sech2 * r2 + ddown * q2 + down * dq2
    return scale * l1, l2, scale * g11, scale * g12, g21, g22


def toy_jacobian(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x [n, 2] → J [n, 2, 2]`` with ``J[k, i] = ∇Lᵢ(x_k)``, in closed form (:func:`toy_point` per row)."""
    rows = [toy_point(float(a), float(b), scale)[2:] for a, b in x.reshape(-1, 2).tolist()]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 2, 2)


# ------------------------------------------------------------------------------------------------ the front


def _pareto_x2(x1: float) -> float:
    """x₂ of the Pareto point above ``x1 ∈ [−7, 7]``: the root of d/dx₂ of the multiplier-weighted loss."""
    a = (49.0 - x1 * x1) / 10.0 - 20.0

    def slope(x2: float) -> float:  # d/dx2 of tanh(-x2/2)·(a + 0.01(x2 + 8)²)
        th = math.tanh(-0.5 * x2)
        return -0.5 * (1.0 - th * th) * (a + 0.01 * (x2 + 8.0) ** 2) + th * 0.02 * (x2 + 8.0)

    return float(brentq(slope, -14.0, -8.0, xtol=1e-13))


def pareto_set(n: int = 2001) -> np.ndarray:
    """``[n, 2]`` points of the Pareto set in x, x₁ from −7 to 7 (independent of the loss scale)."""
    x1 = np.linspace(-7.0, 7.0, n)
    return np.stack([x1, np.array([_pareto_x2(float(v)) for v in x1])], 1)


def pareto_front(scale: float, n: int = 2001) -> np.ndarray:
    """``[n, 2]`` loss pairs (L₁, L₂) along :func:`pareto_set`."""
    return toy_losses(torch.from_numpy(pareto_set(n)), scale).numpy()


def grid_front(scale: float, n: int = 1201, box: float = 11.0) -> np.ndarray:
    """Non-dominated loss pairs of an ``n × n`` grid of x in ``[−box, box]²`` (sorted by L₁)."""
    axis = np.linspace(-box, box, n)
    xs = torch.from_numpy(np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2))
    f = toy_losses(xs, scale).numpy()
    f = f[np.lexsort((f[:, 1], f[:, 0]))]
    best = np.minimum.accumulate(f[:, 1])
    keep = np.r_[True, f[1:, 1] < best[:-1]]
    return f[keep]


def _segment_distance(points: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Euclidean distance from each of ``points [k, 2]`` to the polyline ``curve [n, 2]``."""
    a, b = curve[:-1], curve[1:]
    ab = b - a
    denom = np.maximum((ab * ab).sum(1), 1e-300)
    out = np.empty(len(points))
    for i, p in enumerate(points):
        t = np.clip(((p - a) * ab).sum(1) / denom, 0.0, 1.0)
        out[i] = np.sqrt((((a + t[:, None] * ab) - p) ** 2).sum(1)).min()
    return out


def check_front(scale: float, n: int = 1201) -> dict[str, float]:
    """How well the closed-form front matches a dense grid: the largest distance (loss space) of a grid
    non-dominated point to the front, and how far any grid point lies below it (dominates it: should be ~0)."""
    front = pareto_front(scale)
    grid = grid_front(scale, n)
    dist = _segment_distance(grid, front)
    # a grid point that dominates a front point by more than the grid spacing would disprove the front
    below = 0.0
    for p in grid:
        gap = np.minimum(front[:, 0] - p[0], front[:, 1] - p[1]).max()
        below = max(below, float(gap))
    return {"grid_points": float(len(grid)), "max_grid_to_front": float(dist.max()),
            "median_grid_to_front": float(np.median(dist)), "max_dominance": below}


# ------------------------------------------------------------------------------------------------- the runs


@dataclass
class Outcome:
    """One method from one start."""

    method: str
    start: tuple[float, float]
    trajectory: np.ndarray  # [k, 2] x every ``record`` steps, last row the final x
    losses: tuple[float, float]
    x_distance: float
    loss_distance: float
    front_x1: float
    on_front: bool
    seconds: float
    steps: int = 0
    stop: str = "steps"


def run_one(method: str, start: Sequence[float], setting: Setting, *, steps: int | None = None, record: int = 50,
            patience: int = 0, still: float = 2e-3, max_seconds: float = math.inf) -> tuple[np.ndarray, int, str]:
    """Adam on x from ``start`` with the registered weighting ``method``.

    Returns x every ``record`` steps (last row: the final x), the steps taken and why it stopped: ``steps`` (all
    of them), ``still`` (with ``patience > 0``: x moved less than ``still`` over the last ``patience`` steps, i.e.
    under ``still/patience`` per step — it would need millions of steps to move one unit) or ``time`` (the run
    passed ``max_seconds``; judged where it stopped, and the table says so).

    x's Adam is PyTorch's update rule (β = 0.9, 0.999, ε = 10⁻⁸) written on two floats, which keeps a step at
    tens of microseconds; a weighting's own learned parameters take ``torch.optim.Adam`` at the same rate, as
    the training loop gives them. Raises whatever the weighting raises (the caller lists it as "cannot run").
    """
    steps = setting.steps if steps is None else steps
    scale, lr = setting.scale, setting.lr
    weighting = WEIGHTINGS.create(method, list(TASKS), where=f"weighting '{method}'",
                                  **setting.options.get(method, {}))
    if getattr(weighting, "needs_validation", False):  # bilevel methods learn from held-out batches
        raise NotImplementedError("learns its weights from validation batches (a look-ahead step); the toy has "
                                  "no validation split, so it would run with frozen weights")
    weighting.train()
    learned = [p for p in weighting.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(learned, lr=lr) if learned else None
    shift1, shift2 = SHIFT * scale, SHIFT
    needs_gramian = weighting.needs_gramian
    combiner = weighting if isinstance(weighting, JacobianWeighting) else None
    b1, b2, eps = 0.9, 0.999, 1e-8
    x = [float(start[0]), float(start[1])]
    m_, v_ = [0.0, 0.0], [0.0, 0.0]
    out = [list(x)]
    began = time.perf_counter()
    marks: list[list[float]] = [list(x)]  # x every `patience` steps
    for step in range(1, steps + 1):
        l1, l2, g11, g12, g21, g22 = toy_point(x[0], x[1], scale)
        losses = torch.tensor([l1 + shift1, l2 + shift2], dtype=torch.float64)
        if combiner is not None:  # methods that combine J [2, 2] themselves (GradDrop, MoCo, ...)
            jac = torch.tensor([[g11, g12], [g21, g22]], dtype=torch.float64)
            result = combiner.combine(losses, jac)
            w = result.weights
            d1, d2 = result.update.tolist()
        else:
            gram = None
            if needs_gramian:
                off = g11 * g21 + g12 * g22
                gram = torch.tensor([[g11 * g11 + g12 * g12, off], [off, g21 * g21 + g22 * g22]], dtype=torch.float64)
            w = weighting(losses, gram)
            w1, w2 = w.detach().tolist()
            d1, d2 = w1 * g11 + w2 * g21, w1 * g12 + w2 * g22
        if optimizer is not None:  # Σ wᵢLᵢ + penalty trains the weighting's own parameters
            optimizer.zero_grad(set_to_none=True)
            total = (w * losses).sum() + weighting.penalty().to(losses)
            if total.requires_grad:
                total.backward()
                optimizer.step()
        bc1, bc2 = 1.0 - b1**step, math.sqrt(1.0 - b2**step)
        for k, g in ((0, d1), (1, d2)):
            m_[k] = b1 * m_[k] + (1.0 - b1) * g
            v_[k] = b2 * v_[k] + (1.0 - b2) * g * g
            x[k] -= (lr / bc1) * m_[k] / (math.sqrt(v_[k]) / bc2 + eps)
        if not (math.isfinite(x[0]) and math.isfinite(x[1])):
            raise FloatingPointError(f"x became non-finite at step {step}")
        if step % record == 0 or step == steps:
            out.append(list(x))
        if patience and step % patience == 0:
            moved = math.hypot(x[0] - marks[-1][0], x[1] - marks[-1][1])
            marks.append(list(x))
            if moved < still:
                out.append(list(x))
                return np.array(out), step, "still"
        if step % 500 == 0 and time.perf_counter() - began > max_seconds:
            out.append(list(x))
            return np.array(out), step, "time"
    return np.array(out), steps, "steps"


def assess(method: str, start: Sequence[float], traj: np.ndarray, setting: Setting, seconds: float, *,
           tol: float = 0.05, pset: np.ndarray | None = None, front: np.ndarray | None = None) -> Outcome:
    """Where the final point of ``traj`` lies with respect to the Pareto set and front."""
    pset = pareto_set() if pset is None else pset
    front = pareto_front(setting.scale) if front is None else front
    final = traj[-1]
    losses = toy_losses(torch.from_numpy(final), setting.scale).tolist()
    xd = float(_segment_distance(final[None], pset)[0])
    ld = float(_segment_distance(np.array([losses]), front)[0])
    nearest = float(pset[np.argmin(((pset - final) ** 2).sum(1)), 0])
    return Outcome(method, (float(start[0]), float(start[1])), traj, (losses[0], losses[1]), xd, ld, nearest,
                   xd < tol, seconds)


def run_all(setting: Setting, methods: Sequence[str] | None = None, *, steps: int | None = None,
            tol: float = 0.05, record: int = 50, patience: int = 0, max_seconds: float = math.inf,
            verbose: bool = True) -> tuple[list[Outcome], dict[str, str]]:
    """Every method (default: the whole registry, read now) from every start. Returns the outcomes and, per
    method that could not run, the reason."""
    names = list(WEIGHTINGS.names()) if methods is None else list(methods)
    pset, front = pareto_set(), pareto_front(setting.scale)
    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    for name in names:
        for start in setting.starts:
            began = time.perf_counter()
            try:
                traj, done, stop = run_one(name, start, setting, steps=steps, record=record, patience=patience,
                                           max_seconds=max_seconds)
            except Exception as exc:  # any failure is reported, never dropped
                skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                break
            o = assess(name, start, traj, setting, time.perf_counter() - began, tol=tol, pset=pset, front=front)
            o.steps, o.stop = done, stop
            outcomes.append(o)
            if verbose:
                print(f"  {name:>12} from {start}: ({o.losses[0]:.4f}, {o.losses[1]:.4f}) x-dist {o.x_distance:.3g}"
                      f" [{o.steps} steps, {o.stop}, {o.seconds:.1f}s]", flush=True)
    return outcomes, skipped


def _note(method: str) -> str:
    """A caveat for methods whose idea does not map one-to-one onto a 2-parameter model."""
    try:
        w = WEIGHTINGS.create(method, list(TASKS))
    except Exception:  # (already listed as cannot run)
        return ""
    if getattr(w, "gramian", None) == "representation":
        return "the toy has no representation: its Gramian is over x, so it runs as the parameter-level method"
    return ""


def table(outcomes: Sequence[Outcome], skipped: dict[str, str], setting: Setting) -> str:
    """The Markdown table: method, start, final (L1, L2), distances, nearest x₁, on front?, published."""
    lines = ["| method | start | steps | final (L1, L2) | distance to front: x / loss | nearest x₁ | on front? "
             "| published |", "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        pub = published(setting.name, o.method, setting.starts.index(o.start))
        steps = f"{o.steps}" + {"steps": "", "still": " (still)", "time": " (time cap)"}[o.stop]
        lines.append(f"| {o.method} | ({o.start[0]:g}, {o.start[1]:g}) | {steps} | "
                     f"({o.losses[0]:.3f}, {o.losses[1]:.3f}) | "
                     f"{o.x_distance:.3g} / {o.loss_distance:.3g} | {o.front_x1:+.2f} | "
                     f"{'yes' if o.on_front else 'no'} | {pub} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | — | — | cannot run: {why} | | | | — |")
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome], setting: Setting) -> str:
    """One line per method: how many starts reach the front, and where on it."""
    lines = ["| method | starts on front | nearest x₁ of the final points (✗: not on the front) | published |",
             "|---|---|---|---|"]
    for name in dict.fromkeys(o.method for o in outcomes):
        mine = [o for o in outcomes if o.method == name]
        hits = sum(o.on_front for o in mine)
        where = ", ".join(f"{o.front_x1:+.1f}" + ("" if o.on_front else "✗") for o in mine)
        shown = PUBLISHED.get(setting.name, {}).get(name)
        pub = "; ".join(dict.fromkeys(shown)) if shown else "—"
        lines.append(f"| {name} | {hits}/{len(mine)} | {where} | {pub} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures


def _grid(scale: float, box: float = 11.0, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(-box, box, n)
    gx, gy = np.meshgrid(axis, axis)
    f = toy_losses(torch.from_numpy(np.stack([gx, gy], -1)), scale).numpy()
    return gx, gy, f


def figure(outcomes: Sequence[Outcome], setting: Setting, path: Path, methods: Sequence[str] | None = None) -> None:
    """Contour of L₁ + L₂ in x with the Pareto set and every start's trajectory, one panel per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(o.method for o in outcomes)) if methods is None else list(methods)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    gx, gy, f = _grid(setting.scale)
    pset = pareto_set(401)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.contour(gx, gy, f.sum(-1), levels=18, cmap="viridis", linewidths=0.7)
        ax.plot(pset[:, 0], pset[:, 1], color="0.55", linewidth=4, zorder=1)
        for o in (o for o in outcomes if o.method == name):
            t = o.trajectory
            ax.plot(t[:, 0], t[:, 1], color="tab:red" if not o.on_front else "tab:orange", linewidth=1.3, zorder=3)
            ax.plot(*t[0], "ko", markersize=4, zorder=4)
            ax.plot(*t[-1], marker="x" if not o.on_front else "*", color="k", markersize=7, zorder=5)
        hits = sum(o.on_front for o in outcomes if o.method == name)
        total = sum(1 for o in outcomes if o.method == name)
        ax.set_title(f"{name}: {hits}/{total} on front", fontsize=10)
        ax.set_xlim(-11, 11)
        ax.set_ylim(-11, 11)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"2-D toy ({setting.name} setting, s = {setting.scale:g}, {setting.steps} Adam steps): contours of "
                 "L1 + L2, Pareto set in grey, ● start, ★ on front, × not", fontsize=10)
    fig.savefig(path, dpi=110)


def fronts_figure(outcomes: Sequence[Outcome], setting: Setting, path: Path,
                  methods: Sequence[str] | None = None) -> None:
    """Loss-space trajectories (L₁, L₂) against the Pareto front, one panel per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(o.method for o in outcomes)) if methods is None else list(methods)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    front = pareto_front(setting.scale, 401)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.plot(front[:, 0], front[:, 1], color="0.55", linewidth=4, zorder=1)
        for o in (o for o in outcomes if o.method == name):
            lt = toy_losses(torch.from_numpy(o.trajectory), setting.scale).numpy()
            ax.plot(lt[:, 0], lt[:, 1], color="tab:red" if not o.on_front else "tab:orange", linewidth=1.2)
            ax.plot(*lt[0], "ko", markersize=4)
            ax.plot(*lt[-1], marker="x" if not o.on_front else "*", color="k", markersize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("L1", fontsize=8)
        ax.set_ylabel("L2", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Loss space ({setting.name} setting): Pareto front in grey", fontsize=10)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------ main


def save(path: Path, outcomes: Sequence[Outcome], skipped: dict[str, str], setting: Setting,
         check: dict[str, float]) -> None:
    """Write the outcomes (with trajectories, x every 50 steps) as JSON; :func:`load` reads them back."""
    rows = [{"method": o.method, "start": o.start, "losses": o.losses, "x_distance": o.x_distance,
             "loss_distance": o.loss_distance, "front_x1": o.front_x1, "on_front": o.on_front, "steps": o.steps,
             "stop": o.stop, "seconds": o.seconds, "trajectory": np.round(o.trajectory, 6).tolist()}
            for o in outcomes]
    path.write_text(json.dumps({"setting": setting.name, "front_check": check, "runs": rows,
                                "cannot_run": skipped}))


def load(paths: Sequence[Path]) -> tuple[Setting, list[Outcome], dict[str, str], dict[str, float]]:
    """Merge the runs of several :func:`save` files (one setting): a method in a later file replaces its runs
    from earlier files."""
    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    names: set[str] = set()
    check: dict[str, float] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        names.add(data["setting"])
        check = data["front_check"]
        skipped.update(data["cannot_run"])
        later = {r["method"] for r in data["runs"]}
        outcomes = [o for o in outcomes if o.method not in later]
        for r in data["runs"]:
            outcomes.append(Outcome(r["method"], tuple(r["start"]), np.array(r["trajectory"]), tuple(r["losses"]),
                                    r["x_distance"], r["loss_distance"], r["front_x1"], r["on_front"],
                                    r["seconds"], r["steps"], r["stop"]))
    if len(names) != 1:
        raise SystemExit(f"--from-json: the files mix settings {sorted(names)}; give files of one setting.")
    return SETTINGS[names.pop()], outcomes, skipped, check


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="nash")
    parser.add_argument("--methods", nargs="*", help="registered weightings to run (default: all of them)")
    parser.add_argument("--steps", type=int, help="Adam steps (default: the paper's)")
    parser.add_argument("--tol", type=float, default=0.05, help="x-distance to the Pareto set counted as reached")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop a run once x moved < 0.002 over this many steps (default 0: run every step; "
                             "a screening shortcut only, it can cut a run that lingers and then leaves)")
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="wall-clock cap of one run")
    parser.add_argument("--figure", type=Path, help="write the contour/trajectory panels here (PNG)")
    parser.add_argument("--fronts", type=Path, help="write the loss-space panels here (PNG)")
    parser.add_argument("--panels", nargs="*", help="methods drawn in the figures (default: all that ran)")
    parser.add_argument("--json", type=Path, help="write the outcomes (with trajectories) here")
    parser.add_argument("--from-json", type=Path, nargs="+", help="print and draw saved runs instead of running")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.from_json:
        setting, outcomes, skipped, check = load(args.from_json)
    else:
        setting = SETTINGS[args.setting]
        check = check_front(setting.scale)
        outcomes, skipped = run_all(setting, args.methods, steps=args.steps, tol=args.tol, patience=args.patience,
                                    max_seconds=args.max_seconds)
    print(f"front check (s = {setting.scale:g}): {int(check['grid_points'])} non-dominated points of a 1201² grid, "
          f"largest distance to the closed-form front {check['max_grid_to_front']:.3g} (median "
          f"{check['median_grid_to_front']:.3g}); no grid point dominates it by more than {check['max_dominance']:.3g}")
    print()
    print(table(outcomes, skipped, setting))
    print()
    print(summary(outcomes, setting))
    for name in dict.fromkeys(o.method for o in outcomes):
        note = _note(name)
        if note:
            print(f"note: {name}: {note}")
    print(f"\n{len(outcomes)} runs, {time.perf_counter() - began:.0f} s")
    if args.json and not args.from_json:
        save(args.json, outcomes, skipped, setting, check)
    if args.figure:
        figure(outcomes, setting, args.figure, args.panels)
    if args.fronts:
        fronts_figure(outcomes, setting, args.fronts, args.panels)


if __name__ == "__main__":
    main()
