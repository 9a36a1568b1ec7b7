"""A Keras 3 model on the PyTorch backend as a torch module that mtml can train, adapt and meta-learn.

A Keras layer reads its own ``keras.Variable`` s, not the parameters its ``torch.nn.Module`` face registers, so
``torch.func.functional_call`` on a Keras model swaps tensors the layer never reads: outputs are unchanged and the
substituted tensors get no gradient (keras-team/keras#20279). :class:`KerasModule` exposes the variables as
ordinary parameters and buffers of its own and runs the model through Keras' *stateless call* with whatever
tensors sit in those slots, so ``functional_call(wrapper, {name: tensor}, x)`` — the way the meta-learning engine
runs adapted, per-task parameters — gives the outputs and gradients of the substituted tensors.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from mtml._optional import require
from mtml.errors import ConfigError

__all__ = ["KerasModule", "from_keras"]


def _keras() -> Any:
    """The ``keras`` package, checked to run on the PyTorch backend."""
    try:
        keras = require("keras", "mtml.nn.KerasModule", extra="keras")
    except ImportError as err:  # keras is there but its backend (TensorFlow by default) is not
        raise ConfigError(f"importing keras failed ({err}); set KERAS_BACKEND=torch before keras is first "
                          "imported (os.environ['KERAS_BACKEND'] = 'torch').") from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigError(f"mtml.nn.KerasModule needs Keras on the PyTorch backend, but keras runs on {backend!r}; "
                          "set KERAS_BACKEND=torch before keras is first imported.")
    return keras


def _slot(name: str, taken: set[str]) -> str:
    """A parameter name for a variable called ``name``: identifier characters only, unique among ``taken``."""
    base = re.sub(r"\W", "_", name) or "w"
    slot, i = base, 1
    while slot in taken:
        slot, i = f"{base}_{i}", i + 1
    taken.add(slot)
    return slot


class KerasModule(nn.Module):
    """A built Keras 3 model (or layer) on the PyTorch backend as a torch module, ``[batch, *input] → [batch, *out]``.

    Each top-level Keras layer holding variables becomes a child module named by its position in
    ``model.layers`` (as in an ``nn.Sequential``): ``"0.kernel"``, ``"0.bias"``, ``"2.kernel"``; a repeated variable
    name gets a suffix (``kernel_1``). Trainable variables are ``nn.Parameter`` s — the very tensors the Keras
    variables hold, so an optimiser step on the wrapper updates the Keras model too — and non-trainable ones
    (frozen weights, ``BatchNormalization`` moving statistics, dropout seed states) are buffers. ``forward`` runs
    ``model.stateless_call`` on the tensors in those slots (``training`` follows :meth:`train`/:meth:`eval`),
    writes the state the call updated back into the buffers, and returns the model's single output tensor.
    Regularisation losses the Keras layers add are not part of the output (use mtml's ``weight_decay``).

    Args:
        model: a built ``keras.Model`` or ``keras.layers.Layer`` with one input and one output tensor.
        input_shape: one example's input shape; default the model's (``keras.Input((100,))`` gives ``(100,)``).
            Needed for models without declared inputs (subclassed models built by calling them).
        vmap: whether ``torch.func.vmap`` over tasks can run the model (see :attr:`supports_vmap`); default:
            probed here on zeros of ``input_shape``.

    Attributes:
        keras_model: the wrapped Keras model (not a submodule: its parameters are this module's).
        supports_vmap: False when the meta-learning engine must run the model one task at a time instead of
            vectorising over tasks: it updates state in training mode (dropout, batch statistics) or has an
            operation ``vmap`` cannot batch (e.g. a channels-last ``Conv2D``). Read by
            :func:`mtml.meta.batched_forward`.
        out_features: the output width when the output is ``[batch, width]`` (what :func:`mtml.nn.feature_dim`
            reads), else None.
    """

    def __init__(self, model: Any, /, *, input_shape: Sequence[int] | None = None, vmap: bool | None = None) -> None:
        super().__init__()
        keras = _keras()
        if not isinstance(model, keras.layers.Layer):
            raise ConfigError(f"KerasModule wraps a keras.Model or keras.layers.Layer; got {type(model).__name__}. "
                              "A torch module can be a trunk or head as it is.")
        if not model.built or not model.variables:
            raise ConfigError(f"Keras model {model.name!r} is not built (it has no variables yet); give it an input "
                              "shape first: keras.Sequential([keras.Input((100,)), ...]) or model.build((None, 100)).")
        self.__dict__["keras_model"] = model  # kept out of the module tree: its variables are registered below
        self.input_shape = self._input_shape(model, input_shape)
        layers = list(getattr(model, "layers", []) or [model])
        owner = {id(v): str(i) for i in reversed(range(len(layers))) for v in layers[i].variables}
        taken: dict[str, set[str]] = {}
        slots: dict[int, tuple[nn.Module, str]] = {}
        for variable in model.variables:
            key = owner.get(id(variable), "model")  # variables of the model itself, outside its layers
            if key not in self._modules:
                self.add_module(key, nn.Module())
            child = self._modules[key]
            assert child is not None
            slot = _slot(variable.name, taken.setdefault(key, set()))
            if variable.trainable:
                child.register_parameter(slot, variable.value)  # the Keras variable's own nn.Parameter
            else:
                child.register_buffer(slot, variable.value.detach())
            slots[id(variable)] = (child, slot)
        self._trainable = [slots[id(v)] for v in model.trainable_variables]
        self._frozen = [slots[id(v)] for v in model.non_trainable_variables]
        self._paths = [v.path for v in model.non_trainable_variables]
        self._training_arg = "training" in inspect.signature(model.call).parameters
        self.out_features: int | None = None
        self.supports_vmap = self._probe() if vmap is None else bool(vmap)

    @staticmethod
    def _input_shape(model: Any, given: Sequence[int] | None) -> tuple[int, ...]:
        if given is not None:
            return tuple(int(d) for d in given)
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise ConfigError(f"Keras model {model.name!r} declares {len(inputs or [])} inputs; KerasModule needs "
                              "one input tensor: pass input_shape=(...) (one example's shape) for a subclassed model.")
        shape = tuple(inputs[0].shape[1:])
        if any(d is None for d in shape):
            raise ConfigError(f"Keras model {model.name!r} has input shape {shape} with free dimensions; pass "
                              "input_shape=(...) with every size of one example.")
        return tuple(int(d) for d in shape)
