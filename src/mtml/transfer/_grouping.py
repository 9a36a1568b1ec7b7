"""Task grouping: split tasks into k groups that help each other most, from an affinity matrix.

Definition used here (a partition, unlike TAG's overlapping groups): every task belongs to exactly one of
``k`` non-empty groups. A task ``j`` in group ``G`` scores the mean affinity onto it from its group mates,
``(1/(|G|−1)) Σ_{i∈G, i≠j} A[i, j]`` (Fifty et al. 2021, "Efficiently Identifying Task Groupings for
Multi-Task Learning", §3.2), and 0 when it is alone (no transfer either way). The total score of a partition is
the sum over tasks, which equals ``Σ_G S(G)/(|G|−1)`` with ``S(G)`` the sum of off-diagonal affinities inside
``G``. :func:`group_tasks` maximises it exactly for up to ``exact_limit`` tasks (every partition into k blocks,
scored in vectorised chunks) and greedily beyond (agglomerative merges, then moves and swaps until no single
change improves the score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtml.errors import ConfigError, DataError

__all__ = ["Grouping", "group_tasks", "grouping_score", "partitions"]

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Grouping:
    """Groups as tuples of task indices (sorted, groups ordered by their first task), the total score and
    the search used (``"exact"`` or ``"greedy"``)."""

    groups: tuple[tuple[int, ...], ...]
    score: float
    method: str

    def named(self, names: Sequence[str]) -> list[list[str]]:
        return [[names[i] for i in g] for g in self.groups]

    def labels(self) -> list[int]:
        """Group index of every task."""
        out = [0] * sum(len(g) for g in self.groups)
        for gi, g in enumerate(self.groups):
            for i in g:
                out[i] = gi
        return out


def _check(affinity: Tensor, k: int) -> Tensor:
    a = torch.as_tensor(affinity).to(torch.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DataError(f"affinity must be a square [tasks, tasks] matrix; got shape {tuple(a.shape)}.")
    if not bool(torch.isfinite(a).all()):
        raise DataError("affinity holds NaN/inf entries; record more steps or drop the tasks whose loss is 0.")
    if not 1 <= k <= a.shape[0]:
        raise ConfigError(f"the number of groups must be between 1 and the number of tasks ({a.shape[0]}). Got {k}.")
    return a.clone().fill_diagonal_(0.0)


def grouping_score(affinity: Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Total score of ``groups`` (see the module docstring) under ``affinity: [m, m]`` (``A[i, j]``: i onto j)."""
    a = _check(affinity, max(1, len(groups)))
    total = 0.0
    for g in groups:
        if len(g) > 1:
            idx = torch.as_tensor(list(g))
            total += float(a[idx][:, idx].sum()) / (len(g) - 1)
    return total


def partitions(m: int, k: int) -> Tensor:
    """Every partition of ``m`` items into exactly ``k`` non-empty blocks, as restricted-growth label rows
    ``[S(m, k), m]`` (uint8; item 0 in block 0, each new block numbered in order of first appearance)."""
    rows = torch.zeros(1, 1, dtype=torch.uint8)
    top = torch.zeros(1, dtype=torch.uint8)  # largest label used so far in each row
    for pos in range(1, m):
        new_rows, new_top = [], []
        for c in range(k):
            ok = top.to(torch.int64) + 1 >= c
            rows_c = torch.cat([rows[ok], torch.full((int(ok.sum()), 1), c, dtype=torch.uint8)], 1)
            new_rows.append(rows_c)
            new_top.append(torch.clamp_min(top[ok], c))
        rows, top = torch.cat(new_rows), torch.cat(new_top)
        feasible = top.to(torch.int64) + 1 + (m - pos - 1) >= k  # enough items left to open the missing blocks
        rows, top = rows[feasible], top[feasible]
    return rows[top.to(torch.int64) + 1 == k]


def _exact(a: Tensor, k: int) -> tuple[list[int], float]:
    labels = partitions(a.shape[0], k)
    best_score, best_row = -torch.inf, 0
    for start in range(0, labels.shape[0], _CHUNK):
        lab = labels[start:start + _CHUNK].to(torch.int64)
        onehot = torch.nn.functional.one_hot(lab, k).to(a.dtype)  # [P, m, k]
        inside = torch.einsum("pig,ij,pjg->pg", onehot, a, onehot)  # S(G) per block
        scores = (inside / (onehot.sum(1) - 1).clamp_min(1)).sum(1)
        value, row = scores.max(0)
        if float(value) > best_score:
            best_score, best_row = float(value), start + int(row)
    return labels[best_row].tolist(), best_score


def _values(s: Tensor, n: Tensor) -> Tensor:
    """Group scores ``S(G)/(|G|−1)`` (0 for singletons) from within-group sums ``s`` and sizes ``n``."""
    return torch.where(n > 1, s / (n - 1).clamp_min(1), torch.zeros_like(s))


def _agglomerate(b: Tensor, k: int) -> Tensor:
    """Labels ``[m]`` after merging, from singletons, the pair of groups with the best score gain until ``k``
    remain. ``b = A + Aᵀ`` with a zero diagonal; ``x[g, h]`` holds the cross sums between groups."""
    m = b.shape[0]
    x, s, n = b.clone(), torch.zeros(m, dtype=b.dtype), torch.ones(m, dtype=b.dtype)
    owner = list(range(m))  # current group (row of x) of each task
    alive = list(range(m))
    while len(alive) > k:
        xa, sa, na = x[alive][:, alive], s[alive], n[alive]
        merged = sa[:, None] + sa[None, :] + xa
        gain = _values(merged, na[:, None] + na[None, :]) - _values(sa, na)[:, None] - _values(sa, na)[None, :]
        gain.fill_diagonal_(-torch.inf)
        flat = int(gain.argmax())
        g, h = sorted((alive[flat // len(alive)], alive[flat % len(alive)]))
        s[g], n[g] = s[g] + s[h] + x[g, h], n[g] + n[h]
        x[g, :] += x[h, :]
        x[:, g] += x[:, h]
        alive.remove(h)
        owner = [g if o == h else o for o in owner]
    rank = {gid: r for r, gid in enumerate(alive)}
    return torch.tensor([rank[o] for o in owner])


def _improve(b: Tensor, labels: Tensor, k: int) -> Tensor:
    """Best-improvement local search over single moves and pairwise swaps (no group may become empty), all
    candidate changes scored at once from ``C[i, g] = Σ_{t∈g} b[i, t]``."""
    m = b.shape[0]
    for _ in range(100 * m):
        onehot = torch.nn.functional.one_hot(labels, k).to(b.dtype)
        c = b @ onehot  # [m, k]
        n, s = onehot.sum(0), 0.5 * (onehot * c).sum(0)
        val = _values(s, n)
        own = c.gather(1, labels[:, None])[:, 0]  # C[i, l_i]
        move = (_values(s[labels] - own, n[labels] - 1)[:, None] + _values(s[None, :] + c, n[None, :] + 1)
                - val[labels][:, None] - val[None, :])
        move[onehot.bool() | (n[labels] < 2)[:, None]] = -torch.inf
        cross = c[:, labels]  # [i, j] = C[i, l_j]
        sx = s[labels][:, None] - own[:, None] + cross.T - b
        sy = s[labels][None, :] - own[None, :] + cross - b
        swap = (_values(sx, n[labels][:, None]) + _values(sy, n[labels][None, :])
                - val[labels][:, None] - val[labels][None, :])
        swap[labels[:, None] == labels[None, :]] = -torch.inf
        if max(float(move.max()), float(swap.max())) <= 1e-12:
            break
        labels = labels.clone()
        if float(move.max()) >= float(swap.max()):
            i, y = divmod(int(move.argmax()), k)
            labels[i] = y
        else:
            i, j = divmod(int(swap.argmax()), m)
            labels[i], labels[j] = labels[j].clone(), labels[i].clone()
    return labels


def group_tasks(affinity: Tensor, k: int, *, exact_limit: int = 12) -> Grouping:
    """Split the tasks of ``affinity: [m, m]`` (``A[i, j]``: affinity of task i onto task j) into ``k`` groups
    maximising :func:`grouping_score`: exact when ``m <= exact_limit``, greedy with local search otherwise."""
    a = _check(affinity, k)
    m = a.shape[0]
    if m <= exact_limit:
        labels, score = _exact(a, k)
        groups = [[i for i in range(m) if labels[i] == g] for g in range(k)]
        method = "exact"
    else:
        b = a + a.T
        found = _improve(b, _agglomerate(b, k), k).tolist()
        groups = [[i for i in range(m) if found[i] == g] for g in range(k)]
        score, method = grouping_score(a, groups), "greedy"
    ordered = tuple(sorted(tuple(sorted(g)) for g in groups))
    return Grouping(ordered, float(score), method)
