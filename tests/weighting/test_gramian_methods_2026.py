"""ConFIG, DualProj, SDMGrad, MoDo and Krum (issue 20): closed forms on tiny cases, vector oracles, state,
option errors, and one engine step that applies the weights. Agreement with TorchJD's recorded outputs is in
``test_gradient_methods.py::test_agrees_with_torchjd``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mtml.engine._joint import joint_step, task_losses
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task
from mtml.weighting import MGDA, WEIGHTINGS, ConFIG, DualProj, Krum, MoDo, SDMGrad
from mtml.weighting._simplex import simplex_projection
from mtml.weighting._solvers import min_norm_simplex

NEW = ["config_grad", "dualproj", "sdmgrad", "modo", "krum"]
F64 = torch.float64


def _names(m: int) -> list[str]:
    return [f"t{i}" for i in range(m)]


def _ones(m: int) -> torch.Tensor:
    return torch.ones(m, dtype=F64)


def _jac(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=F64) * torch.rand(m, 1, generator=g, dtype=F64).add(0.2) * 3


def test_registered_with_truthful_flags() -> None:
    assert set(NEW) <= set(WEIGHTINGS.names())
    classes = {name: WEIGHTINGS.get(name) for name in NEW}
    assert classes == {"config_grad": ConFIG, "dualproj": DualProj, "sdmgrad": SDMGrad, "modo": MoDo, "krum": Krum}
    for cls in classes.values():
        assert cls.needs_gramian and not cls.stochastic
    assert not ConFIG.nonnegative  # see test_config_weights_can_be_negative
    assert DualProj.nonnegative and SDMGrad.nonnegative and MoDo.nonnegative and Krum.nonnegative
    assert ConFIG.permutation_equivariant and DualProj.permutation_equivariant and Krum.permutation_equivariant
    assert not SDMGrad.permutation_equivariant and not MoDo.permutation_equivariant  # stateful: see below


# -- ConFIG --------------------------------------------------------------------------------------------------
def _config_from_vectors(jac: torch.Tensor) -> torch.Tensor:
    """The paper's update from the gradient vectors themselves: ``d = pinv(Û)·1``, ``(Σ gᵢᵀd̂)·d̂``."""
    units = jac / jac.norm(dim=1, keepdim=True)
    d = torch.linalg.pinv(units) @ torch.ones(jac.shape[0], dtype=jac.dtype)
    d = d / d.norm()
    return (jac @ d).sum() * d


def test_config_orthogonal_gradients_closed_form() -> None:
    a, b = 3.0, 0.5
    jac = torch.tensor([[a, 0.0, 0.0], [0.0, b, 0.0]], dtype=F64)
    w = ConFIG(_names(2))(_ones(2), jac @ jac.T)
    # unit gradients e₁, e₂: d̂ = (e₁ + e₂)/√2, length (a + b)/√2, update (a + b)/2·(e₁ + e₂)
    torch.testing.assert_close(w, torch.tensor([(a + b) / (2 * a), (a + b) / (2 * b)], dtype=F64))
    torch.testing.assert_close(w @ jac, torch.tensor([1.75, 1.75, 0.0], dtype=F64))


def test_config_two_conflicting_gradients_by_hand() -> None:
    jac = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=F64)  # cos = −1/√2
    # unit rows u₁ = (1, 0), u₂ = (−1, 1)/√2; u₁·d = u₂·d = 1 gives d = (1, 1 + √2)
    d = torch.tensor([1.0, 1.0 + math.sqrt(2.0)], dtype=F64)
    d_hat = d / d.norm()
    expected = (jac @ d_hat).sum() * d_hat
    update = ConFIG(_names(2))(_ones(2), jac @ jac.T) @ jac
    torch.testing.assert_close(update, expected)
    cosines = (jac @ update) / jac.norm(dim=1) / update.norm()
    torch.testing.assert_close(cosines[0], cosines[1])  # the same angle with every task
    assert (cosines > 0).all()  # conflict-free


@pytest.mark.parametrize(("m", "n"), [(2, 6), (4, 9), (5, 3), (8, 20)])
def test_config_matches_the_vector_computation(m: int, n: int) -> None:
    jac = _jac(m, n, 10 * m + n)
    jac[1] = -0.6 * jac[0] + 0.2 * jac[1]
    update = ConFIG(_names(m))(_ones(m), jac @ jac.T) @ jac
    torch.testing.assert_close(update, _config_from_vectors(jac), rtol=1e-9, atol=1e-9)


def test_config_weights_can_be_negative() -> None:
    """A unit gradient almost on the bisector of two others: matching its projection needs it weighed < 0."""
    t = 0.2
    third = [math.cos(t) / math.sqrt(2), math.cos(t) / math.sqrt(2), math.sin(t)]
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], third], dtype=F64)
    w = ConFIG(_names(3))(_ones(3), jac @ jac.T)
    assert float(w[2]) < 0
    torch.testing.assert_close(w @ jac, _config_from_vectors(jac))


def test_config_zero_gradient_and_zero_gramian() -> None:
    jac = _jac(3, 5, 1)
    jac[1] = 0.0
    w = ConFIG(_names(3))(_ones(3), jac @ jac.T)
    assert float(w[1]) == 0.0
    torch.testing.assert_close(w @ jac, _config_from_vectors(jac[[0, 2]]))
    assert torch.equal(ConFIG(_names(3))(_ones(3), torch.zeros(3, 3, dtype=F64)), torch.zeros(3, dtype=F64))


# -- DualProj ------------------------------------------------------------------------------------------------
def test_dualproj_orthogonal_gradients_keep_the_mean() -> None:
    jac = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    w = DualProj(_names(3))(_ones(3), jac @ jac.T)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64))  # the mean conflicts with no task


def test_dualproj_two_conflicting_gradients_by_hand() -> None:
    jac = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=F64)
    # mean (−0.5, 0.5) conflicts with g₁ only: its projection onto {d : g₁·d ≥ 0, g₂·d ≥ 0} is (0, 0.5) = 1·g₁ + 0.5·g₂
    w = DualProj(_names(2), reg_eps=0.0)(_ones(2), jac @ jac.T)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5], dtype=F64), rtol=1e-9, atol=1e-9)
    w = DualProj(_names(2))(_ones(2), jac @ jac.T)  # TorchJD's ridge moves it a little
    torch.testing.assert_close(w @ jac, torch.tensor([0.0, 0.5], dtype=F64), rtol=0, atol=2e-3)


@pytest.mark.parametrize("m", [3, 6, 10])
def test_dualproj_is_the_projection_onto_the_dual_cone(m: int) -> None:
    """KKT of ``min ‖d − ḡ‖ s.t. Jd ≥ 0`` at ``d = Jᵀw``: ``d − ḡ = Jᵀμ``, μ ≥ 0, μᵢ·(Jd)ᵢ = 0 with μ = w − 1/m."""
    jac = _jac(m, 2 * m, m)
    jac[1] = -0.8 * jac[0] + 0.1 * jac[1]
    gram = jac @ jac.T
    w = DualProj(_names(m), reg_eps=0.0)(_ones(m), gram)
    mu = w - 1 / m
    assert (mu >= -1e-12).all() and (gram @ w >= -1e-9).all()
    torch.testing.assert_close(mu * (gram @ w), torch.zeros(m, dtype=F64), rtol=0, atol=1e-10 * float(gram.trace()))
    assert float(mu.max()) > 1e-3  # the mean did conflict: the projection really moved it


# -- Krum ----------------------------------------------------------------------------------------------------
def _krum_by_loop(jac: torch.Tensor, n_byzantine: int, n_selected: int) -> torch.Tensor:
    """Blanchard et al.'s rule on the vectors: score = Σ of squared-root distances to the m − f − 2 nearest."""
    m = jac.shape[0]
    scores = []
    for i in range(m):
        dist = sorted(float((jac[i] - jac[j]).norm()) for j in range(m) if j != i)
        scores.append(sum(dist[: m - n_byzantine - 2]))
    chosen = np.argsort(scores, kind="stable")[:n_selected]
    w = torch.zeros(m, dtype=F64)
    w[list(chosen)] = 1.0 / n_selected
    return w


def test_krum_picks_the_outliers_out() -> None:
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(6, generator=g, dtype=F64)
    crowd = centre + 0.1 * torch.randn(5, 6, generator=g, dtype=F64)
    outliers = torch.stack([-4 * centre, centre + 5 * torch.randn(6, generator=g, dtype=F64)])
    jac = torch.cat([crowd[:2], outliers[:1], crowd[2:], outliers[1:]])  # outliers at rows 2 and 6
    gram = jac @ jac.T
    for f, k in [(0, 1), (2, 1), (2, 3), (2, 5)]:
        w = Krum(_names(7), n_byzantine=f, n_selected=k)(_ones(7), gram)
        assert float(w[2]) == 0.0 and float(w[6]) == 0.0, (f, k, w)
        torch.testing.assert_close(w, _krum_by_loop(jac, f, k))
    mean = Krum(_names(7), n_selected=7)(_ones(7), gram)
    torch.testing.assert_close(mean, torch.full((7,), 1 / 7, dtype=F64))


@pytest.mark.parametrize("seed", range(5))
def test_krum_matches_the_loop_on_random_gradients(seed: int) -> None:
    jac = _jac(6, 4, seed)
    for f, k in [(0, 1), (1, 2), (3, 4)]:
        w = Krum(_names(6), n_byzantine=f, n_selected=k)(_ones(6), jac @ jac.T)
        torch.testing.assert_close(w, _krum_by_loop(jac, f, k))


def test_krum_tied_scores_share_the_weight() -> None:
    # three tasks: each is scored by its one nearest neighbour, so the closest pair always ties
    jac = torch.tensor([[1.0, 0.0], [1.1, 0.0], [5.0, 3.0]], dtype=F64)
    w = Krum(_names(3))(_ones(3), jac @ jac.T)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.0], dtype=F64))
    w = Krum(_names(2))(_ones(2), jac[:2] @ jac[:2].T)  # no neighbour to score by: the mean
    torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=F64))


# -- SDMGrad -------------------------------------------------------------------------------------------------
def _project2(y: torch.Tensor) -> torch.Tensor:
    """Simplex projection of a 2-vector, by hand: move along (1, −1) onto x₁ + x₂ = 1, clip to [0, 1]."""
    x0 = min(max((float(y[0]) - float(y[1]) + 1) / 2, 0.0), 1.0)
    return torch.tensor([x0, 1 - x0], dtype=F64)


def test_simplex_projection_against_a_sorting_free_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 7):
        for _ in range(20):
            y = torch.randn(m, generator=g, dtype=F64) * 3
            x = simplex_projection(y)
            assert (x >= 0).all() and float(x.sum()) == pytest.approx(1.0)
            # optimality: x = max(y − θ, 0) for one θ, found here by bisection
            lo, hi = float(y.min()) - 1, float(y.max())
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if float((y - mid).clamp_min(0).sum()) > 1 else (lo, mid)
            torch.testing.assert_close(x, (y - lo).clamp_min(0), rtol=1e-12, atol=1e-12)
        if m == 2:
            torch.testing.assert_close(simplex_projection(torch.tensor([3.0, -1.0], dtype=F64)), _project2(
                torch.tensor([3.0, -1.0], dtype=F64)))


def test_sdmgrad_one_iteration_by_hand() -> None:
    jac = torch.tensor([[2.0, 0.0], [-1.0, 0.5]], dtype=F64)
    gram = jac @ jac.T
    lam, lr = 0.3, 0.7
    w = SDMGrad(_names(2), lam=lam, iterations=1, lr=lr)
    scale = float(gram.diagonal().sqrt().mean()) ** 2 + 1e-8
    w0 = torch.full((2,), 0.5, dtype=F64)
    w1 = _project2(w0 - lr * (gram / scale) @ (w0 + lam / 2))
    torch.testing.assert_close(w(_ones(2), gram), (w1 + lam / 2) / (1 + lam))
    torch.testing.assert_close(w.w, w1)  # the state advanced
    # second call, two iterations: the velocity restarts, then carries momentum 0.5
    w.iterations = 2
    v = (gram / scale) @ (w1 + lam / 2)
    w2 = _project2(w1 - lr * v)
    w3 = _project2(w2 - lr * (0.5 * v + (gram / scale) @ (w2 + lam / 2)))
    torch.testing.assert_close(w(_ones(2), gram), (w3 + lam / 2) / (1 + lam))


@pytest.mark.parametrize("m", [2, 4, 7])
def test_sdmgrad_limits_are_mgda_and_the_mean(m: int) -> None:
    jac = _jac(m, m + 3, m)
    jac[1] = -0.7 * jac[0] + 0.3 * jac[1]
    gram = jac @ jac.T
    mgda = MGDA(_names(m))(_ones(m), gram)
    w = SDMGrad(_names(m), lam=0.0, iterations=3000, lr=0.5, momentum=0.0)(_ones(m), gram)
    assert float(w @ gram @ w) <= float(mgda @ gram @ mgda) * (1 + 1e-6)  # the min-norm value
    torch.testing.assert_close(w @ jac, mgda @ jac, rtol=0, atol=1e-4 * float(jac.abs().max()))
    mean = SDMGrad(_names(m), lam=1e6)(_ones(m), gram)
    torch.testing.assert_close(mean, torch.full((m,), 1 / m, dtype=F64), rtol=0, atol=1e-5)


# -- MoDo ----------------------------------------------------------------------------------------------------
def test_modo_one_step_by_hand() -> None:
    jac = torch.tensor([[2.0, 0.0], [-1.0, 0.5]], dtype=F64)
    gram = jac @ jac.T
    gamma, rho = 0.05, 0.1
    w = MoDo(_names(2), gamma=gamma, rho=rho)
    lam0 = torch.full((2,), 0.5, dtype=F64)
    lam1 = _project2(lam0 - gamma * (gram @ lam0 + rho * lam0))
    torch.testing.assert_close(w(_ones(2), gram), lam1)
    lam2 = _project2(lam1 - gamma * (gram @ lam1 + rho * lam1))
    torch.testing.assert_close(w(_ones(2), gram), lam2)


@pytest.mark.parametrize("m", [3, 6])
def test_modo_converges_to_the_regularised_min_norm_point(m: int) -> None:
    jac = _jac(m, m + 2, m)
    gram = jac @ jac.T
    rho = 1.0  # a well-conditioned problem: projected gradient converges linearly
    target = torch.from_numpy(min_norm_simplex((gram + rho * torch.eye(m, dtype=F64)).numpy(), ridge=0.0))
    w = MoDo(_names(m), gamma=1.0 / float(torch.linalg.eigvalsh(gram).max() + rho), rho=rho)
    for _ in range(3000):
        out = w(_ones(m), gram)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-6)


# -- state ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "buffer"), [(SDMGrad, "w"), (MoDo, "lambd")])
def test_state_lives_in_a_buffer_advances_only_in_training(cls: type, buffer: str) -> None:
    m = 3
    jac = _jac(m, 5, 3)
    gram = jac @ jac.T
    opts = {"gamma": 0.02} if cls is MoDo else {"iterations": 1, "lr": 0.05}  # not at its fixed point yet
    a = cls(_names(m), **opts)
    first = a(_ones(m), gram)
    assert list(a.state_dict()) == [buffer]
    b = cls(_names(m), **opts)
    b.load_state_dict(a.state_dict())
    second = a(_ones(m), gram)
    assert not torch.allclose(first, second)  # the state moved the weights
    torch.testing.assert_close(b(_ones(m), gram), second)  # and it travels in the state dict
    a.eval()
    saved = a.state_dict()[buffer].clone()
    a(_ones(m), gram)
    assert torch.equal(a.state_dict()[buffer], saved)


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_stateful_methods_are_equivariant_given_permuted_histories(name: str) -> None:
    m, perm = 4, torch.tensor([2, 0, 3, 1])
    a, b = WEIGHTINGS.create(name, _names(m)), WEIGHTINGS.create(name, _names(m))
    for step in range(10):
        jac = _jac(m, 5, step)
        gram = jac @ jac.T
        losses = torch.rand(m, dtype=F64) + 0.5
        torch.testing.assert_close(b(losses[perm], gram[perm][:, perm]), a(losses, gram)[perm], rtol=1e-9, atol=1e-12)


# -- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("dualproj", {"reg_eps": -1.0}, r"`reg_eps` must be a finite number >= 0\. Got -1\.0\."),
    ("dualproj", {"norm_eps": math.inf}, r"`norm_eps` must be a finite number >= 0\. Got inf\."),
    ("sdmgrad", {"lam": -0.1}, r"`lam` must be a finite number >= 0\. Got -0\.1\."),
    ("sdmgrad", {"iterations": 0}, r"`iterations` must be an integer >= 1\. Got 0\."),
    ("sdmgrad", {"iterations": 2.5}, r"`iterations` must be a valid integer.*Got 2\.5"),  # (registry)
    ("sdmgrad", {"lr": 0.0}, r"`lr` must be a finite number > 0\. Got 0\.0\."),
    ("sdmgrad", {"momentum": 1.0}, r"`momentum` must be in \[0, 1\)\. Got 1\.0\."),
    ("modo", {"gamma": 0}, r"`gamma` must be a finite number > 0\. Got 0\."),
    ("modo", {"rho": -1}, r"`rho` must be a finite number >= 0\. Got -1\."),
    ("modo", {"gamma": "fast"}, r"`gamma` must be a valid number.*Got 'fast'"),
    ("krum", {"n_byzantine": -1}, r"`n_byzantine` must be an integer >= 0\. Got -1\."),
    ("krum", {"n_byzantine": 2}, r"`n_byzantine` = 2 needs at least n_byzantine \+ 3 = 5 tasks, got 4; lower "
                                 r"`n_byzantine` to at most 1\."),
    ("krum", {"n_selected": 5}, r"`n_selected` must be an integer from 1 to the number of tasks \(4\)\. Got 5\."),
    ("krum", {"n_selected": 0}, r"`n_selected` must be an integer from 1"),
    ("config_grad", {"gramian": "fast"}, r"`gramian` must be one of"),
])
def test_bad_options_are_one_line_config_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        WEIGHTINGS.create(name, _names(4), **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'iteration'.*Did you mean 'iterations'"):
        WEIGHTINGS.create("sdmgrad", _names(2), iteration=3)


# -- one engine step ---------------------------------------------------------------------------------------
def _setup() -> tuple[MultiTaskModel, dict[str, Task], dict]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=F64)
    z = torch.randn(12, 1, generator=g, dtype=F64)
    tasks = [Task(f"t{i}", "regression", Split(x, z * c + 0.1 * torch.randn(12, 1, generator=g, dtype=F64)),
                  group="g") for i, c in enumerate((3.0, -3.0, 1.0, 0.2))]
    heads = {t.name: nn.Linear(4, 1) for t in tasks}
    with torch.no_grad():  # one head for every task, so opposite targets conflict in the trunk
        for head in list(heads.values())[1:]:
            head.load_state_dict(next(iter(heads.values())).state_dict())
    model = MultiTaskModel(mlp(5, (6, 4), activation="tanh"), heads).double()
    return model, {t.name: t for t in tasks}, {t.name: (t.train.x, t.train.y) for t in tasks}


@pytest.mark.parametrize("name", NEW)
def test_one_joint_step_applies_the_weights(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tasks, batch = _setup()
    names = list(tasks)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    losses = task_losses(model, tasks, batch, names)
    per_task = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(names))]
    shared = {id(p) for p in model.shared_parameters()}
    rows = torch.stack([torch.cat([g.reshape(-1) for g, p in zip(grads, params, strict=True) if id(p) in shared])
                        for grads in per_task])
    options = {"n_selected": 2} if name == "krum" else {}
    expected = WEIGHTINGS.create(name, names, **options)(losses.detach(), rows @ rows.T)
    assert not torch.allclose(expected, expected[:1].expand(4))  # weights a plain sum would not give

    weighting = WEIGHTINGS.create(name, names, **options)
    calls = []
    original = type(weighting).weights
    monkeypatch.setattr(type(weighting), "weights", lambda self, *a: calls.append(1) or original(self, *a))
    result = joint_step(model, tasks, batch, weighting, torch.optim.SGD(model.parameters(), lr=0.1))
    assert calls == [1]
    torch.testing.assert_close(torch.tensor([result.weights[n] for n in names], dtype=F64), expected,
                               rtol=1e-9, atol=1e-12)
    for k, (p, p0) in enumerate(zip(params, before, strict=True)):
        step = sum(float(expected[i]) * per_task[i][k] for i in range(len(names)))
        torch.testing.assert_close(p.detach(), p0 - 0.1 * step, rtol=1e-9, atol=1e-12)
