"""The Gramian of per-task gradients over the shared parameters, ``G[i, j] = ⟨∇Lᵢ, ∇Lⱼ⟩``, five ways.

* ``loop`` — one backward per task (:func:`task_gramian` with ``backend="loop"``);
* ``batched`` — one vmapped backward with m cotangents (``is_grads_batched``);
* ``layerwise`` — per ``nn.Linear`` layer of the shared part, from its input ``a [N, d_in]`` and the per-task
  gradients of its output ``δ [N, d_out]``: ``⟨δ_sᵀa, δ_tᵀa⟩``, by explicit per-task gradients or by the kernel
  identity ``Σ (aaᵀ ∘ δ_sδ_tᵀ)``, whichever costs fewer flops. When each task owns its own rows of every shared
  call (``forward_many`` concatenates the tasks' batches and the trunk treats rows independently), ONE ordinary
  backward of ``Σ Lᵢ`` gives every row's ``δ``, and task t's gradient is the sum over its rows: the exact
  Gramian costs about one extra backward. Otherwise ``δ`` comes from one batched backward to the layer outputs.
* ``representation`` — gradients with respect to the trunk's output instead of its parameters (MGDA-UB's bound):
  cheapest, not the parameter Gramian. With row-owned batches this Gramian is diagonal.
* ``auto`` — ``layerwise`` when every shared parameter sits in an ``nn.Linear`` (row-owned or not), else ``loop``
  on CPU and ``batched`` on GPU. :attr:`GramianTape.used` says which ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtml.errors import ConfigError
from mtml.weighting.base import GRAMIAN_BACKENDS

__all__ = ["GramianTape", "task_gramian", "task_jacobian"]


def task_gramian(losses: Tensor, params: Sequence[torch.Tensor], *, backend: str = "batched") -> Tensor:
    """``G[i, j] = ⟨∇_θ Lᵢ, ∇_θ Lⱼ⟩`` for ``losses: [m]`` over ``params`` → ``[m, m]``.

    ``backend="batched"``: one batched backward (``is_grads_batched``); ``"loop"``: one backward per task. The
    graph of ``losses`` stays alive for the weighted backward that follows. Unreached parameters count as 0.
    """
    if backend not in ("batched", "loop"):
        raise ConfigError(f"`backend` must be 'batched' or 'loop'. Got {backend!r}.")
    m = losses.shape[0]
    params = list(params)
    zero = torch.zeros(m, m, dtype=losses.dtype, device=losses.device)
    if not params:  # e.g. no shared parameters (one trunk per task): no gradient to share
        return zero
    if backend == "loop":
        gram = zero
        rows = []
        for i in range(m):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            rows.append([g.reshape(-1) if g is not None else None for g in grads])
        for k in range(len(params)):
            cols = [r[k] if r[k] is not None else params[k].new_zeros(params[k].numel()) for r in rows]
            if any(r[k] is not None for r in rows):
                block = torch.stack(cols).to(losses.dtype)
                gram = gram + block @ block.T
        return gram
    eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    reached = [g.reshape(m, -1) for g in grads if g is not None]
    if not reached:
        return zero
    jac = torch.cat(reached, dim=1)
    return jac @ jac.T


def task_jacobian(losses: Tensor, params: Sequence[torch.Tensor], *, backend: str = "batched") -> Tensor:
    """Per-task gradients ``J[i] = ∇_θ Lᵢ`` of ``losses: [m]`` over ``params``, flattened → ``[m, P]``.

    What data-parallel training all-reduces (the Gramian of summed gradients is not the sum of Gramians):
    ``batched`` uses one batched backward, ``loop`` one backward per task. The graph of ``losses`` is kept.
    Unreached parameters give zero columns.
    """
    if backend not in ("batched", "loop"):
        raise ConfigError(f"`backend` must be 'batched' or 'loop'. Got {backend!r}.")
    m, params = losses.shape[0], list(params)
    if not params:
        return losses.new_zeros(m, 0)
    if backend == "loop":
        rows = [torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True) for i in range(m)]
    else:
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        batched = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                      allow_unused=True)
        rows = [tuple(g[i] if g is not None else None for g in batched) for i in range(m)]
    return torch.stack([torch.cat([(g if g is not None else p.new_zeros(p.shape)).reshape(-1).to(losses.dtype)
                                   for g, p in zip(row, params, strict=True)]) for row in rows])


def forward_many_owners(model: nn.Module, inputs: Mapping[str, Tensor], names: Sequence[str]) -> list[Tensor]:
    """Task index (in ``names``) of every row of every trunk call ``MultiTaskModel.forward_many(inputs)`` makes.

    Tasks with a stem call the trunk alone, in input order; then one call per group of stem-less tasks with a
    common input shape, rows concatenated in input order. A model with its own ``row_owners(inputs, names)``
    method is asked instead.
    """
    custom = getattr(model, "row_owners", None)
    if callable(custom):
        return list(custom(inputs, names))
    index = {n: i for i, n in enumerate(names)}
    stems = getattr(model, "stems", {})
    calls: list[Tensor] = []
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for task, x in inputs.items():
        owner = torch.full((x.shape[0],), index[task], dtype=torch.long, device=x.device)
        if task in stems:
            calls.append(owner)
        else:
            groups.setdefault(tuple(x.shape[1:]), []).append(owner)
    calls.extend(torch.cat(parts) for parts in groups.values())
    return calls


class GramianTape:
    """Records, during the forward pass, what the chosen Gramian backend needs; then computes the Gramian.

    Usage (what :func:`~mtml.engine.joint.joint_step` does)::

        tape = GramianTape(model, "auto")
        with tape:
            losses = task_losses(model, tasks, batch, names)
        gramian = tape.gramian(losses, inputs={n: batch[n][0] for n in names}, names=names)

    ``model`` needs ``shared_parameters()`` and, for ``layerwise``/``representation``, a ``trunk`` module (the
    shared part called by ``forward_many``). ``inputs`` lets the tape derive which task owns which row.
    """

    def __init__(self, model: nn.Module, backend: str = "auto") -> None:
        if backend not in GRAMIAN_BACKENDS:
            raise ConfigError(f"`gramian` must be one of {', '.join(GRAMIAN_BACKENDS)}. Got {backend!r}.")
        self.model = model
        self.backend = backend
        self.used = ""
        shared: list[nn.Parameter] = list(model.shared_parameters())  # type: ignore[operator]
        self.shared = shared
        ids = {id(p) for p in shared}
        self.linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear) and id(mod.weight) in ids
                        and (mod.bias is None or id(mod.bias) in ids)]
        covered = {id(p) for mod in self.linears for p in mod.parameters(recurse=False)}
        self.rest = [p for p in shared if id(p) not in covered]
        trunk = getattr(model, "trunk", None)
        self.trunk: nn.Module | None = trunk if isinstance(trunk, nn.Module) else None
        self._handles: list[RemovableHandle] = []
        self._calls: list[Tensor] = []  # trunk outputs, in call order
        self._records: dict[nn.Linear, list[tuple[Tensor, Tensor, int]]] = {}
        self._outside = False  # a shared Linear ran outside a trunk call: row ownership unknown

    # -- recording ---------------------------------------------------------------------------------------
    def __enter__(self) -> GramianTape:
        self._calls, self._records, self._outside = [], {mod: [] for mod in self.linears}, False
        if self.backend in ("loop", "batched") or self.trunk is None:
            return self
        self._active = False
        self._handles.append(self.trunk.register_forward_pre_hook(self._enter_trunk))
        self._handles.append(self.trunk.register_forward_hook(self._leave_trunk))
        if self.backend in ("auto", "layerwise"):
            for mod in self.linears:
                self._handles.append(mod.register_forward_hook(self._record_linear))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter_trunk(self, module: nn.Module, args: Any) -> None:
        self._active = True

    def _leave_trunk(self, module: nn.Module, args: Any, output: Any) -> None:
        self._active = False
        self._calls.append(output)

    def _record_linear(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active:
            self._outside = True
        self._records[module].append((args[0], output, len(self._calls)))  # type: ignore[index]

    # -- computing ---------------------------------------------------------------------------------------
    def gramian(self, losses: Tensor, inputs: Mapping[str, Tensor] | None = None,
                names: Sequence[str] | None = None) -> Tensor:
        """``[m, m]`` Gramian of ``losses: [m]`` (graph kept for the weighted backward)."""
        m = losses.shape[0]
        owners = self._owners(inputs, names, m)
        backend = self.backend
        if backend == "auto":
            can = self.trunk is not None and not self.rest and not self._outside and self._recorded_all()
            backend = "layerwise" if can else ("batched" if losses.device.type == "cuda" else "loop")
        if backend in ("layerwise", "representation") and self.trunk is None:
            raise ConfigError(f"gramian '{backend}' needs a model with a `trunk` module; use loop or batched.")
        if backend in ("loop", "batched"):
            self.used = backend
            return task_gramian(losses, self.shared, backend=backend)
        if backend == "representation":
            self.used = "representation" + ("/rows" if owners is not None else "/batched")
            return self._representation(losses, owners)
        self.used = "layerwise" + ("/rows" if owners is not None else "/batched")
        gram = self._layerwise(losses, owners)
        if self.rest:
            gram = gram + task_gramian(losses, self.rest, backend="loop")
        return gram

    def _recorded_all(self) -> bool:
        return all(self._records[mod] for mod in self.linears) and bool(self._calls)

    def _owners(self, inputs: Mapping[str, Tensor] | None, names: Sequence[str] | None, m: int) -> list[Tensor] | None:
        if inputs is None or names is None or self.trunk is None or self._outside or len(names) != m:
            return None
        try:
            owners = forward_many_owners(self.model, inputs, names)
        except (KeyError, AttributeError):
            return None
        if len(owners) != len(self._calls):
            return None
        for own, out in zip(owners, self._calls, strict=True):
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != own.shape[0]:
                return None
        for records in self._records.values():
            for a, z, call in records:
                if a.dim() != 2 or z.dim() != 2 or call >= len(owners) or a.shape[0] != owners[call].shape[0]:
                    return None
        return owners

    def _representation(self, losses: Tensor, owners: list[Tensor] | None) -> Tensor:
        m = losses.shape[0]
        feats = [f for f in self._calls if isinstance(f, Tensor) and f.requires_grad]
        gram = losses.new_zeros(m, m)
        if not feats:
            return gram
        if owners is not None:
            grads = torch.autograd.grad(losses.sum(), feats, retain_graph=True, allow_unused=True)
            for g, own in zip(grads, owners, strict=True):
                if g is not None:
                    sq = g.reshape(g.shape[0], -1).square().sum(1).to(gram.dtype)
                    gram = gram + torch.diag(gram.new_zeros(m).index_add(0, own, sq))
            return gram
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(losses, feats, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        flat = [g.reshape(m, -1) for g in grads if g is not None]
        return torch.cat(flat, 1) @ torch.cat(flat, 1).T if flat else gram

    def _layerwise(self, losses: Tensor, owners: list[Tensor] | None) -> Tensor:
        m = losses.shape[0]
        items = [(mod, a, z, call) for mod in self.linears for a, z, call in self._records[mod] if z.requires_grad]
        gram = losses.new_zeros(m, m)
        if not items:
            return gram
        outs = [z for _, _, z, _ in items]
        if owners is not None:
            deltas = torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)
        else:
            eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
            deltas = torch.autograd.grad(losses, outs, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                         allow_unused=True)
        by_layer: dict[nn.Linear, list[tuple[Tensor, Tensor, int]]] = {}
        for (mod, a, _, call), d in zip(items, deltas, strict=True):
            if d is not None:
                by_layer.setdefault(mod, []).append((a.detach(), d, call))
        for mod, parts in by_layer.items():
            a = torch.cat([p[0] for p in parts]).reshape(-1, mod.in_features)
            if mod.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)  # the bias is a weight on a constant input
            if owners is not None:
                d = torch.cat([p[1] for p in parts])
                own = torch.cat([owners[p[2]] for p in parts])
                gram = gram + _rows_gram(a, d, own, m).to(gram.dtype)
            else:
                d = torch.cat([p[1] for p in parts], dim=1)
                gram = gram + _batched_gram(a, d).to(gram.dtype)
        return gram


_CHUNK = 1 << 24  # elements of per-task gradients held at once


def _rows_gram(a: Tensor, d: Tensor, owner: Tensor, m: int) -> Tensor:
    """Row-owned layer: ``a [N, i]``, ``δ [N, o]``, ``owner [N]`` → ``[m, m]`` Gramian of ``Σ_{rows of t} δᵀa``."""
    n, i = a.shape
    o = d.shape[1]
    if n * n * (i + o + m) < n * i * o + m * m * i * o:  # kernel identity is cheaper
        onehot = torch.zeros(n, m, dtype=a.dtype, device=a.device)
        onehot[torch.arange(n, device=a.device), owner] = 1.0
        kernel = (a @ a.T) * (d @ d.T)
        return onehot.T @ kernel @ onehot
    counts = torch.bincount(owner, minlength=m).tolist()
    order = torch.argsort(owner, stable=True)
    if not bool((order == torch.arange(n, device=order.device)).all()):
        a, d = a[order], d[order]
    gram = a.new_zeros(m, m)
    step = max(1, _CHUNK // max(1, m * i))
    for lo in range(0, o, step):
        dc = d[:, lo : lo + step]
        if len(set(counts)) == 1 and counts[0] > 0:
            k = counts[0]
            jac = torch.bmm(dc.reshape(m, k, -1).transpose(1, 2), a.reshape(m, k, i)).reshape(m, -1)
        else:
            jac = torch.stack([blk_d.T @ blk_a for blk_d, blk_a in zip(dc.split(counts), a.split(counts), strict=True)])
            jac = jac.reshape(m, -1)
        gram = gram + jac @ jac.T
    return gram


def _batched_gram(a: Tensor, d: Tensor) -> Tensor:
    """Shared rows: ``a [N, i]``, per-task ``δ [m, N, o]`` → ``[m, m]`` Gramian of ``δ_tᵀa``."""
    m, n, o = d.shape
    i = a.shape[1]
    if n * n * i + m * n * n * o + m * m * n * o < m * n * i * o + m * m * i * o:
        z = (a @ a.T) @ d.permute(1, 0, 2).reshape(n, m * o)  # (aaᵀ)·δ_t for every t: [N, m·o]
        return d.reshape(m, -1) @ z.reshape(n, m, o).permute(1, 0, 2).reshape(m, -1).T
    gram = a.new_zeros(m, m)
    step = max(1, _CHUNK // max(1, m * i))
    for lo in range(0, o, step):
        dc = d[:, :, lo : lo + step]
        jac = (dc.transpose(1, 2).reshape(-1, n) @ a).reshape(m, -1)
        gram = gram + jac @ jac.T
    return gram
