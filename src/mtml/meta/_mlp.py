"""The speed path: MLP chains run with stacked per-task weights and differentiated by hand.

A model that is a chain of ``nn.Linear`` layers and element-wise activations (nested ``nn.Sequential``, or a
single-head :class:`~mtml.nn.MultiTaskModel` of those) is flattened into a list of :class:`Linear` and
:class:`Activation` steps. :func:`chain_forward` runs it on ``x: [tasks, n, features]`` with each parameter
either shared (its own shape: one ``F.linear`` for all tasks) or per task (``[tasks, *shape]``: one
``baddbmm``). :func:`chain_gradients` gives every task's gradient of its own support loss by back-propagating
by hand with the same batched products — no ``autograd.grad`` call, no ``vmap`` — so the inner loop is a plain
forward graph that the outer ``backward()`` differentiates once (second-order terms included). Activations use
ATen's backward kernels (``threshold_backward``, ``tanh_backward``, ...), which are themselves differentiable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.meta._episode import way_logits
from mtml.nn import MultiTaskModel

__all__ = [
    "Activation",
    "Linear",
    "chain_forward",
    "chain_gradients",
    "linear_chain",
    "single_head",
    "supports_gradients",
]

_aten = torch.ops.aten


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` of a chain, by parameter name."""

    weight: str
    bias: str | None


@dataclass(frozen=True)
class Activation:
    """An element-wise activation; ``backward(grad, pre, post)`` = ``grad · f'(pre)`` (``None``: autograd)."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor] | None
    kind: str  # what it computes, e.g. "leaky_relu(0.1)": the compiled path shares one program per chain of kinds


Layer = Linear | Activation


def _activation(module: nn.Module) -> Activation | None:
    kind = type(module)
    if kind is nn.ReLU:
        return Activation(torch.relu, lambda g, pre, post: _aten.threshold_backward(g, post, 0.0), "relu")
    if kind is nn.Tanh:
        return Activation(torch.tanh, lambda g, pre, post: _aten.tanh_backward(g, post), "tanh")
    if kind is nn.Sigmoid:
        return Activation(torch.sigmoid, lambda g, pre, post: _aten.sigmoid_backward(g, post), "sigmoid")
    if kind is nn.LeakyReLU:
        slope = float(getattr(module, "negative_slope", 0.01))
        return Activation(lambda x: F.leaky_relu(x, slope),
                          lambda g, pre, post: _aten.leaky_relu_backward(g, pre, slope, False),
                          f"leaky_relu({slope!r})")
    if kind is nn.GELU:
        approximate = str(getattr(module, "approximate", "none"))
        return Activation(lambda x: F.gelu(x, approximate=approximate),
                          lambda g, pre, post: _aten.gelu_backward(g, pre, approximate=approximate),
                          f"gelu({approximate})")
    if kind is nn.SiLU:  # silu_backward has no derivative of its own: autograd differentiates this chain
        return Activation(F.silu, None, "silu")
    return None


def single_head(model: MultiTaskModel) -> str:
    """The name of the one head of ``model``; :class:`ConfigError` if it has several."""
    if len(model.task_names) != 1:
        raise ConfigError(
            f"meta-learning runs one task family through one head, but the model has {len(model.task_names)} "
            f"heads ({', '.join(model.task_names)}); build the MultiTaskModel with a single head."
        )
    return model.task_names[0]


def _chain(module: nn.Module, prefix: str, out: list[Layer]) -> bool:
    kind = type(module)
    if kind is nn.Sequential:
        # every entry, in order: named_children() yields a module used twice (``act`` in ``l1, act, l2, act``)
        # only once, which would drop the second use from the chain
        return all(child is not None and _chain(child, f"{prefix}{name}.", out)
                   for name, child in module._modules.items())
    if isinstance(module, nn.Linear) and kind is nn.Linear:
        out.append(Linear(prefix + "weight", prefix + "bias" if module.bias is not None else None))
        return True
    if kind is nn.Identity or (isinstance(module, nn.Dropout) and kind is nn.Dropout and module.p == 0.0):
        return True
    if isinstance(module, MultiTaskModel) and kind is MultiTaskModel:
        task = single_head(module)
        key = module.stem_of.get(task)
        parts = [(f"stems.{key}.", module.stems[key])] if key is not None else []
        parts += [("trunk.", module.trunk), (f"heads.{task}.", module.heads[task])]
        return all(_chain(m, prefix + p, out) for p, m in parts)
    act = _activation(module)
    if act is not None:
        out.append(act)
    return act is not None


def linear_chain(model: nn.Module) -> list[Layer] | None:
    """The model as :class:`Linear` and :class:`Activation` steps, or ``None`` if it is not such a chain."""
    out: list[Layer] = []
    if not _chain(model, "", out):
        return None
    # a Linear used twice (tied weights) is registered under one name only: the general path handles it
    params = dict(model.named_parameters())
    names = [n for layer in out if isinstance(layer, Linear) for n in (layer.weight, layer.bias) if n is not None]
    return out if len(set(names)) == len(names) and all(n in params for n in names) else None


def _linear(x: Tensor, layer: Linear, params: Mapping[str, Tensor]) -> Tensor:
    w = params[layer.weight]
    b = None if layer.bias is None else params[layer.bias]
    if w.ndim == 2:  # shared by every task: one matrix product for all of them
        if b is None or b.ndim == 1:
            return F.linear(x, w, b)
        return torch.baddbmm(b.unsqueeze(1), x, w.t().expand(x.shape[0], -1, -1))
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1) if b.ndim == 2 else b, x, w.transpose(1, 2))


def chain_forward(chain: list[Layer], params: Mapping[str, Tensor], x: Tensor,
                  trace: list[Tensor] | None = None) -> Tensor:
    """The chain on ``x: [tasks, n, in]`` → ``[tasks, n, out]``.

    Each parameter is shared (its own shape) or per task (``[tasks, *shape]``), told apart by its number of
    dimensions. ``trace`` (if given) collects every step's input and, last, the output.
    """
    for layer in chain:
        if trace is not None:
            trace.append(x)
        x = _linear(x, layer, params) if isinstance(layer, Linear) else layer.forward(x)
    if trace is not None:
        trace.append(x)
    return x


def supports_gradients(chain: list[Layer]) -> bool:
    """Whether :func:`chain_gradients` can differentiate ``chain`` by hand."""
    return all(isinstance(layer, Linear) or layer.backward is not None for layer in chain)


def _output_delta(pred: Tensor, y: Tensor) -> Tensor:
    """∂(per-task mean loss)/∂pred: ``2(pred − y)/(n·outputs)`` for MSE, ``(softmax − onehot)/n`` for CE."""
    if y.is_floating_point():
        return (pred - y) * (2.0 / (pred.shape[1] * pred.shape[2]))
    return (torch.softmax(pred, -1) - F.one_hot(y, pred.shape[-1]).to(pred.dtype)) * (1.0 / pred.shape[1])


def chain_gradients(chain: list[Layer], params: Mapping[str, Tensor], names: list[str], x: Tensor,
                    y: Tensor, *, ways: int = 0) -> dict[str, Tensor]:
    """Per-task gradients ``{name: [tasks, *shape]}`` of each task's mean loss on ``(x, y)``, for ``names``.

    ``params`` holds every parameter, shared or per task (see :func:`chain_forward`); ``names`` are those to
    differentiate. The result is differentiable (the outer loop back-propagates through it for second-order
    MAML); under ``torch.no_grad()`` it is a plain computation. Requires :func:`supports_gradients`. With
    ``ways`` below the chain's outputs (classification) the loss is on the first ``ways`` logits only
    (:func:`~mtml.meta._episode.way_logits`): the others get a zero gradient.
    """
    trace: list[Tensor] = []
    pred = chain_forward(chain, params, x, trace)
    logits = way_logits(pred, y, ways)
    delta = _output_delta(logits, y)
    if logits.shape[-1] < pred.shape[-1]:
        delta = F.pad(delta, (0, pred.shape[-1] - logits.shape[-1]))
    wanted = set(names)
    first = min(i for i, layer in enumerate(chain)
                if isinstance(layer, Linear) and (layer.weight in wanted or layer.bias in wanted))
    grads: dict[str, Tensor] = {}
    for i in range(len(chain) - 1, first - 1, -1):
        layer, inp = chain[i], trace[i]
        if isinstance(layer, Activation):
            assert layer.backward is not None
            delta = layer.backward(delta, inp, trace[i + 1])
            continue
        if layer.weight in wanted:
            grads[layer.weight] = torch.bmm(delta.transpose(1, 2), inp)
        if layer.bias is not None and layer.bias in wanted:
            grads[layer.bias] = delta.sum(1)
        if i > first:
            w = params[layer.weight]
            delta = torch.bmm(delta, w) if w.ndim == 3 else delta @ w
    return {name: grads[name] for name in names}
