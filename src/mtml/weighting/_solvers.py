"""Small dense solvers on the task Gramian, in float64 numpy (m ≤ a few dozen: per-call overhead dominates).

* :func:`nnqp` — ``argmin_{u ≥ 0} ½uᵀQu + bᵀu`` by the Lawson–Hanson active-set method (exact, finite);
* :func:`min_norm_simplex` — MGDA's ``argmin_{w ∈ Δ} wᵀGw``, reduced to one :func:`nnqp`;
* :func:`nash_bargaining` — Nash-MTL's ``α ⊙ Gα = 1``, by damped Newton on a strictly convex potential.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

Array = NDArray[np.float64]

__all__ = ["as_numpy", "min_norm_simplex", "nash_bargaining", "nnqp", "scaled", "to_weights", "trace_ridged"]


def as_numpy(gramian: Tensor) -> Array:
    """``[m, m]`` tensor (any device) → symmetric float64 array."""
    g = gramian.detach().to("cpu", torch.float64).numpy()
    return np.asarray(0.5 * (g + g.T), dtype=np.float64)


def to_weights(w: Array, like: Tensor) -> Tensor:
    """Float64 weights → a tensor with ``like``'s dtype and device."""
    return torch.as_tensor(np.ascontiguousarray(w), dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def scaled(gramian: Array) -> tuple[Array, float]:
    """``(G / s, s)`` with ``s`` the mean squared gradient norm (``trace(G)/m``); ``s = 0`` for a zero Gramian."""
    s = float(np.trace(gramian)) / gramian.shape[0]
    if not s > 1e-30 or not np.isfinite(s):
        return np.zeros_like(gramian), 0.0
    return gramian / s, s


def trace_ridged(gramian: Array, norm_eps: float, reg_eps: float) -> Array:
    """UPGrad's and DualProj's QP matrix (TorchJD's convention): ``G`` divided by its trace (a trace below
    ``norm_eps`` counts as a zero Gramian) plus the ridge ``max(reg_eps, 1e-12)·I``."""
    trace = float(np.trace(gramian))
    g = gramian / trace if trace >= norm_eps else np.zeros_like(gramian)
    return g + max(reg_eps, 1e-12) * np.eye(gramian.shape[0])


def nnqp(q: Array, b: Array, *, tol: float = 1e-12) -> Array:
    """``argmin_{u ≥ 0} ½uᵀQu + bᵀu`` for symmetric positive definite ``Q [m, m]`` (Lawson–Hanson).

    The free set grows by the coordinate with the most negative gradient; a step that would leave the
    orthant is cut back at the first coordinate reaching 0, which leaves the free set. Finite; at most a few
    ``m`` iterations in practice (capped at ``10·m + 10``).
    """
    m = b.shape[0]
    u = np.zeros(m)
    free = np.zeros(m, dtype=bool)
    scale = max(float(np.abs(b).max()), 1e-300)
    for _ in range(10 * m + 10):
        grad = -(q @ u + b)  # negative gradient
        grad[free] = -np.inf
        j = int(np.argmax(grad))
        if grad[j] <= tol * scale:
            break
        free[j] = True
        for _ in range(m + 1):
            idx = np.flatnonzero(free)
            z = np.zeros(m)
            z[idx] = np.linalg.solve(q[np.ix_(idx, idx)], -b[idx])
            if (z[idx] > 0).all():
                u = z
                break
            neg = idx[z[idx] <= 0]
            alpha = float(np.min(u[neg] / (u[neg] - z[neg])))
            u = u + alpha * (z - u)
            free &= u > tol * max(float(u.max()), 1e-300)
            u[~free] = 0.0
            if not free.any():
                break
    return u


def min_norm_simplex(gramian: Array, *, ridge: float = 1e-7) -> Array:
    """MGDA's ``argmin_{w ≥ 0, Σw = 1} wᵀGw`` (the min-norm point of the convex hull of the gradients).

    Solves ``u = argmin_{u ≥ 0} ½uᵀ(G/s + εI)u − 1ᵀu`` and returns ``u / Σu``: the KKT conditions of the two
    problems coincide (``(Gu)ᵢ ≥ 1`` with equality on the support). The ridge ``ε`` (relative to the mean squared
    gradient norm ``s``) picks the smallest-norm weights when the minimiser is not unique (identical or
    exactly cancelling gradients) and makes a zero Gramian give uniform weights.
    """
    m = gramian.shape[0]
    g, _ = scaled(gramian)
    u = nnqp(g + ridge * np.eye(m), -np.ones(m))
    total = float(u.sum())
    return u / total if total > 0 else np.full(m, 1.0 / m)


def nash_bargaining(gramian: Array, start: Array | None = None, *, ridge: float = 1e-10, iters: int = 50) -> Array:
    """Nash-MTL's bargaining weights: ``α > 0`` with ``αᵢ·(Gα)ᵢ = 1`` for every task.

    That is the stationary point of the strictly convex ``f(α) = ½αᵀGα − Σ log αᵢ``; damped Newton (backtracking
    keeps ``α > 0`` and decreases ``f``) from ``start`` (a warm start in units of ``G``) or from ``1/√Gᵢᵢ``.
    ``G`` is scaled to unit mean diagonal and given a ridge ``ε`` so that gradients whose cone contains 0 (where
    no bargaining solution exists) still give finite weights. Rows with a zero diagonal must be removed first.
    """
    m = gramian.shape[0]
    g, s = scaled(gramian)
    g = g + ridge * np.eye(m)
    alpha = start * np.sqrt(s) if start is not None and np.all(start > 0) else 1.0 / np.sqrt(np.diag(g))

    def f(a: Array) -> float:
        return float(0.5 * a @ g @ a - np.log(a).sum())

    for _ in range(iters):
        grad = g @ alpha - 1.0 / alpha
        step = np.linalg.solve(g + np.diag(1.0 / alpha**2), grad)
        decrement = float(grad @ step)
        if decrement < 1e-20:
            break
        t = 1.0
        while np.any(alpha - t * step <= 0) or f(alpha - t * step) > f(alpha) - 0.25 * t * decrement:
            t *= 0.5
            if t < 1e-10:
                break
        alpha = alpha - t * step
    return np.asarray(alpha / np.sqrt(s), dtype=np.float64)
