"""Behaviour of :mod:`mtml.transfer` that the mutation run (benchmarks/mutation_score.py) found untested: the local
search of task grouping from any start, documented default agreements, the coding rate's closed form and a
one-row source in domain adaptation."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from torch import nn

from mtml.nn import MultiTaskModel
from mtml.tasks import Split, Task
from mtml.transfer import ADAPTERS, STRATEGIES, Adapter, Source, grouping_score, transrate
from mtml.transfer._estimators import coding_rate
from mtml.transfer._grouping import _improve
from mtml.transfer._strategies import FineTune


# -- grouping: the move/swap local search ends in a local optimum from any start ----------------------------------
def _score(a: torch.Tensor, labels: list[int], k: int) -> float:
    return grouping_score(a, [[i for i in range(len(labels)) if labels[i] == g] for g in range(k)])


def _is_local_optimum(a: torch.Tensor, labels: list[int], k: int) -> bool:
    best = _score(a, labels, k) + 1e-9
    m = len(labels)
    for i, g in itertools.product(range(m), range(k)):
        moved = [*labels[:i], g, *labels[i + 1:]]
        if len(set(moved)) == k and _score(a, moved, k) > best:
            return False
    for i, j in itertools.combinations(range(m), 2):
        swapped = list(labels)
        swapped[i], swapped[j] = labels[j], labels[i]
        if _score(a, swapped, k) > best:
            return False
    return True


def test_local_search_from_random_starts_reaches_a_local_optimum_and_never_loses_score() -> None:
    """200 random instances (4-8 tasks, 2-3 groups) from random starts, each checked against every single move
    and swap scored directly: the search may only stop where none improves the score."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        m, k = 4 + seed % 5, 2 + seed % 2
        a = torch.randn(m, m, generator=g).double().fill_diagonal_(0.0)
        start = torch.randperm(m, generator=g) % k
        found = _improve(a + a.T, start, k).tolist()
        assert len(set(found)) == k, seed  # no group was emptied
        assert _score(a, found, k) >= _score(a, start.tolist(), k) - 1e-9, seed
        assert _is_local_optimum(a, found, k), seed


def test_local_search_takes_a_swap_when_every_move_loses() -> None:
    """Two pairs, each task in the wrong pair: moving any one task alone loses score, the swap gains."""
    a = torch.zeros(4, 4, dtype=torch.float64)
    for i, j in ((0, 1), (2, 3)):
        a[i, j] = a[j, i] = 1.0
    for i, j in ((0, 2), (1, 3)):
        a[i, j] = a[j, i] = 0.4
    start = torch.tensor([0, 1, 0, 1])  # {0, 2}, {1, 3} score 1.6; {0, 1}, {2, 3} score 4
    found = _improve(a + a.T, start, 2).tolist()
    for i in range(4):  # every single move from the start loses
        for gr in range(2):
            moved = [*start.tolist()[:i], gr, *start.tolist()[i + 1:]]
            if moved != start.tolist():
                assert _score(a, moved, 2) < _score(a, start.tolist(), 2) == pytest.approx(1.6)
    assert _score(a, found, 2) == pytest.approx(4.0)
    assert found[0] == found[1] and found[2] == found[3] and found[0] != found[2]


# -- documented defaults that must agree ---------------------------------------------------------------------------
def _defaults(fn: object, names: tuple[str, ...]) -> dict[str, object]:
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    return {n: params[n].default for n in names}


LOOP = ("steps", "lr", "batch_size", "weight_decay")


def test_strategies_documented_as_finetune_all_share_its_training_loop_defaults() -> None:
    want = _defaults(FineTune.__init__, LOOP)
    checked = 0
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        if isinstance(cls, type) and "as ``finetune_all``" in (cls.__doc__ or ""):
            assert _defaults(cls.__init__, LOOP) == want, name
            checked += 1
    assert checked >= 4  # bss, co_tuning, stochnorm, lwf


def test_adapters_share_the_adapter_defaults_they_document() -> None:
    names = (*LOOP, "trade_off")
    want = _defaults(Adapter.__init__, names)
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        assert "as :class:`Adapter`" in (cls.__doc__ or ""), name
        assert _defaults(cls.__init__, names) == want, name


# -- TransRate's coding rate -------------------------------------------------------------------------------------
def test_coding_rate_defaults_to_transrates_eps_and_is_the_log_determinant() -> None:
    z = torch.randn(30, 5, generator=torch.Generator().manual_seed(3)).double()
    eps = inspect.signature(transrate).parameters["eps"].default
    rate = float(coding_rate(z))
    assert rate == pytest.approx(float(coding_rate(z, eps)), rel=1e-12)
    n, d = z.shape
    closed = 0.5 * float(torch.logdet(torch.eye(d, dtype=torch.float64) + z.T @ z / (n * eps)))
    assert rate == pytest.approx(closed, rel=1e-9)
    assert float(coding_rate(torch.zeros(7, 3))) == 0.0  # no spread, no rate
    assert float(coding_rate(2 * z)) > rate > 0  # more spread, more rate


# -- domain adaptation with the smallest source --------------------------------------------------------------------
def test_an_adapter_trains_from_a_single_labelled_source_row() -> None:
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(20, 4, generator=g) + 3.0
    target = Task("c", "multiclass", Split(xt, (xt[:, 0] > 3).long()), num_outputs=2)
    torch.manual_seed(0)
    model = MultiTaskModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"c": nn.Linear(8, 2)},
                           input_shapes={"c": (4,)})
    source = Source(model.eval(), kinds={"c": "multiclass"})
    one = Split(torch.randn(1, 4, generator=g), torch.tensor([1]))
    method = ADAPTERS.create("mcc", steps=3, batch_size=8)
    predictor = method.fit(source, target, one, xt, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(method.last_transfer)
    assert predictor(xt).shape == (20, 2)
