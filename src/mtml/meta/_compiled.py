"""The compiled speed path: MAML's whole meta-gradient on an MLP chain as one ``torch.compile``d function.

On a small MLP the eager meta-step spends its time in per-operation overhead, not arithmetic (the sinusoid MLP
runs at the speed of a hand-batched ``bmm`` reference, about 1 ms per meta-iteration of 25 tasks; see
docs/meta-learning.md). Here the inner loop (hand-derived gradients, :mod:`mtml.meta._mlp`), the query loss and
its gradient with respect to every meta-parameter are written as one pure function,
``torch.func.grad_and_value`` of the query loss, which ``torch.compile`` traces into a single graph — forward,
second-order terms and outer backward together — and compiles into fused kernels. The outer loop then sees an
ordinary objective: :class:`_GivenGradients` hands the compiled meta-gradient to ``backward()`` (scaled by the
incoming gradient, so chunk weights and loss scalers apply), and the optimiser, DDP hooks and gradient
clipping work as before.

Opt-in (``MAML(..., compiled=True)``, also FOMAML, ANIL, BOIL and Meta-SGD; ``compiled: true`` in a config's
algorithm options): compiling takes seconds (10–18 s for the sinusoid MLP on this project's CPU, about 2.5 s from
torch's on-disk cache) and needs a C++ compiler; each new episode shape compiles again. If compiling fails the
algorithm says so once and runs eagerly; the result is the same either way. The objective it returns is
differentiable once (a second derivative through the compiled gradient is refused).
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.exc import TorchRuntimeError
from torch.autograd.function import once_differentiable

from mtml.meta._episode import mean_task_loss, way_logits
from mtml.meta._mlp import Layer, Linear, chain_forward, chain_gradients

__all__ = ["CompiledMetaGradient"]

_FAKE_LOG = logging.getLogger("torch._subclasses.fake_tensor")


class _GivenGradients(torch.autograd.Function):
    """``value`` as a differentiable function of ``params`` whose gradient is the precomputed ``grads``."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, count: int, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors[:count])
        return value.clone()

    @staticmethod
    @once_differentiable  # the compiled gradient is a constant here: a second derivative through it is refused
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.saved_tensors
        return (None, None, *(None for _ in grads), *(g * grad_out for g in grads))


def _warn_eager(why: str) -> None:
    warnings.warn(f"mtml: `compiled: true` could not compile the meta-gradient ({why[:300]}); running the eager "
                  "path, which computes the same result more slowly.", RuntimeWarning, stacklevel=4)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _enter(gradient: Callable[..., Any], *args: Any) -> Any:
    """The compiled frame: each :class:`_Program` compiles a copy of this function's code under its own name."""
    return gradient(*args)


class _Program:
    """One compiled meta-gradient function for one chain structure and inner loop (see :func:`_program`)."""

    def __init__(self, chain: list[Layer], adapted: list[str], zeroed: frozenset[str], steps: int,
                 first_order: bool, ways: int) -> None:
        self.chain, self.adapted, self.zeroed = chain, adapted, zeroed
        self.steps, self.first_order, self.ways = steps, first_order, ways
        self.failed: str | None = None
        self.gradient = torch.func.grad_and_value(self._objective, has_aux=True)
        # a code object of its own (Dynamo caches compiled frames by code object, at most
        # ``torch._dynamo.config.recompile_limit`` = 8 each): programs do not evict or slow each other
        code = _enter.__code__.replace(co_name=f"mtml_meta_gradient_{len(_PROGRAMS)}")
        entry = types.FunctionType(code, _enter.__globals__, code.co_name)
        self.fn: Callable[..., Any] = torch.compile(entry, fullgraph=True)

    def _objective(self, learned: tuple[dict[str, Tensor], dict[str, Tensor]], frozen: dict[str, Tensor],
                   lr: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        meta, rates = learned  # the model's trainable parameters; learned inner rates by adapted name
        params = {**frozen, **meta}
        shared = {n: p for n, p in params.items() if n not in self.adapted}
        fast = {n: torch.zeros_like(params[n]) if n in self.zeroed else params[n] for n in self.adapted}
        for _ in range(self.steps):
            grads = chain_gradients(self.chain, {**shared, **fast}, self.adapted, xs, ys, ways=self.ways)
            if self.first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = {n: w - rates.get(n, lr) * grads[n] for n, w in fast.items()}
        pred = way_logits(chain_forward(self.chain, {**shared, **fast}, xq), yq, self.ways)
        return mean_task_loss(pred, yq), pred.detach()


_PROGRAMS: dict[tuple[object, ...], _Program] = {}


def _program(chain: list[Layer], adapted: list[str], zeroed: frozenset[str], steps: int, first_order: bool,
             ways: int) -> _Program:
    """The compiled program for this structure, shared by every algorithm that has it.

    Programs are made once per structure, so a new algorithm per sweep trial or per run reuses its structure's
    compiled code instead of compiling it again (and, with an inner rate that differs, it is the same code).
    """
    layers = tuple((layer.weight, layer.bias) if isinstance(layer, Linear) else layer.kind for layer in chain)
    key = (layers, tuple(adapted), zeroed, steps, first_order, ways)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _Program(chain, list(adapted), zeroed, steps, first_order, ways)
    return _PROGRAMS[key]


class CompiledMetaGradient:
    """MAML's meta-objective on an MLP chain with its meta-gradient computed by one compiled function.

    Args:
        chain: the model's MLP chain (:func:`~mtml.meta._mlp.linear_chain`); every activation has a hand backward.
        adapted: the parameters the inner loop adapts.
        zeroed: adapted parameters that start every inner loop at zero (``zero_head``).
        steps, lr, first_order: the training inner loop (``lr`` enters the compiled graph as an input, so trials of
            a sweep that differ only in it share one compiled function, and the on-disk compile cache).
        ways: the episode's ways (classification with a head of more outputs), else 0.
    """

    def __init__(self, chain: list[Layer], adapted: list[str], zeroed: frozenset[str], *, steps: int,
                 lr: float, first_order: bool, ways: int) -> None:
        self.lr = float(lr)
        self.zeroed = zeroed
        self.failed: str | None = None
        self.calls = 0  # compiled meta-gradients computed (tests check the path ran)
        self._program = _program(chain, list(adapted), zeroed, steps, first_order, ways)

    def __call__(self, params: Mapping[str, Tensor], rates: Mapping[str, Tensor], xs: Tensor, ys: Tensor,
                 xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(objective, query predictions)``, the objective differentiable to the trainable ``params`` and
        ``rates`` (learned inner rates by adapted parameter name, Meta-SGD's; the others step at ``lr``) with the
        compiled meta-gradient; ``None`` once compiling has failed (the caller runs the eager path)."""
        if self.failed is not None:
            return None
        if self._program.failed is not None:  # another algorithm of this structure could not compile it
            self.failed = self._program.failed
            _warn_eager(self.failed)
            return None
        # a zeroed head never reaches the objective: like the eager path, it gets no gradient (not a zero one)
        meta = {n: p.detach() for n, p in params.items() if p.requires_grad and n not in self.zeroed}
        frozen = {n: p.detach() for n, p in params.items() if n not in meta}
        quiet = _FAKE_LOG.disabled
        _FAKE_LOG.disabled = True  # it logs a traced op's error (a shape mismatch) at length before raising it
        try:
            lr = torch.tensor(self.lr, dtype=xs.dtype, device=xs.device)
            learned = (meta, {n: r.detach() for n, r in rates.items()})
            grads, (value, pred) = self._program.fn(self._program.gradient, learned, frozen, lr, xs, ys, xq, yq)
        except TorchRuntimeError:  # the computation itself fails (bad shapes): the eager path raises its own error
            return None
        except Exception as error:  # no C++ compiler, an unsupported op or device: the eager path gives the same
            self.failed = self._program.failed = f"{type(error).__name__}: {_first_line(error)}"
            _warn_eager(self.failed)
            return None
        finally:
            _FAKE_LOG.disabled = quiet
        self.calls += 1
        meta_grads, rate_grads = grads
        given = [meta_grads[n] for n in meta] + [rate_grads[n] for n in rates]
        live = [params[n] for n in meta] + list(rates.values())
        return _GivenGradients.apply(value, len(given), *given, *live), pred
