"""Running one module with per-task parameters, vectorised over the tasks of an episode.

Parameters come in two dicts: ``shared`` (the module's own shapes, used by every task) and ``fast``
(``[tasks, *shape]``, one copy per task). :func:`batched_forward` maps ``x: [tasks, n, *input]`` to
``[tasks, n, *output]``. Two engines compute it:

- the **speed path**: a module that is a chain of ``nn.Linear`` layers and element-wise activations (nested
  ``nn.Sequential`` or a single-head :class:`~mtml.nn.MultiTaskModel` of those) runs as batched matrix
  products (``baddbmm``) on the stacked per-task weights: one kernel per layer for all tasks, no ``vmap``;
- the **general path**: any other module runs through ``torch.func.vmap`` over ``torch.func.functional_call``.

Both are differentiable to any order, so an inner loop can take gradients through them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mtml.errors import ConfigError
from mtml.nn.model import MultiTaskModel

__all__ = ["ParameterFilter", "batched_forward", "embed", "linear_chain", "parameter_filter"]

ParameterFilter = Callable[[str], bool]
Activation = Callable[[Tensor], Tensor]

def _gelu(m: nn.Module) -> Activation:
    approximate = str(getattr(m, "approximate", "none"))
    return lambda x: F.gelu(x, approximate=approximate)


def _leaky_relu(m: nn.Module) -> Activation:
    slope = float(getattr(m, "negative_slope", 0.01))
    return lambda x: F.leaky_relu(x, slope)


_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: torch.relu,
    nn.Tanh: lambda m: torch.tanh,
    nn.Sigmoid: lambda m: torch.sigmoid,
    nn.SiLU: lambda m: F.silu,
    nn.GELU: _gelu,
    nn.LeakyReLU: _leaky_relu,
}


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` of a chain, by parameter name."""

    weight: str
    bias: str | None


Layer = Linear | Activation


def _single_head(model: MultiTaskModel) -> str:
    if len(model.task_names) != 1:
        raise ConfigError(
            f"meta-learning runs one task family through one head, but the model has {len(model.task_names)} "
            f"heads ({', '.join(model.task_names)}); build the MultiTaskModel with a single head."
        )
    return model.task_names[0]


def _chain(module: nn.Module, prefix: str, out: list[Layer]) -> bool:
    kind = type(module)
    if kind is nn.Sequential:
        return all(_chain(child, f"{prefix}{name}.", out) for name, child in module.named_children())
    if isinstance(module, nn.Linear) and kind is nn.Linear:
        out.append(Linear(prefix + "weight", prefix + "bias" if module.bias is not None else None))
        return True
    if kind is nn.Identity or (isinstance(module, nn.Dropout) and kind is nn.Dropout and module.p == 0.0):
        return True
    if kind in _ACTIVATIONS:
        out.append(_ACTIVATIONS[kind](module))
        return True
    if isinstance(module, MultiTaskModel) and kind is MultiTaskModel:
        task = _single_head(module)
        parts = [(f"stems.{task}.", module.stems[task])] if task in module.stems else []
        parts += [("trunk.", module.trunk), (f"heads.{task}.", module.heads[task])]
        return all(_chain(m, prefix + p, out) for p, m in parts)
    return False


def linear_chain(model: nn.Module) -> list[Layer] | None:
    """The model as a list of :class:`Linear` layers and activations; ``None`` if it is not such a chain."""
    out: list[Layer] = []
    return out if _chain(model, "", out) else None


def _linear(x: Tensor, layer: Linear, shared: Mapping[str, Tensor], fast: Mapping[str, Tensor]) -> Tensor:
    bias = None if layer.bias is None else fast.get(layer.bias)
    shared_bias = None if layer.bias is None or bias is not None else shared[layer.bias]
    w = fast.get(layer.weight)
    if w is None:
        y = F.linear(x, shared[layer.weight], shared_bias)
        return y if bias is None else y + bias.unsqueeze(1)
    if bias is not None:
        return torch.baddbmm(bias.unsqueeze(1), x, w.transpose(1, 2))
    y = torch.bmm(x, w.transpose(1, 2))
    return y if shared_bias is None else y + shared_bias


def _run_chain(chain: list[Layer], shared: Mapping[str, Tensor], fast: Mapping[str, Tensor],
               x: Tensor) -> Tensor:
    for layer in chain:
        x = _linear(x, layer, shared, fast) if isinstance(layer, Linear) else layer(x)
    return x


def _call(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    if isinstance(model, MultiTaskModel):
        return functional_call(model, dict(params), (x, _single_head(model)))
    return functional_call(model, dict(params), (x,))


def batched_forward(
    model: nn.Module,
    shared: Mapping[str, Tensor],
    fast: Mapping[str, Tensor],
    x: Tensor,
    *,
    chain: list[Layer] | None = None,
) -> Tensor:
    """``model`` on ``x: [tasks, n, *input]`` with per-task ``fast`` parameters ``{name: [tasks, *shape]}``.

    ``shared`` holds the remaining parameters (unbatched). ``chain`` (from :func:`linear_chain`) selects the
    speed path; without it, or for inputs that are not ``[tasks, n, features]``, the call goes through
    ``vmap(functional_call)``. Returns ``[tasks, n, *output]``.
    """
    if chain is not None and x.ndim == 3:
        return _run_chain(chain, shared, fast, x)

    def one_task(fast_t: dict[str, Tensor], x_t: Tensor) -> Tensor:
        return _call(model, {**shared, **fast_t}, x_t)

    return vmap(one_task)(dict(fast), x)


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
    out = model.features(flat, _single_head(model)) if isinstance(model, MultiTaskModel) else model(flat)
    return out.reshape(x.shape[0], x.shape[1], -1)
