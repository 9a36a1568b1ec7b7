"""Running one module with per-task parameters, vectorised over the tasks of an episode.

Parameters come in two dicts: ``shared`` (used by every task) and ``fast`` (adapted per task). A fast
parameter is either still tied across tasks (its own shape, as at the start of an inner loop) or stacked
``[tasks, *shape]``. :func:`batched_forward` maps ``x: [tasks, n, *input]`` to ``[tasks, n, *output]`` and
:func:`task_gradients` gives each task's gradient of its own loss. Three engines compute them:

- the **speed path** (:mod:`mtml.meta._mlp`): MLP chains run as batched matrix products on the stacked
  weights and are differentiated by hand — no ``vmap``, no ``autograd.grad``;
- the **task loop** for image models (inputs ``[tasks, n, C, H, W]``): one task at a time through the model's
  own forward (``functional_call`` on that task's parameters), all tasks in one call while they share them;
  also for any model holding a module with ``supports_vmap = False`` (a :class:`~mtml.nn.KerasModule` with
  dropout or batch statistics, or with an op ``vmap`` cannot batch), whatever its inputs;
- the **general path**: any other module runs through ``torch.func.vmap`` over
  ``torch.func.functional_call``, and one ``autograd.grad`` of the summed task losses gives every task its own
  gradient (tasks share no adapted parameter, so the sum separates).

All are differentiable to any order, so an outer loop can back-propagate through an inner loop built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mtml.errors import ConfigError
from mtml.meta._episode import episode_losses, way_logits
from mtml.meta._mlp import Layer, chain_forward, chain_gradients, linear_chain, single_head, supports_gradients
from mtml.meta._paths import current_paths
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

__all__ = [
    "ParameterFilter",
    "batched_forward",
    "declines_vmap",
    "embed",
    "linear_chain",
    "model_plan",
    "parameter_filter",
    "task_gradients",
]

ParameterFilter = Callable[[str], bool]

Plan = list[Layer] | None
"""How :func:`batched_forward` runs a model: an MLP chain, or ``None`` (the task loop for images, else ``vmap``)."""


def model_plan(model: nn.Module) -> Plan:
    """The speed path ``model`` allows and the switches (:func:`~mtml.meta.speed_paths`) leave on (see
    :data:`Plan`). Reading the model costs a walk of its modules, so algorithms compute the plan once per model
    and pass it as ``chain``."""
    return linear_chain(model) if current_paths().mlp_chain else None


def _call(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    if isinstance(model, MultiTaskModel):
        return functional_call(model, dict(params), (x, single_head(model)))
    return functional_call(model, dict(params), (x,))


def _split(model: nn.Module, shared: Mapping[str, Tensor],
           fast: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(stacked, common)``: the fast parameters stacked ``[tasks, *shape]``, and every parameter all tasks use
    as it is (the shared ones and the fast ones still tied)."""
    ndim = {n: p.ndim for n, p in model.named_parameters()}
    stacked = {n: w for n, w in fast.items() if w.ndim > ndim[n]}
    return stacked, {**shared, **{n: w for n, w in fast.items() if n not in stacked}}


def _vmap_forward(model: nn.Module, shared: Mapping[str, Tensor], fast: Mapping[str, Tensor],
                  x: Tensor) -> Tensor:
    stacked, common = _split(model, shared, fast)

    def one_task(stacked_t: dict[str, Tensor], x_t: Tensor) -> Tensor:
        return _call(model, {**common, **stacked_t}, x_t)

    return vmap(one_task)(stacked, x)


def _loop_forward(model: nn.Module, shared: Mapping[str, Tensor], fast: Mapping[str, Tensor],
                  x: Tensor) -> Tensor:
    """One task at a time through the model's own forward, each with its slice of the per-task parameters."""
    stacked, common = _split(model, shared, fast)
    if not stacked:  # every task has the same parameters: one call on all tasks' examples
        return _call(model, common, x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return torch.stack([_call(model, {**common, **{n: w[t] for n, w in stacked.items()}}, x[t])
                        for t in range(x.shape[0])])


def declines_vmap(model: nn.Module) -> bool:
    """Whether a module of ``model`` sets ``supports_vmap = False``: ``vmap`` cannot run it, so
    :func:`batched_forward` takes the task loop for it, on any input and whatever the ``task_loop`` switch."""
    return any(getattr(m, "supports_vmap", True) is False for m in model.modules())


def batched_forward(
    model: nn.Module,
    shared: Mapping[str, Tensor],
    fast: Mapping[str, Tensor],
    x: Tensor,
    *,
    chain: Plan = None,
) -> Tensor:
    """``model`` on ``x: [tasks, n, *input]`` with per-task ``fast`` parameters → ``[tasks, n, *output]``.

    ``chain`` (from :func:`model_plan`) selects the speed path for ``[tasks, n, features]``; images
    ``[tasks, n, C, H, W]`` and models that decline ``vmap`` (:func:`declines_vmap`) take the task loop;
    anything else goes through ``vmap(functional_call)``.
    """
    if isinstance(chain, list) and x.ndim == 3:
        return chain_forward(chain, {**shared, **fast}, x)
    if (x.ndim == 5 and current_paths().task_loop) or declines_vmap(model):
        return _loop_forward(model, shared, fast, x)
    return _vmap_forward(model, shared, fast, x)


def task_gradients(
    model: nn.Module,
    shared: Mapping[str, Tensor],
    fast: Mapping[str, Tensor],
    support: Split,
    *,
    chain: Plan = None,
    create_graph: bool = False,
    ways: int = 0,
) -> dict[str, Tensor]:
    """``{name: [tasks, *shape]}``: each task's gradient of its mean support loss w.r.t. each fast parameter.

    With ``create_graph`` the gradients are differentiable (second-order meta-gradients); otherwise they are
    detached. The speed path is used when ``chain`` is given and can be differentiated by hand. ``ways`` (the
    episode's, for classification) leaves a head's logits beyond it out of the loss (:func:`way_logits`).
    """
    if (isinstance(chain, list) and support.x.ndim == 3 and supports_gradients(chain)
            and current_paths().hand_gradients):
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            return chain_gradients(chain, {**shared, **fast}, list(fast), support.x, support.y, ways=ways)
    tasks = support.x.shape[0]
    ndim = {n: p.ndim for n, p in model.named_parameters()}
    stacked = {n: w if w.ndim > ndim[n] else w.unsqueeze(0).expand(tasks, *w.shape) for n, w in fast.items()}
    with torch.enable_grad():
        if not create_graph:
            stacked = {n: w.detach().requires_grad_() for n, w in stacked.items()}
        pred = way_logits(batched_forward(model, shared, stacked, support.x, chain=chain), support.y, ways)
        loss = episode_losses(pred, support.y).sum()
        grads = torch.autograd.grad(loss, list(stacked.values()), create_graph=create_graph)
    return dict(zip(stacked, grads, strict=True))


def parameter_filter(model: nn.Module, spec: str | ParameterFilter) -> ParameterFilter:
    """Which parameters an inner loop adapts: ``"all"``, ``"heads"``, ``"trunk"`` or a predicate on names.

    For a :class:`~mtml.nn.MultiTaskModel`, ``"heads"`` selects names starting ``heads.`` and ``"trunk"``
    those starting ``trunk.``. For any other module the head is its last direct child that holds parameters
    (the last ``nn.Linear`` of an MLP) and the trunk is everything before it.
    """
    if callable(spec):
        return spec
    if spec == "all":
        return lambda name: True
    if spec not in ("heads", "trunk"):
        raise ConfigError(f"`adapt` must be 'all', 'heads', 'trunk' or a callable on parameter names. "
                          f"Got {spec!r}.")
    if isinstance(model, MultiTaskModel):
        prefix = "heads." if spec == "heads" else "trunk."
        return lambda name: name.startswith(prefix)
    owners = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not owners:
        raise ConfigError(f"`adapt={spec!r}` needs a model whose direct children hold parameters (an "
                          f"nn.Sequential or a MultiTaskModel); {type(model).__name__} has none. Pass a "
                          "predicate on parameter names instead.")
    head = owners[-1] + "."
    if spec == "heads":
        return lambda name: name.startswith(head)
    return lambda name: not name.startswith(head)


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Embeddings ``[tasks, n, dim]`` of ``x: [tasks, n, *input]``, all tasks in one call of the shared model.

    ``model.features`` for a :class:`~mtml.nn.MultiTaskModel` (stem and trunk), ``model`` itself otherwise.
    """
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    out = model.features(flat, single_head(model)) if isinstance(model, MultiTaskModel) else model(flat)
    return out.reshape(x.shape[0], x.shape[1], -1)
