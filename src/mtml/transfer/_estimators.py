"""Transferability estimators: how well a source model should do on a target task, without fine-tuning.

Each estimator reads what a frozen source model gives on the target's training data — trunk features
``[n, d]`` or the source head's class probabilities ``[n, c_s]`` — together with the target labels, and returns
one number (higher = better expected transfer). Every computation runs in float64.

- :func:`logme` — You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning":
  the maximised log marginal evidence (per example) of a Bayesian linear model on the features.
- :func:`leep` — Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations": log-likelihood of the empirical predictor P(y | z) composed with the source head.
- :func:`nce` — Tran et al. 2019, "Transferability and Hardness of Supervised Classification Tasks": negative
  conditional entropy −H(Y | Z) of target labels given the source's hard labels.
- :func:`hscore` — Bao et al. 2019, "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning": ``tr(cov(f)⁻¹ cov(E[f | y]))``.
- :func:`transrate` — Huang, Huang, Rong, Yang & Wei, "Frustratingly Easy Transferability Estimation", ICML
  2022: the coding-rate difference ``R(Z) − R(Z | Y)`` of the centred features.

:func:`spearman` and :func:`weighted_tau` (Vigna 2015, as ``scipy.stats.weightedtau`` defines it) compare a
ranking of sources by an estimate with their actual results.

:data:`ESTIMATORS` holds them behind one call, ``estimator(features, source_probs, labels, kind=...)``, so a
ranking loop treats them alike; :meth:`Estimator.applies` says which inputs and target kinds each one needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mtml.errors import DataError
from mtml.registry import Registry

__all__ = [
    "ESTIMATORS", "Estimator", "coding_rate", "estimate_all", "head_probs", "hscore", "leep", "log_evidence", "logme",
    "logme_fixed_point", "nce", "spearman", "transrate", "weighted_tau",
]

_F64 = torch.float64
CLASSIFICATION = ("binary", "multiclass")
KINDS = ("regression", "binary", "multiclass", "multilabel")


# -- input checks ------------------------------------------------------------------------------------------
def _finite(t: Tensor, what: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(f"{what} holds {bad} NaN/inf values; transferability needs finite inputs. Drop or impute "
                        "those rows first.")
    return t


def _features(features: Tensor, n: int | None = None) -> Tensor:
    f = _finite(features, "features")
    if f.ndim != 2:
        raise DataError(f"features must be [examples, dims]; got shape {tuple(f.shape)}. Flatten them first.")
    if n is not None and f.shape[0] != n:
        raise DataError(f"features have {f.shape[0]} rows but labels have {n}; give one label per row.")
    return f.to(_F64)


def _classes(labels: Tensor, n: int | None = None) -> Tensor:
    """Integer class labels ``[n]`` in ``[0, C)``, with at least two classes present."""
    y = _finite(labels, "labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"class labels must be [examples]; got shape {tuple(y.shape)}. Multilabel or regression "
                        "targets are handled by LogME only.")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise DataError("class labels must be whole numbers; got fractional values. Pass kind='regression' for "
                            "continuous targets.")
        y = y.long()
    if n is not None and y.shape[0] != n:
        raise DataError(f"labels have {y.shape[0]} rows but the source inputs have {n}; give one label per row.")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"class labels must be >= 0; got {int(y.min())}.")
    if int(torch.unique(y).numel()) < 2:
        raise DataError("labels hold only one class; a transferability score needs at least two classes.")
    return y


def _one_hot(y: Tensor) -> Tensor:
    """``[n, C]`` float64 one-hot of the classes present (absent class ids are dropped)."""
    _, inv = torch.unique(y, return_inverse=True)
    return torch.nn.functional.one_hot(inv).to(_F64)


# -- LogME -------------------------------------------------------------------------------------------------
def log_evidence(features: Tensor, targets: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Tensor:
    """Log marginal evidence ``log p(y | F, α, β)`` per column, directly from its definition (no SVD).

    Model: ``y = F w + ε``, ``w ~ N(0, α⁻¹ I_d)``, ``ε ~ N(0, β⁻¹ I_n)``; so ``y ~ N(0, β⁻¹ I + α⁻¹ F Fᵀ)``.
    ``features: [n, d]``, ``targets: [n, t]``, ``alpha``/``beta``: scalars or ``[t]``. Returns ``[t]`` (not
    divided by n). Cost O(n³): meant as the oracle for :func:`logme`, not for large n.
    """
    f, y = features.to(_F64), targets.to(_F64)
    if y.ndim == 1:
        y = y[:, None]
    a = torch.as_tensor(alpha, dtype=_F64).expand(y.shape[1])
    b = torch.as_tensor(beta, dtype=_F64).expand(y.shape[1])
    eye, gram = torch.eye(f.shape[0], dtype=_F64), f @ f.T
    out = []
    for c in range(y.shape[1]):
        cov = eye / b[c] + gram / a[c]
        dist = torch.distributions.MultivariateNormal(torch.zeros(f.shape[0], dtype=_F64), covariance_matrix=cov)
        out.append(dist.log_prob(y[:, c]))
    return torch.stack(out)


@dataclass(frozen=True)
class _Spectrum:
    """SVD pieces of ``F`` shared by every target column: ``s2 = σᵢ²`` ``[k]``, ``z = Uᵀy`` ``[k, t]``,
    ``rest = ‖y‖² − ‖z‖²`` ``[t]`` (target energy outside the span of F), ``n`` and ``d``."""

    s2: Tensor
    z: Tensor
    rest: Tensor
    n: int
    d: int

    @classmethod
    def of(cls, f: Tensor, y: Tensor) -> _Spectrum:
        u, s, _ = torch.linalg.svd(f, full_matrices=False)
        keep = s > s.max() * max(f.shape) * torch.finfo(_F64).eps if s.numel() else s > 0
        u, s = u[:, keep], s[keep]
        z = u.T @ y
        rest = ((y * y).sum(0) - (z * z).sum(0)).clamp_min(0.0)
        return cls(s * s, z, rest, f.shape[0], f.shape[1])

    def evidence(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log evidence [t], ‖m‖² [t], ‖Fm − y‖² [t])`` at the posterior mean ``m`` for ``α, β: [t]``."""
        denom = alpha + beta * self.s2[:, None]  # [k, t]
        m2 = ((beta * self.s2[:, None].sqrt() * self.z / denom) ** 2).sum(0)
        res2 = ((alpha * self.z / denom) ** 2).sum(0) + self.rest
        logdet = torch.log(denom).sum(0) + (self.d - self.s2.numel()) * torch.log(alpha)
        ev = (self.n * torch.log(beta) + self.d * torch.log(alpha) - self.n * math.log(2 * math.pi)
              - beta * res2 - alpha * m2 - logdet) / 2
        return ev, m2, res2


def logme_fixed_point(
    features: Tensor, targets: Tensor, *, max_iter: int = 100, tol: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor]:
    """MacKay's fixed-point iteration for ``α, β`` maximising the evidence, on the SVD of ``features``.

    ``γ = Σᵢ βσᵢ² / (α + βσᵢ²)``, ``α ← γ / ‖m‖²``, ``β ← (n − γ) / ‖Fm − y‖²``, one column of ``targets``
    ``[n, t]`` at a time but vectorised over columns. Returns ``(evidence [t], alpha [t], beta [t])``; at the
    fixed point the gradient of the evidence in ``(α, β)`` is zero.
    """
    f, y = features.to(_F64), targets.to(_F64)
    spec = _Spectrum.of(f, y)
    tiny = torch.finfo(_F64).tiny
    alpha = torch.ones(y.shape[1], dtype=_F64)
    beta = torch.ones(y.shape[1], dtype=_F64)
    for _ in range(max_iter):
        _, m2, res2 = spec.evidence(alpha, beta)
        gamma = (beta * spec.s2[:, None] / (alpha + beta * spec.s2[:, None])).sum(0)
        new_alpha = gamma / m2.clamp_min(tiny)
        new_beta = (spec.n - gamma) / res2.clamp_min(tiny)
        done = bool(((new_alpha / new_beta - alpha / beta).abs() <= tol * (alpha / beta)).all())
        alpha, beta = new_alpha.clamp_min(tiny), new_beta.clamp_min(tiny)
        if done:
            break
    return spec.evidence(alpha, beta)[0], alpha, beta


def logme(features: Tensor, labels: Tensor, *, kind: str = "multiclass") -> float:
    """LogME of ``features: [n, d]`` for ``labels`` (You et al. 2021): the evidence per example, averaged
    over target columns — one-hot class columns for ``binary``/``multiclass`` (labels ``[n]``), target columns
    for ``regression`` (``[n]`` or ``[n, t]``) and ``multilabel`` (``[n, L]``)."""
    _kind(kind)
    y = _finite(labels, "labels")
    if kind in CLASSIFICATION:
        y = _one_hot(_classes(y))
    else:
        y = y.to(_F64)
        y = y[:, None] if y.ndim == 1 else y
        if y.ndim != 2:
            raise DataError(f"{kind} targets must be [examples] or [examples, columns]; got {tuple(y.shape)}.")
    f = _features(features, y.shape[0])
    if f.shape[0] < 2:
        raise DataError(f"LogME needs at least 2 examples; got {f.shape[0]}.")
    ev, _, _ = logme_fixed_point(f, y)
    return float(ev.mean() / f.shape[0])


# -- LEEP and NCE -----------------------------------------------------------------------------------------
def _probs(source_probs: Tensor) -> Tensor:
    p = _finite(source_probs, "source_probs").to(_F64)
    if p.ndim != 2:
        raise DataError(f"source_probs must be [examples, source classes]; got shape {tuple(p.shape)}.")
    if bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=_F64), atol=1e-4):
        raise DataError("source_probs rows must be probabilities (>= 0, summing to 1); apply softmax to logits.")
    return p


def leep(source_probs: Tensor, labels: Tensor) -> float:
    """LEEP (Nguyen et al. 2020) of a source head with class probabilities ``source_probs: [n, c_s]`` for
    target ``labels: [n]``: ``(1/n) Σᵢ log Σ_z P̂(yᵢ | z) θ(xᵢ)_z`` with the empirical
    ``P̂(y, z) = (1/n) Σᵢ θ(xᵢ)_z 1[yᵢ = y]``. Always ≤ 0; higher is better."""
    p = _probs(source_probs)
    y = _one_hot(_classes(labels, p.shape[0]))  # [n, C]
    joint = y.T @ p / p.shape[0]  # [C, c_s]
    cond = joint / joint.sum(0, keepdim=True).clamp_min(torch.finfo(_F64).tiny)  # P(y | z)
    eep = ((p @ cond.T) * y).sum(1)  # [n]: Σ_z P(yᵢ|z) θ(xᵢ)_z
    return float(torch.log(eep).mean())


def nce(source_labels: Tensor, labels: Tensor) -> float:
    """NCE (Tran et al. 2019): ``−H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z)`` from the source's hard labels
    ``source_labels: [n]`` (e.g. the argmax of its head) and target ``labels: [n]``. Always ≤ 0."""
    z = _finite(source_labels, "source_labels")
    if z.ndim != 1:
        raise DataError(f"source_labels must be [examples]; got shape {tuple(z.shape)}.")
    y = _one_hot(_classes(labels, z.shape[0]))
    _, zi = torch.unique(z, return_inverse=True)
    joint = y.T @ torch.nn.functional.one_hot(zi).to(_F64) / z.shape[0]  # [C, c_s]
    cond = joint / joint.sum(0, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * torch.log(cond[mask])).sum())


# -- H-score -------------------------------------------------------------------------------------------------
def hscore(features: Tensor, labels: Tensor) -> float:
    """H-score (Bao et al. 2019): ``tr(cov(f)⁺ cov(E[f | y]))`` for ``features: [n, d]`` and class ``labels: [n]``.

    ``cov(E[f | y])`` is the covariance of each row replaced by its class mean. The pseudo-inverse handles
    rank-deficient features (dead units); the score is invariant to invertible linear maps of the features.
    """
    y = _classes(labels)
    f = _features(features, y.shape[0])
    f = f - f.mean(0)
    onehot = _one_hot(y)
    means = (onehot.T @ f) / onehot.sum(0)[:, None]  # [C, d]
    g = onehot @ means  # [n, d]: each row's class mean
    cov_f = f.T @ f / f.shape[0]
    cov_g = g.T @ g / f.shape[0]
    return float(torch.trace(torch.linalg.pinv(cov_f, hermitian=True, rtol=1e-10) @ cov_g))


# -- TransRate -----------------------------------------------------------------------------------------------
def coding_rate(features: Tensor, eps: float = 1e-4) -> Tensor:
    """``R(Z, ε) = ½ log det(I_d + ZᵀZ / (n ε))`` of ``features: [n, d]`` (float64), from the singular values:
    ``½ Σᵢ log(1 + σᵢ² / (n ε))`` (the same determinant as ``I_n + Z Zᵀ / (n ε)``, so O(min(n, d)³))."""
    z = features.to(_F64)
    s = torch.linalg.svdvals(z)
    return 0.5 * torch.log1p(s.square() / (z.shape[0] * eps)).sum()


def transrate(features: Tensor, labels: Tensor, *, eps: float = 1e-4) -> float:
    """TransRate (Huang et al., ICML 2022) of ``features: [n, d]`` for class ``labels: [n]``:
    ``R(Z, ε) − R(Z | Y, ε)`` with ``Z`` the features centred over all rows, :func:`coding_rate` ``R`` and
    ``R(Z | Y, ε) = (1/K) Σ_k R(Z_k, ε)`` over the ``K`` classes present (``Z_k`` the rows of class ``k``, each
    with its own ``n_k``), as in the authors' released code; ``ε = 1e-4`` is theirs too. Higher is better."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < float("inf"):
        raise DataError(f"TransRate's eps must be a finite number > 0; got {eps!r}. Use the paper's 1e-4.")
    y = _classes(labels)
    f = _features(features, y.shape[0])
    z = f - f.mean(0)
    rates = [coding_rate(z[y == c], eps) for c in torch.unique(y)]
    return float(coding_rate(z, eps) - torch.stack(rates).mean())


# -- rank correlation --------------------------------------------------------------------------------------------
def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(a).to(_F64).reshape(-1), torch.as_tensor(b).to(_F64).reshape(-1)
    if x.shape != y.shape:
        raise DataError(f"rank correlation needs two rankings of the same items; got {x.numel()} and {y.numel()}.")
    if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
        raise DataError("rank correlation needs finite scores; drop the sources with NaN/inf first.")
    return x, y


def _ranks(v: Tensor) -> Tensor:
    """Average ranks from 0 (ties share the mean rank)."""
    order = v.argsort()
    r = torch.empty_like(v)
    r[order] = torch.arange(len(v), dtype=v.dtype)
    for value in v.unique():
        tie = v == value
        r[tie] = r[tie].mean()
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks of ``a`` and ``b`` (NaN when one is constant)."""
    x, y = _pair(a, b)
    ra, rb = _ranks(x), _ranks(y)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def _weighted_tau_ranked(x: Tensor, y: Tensor) -> Tensor:
    """Vigna's weighted τ with hyperbolic additive weights, the importance ranking being the decreasing
    lexicographic order of ``(x, y)``: ``Σ_{i<j} w_ij sgn(xᵢ−xⱼ) sgn(yᵢ−yⱼ) / √(Σ w_ij [xᵢ≠xⱼ] · Σ w_ij [yᵢ≠yⱼ])``
    with ``w_ij = 1/(rᵢ+1) + 1/(rⱼ+1)`` and ``rᵢ`` the position of item ``i`` in that order (from 0)."""
    n = x.numel()
    order = sorted(range(n), key=lambda i: (float(x[i]), float(y[i]), i), reverse=True)
    rank = torch.empty(n, dtype=_F64)
    rank[torch.tensor(order)] = torch.arange(n, dtype=_F64)
    w = 1.0 / (rank + 1.0)
    i, j = torch.triu_indices(n, n, 1)
    weight = w[i] + w[j]
    sx, sy = torch.sign(x[i] - x[j]), torch.sign(y[i] - y[j])
    return (weight * sx * sy).sum() / torch.sqrt((weight * sx.abs()).sum() * (weight * sy.abs()).sum())


def weighted_tau(a: Tensor, b: Tensor) -> float:
    """Weighted Kendall τ (Vigna, "A Weighted Correlation Index for Rankings with Ties", WWW 2015) as
    ``scipy.stats.weightedtau(a, b)`` computes it by default: hyperbolic weights ``1/(r+1)`` summed over each pair,
    the mean of the two values with the importance ranking taken from ``(a, b)`` and from ``(b, a)``. Agreement
    among the top items (largest values) counts most; 1 for the same order, −1 for the reverse. O(n²)."""
    x, y = _pair(a, b)
    if x.numel() < 2:
        raise DataError(f"rank correlation needs at least 2 items; got {x.numel()}.")
    return float((_weighted_tau_ranked(x, y) + _weighted_tau_ranked(y, x)) / 2)


# -- the uniform interface ---------------------------------------------------------------------------------
def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise DataError(f"kind {kind!r} is not one of {', '.join(KINDS)}.")
    return kind


@dataclass(frozen=True)
class Estimator:
    """One estimator behind the uniform call ``est(features, source_probs, labels, kind=...) -> float``.

    ``uses`` is ``"features"`` (trunk features ``[n, d]``) or ``"probs"`` (source-head probabilities
    ``[n, c_s]``; hard labels are their argmax); ``kinds`` are the target kinds it is defined for.
    """

    uses: str
    kinds: tuple[str, ...]
    score: Callable[[Tensor, Tensor, str], float]

    def applies(self, kind: str, *, has_probs: bool) -> bool:
        return kind in self.kinds and (self.uses == "features" or has_probs)

    def __call__(self, features: Tensor | None, source_probs: Tensor | None, labels: Tensor, *,
                 kind: str = "multiclass") -> float:
        _kind(kind)
        if kind not in self.kinds:
            raise DataError(f"this estimator is defined for {', '.join(self.kinds)} targets, not {kind!r}; use "
                            "logme for regression and multilabel targets.")
        source = features if self.uses == "features" else source_probs
        if source is None:
            what = "trunk features" if self.uses == "features" else "source-head probabilities"
            raise DataError(f"this estimator needs {what}; the source gave none (LEEP and NCE need a "
                            "classification head on the source model).")
        return self.score(source, labels, kind)


ESTIMATORS: Registry[float] = Registry("estimator")
ESTIMATORS.register("logme", Estimator("features", KINDS, lambda f, y, k: logme(f, y, kind=k)),
                    help="LogME, You et al. 2021: max log evidence of a Bayesian linear model on the features")
ESTIMATORS.register("leep", Estimator("probs", CLASSIFICATION, lambda p, y, k: leep(p, y)),
                    help="LEEP, Nguyen et al. 2020: log-likelihood of the empirical predictor on source probs")
ESTIMATORS.register("nce", Estimator("probs", CLASSIFICATION, lambda p, y, k: nce(_probs(p).argmax(1), y)),
                    help="NCE, Tran et al. 2019: -H(target | source hard label)")
ESTIMATORS.register("hscore", Estimator("features", CLASSIFICATION, lambda f, y, k: hscore(f, y)),
                    help="H-score, Bao et al. 2019: tr(cov(f)^-1 cov(E[f|y]))")
ESTIMATORS.register("transrate", Estimator("features", CLASSIFICATION, lambda f, y, k: transrate(f, y)),
                    help="TransRate, Huang et al. 2022: coding rate R(Z) - R(Z|Y) of the centred features")


def head_probs(outputs: Tensor, kind: str) -> Tensor | None:
    """Class probabilities ``[n, c_s]`` from a source head's outputs: softmax of multiclass logits, ``[1 − p, p]``
    for a binary logit ``[n, 1]``; ``None`` for regression and multilabel heads (no class distribution)."""
    _kind(kind)
    if kind == "multiclass" and (outputs.ndim != 2 or outputs.shape[1] < 2):
        raise DataError(f"a multiclass head gives [n, classes >= 2] logits; got shape {tuple(outputs.shape)}. "
                        "Pass kind='binary' for a single logit.")
    if kind == "binary" and outputs.reshape(outputs.shape[0], -1).shape[1] != 1:
        raise DataError(f"a binary head gives one logit per row; got shape {tuple(outputs.shape)}.")
    if kind == "multiclass":
        return torch.softmax(outputs.to(_F64), 1)
    if kind == "binary":
        p = torch.sigmoid(outputs.to(_F64).reshape(-1, 1))
        return torch.cat([1 - p, p], 1)
    return None


def estimate_all(
    features: Tensor | None, source_probs: Tensor | None, labels: Tensor, kind: str
) -> dict[str, float | None]:
    """Every registered estimator that applies to ``kind`` and the given inputs; ``None`` for the others."""
    out: dict[str, float | None] = {}
    for name in ESTIMATORS:
        est = ESTIMATORS.get(name)
        ok = isinstance(est, Estimator) and est.applies(kind, has_probs=source_probs is not None)
        ok = ok and (features is not None or getattr(est, "uses", "") != "features")
        out[name] = ESTIMATORS.create(name, features, source_probs, labels, kind=kind) if ok else None
    return out
