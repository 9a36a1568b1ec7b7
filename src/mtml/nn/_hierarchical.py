"""Hierarchical heads: each task's linear head is a shared mean plus a task deviation drawn from a learned prior.

The linear mixed model on learned features. With ``z = [trunk(x), 1]`` (``p`` columns) and the random part
``z_R`` (the columns whose coefficients vary by task, ``r`` of them), task t's targets are

    y_t = z_t β + z_{R,t} u_t + ε,    u_t ~ N(0, Ψ = diag(τ²)),    ε ~ N(0, σ²),

so ``y_t ~ N(z_t β, Σ_t = σ² I + z_{R,t} Ψ z_{R,t}ᵀ)``. Training minimises the marginal negative log-likelihood
(the variance components τ², σ² are learned from the data: empirical Bayes, no tuning of a shrinkage strength),
computed per task with the Woodbury identity from ``r × r`` sufficient statistics gathered by one segmented sum
over all rows (no per-task Python loop). Predictions use the posterior mean of ``u_t`` given the task's training
rows (the BLUP), ``u_t = A_t⁻¹ z_{R,t}ᵀ (y_t − z_t β) / σ²`` with ``A_t = Ψ⁻¹ + z_{R,t}ᵀ z_{R,t} / σ²``: ridge
regression of each task around the shared mean, with the ridge strength ``σ²/τ²`` estimated rather than chosen.
On an identity trunk this is the random-coefficients model that lme4 / statsmodels ``MixedLM`` fit by maximum
likelihood (Laird & Ware 1982, "Random-effects models for longitudinal data"; Henderson 1975 for the BLUP);
``tests/nn/test_hierarchical.py`` checks estimates and predictions against statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.groups import task_groups
from mtml.nn._model import MultiTaskModel
from mtml.tasks import Task, TaskKind

__all__ = ["HierarchicalHeads", "HierarchicalModel", "Stats"]

Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # per task: rows [m], Z_RᵀZ_R [m, r, r], Z_Rᵀe [m, r, out], eᵀe [m, out]


class HierarchicalHeads(nn.Module):
    """The shared mean ``β [p, out]``, the prior variances ``τ² [r]`` and the noise variances ``σ² [out]`` of m
    regression heads on ``d``-dimensional features; ``random`` lists the coefficient indices (``0..d-1`` the
    features, ``d`` the intercept) whose values vary by task. ``deviation [m, r, out]`` holds the BLUPs of the last
    :meth:`refit`.
    """

    random: Tensor
    deviation: Tensor

    def __init__(self, d: int, num_tasks: int, out: int = 1, *, random: Sequence[int] | None = None) -> None:
        super().__init__()
        p = d + 1
        index = list(range(p)) if random is None else sorted(set(random))
        if not index or index[0] < 0 or index[-1] >= p:
            raise ConfigError(f"`random` must list coefficient indices in 0..{d} ({d} = the intercept). Got "
                              f"{list(random or [])}.")
        self.d, self.out, self.num_tasks = d, out, num_tasks
        self.register_buffer("random", torch.tensor(index, dtype=torch.long))
        self.mean = nn.Parameter(torch.zeros(p, out))
        self.log_tau2 = nn.Parameter(torch.full((len(index),), math.log(0.1)))
        self.log_sigma2 = nn.Parameter(torch.zeros(out))
        self.register_buffer("deviation", torch.zeros(num_tasks, len(index), out))

    # -- the model ------------------------------------------------------------------------------------
    def design(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``z = [h, 1]`` ``[n, p]`` and its random columns ``z_R`` ``[n, r]``."""
        z = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
        return z, z[:, self.random]

    def stats(self, h: Tensor, y: Tensor, owner: Tensor) -> Stats:
        """Sufficient statistics per task of rows ``h [n, d]``, ``y [n, out]`` owned by ``owner [n]``, around the
        shared mean (``e = y − zβ``), by segmented sums over all rows at once."""
        z, zr = self.design(h)
        e = y - z @ self.mean  # [n, out]
        m = self.num_tasks
        n = torch.zeros(m, dtype=h.dtype, device=h.device).index_add(0, owner, torch.ones_like(owner, dtype=h.dtype))
        ztz = h.new_zeros(m, zr.shape[1] * zr.shape[1]).index_add(0, owner, (zr[:, :, None] * zr[:, None, :])
                                                                  .reshape(len(zr), -1))
        zte = h.new_zeros(m, zr.shape[1] * self.out).index_add(0, owner, (zr[:, :, None] * e[:, None, :])
                                                               .reshape(len(zr), -1))
        ete = h.new_zeros(m, self.out).index_add(0, owner, e * e)
        r = zr.shape[1]
        return n, ztz.reshape(m, r, r), zte.reshape(m, r, self.out), ete

    def _posterior(self, ztz: Tensor) -> tuple[Tensor, Tensor]:
        """Cholesky factors of ``A_t = Ψ⁻¹ + ZᵀZ/σ²`` per task and output ``[m, out, r, r]``, and ``σ² [out]``."""
        sigma2 = self.log_sigma2.exp()
        eye = torch.eye(ztz.shape[1], dtype=ztz.dtype, device=ztz.device)
        a = (eye / self.log_tau2.exp())[None, None] + ztz[:, None] / sigma2[None, :, None, None]
        return torch.linalg.cholesky(a), sigma2

    def nll(self, h: Tensor, y: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """Marginal negative log-likelihood per task ``[m]`` (summed over its rows and outputs) and row counts."""
        n, ztz, zte, ete = self.stats(h, y, owner)
        chol, sigma2 = self._posterior(ztz)
        b = (zte / sigma2).transpose(1, 2).unsqueeze(-1)  # [m, out, r, 1]: Z_Rᵀe/σ²
        solved = torch.cholesky_solve(b, chol)
        quad = ete / sigma2 - (b * solved).sum((2, 3))  # eᵀΣ⁻¹e per task and output
        logdet = n[:, None] * self.log_sigma2 + self.log_tau2.sum() + 2 * chol.diagonal(dim1=2, dim2=3).log().sum(2)
        value = 0.5 * (quad + logdet + n[:, None] * math.log(2 * math.pi))
        return value.sum(1), n

    @torch.no_grad()
    def refit(self, h: Tensor, y: Tensor, owner: Tensor) -> None:
        """Set every task's BLUP deviation from its (training) rows; a task with no rows keeps deviation 0."""
        n, ztz, zte, _ = self.stats(h, y, owner)
        chol, sigma2 = self._posterior(ztz)
        u = torch.cholesky_solve((zte / sigma2).transpose(1, 2).unsqueeze(-1), chol).squeeze(-1)  # [m, out, r]
        self.deviation.copy_(torch.where(n[:, None, None] > 0, u.transpose(1, 2), torch.zeros_like(u.transpose(1, 2))))

    def predict(self, h: Tensor, task: int | Tensor) -> Tensor:
        """``z β + z_R u_task`` ``[n, out]`` for rows of one task, or of the task ``task[i]`` for row i (a tensor
        ``[n]`` of task indices)."""
        z, zr = self.design(h)
        if isinstance(task, Tensor):
            return z @ self.mean + (zr[:, :, None] * self.deviation[task].to(h.dtype)).sum(1)
        return z @ self.mean + zr @ self.deviation[task].to(h.dtype)


class _Slot(nn.Module):
    """Task ``index``'s head: predictions of the model's shared :class:`HierarchicalHeads` (not a submodule of the
    slot, so its parameters are registered once, under ``hierarchy.*``)."""

    def __init__(self, shared: HierarchicalHeads, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        self.index = index

    def forward(self, h: Tensor) -> Tensor:
        shared: HierarchicalHeads = object.__getattribute__(self, "_shared")
        return shared.predict(h, self.index)


class HierarchicalModel(MultiTaskModel):
    """``MultiTaskModel`` whose heads are one :class:`HierarchicalHeads`: trained by the marginal likelihood
    (:meth:`training_losses`, what :func:`mtml.engine._joint.task_losses` calls), predicting with the BLUPs that
    :meth:`refit` computes from the tasks' training rows (what :func:`mtml.engine._joint.evaluate` calls first).
    """

    def __init__(self, trunk: nn.Module, tasks: Sequence[Task], d: int, *, random: Sequence[int] | None = None,
                 stems: Mapping[str, nn.Module] | None = None, stem_of: Mapping[str, str] | None = None) -> None:
        bad = [t.name for t in tasks if t.kind is not TaskKind.REGRESSION or t.loss is not None]
        if bad:
            raise ConfigError(f"model.head: hierarchical fits regression tasks with the default squared loss (a "
                              f"linear mixed model); tasks {bad} are not. Use the default head for them.")
        shared = [g.name for g in task_groups(tasks) if g.shared]
        if shared:
            raise ConfigError(f"model.head: hierarchical needs every task's own rows (one regression per group); "
                              f"task groups {shared} share their rows. Use the default head for them.")
        outs = {t.num_outputs for t in tasks}
        if len(outs) != 1:
            raise ConfigError(f"model.head: hierarchical needs one output width for all tasks; got {sorted(outs)}.")
        hierarchy = HierarchicalHeads(d, len(tasks), outs.pop(), random=random)
        heads = {t.name: _Slot(hierarchy, i) for i, t in enumerate(tasks)}
        super().__init__(trunk, heads, stems, input_shapes={t.name: t.input_shape for t in tasks}, stem_of=stem_of)
        self.hierarchy = hierarchy
        self.index = {t.name: i for i, t in enumerate(tasks)}

    def _features(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, list[str]]:
        """Trunk features of every task's rows, concatenated, the task index of each row, and the task order of
        the rows (one pass of :meth:`trunk_plan`)."""
        xs = list(inputs.values())
        if not self.stem_of and len({(x.shape[1:], x.dtype) for x in xs}) == 1 and len({id(x) for x in xs}) == len(xs):
            sizes = torch.tensor([x.shape[0] for x in xs], device=xs[0].device)  # one call, no per-task ops
            index = torch.tensor([self.index[n] for n in inputs], device=xs[0].device)
            return self.trunk(torch.cat(xs)), torch.repeat_interleave(index, sizes), list(inputs)
        feats, owner, order = [], [], []
        for call in self.trunk_plan(inputs):
            stem = self.stem_call(call)
            x = call[0][0] if len(call) == 1 else torch.cat([x for x, _ in call])
            feats.append(self.trunk(stem(x) if stem is not None else x))
            for xb, names in call:
                if len(names) != 1:
                    raise ConfigError(f"model.head: hierarchical needs every task's own rows; tasks {names} were "
                                      "given the same input tensor.")
                owner.append(torch.full((xb.shape[0],), self.index[names[0]], dtype=torch.long, device=xb.device))
                order.append(names[0])
        return torch.cat(feats), torch.cat(owner), order

    def forward_rows(self, names: Sequence[str], x: Tensor, sizes: Sequence[int],
                     owner: Tensor | None = None) -> Tensor:
        """Predictions ``[rows, out]`` for rows of stem-less tasks concatenated task after task (``sizes[i]`` rows
        of ``names[i]``), each with its task's BLUP: one trunk pass."""
        index = torch.tensor([self.index[n] for n in names], device=x.device)
        if owner is None:
            owner = torch.repeat_interleave(torch.arange(len(sizes), device=x.device),
                                            torch.tensor(list(sizes), device=x.device))
        return self.hierarchy.predict(self.features(x), index[owner])

    def training_losses(self, tasks: Mapping[str, Task], batch: Mapping[str, tuple[Tensor, ...]],
                        names: Sequence[str]) -> Tensor:
        """``[m]`` per-row marginal NLLs of ``names`` on ``batch`` (``{task: (x, y)}``), one trunk pass."""
        for n in names:
            if len(batch[n]) > 2:
                raise ConfigError(f"model.head: hierarchical does not take missing labels yet (task '{n}'); drop "
                                  "the unlabelled rows (data.options.dropna: true).")
        packs = [p for p in getattr(batch, "packs", ()) if p.names == tuple(names) and p.mask is None]
        if packs and not any(n in self.stem_of for n in names):  # every task in one pack: no per-task work
            pack = packs[0]
            h = self.trunk(pack.x)
            owner = torch.tensor([self.index[n] for n in names], device=h.device)[pack.owner]
            y = pack.y.to(h.dtype)
        else:
            h, owner, order = self._features({n: batch[n][0] for n in names})
            y = torch.cat([batch[n][1] for n in order]).to(h.dtype)
        value, rows = self.hierarchy.nll(h, y, owner)
        index = torch.tensor([self.index[n] for n in names], device=h.device)
        return value[index] / rows[index].clamp_min(1)

    @torch.no_grad()
    def refit(self, tasks: Sequence[Task]) -> None:
        """Every task's BLUP deviation from its training split, with the current trunk and variance components."""
        known = {t.name: t for t in tasks if t.name in self.index}
        if not known:
            return
        was = self.training
        self.eval()
        try:
            h, owner, order = self._features({n: t.train.x for n, t in known.items()})
            self.hierarchy.refit(h, torch.cat([known[n].train.y for n in order]).to(h.dtype), owner)
        finally:
            self.train(was)

    def mean_head(self) -> nn.Linear:
        """The shared mean ``β`` as an ordinary linear head (a copy): what transfer strategies start a new task
        from."""
        h = self.hierarchy
        head = nn.Linear(h.d, h.out).to(h.mean.device, h.mean.dtype)
        with torch.no_grad():
            head.weight.copy_(h.mean[: h.d].T)
            head.bias.copy_(h.mean[h.d])
        return head



def build_hierarchical(tasks: Sequence[Task], *, trunk_hidden: Sequence[int] = (), stem_width: int | None = None,
                       activation: str = "relu", dropout: float = 0.0,
                       random: Sequence[int | str] | str = "all") -> HierarchicalModel:
    """A :class:`HierarchicalModel`: the MLP trunk (and stems) of :func:`~mtml.nn.build_multitask_model`, then
    hierarchical linear heads. ``trunk_hidden=[]`` (no trunk) gives the classical linear mixed model on the
    inputs. ``random``: ``"all"`` (every coefficient varies by task), or a list of feature indices and
    ``"intercept"`` (e.g. ``[intercept, 2]``: a random intercept and a random slope on feature 2).
    """
    from mtml.nn._builders import build_multitask_model

    base = build_multitask_model(tasks, trunk_hidden=trunk_hidden, stem_width=stem_width, activation=activation,
                                 dropout=dropout)
    first = next(iter(base.heads.values()))
    d = first.in_features if isinstance(first, nn.Linear) else int(first[0].in_features)  # type: ignore[index]
    index: list[int] | None = None
    if random != "all":
        if isinstance(random, str) or not isinstance(random, Sequence) or not random:
            raise ConfigError(f"model.head_options.random must be 'all' or a non-empty list of feature indices and "
                              f"'intercept'. Got {random!r}.")
        index = []
        for r in random:
            if r == "intercept":
                index.append(d)
            elif isinstance(r, int) and not isinstance(r, bool) and 0 <= r < d:
                index.append(r)
            else:
                raise ConfigError(f"model.head_options.random: {r!r} is not a feature index in 0..{d - 1} of the "
                                  "trunk's output or 'intercept'.")
    return HierarchicalModel(base.trunk, tasks, d, random=index, stems=dict(base.stems),
                             stem_of=dict(base.stem_of) or None)
