"""Task grouping: exhaustive enumeration, planted clusters, exact >= greedy, input errors."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from mtml.errors import ConfigError, DataError
from mtml.transfer._grouping import Grouping, group_tasks, grouping_score, partitions


def _stirling2(m: int, k: int) -> int:
    return sum((-1) ** j * math.comb(k, j) * (k - j) ** m for j in range(k + 1)) // math.factorial(k)


def _planted(sizes: list[int], *, within: float = 0.4, across: float = -0.05, noise: float = 0.05,
             seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(sizes), generator=g)  # clusters are not contiguous in task order
    truth = [0] * sum(sizes)
    start = 0
    for c, s in enumerate(sizes):
        for t in perm[start:start + s].tolist():
            truth[t] = c
        start += s
    lab = torch.tensor(truth)
    a = torch.where(lab[:, None] == lab[None, :], within, across) + noise * torch.randn(len(lab), len(lab),
                                                                                        generator=g)
    return a, truth


def _same_partition(found: Grouping, truth: list[int]) -> bool:
    want = sorted(tuple(i for i, c in enumerate(truth) if c == k) for k in set(truth))
    return list(found.groups) == want


@pytest.mark.parametrize(("m", "k"), [(1, 1), (4, 2), (5, 3), (7, 4), (6, 6)])
def test_partitions_are_all_distinct_set_partitions(m: int, k: int) -> None:
    rows = partitions(m, k)
    assert rows.shape == (_stirling2(m, k), m)
    canon = {frozenset(frozenset(i for i in range(m) if r[i] == b) for b in range(k)) for r in rows.tolist()}
    assert len(canon) == rows.shape[0]
    assert all(len(set(r)) == k for r in rows.tolist())


def test_exact_equals_brute_force_over_all_labelings() -> None:
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    best = -math.inf
    for labels in itertools.product(range(3), repeat=6):
        if len(set(labels)) == 3:
            groups = [[i for i in range(6) if labels[i] == b] for b in range(3)]
            best = max(best, grouping_score(a, groups))
    found = group_tasks(a, 3)
    assert found.method == "exact"
    assert found.score == pytest.approx(best, abs=1e-9)
    assert grouping_score(a, found.groups) == pytest.approx(found.score, abs=1e-9)


def test_score_is_sum_of_mean_affinity_onto_each_task() -> None:
    a = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [5.0, 6.0, 9.0]])
    # group {0,1,2}: onto 0 = (3+5)/2, onto 1 = (1+6)/2, onto 2 = (2+4)/2 ; {0},{1,2}: onto 1 = 6, onto 2 = 4
    assert grouping_score(a, [[0, 1, 2]]) == pytest.approx(4 + 3.5 + 3)
    assert grouping_score(a, [[0], [1, 2]]) == pytest.approx(10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_clusters_recovered_exactly(seed: int) -> None:
    a, truth = _planted([3, 4, 4], seed=seed)
    assert _same_partition(group_tasks(a, 3), truth)
    big, big_truth = _planted([5, 6, 4, 5], seed=seed)  # 20 tasks: the greedy path
    found = group_tasks(big, 4)
    assert found.method == "greedy" and _same_partition(found, big_truth)


def test_exact_at_least_greedy() -> None:
    for seed in range(6):
        a = torch.randn(9, 9, generator=torch.Generator().manual_seed(seed))
        for k in (2, 3, 4):
            exact = group_tasks(a, k)
            greedy = group_tasks(a, k, exact_limit=0)
            assert greedy.method == "greedy" and len(greedy.groups) == k
            assert exact.score >= greedy.score - 1e-9
            assert sorted(i for g in greedy.groups for i in g) == list(range(9))


def test_twelve_tasks_four_groups_is_fast() -> None:
    a, truth = _planted([3, 3, 3, 3], seed=5)
    start = time.perf_counter()
    found = group_tasks(a, 4)
    assert time.perf_counter() - start < 15  # S(12, 4) = 611501 partitions
    assert found.method == "exact" and _same_partition(found, truth)


def test_named_and_labels() -> None:
    g = Grouping(((0, 2), (1,)), 1.0, "exact")
    assert g.named(["a", "b", "c"]) == [["a", "c"], ["b"]]
    assert g.labels() == [0, 1, 0]


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="square"):
        group_tasks(torch.zeros(3, 4), 2)
    with pytest.raises(ConfigError, match="between 1 and the number of tasks"):
        group_tasks(torch.zeros(3, 3), 4)
    bad = torch.zeros(3, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        group_tasks(bad, 2)


def test_greedy_ends_in_a_local_optimum_of_moves_and_swaps() -> None:
    """Oracle for the vectorised move/swap gains: no single move or swap, scored directly, does better."""
    a = torch.randn(14, 14, generator=torch.Generator().manual_seed(7))
    found = group_tasks(a, 3)
    assert found.method == "greedy"
    labels = found.labels()

    def score(lab: list[int]) -> float:
        return grouping_score(a, [[i for i in range(14) if lab[i] == g] for g in range(3)])

    assert score(labels) == pytest.approx(found.score)
    for i in range(14):
        for g in range(3):
            moved = [*labels[:i], g, *labels[i + 1:]]
            if len(set(moved)) == 3:
                assert score(moved) <= found.score + 1e-9
        for j in range(i + 1, 14):
            swapped = list(labels)
            swapped[i], swapped[j] = labels[j], labels[i]
            assert score(swapped) <= found.score + 1e-9
