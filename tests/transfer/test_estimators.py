"""Transferability estimators: oracles from their definitions, invariances, and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mtml.errors import DataError
from mtml.transfer._estimators import (
    ESTIMATORS,
    hscore,
    leep,
    log_evidence,
    logme,
    logme_fixed_point,
    nce,
    spearman,
    transrate,
    weighted_tau,
)

F64 = torch.float64


def _data(n: int = 60, d: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    f = torch.randn(n, d, generator=g, dtype=F64) + 1.5 * torch.nn.functional.one_hot(y, d).to(F64)
    return f, y


# -- LogME ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 6), (8, 20)])  # n > d and n < d (rank-deficient Gram)
def test_spectral_evidence_equals_direct_formula(shape: tuple[int, int]) -> None:
    from mtml.transfer._estimators import _Spectrum

    g = torch.Generator().manual_seed(1)
    f = torch.randn(*shape, generator=g, dtype=F64)
    y = torch.randn(shape[0], 2, generator=g, dtype=F64)
    alpha, beta = torch.tensor([0.7, 3.0], dtype=F64), torch.tensor([2.0, 0.4], dtype=F64)
    fast = _Spectrum.of(f, y).evidence(alpha, beta)[0]
    torch.testing.assert_close(fast, log_evidence(f, y, alpha, beta))


def test_fixed_point_is_the_evidence_maximum() -> None:
    f, y = _data(n=50, d=4)
    target = (y == 1).to(F64)[:, None] + 0.1 * torch.randn(50, 1, generator=torch.Generator().manual_seed(3),
                                                           dtype=F64)
    ev, alpha, beta = logme_fixed_point(f, target)
    direct = log_evidence(f, target, alpha, beta)
    torch.testing.assert_close(ev, direct)
    # stationary: the gradient of the direct evidence in (log α, log β) vanishes
    la = torch.log(alpha).clone().requires_grad_(True)
    lb = torch.log(beta).clone().requires_grad_(True)
    log_evidence(f, target, la.exp(), lb.exp()).sum().backward()
    assert la.grad is not None and lb.grad is not None
    assert la.grad.abs().max() < 1e-5 and lb.grad.abs().max() < 1e-5
    # and a maximum: no point of a wide log grid around it does better
    grid = torch.exp(torch.linspace(-4, 4, 41, dtype=F64))
    best = max(float(log_evidence(f, target, alpha * a, beta * b)) for a in grid[::4] for b in grid[::4])
    assert best <= float(ev) + 1e-9


def test_logme_classification_is_mean_over_one_hot_columns() -> None:
    f, y = _data()
    onehot = torch.nn.functional.one_hot(y).to(F64)
    per_column = [float(logme_fixed_point(f, onehot[:, [c]])[0]) / len(y) for c in range(3)]
    assert logme(f, y, kind="multiclass") == pytest.approx(sum(per_column) / 3, rel=1e-10)
    assert logme(f, onehot, kind="regression") == pytest.approx(sum(per_column) / 3, rel=1e-10)


def test_logme_prefers_informative_features() -> None:
    f, y = _data(n=200, d=6)
    noise = torch.randn(200, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert logme(f, y) > logme(noise, y)
    reg = f[:, :2] @ torch.tensor([[1.0], [-2.0]], dtype=F64)
    assert logme(f, reg, kind="regression") > logme(noise, reg, kind="regression")


def test_logme_label_permutation_and_dtype() -> None:
    f, y = _data()
    perm = torch.tensor([2, 0, 1])
    assert logme(f, perm[y]) == pytest.approx(logme(f, y), rel=1e-10)
    assert logme(f.float(), y) == pytest.approx(logme(f, y), rel=1e-4)


# -- LEEP and NCE -----------------------------------------------------------------------------------------
def test_leep_hand_computed() -> None:
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=F64)
    y = torch.tensor([0, 1, 0])
    # P(y,z) = (1/3) Σ θ_z 1[y]: y=0 → [1.5, 0.5]/3, y=1 → [0.2, 0.8]/3; P(z) = [1.7, 1.3]/3
    cond = torch.tensor([[1.5 / 1.7, 0.5 / 1.3], [0.2 / 1.7, 0.8 / 1.3]], dtype=F64)
    expected = sum(math.log(float(cond[y[i]] @ p[i])) for i in range(3)) / 3
    assert leep(p, y) == pytest.approx(expected, rel=1e-12)


def test_nce_hand_computed() -> None:
    z = torch.tensor([0, 0, 1, 1, 1])
    y = torch.tensor([0, 1, 1, 1, 0])
    # P(z=0)=2/5 with y split 1:1; P(z=1)=3/5 with y split 1:2
    expected = 2 / 5 * math.log(0.5) + 1 / 5 * math.log(1 / 3) + 2 / 5 * math.log(2 / 3)
    assert nce(z, y) == pytest.approx(expected, rel=1e-12)
    assert nce(y, y) == pytest.approx(0.0, abs=1e-12)  # a source that already knows the labels


def test_leep_and_nce_prefer_the_aligned_source() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    good = torch.softmax(3 * torch.nn.functional.one_hot(y, 4).to(F64) + torch.randn(300, 4, generator=g,
                                                                                      dtype=F64), 1)
    bad = torch.softmax(torch.randn(300, 4, generator=g, dtype=F64), 1)
    assert leep(good, y) > leep(bad, y)
    assert nce(good.argmax(1), y) > nce(bad.argmax(1), y)
    perm = torch.tensor([1, 2, 0])
    assert leep(good, perm[y]) == pytest.approx(leep(good, y), rel=1e-12)
    assert nce(good.argmax(1), perm[y]) == pytest.approx(nce(good.argmax(1), y), rel=1e-12)


# -- H-score ------------------------------------------------------------------------------------------------
def test_hscore_matches_explicit_covariances() -> None:
    f, y = _data(n=45, d=4)
    fc = f - f.mean(0)
    cov_f = sum(torch.outer(r, r) for r in fc) / 45
    cond = torch.stack([fc[y == y[i]].mean(0) for i in range(45)])
    cov_g = sum(torch.outer(r, r) for r in cond) / 45
    expected = float(torch.trace(torch.linalg.solve(cov_f, cov_g)))
    assert hscore(f, y) == pytest.approx(expected, rel=1e-10)


def test_hscore_invariances() -> None:
    f, y = _data(n=80, d=5)
    mix = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=F64) + 3 * torch.eye(5, dtype=F64)
    assert hscore(f @ mix, y) == pytest.approx(hscore(f, y), rel=1e-8)  # invertible linear maps
    assert hscore(100 * f + 7, y) == pytest.approx(hscore(f, y), rel=1e-8)  # scale and shift
    assert hscore(f, torch.tensor([2, 0, 1])[y]) == pytest.approx(hscore(f, y), rel=1e-10)
    dup = torch.cat([f, f[:, :1]], 1)  # a duplicated column: singular cov(f), same information
    assert hscore(dup, y) == pytest.approx(hscore(f, y), rel=1e-6)


# -- TransRate ---------------------------------------------------------------------------------------------
def _rate(z: torch.Tensor, eps: float) -> float:
    """The coding rate from its definition: ½ log det(I_d + ZᵀZ / (n ε)), by slogdet of the d × d matrix."""
    n, d = z.shape
    sign, logdet = torch.linalg.slogdet(torch.eye(d, dtype=F64) + z.T @ z / (n * eps))
    assert float(sign) > 0
    return 0.5 * float(logdet)


@pytest.mark.parametrize(("n", "d"), [(12, 3), (6, 9)])  # n > d, and n < d (the n × n route of the SVD)
def test_transrate_equals_the_log_det_formula(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.randn(n, d, generator=g, dtype=F64) + 3.0
    y = torch.arange(n) % 3
    for eps in (1e-4, 0.5):
        z = f - f.mean(0)
        expected = _rate(z, eps) - sum(_rate(z[y == c], eps) for c in range(3)) / 3
        assert transrate(f, y, eps=eps) == pytest.approx(expected, rel=1e-10)


def test_transrate_closed_form_on_a_tiny_feature_matrix() -> None:
    # classes at ±a on e₁, spread ±b (class 0) and ±c (class 1) on e₂; the mean (shifted away) is removed. Every
    # Gram matrix is diagonal: ZᵀZ = diag(4a², 2b² + 2c²), Z₀ᵀZ₀ = diag(2a², 2b²), Z₁ᵀZ₁ = diag(2a², 2c²), so
    # R(Z) − ½(R(Z₀) + R(Z₁)) = ½ log(1 + (b² + c²)/(2ε)) − ¼ (log(1 + b²/ε) + log(1 + c²/ε)): the e₁ terms cancel.
    a, b, c, eps = 2.0, 0.5, 1.5, 0.1
    f = torch.tensor([[a, b], [a, -b], [-a, c], [-a, -c]], dtype=F64) + torch.tensor([1.0, 7.0], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    expected = 0.5 * math.log(1 + (b * b + c * c) / (2 * eps)) - 0.25 * (math.log(1 + b * b / eps)
                                                                         + math.log(1 + c * c / eps))
    assert transrate(f, y, eps=eps) == pytest.approx(expected, rel=1e-12)
    assert expected > 0


def test_transrate_prefers_informative_features_and_ignores_label_names() -> None:
    f, y = _data(n=120, d=5)
    noise = torch.randn(120, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert transrate(f, y) > transrate(noise, y)
    assert transrate(f, torch.tensor([2, 0, 1])[y]) == pytest.approx(transrate(f, y), rel=1e-12)
    with pytest.raises(DataError, match="eps"):
        transrate(f, y, eps=0)


# -- rank correlation --------------------------------------------------------------------------------------------
def test_weighted_tau_examples_and_limits() -> None:
    x, y = torch.tensor([12.0, 2, 1, 12, 2]), torch.tensor([1.0, 4, 7, 1, 0])
    assert weighted_tau(x, y) == pytest.approx(-0.56694968153682723, rel=1e-12)  # scipy's documented example
    v = torch.tensor([0.3, 0.1, 0.9, 0.5])
    assert weighted_tau(v, 2 * v + 1) == pytest.approx(1.0)
    assert weighted_tau(v, -v) == pytest.approx(-1.0)
    # a swap among the top items costs more than the same swap at the bottom
    top = weighted_tau(torch.tensor([4.0, 3, 2, 1]), torch.tensor([3.0, 4, 2, 1]))
    bottom = weighted_tau(torch.tensor([4.0, 3, 2, 1]), torch.tensor([4.0, 3, 1, 2]))
    assert top < bottom < 1
    with pytest.raises(DataError, match="same items"):
        weighted_tau(v, v[:3])


def test_weighted_tau_and_spearman_equal_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = 2 + trial % 9
        x = torch.randint(0, 4, (n,), generator=g).double() if trial % 2 else torch.randn(n, generator=g, dtype=F64)
        y = torch.randint(0, 3, (n,), generator=g).double() if trial % 3 == 0 else torch.randn(n, generator=g,
                                                                                            dtype=F64)
        want = float(stats.weightedtau(x.numpy(), y.numpy()).statistic)
        got = weighted_tau(x, y)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-10, abs=1e-12), (x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on a constant input (NaN, as spearman gives)
            want_rho = float(stats.spearmanr(x.numpy(), y.numpy()).statistic)
        rho = spearman(x, y)
        assert (math.isnan(want_rho) and math.isnan(rho)) or rho == pytest.approx(want_rho, rel=1e-10, abs=1e-12)


# -- the registry and bad input -----------------------------------------------------------------------------
def test_registry_uniform_call() -> None:
    f, y = _data()
    probs = torch.softmax(f[:, :4], 1)
    assert set(ESTIMATORS.names()) == {"logme", "leep", "nce", "hscore", "transrate"}
    for name in ESTIMATORS:
        value = ESTIMATORS.create(name, f, probs, y, kind="multiclass")
        assert math.isfinite(value)
    est = ESTIMATORS.get("leep")
    assert not est.applies("regression", has_probs=True) and not est.applies("multiclass", has_probs=False)
    assert ESTIMATORS.get("logme").applies("regression", has_probs=False)
    with pytest.raises(DataError, match="classification head"):
        ESTIMATORS.create("leep", f, None, y, kind="multiclass")
    with pytest.raises(DataError, match="not 'regression'"):
        ESTIMATORS.create("hscore", f, None, f[:, 0], kind="regression")


@pytest.mark.parametrize("name", ["logme", "leep", "nce", "hscore", "transrate"])
def test_bad_inputs_are_named(name: str) -> None:
    f, y = _data()
    probs = torch.softmax(f[:, :3], 1)
    est = ESTIMATORS.get(name)
    nan_f, nan_p = f.clone(), probs.clone()
    nan_f[3, 1] = float("nan")
    nan_p[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        est(nan_f, nan_p, y)
    with pytest.raises(DataError, match="rows"):
        est(f[:-1], probs[:-1], y)
    with pytest.raises(DataError, match="one class"):
        est(f, probs, torch.zeros_like(y))
    with pytest.raises(DataError, match="kind"):
        est(f, probs, y, kind="ordinal")


def test_leep_rejects_logits() -> None:
    f, y = _data()
    with pytest.raises(DataError, match="softmax"):
        leep(f[:, :3], y)


def test_head_probs() -> None:
    from mtml.transfer import head_probs

    logit = torch.tensor([[0.0], [2.0]])
    p = head_probs(logit, "binary")
    assert p is not None and p.shape == (2, 2)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(logit[:, 0]).double())
    torch.testing.assert_close(p.sum(1), torch.ones(2, dtype=F64))
    q = head_probs(torch.randn(5, 3), "multiclass")
    assert q is not None and q.shape == (5, 3)
    assert head_probs(torch.randn(5, 2), "regression") is None
    with pytest.raises(DataError, match="kind='binary'"):
        head_probs(logit, "multiclass")  # a single logit read as one class would make every estimate constant
    with pytest.raises(DataError, match="one logit"):
        head_probs(torch.randn(5, 3), "binary")
