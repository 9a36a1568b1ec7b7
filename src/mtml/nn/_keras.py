"""A Keras 3 model on the PyTorch backend as a torch module that mtml can train, adapt and meta-learn.

A Keras layer reads its own ``keras.Variable`` s, not the parameters its ``torch.nn.Module`` face registers, so
``torch.func.functional_call`` on a Keras model swaps tensors the layer never reads: outputs are unchanged and the
substituted tensors get no gradient (keras-team/keras#20279). :class:`KerasModule` exposes the variables as
ordinary parameters and buffers of its own and runs the model through Keras' *stateless call* with whatever
tensors sit in those slots, so ``functional_call(wrapper, {name: tensor}, x)`` — the way the meta-learning engine
runs adapted, per-task parameters — gives the outputs and gradients of the substituted tensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
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
    if sys.modules.get("keras") is None and importlib.util.find_spec("keras") is None:
        require("keras", "mtml.nn.KerasModule", extra="keras")  # raises the usual "install the extra" error
    try:
        keras = importlib.import_module("keras")
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
            probed here on zeros of ``input_shape``. Freeze layers (``layer.trainable = False``) before
            wrapping: the split into parameters and buffers is made here.

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
        self.__dict__["_keras_model"] = model  # kept out of the module tree: its variables are registered below
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
        probed = self._probe()  # (always: it checks the call and records out_features)
        self.supports_vmap = probed if vmap is None else bool(vmap)

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

    @property
    def keras_model(self) -> Any:
        """The wrapped Keras model."""
        return self.__dict__["_keras_model"]

    def extra_repr(self) -> str:
        return f"keras_model={self.keras_model.name!r}, input_shape={self.input_shape}, vmap={self.supports_vmap}"

    def _values(self, slots: list[tuple[nn.Module, str]]) -> list[Tensor]:
        """The tensors now in ``slots`` (under ``functional_call``: the substituted ones)."""
        return [getattr(module, name) for module, name in slots]

    def _stateless(self, trainable: list[Tensor], frozen: list[Tensor], x: Tensor,
                   training: bool) -> tuple[Tensor, list[Tensor]]:
        """``model.stateless_call`` on these values, with Keras' device set to ``x``'s (so it moves nothing)."""
        kwargs = {"training": training} if self._training_arg else {}
        with _keras().device(str(x.device)):
            out, state = self.keras_model.stateless_call(trainable, frozen, x, **kwargs)
        if not isinstance(out, Tensor):
            raise ConfigError(f"Keras model {self.keras_model.name!r} returns {type(out).__name__}; KerasModule "
                              "needs a model with one output tensor.")
        return out, list(state)

    def forward(self, x: Tensor) -> Tensor:
        """The model on ``x: [batch, *input_shape]`` with the tensors in this module's parameter slots."""
        frozen = self._values(self._frozen)
        out, state = self._stateless(self._values(self._trainable), frozen, x, self.training)
        for path, old, new in zip(self._paths, frozen, state, strict=True):
            if new is not old:  # dropout seeds, batch statistics: Keras returns the state its call moved on
                try:
                    with torch.no_grad():
                        old.copy_(new)
                except RuntimeError:
                    raise ConfigError(f"Keras variable {path!r} is updated by every call, which vmap over tasks "
                                      "cannot do; build the KerasModule with vmap=False.") from None
        return out

    def _probe(self) -> bool:
        """Check one call on zeros of :attr:`input_shape` (recording :attr:`out_features`), and whether
        ``vmap`` over two tasks with their own parameters runs the model in both modes (:attr:`supports_vmap`)."""
        keras = _keras()
        inputs = getattr(self.keras_model, "inputs", None)
        dtype = inputs[0].dtype if inputs else keras.config.floatx()
        trainable, frozen = self._values(self._trainable), self._values(self._frozen)
        cuda = sorted({w.device.index or 0 for w in trainable if w.device.type == "cuda"})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # unseeded Keras dropout draws torch's RNG
            x = keras.ops.zeros((2, *self.input_shape), dtype=dtype)
            try:
                out, state = self._stateless(trainable, frozen, x, True)
            except ConfigError:
                raise
            except Exception as err:  # Keras' own message on a bad input shape or a call that needs more inputs
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"Keras model {self.keras_model.name!r} fails on one example of input shape "
                                  f"{self.input_shape} ({first}); pass the right input_shape=(...).") from None
            if out.ndim == 2:
                self.out_features = int(out.shape[1])
            if any(new is not old for old, new in zip(frozen, state, strict=True)):
                return False  # state moved by each call: one task at a time
            stacked = [w.detach().unsqueeze(0).expand(2, *w.shape) for w in trainable]

            def runs(training: bool) -> None:
                vmap(lambda w, x_t: self._stateless(w, frozen, x_t, training)[0])(
                    stacked, x.unsqueeze(0).expand(2, *x.shape))

            try:
                runs(False)
                runs(True)
            except Exception:  # an op vmap cannot batch (random numbers, some layouts): loop over tasks
                return False
        return True

    def to_keras(self) -> Any:
        """The Keras model, its variables set to this module's current parameters and buffers (they share the
        trainable tensors already, unless a copy or ``load_state_dict(assign=True)`` replaced them)."""
        model = self.keras_model
        for variables, slots in ((model.trainable_variables, self._trainable),
                                 (model.non_trainable_variables, self._frozen)):
            for variable, value in zip(variables, self._values(slots), strict=True):
                if value is not variable.value:
                    variable.assign(value.detach())
        return model


def from_keras(model: Any, /, *, input_shape: Sequence[int] | None = None, vmap: bool | None = None) -> KerasModule:
    """A built Keras 3 model on the PyTorch backend as a torch module: a trunk, a head or a whole meta-learner
    for mtml (see :class:`KerasModule` and docs/keras.md)::

        os.environ["KERAS_BACKEND"] = "torch"  # before keras is first imported
        trunk = from_keras(keras.Sequential([keras.Input((100,)), keras.layers.Dense(10)]))
        heads = {t.name: from_keras(keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])) for t in tasks}
        model = MultiTaskModel(trunk, heads)
    """
    return KerasModule(model, input_shape=input_shape, vmap=vmap)
