"""The Gramian of per-task gradients over the shared parameters, ``G[i, j] = ⟨∇Lᵢ, ∇Lⱼ⟩``, six ways.

* ``loop`` — one backward per task (:func:`task_gramian` with ``backend="loop"``);
* ``batched`` — one vmapped backward with m cotangents (``is_grads_batched``);
* ``layerwise`` — per ``nn.Linear`` layer of the shared part, from its input ``a [N, d_in]`` and the per-task
  gradients of its output ``δ``: ``⟨δ_sᵀa, δ_tᵀa⟩``, by explicit per-task gradients or by the kernel identity,
  whichever costs fewer multiply-adds (:mod:`mtml.weighting._layer_gram`). ``δ`` comes from ONE ordinary backward
  of ``Σ Lᵢ`` when every trunk row is read by one task and the trunk treats rows independently (checked:
  :mod:`mtml.weighting._row_coupling`) — task t's gradient is then the sum over its rows (``layerwise/rows``);
  otherwise, e.g. tasks on shared rows, from one batched backward of the m task losses to the layer outputs
  (``layerwise/batched``: no parameter Jacobian is formed). Either way the weighted gradient of those layers
  follows from the same ``δ`` (:meth:`GramianTape.backward`), so the step needs no second trunk backward.
* ``rows`` — ``layerwise/rows`` or an error that says why rows cannot be split (shared rows, a BatchNorm, …).
* ``representation`` — gradients with respect to the trunk's output instead of its parameters (MGDA-UB's bound):
  cheapest, not the parameter Gramian. With row-owned batches this Gramian is diagonal.
* ``auto`` — ``layerwise`` when every shared parameter sits in an ``nn.Linear`` (rows split when that is valid),
  else ``loop`` on CPU and ``batched`` on GPU. :attr:`GramianTape.used` says which ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtml._batched_grad import batched_grad
from mtml.errors import ConfigError
from mtml.weighting._base import GRAMIAN_BACKENDS
from mtml.weighting._layer_gram import batched_gram, combined_delta, rows_gram, task_chunks
from mtml.weighting._row_coupling import row_coupling

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
    grads = batched_grad(losses, params, eye, allow_unused=True)
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
        batched = batched_grad(losses, params, eye, allow_unused=True)
        rows = [tuple(g[i] if g is not None else None for g in batched) for i in range(m)]
    return torch.stack([torch.cat([(g if g is not None else p.new_zeros(p.shape)).reshape(-1).to(losses.dtype)
                                   for g, p in zip(row, params, strict=True)]) for row in rows])


def forward_many_owners(model: nn.Module, inputs: Mapping[str, Tensor], names: Sequence[str]) -> list[Tensor]:
    """Task index (in ``names``) of every row of every trunk call ``MultiTaskModel.forward_many(inputs)`` makes;
    ``-1`` for a row that several tasks read (a tensor given to several tasks).

    The calls are the model's ``trunk_plan(inputs)``. A model with its own ``row_owners(inputs, names)`` method
    is asked instead.
    """
    custom = getattr(model, "row_owners", None)
    if callable(custom):
        return list(custom(inputs, names))
    index = {n: i for i, n in enumerate(names)}
    calls = []
    for call in model.trunk_plan(inputs):  # type: ignore[operator]
        calls.append(torch.cat([torch.full((x.shape[0],), index[tasks[0]] if len(tasks) == 1 else -1,
                                           dtype=torch.long, device=x.device) for x, tasks in call]))
    return calls


class GramianTape:
    """Records, during the forward pass, what the chosen Gramian backend needs; then computes the Gramian and,
    for the layer-wise backends, the weighted gradient of the shared layers without a second trunk backward.

    Usage (what :func:`~mtml.engine._joint.joint_step` does)::

        tape = GramianTape(model, "auto")
        with tape:
            losses = task_losses(model, tasks, batch, names)
        gramian = tape.gramian(losses, inputs={n: batch[n][0] for n in names}, names=names)
        weights = weighting(losses, gramian)
        tape.backward((weights * losses).sum(), weights, params)   # or objective.backward()

    ``model`` needs ``shared_parameters()`` and, for ``layerwise``/``rows``/``representation``, a ``trunk`` module
    (the shared part called by ``forward_many``). ``inputs`` lets the tape derive which task reads which row.
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
        self._example: Tensor | None = None  # some trunk input rows, to check that the trunk keeps rows apart
        self._records: dict[nn.Linear, list[tuple[Tensor, Tensor, int]]] = {}
        self._outside = False  # a shared Linear ran outside a trunk call: row ownership unknown
        # (layer, a, δ, row owners): δ [N, out] split by rows, or per-task chunks [m_c, N, out]
        self._pieces: list[tuple[nn.Linear, Tensor, Tensor | list[Tensor], Tensor | None]] = []
        self._jacobian: tuple[list[nn.Parameter], Tensor] | None = None  # explicit per-task gradients

    # -- recording ---------------------------------------------------------------------------------------
    def __enter__(self) -> GramianTape:
        self._calls, self._records, self._outside, self._pieces = [], {mod: [] for mod in self.linears}, False, []
        self._example = None
        if self.backend in ("loop", "batched") or self.trunk is None:
            return self
        self._active = False
        self._handles.append(self.trunk.register_forward_pre_hook(self._enter_trunk))
        self._handles.append(self.trunk.register_forward_hook(self._leave_trunk))
        if self.backend in ("auto", "layerwise", "rows"):
            for mod in self.linears:
                self._handles.append(mod.register_forward_hook(self._record_linear))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter_trunk(self, module: nn.Module, args: Any) -> None:
        self._active = True
        if self._example is None and args and isinstance(args[0], Tensor):
            self._example = args[0]

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
        self._pieces, self._jacobian = [], None
        owners = self._owners(inputs, names, m)
        backend = self.backend
        if backend == "auto":
            can = self.trunk is not None and not self.rest and not self._outside and self._recorded_all()
            backend = "layerwise" if can else ("batched" if losses.device.type == "cuda" else "loop")
        if backend in ("layerwise", "rows", "representation") and self.trunk is None:
            raise ConfigError(f"gramian '{backend}' needs a model with a `trunk` module; use loop or batched.")
        if backend in ("loop", "batched"):
            self.used = backend
            return self._explicit(losses, self.shared, backend)
        if backend == "representation":  # features of a row feed only its own task's head: rows stay valid
            self.used = "representation" + ("/rows" if owners is not None else "/batched")
            return self._representation(losses, owners)
        owners = self._row_owners(owners, strict=backend == "rows")
        self.used = "layerwise" + ("/rows" if owners is not None else "/batched")
        gram = self._layerwise(losses, owners)
        if self.rest:
            gram = gram + self._explicit(losses, self.rest, "loop")
        return gram

    def _explicit(self, losses: Tensor, params: list[nn.Parameter], backend: str) -> Tensor:
        """The Gramian over ``params`` from their explicit per-task gradients ``J [m, P]``, kept for
        :meth:`backward` (which then needs no further backward through them)."""
        if not params:
            return losses.new_zeros(losses.shape[0], losses.shape[0])
        jac = task_jacobian(losses, params, backend=backend)
        self._jacobian = (params, jac)
        return jac @ jac.T

    def _row_owners(self, owners: list[Tensor] | None, *, strict: bool) -> list[Tensor] | None:
        """``owners`` when one backward of ``Σ L`` splits into per-task gradients by rows, else None; with
        ``strict`` (backend ``rows``) a :class:`ConfigError` says why it does not."""
        alternatives = "use gramian: layerwise (exact for any rows: per-task output gradients), batched or loop"
        if owners is None:
            if strict:
                raise ConfigError("gramian 'rows' needs every trunk row read by exactly one task, but here tasks "
                                  f"share their rows (or the model does not say which task reads which row); "
                                  f"{alternatives}.")
            return None
        assert self.trunk is not None
        coupling = row_coupling(self.trunk, self._example)
        if coupling is not None:
            if strict:
                raise ConfigError(f"gramian 'rows' needs a trunk that treats rows independently, but {coupling} "
                                  f"mixes rows, so one backward cannot be split by rows; {alternatives}.")
            return None
        return owners

    def _recorded_all(self) -> bool:
        return all(self._records[mod] for mod in self.linears) and bool(self._calls)

    def _owners(self, inputs: Mapping[str, Tensor] | None, names: Sequence[str] | None, m: int) -> list[Tensor] | None:
        if inputs is None or names is None or self.trunk is None or self._outside or len(names) != m:
            return None
        try:
            owners = forward_many_owners(self.model, inputs, names)
        except (KeyError, AttributeError):
            return None
        if len(owners) != len(self._calls) or any(bool((own < 0).any()) for own in owners):
            return None  # rows read by several tasks: per-task gradients need one backward per task
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
        grads = batched_grad(losses, feats, eye, allow_unused=True)
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
            chunked = [[d] for d in torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)]
        else:  # per-task δ in task chunks: one batched backward each, every temporary small
            eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
            per_chunk = [batched_grad(losses, outs, eye[part], allow_unused=True)
                         for part in task_chunks(m, max(z.numel() for z in outs))]
            chunked = [list(ds) for ds in zip(*per_chunk, strict=True)]
        by_layer: dict[nn.Linear, list[tuple[Tensor, list[Tensor], int]]] = {}
        for (mod, a, _, call), ds in zip(items, chunked, strict=True):
            if all(d is not None for d in ds):
                by_layer.setdefault(mod, []).append((a.detach(), ds, call))
        for mod, parts in by_layer.items():
            a = (parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])).reshape(-1, mod.in_features)
            aug = torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if mod.bias is not None else a  # bias: input 1
            if owners is not None:
                d: Tensor | list[Tensor] = torch.cat([p[1][0] for p in parts]).reshape(a.shape[0], -1)
                own: Tensor | None = torch.cat([owners[p[2]] for p in parts])
                assert isinstance(d, Tensor) and own is not None
                layer = rows_gram(aug, d, own, m)
            else:  # chunk c of every call of the layer, rows concatenated
                d = [(ps[0] if len(ps) == 1 else torch.cat(ps, 1)).reshape(ps[0].shape[0], a.shape[0], -1)
                     for ps in zip(*[p[1] for p in parts], strict=True)]
                own, layer = None, batched_gram(aug, d)
            self._pieces.append((mod, a, d, own))
            gram = gram + layer.to(gram.dtype)
        return gram

    # -- the weighted gradient ------------------------------------------------------------------------------
    def backward(self, objective: Tensor, weights: Tensor, params: Sequence[Tensor]) -> None:
        """Accumulate ``∇ objective`` into ``.grad`` of ``params``, where ``objective = Σ_t weights[t]·L_t + c``
        (``c`` free of the shared layers) and ``weights`` the detached task weights.

        The shared parameters' gradients come from what the Gramian already computed — ``Σ_t w_t δ_tᵀa`` from the
        recorded ``δ`` of a layer-wise Gramian, ``wᵀJ`` from the explicit per-task gradients ``J`` of ``loop`` /
        ``batched`` (no second backward through the trunk) — and autograd computes only the rest (heads, stems,
        weighting parameters). With weights that carry a graph, or the representation Gramian, this is
        ``objective.backward()``.
        """
        covered = {id(p) for mod, _, _, _ in self._pieces for p in mod.parameters(recurse=False)}
        if self._jacobian is not None:
            covered |= {id(p) for p in self._jacobian[0]}
        fused = bool(covered) and not weights.requires_grad and all(id(p) in covered for p in self.shared)
        if not fused:
            objective.backward()
            return
        others = [p for p in params if p.requires_grad and id(p) not in covered]
        if others and objective.requires_grad:
            torch.autograd.backward(objective, inputs=others)
        w = weights.detach()
        for mod, a, d, own in self._pieces:
            delta = combined_delta(d, w, own)  # [N, out]
            _accumulate(mod.weight, delta.T @ a)
            if mod.bias is not None:
                _accumulate(mod.bias, delta.sum(0))
        if self._jacobian is not None:  # Σ_t w_t ∇L_t from the per-task gradients already computed
            explicit, jac = self._jacobian
            for p, g in zip(explicit, (w.to(jac.dtype) @ jac).split([p.numel() for p in explicit]), strict=True):
                _accumulate(p, g)
        self._pieces, self._jacobian = [], None


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if not param.requires_grad:  # a frozen shared layer gets no gradient, as with autograd
        return
    grad = grad.to(param.dtype).reshape(param.shape)
    if param.grad is None:
        param.grad = grad.contiguous()
    else:
        param.grad.add_(grad)
