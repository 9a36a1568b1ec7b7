"""MAML and first-order MAML, vectorised over the tasks of an episode.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtml._checks import check_int, check_positive
from mtml.errors import ConfigError
from mtml.meta._base import MetaAlgorithm, MetaOutput, Scores
from mtml.meta._compiled import CompiledMetaGradient
from mtml.meta._episode import Episode, episode_losses, mean_task_loss, way_logits
from mtml.meta._functional import ParameterFilter, Plan, batched_forward, model_plan, parameter_filter, task_gradients
from mtml.meta._mlp import linear_chain, supports_gradients
from mtml.meta._paths import current_paths
from mtml.tasks import Split

__all__ = ["MAML", "fomaml"]

Params = dict[str, Tensor]


class _ModelPlan(NamedTuple):
    """What MAML reads off a model once (see :meth:`MAML._prepare`)."""

    chain: Plan  # the speed path (MLP chain, conv chain or None)
    names: list[str]  # the adapted parameters
    zeroed: frozenset[str]  # the head parameters that start at zero (``zero_head``)


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning (Finn et al., ICML 2017): an initialisation that adapts in a few steps.

    Each task ``t`` of an episode adapts its own copy of the selected parameters by gradient descent on its
    support loss, ``φₜ ← φₜ − α ∇L(φₜ; supportₜ)`` for ``inner_steps`` steps starting at ``θ``; the outer loss
    is the mean query loss at ``φₜ``, differentiated back to ``θ`` through the inner loop (second order) or,
    with ``first_order=True``, treating the inner gradients as constants. All tasks adapt at once: their
    parameters are stacked ``[tasks, *shape]`` and run through :func:`~mtml.meta._functional.batched_forward`
    (batched matrix products for MLPs, ``torch.func.vmap`` otherwise); one ``autograd.grad`` of the summed
    support losses gives every task its own gradient because tasks do not share adapted parameters.

    Args:
        model: the meta-learner; used here to check that ``adapt`` selects at least one parameter.
        inner_lr: inner-loop step size α during meta-training.
        inner_steps: inner-loop steps during meta-training.
        test_inner_lr: step size at meta-test time (default: ``inner_lr``).
        test_inner_steps: steps at meta-test time (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML): cheaper, no Hessian-vector products.
        adapt: which parameters the inner loop adapts: ``"all"``, ``"heads"`` (ANIL), ``"trunk"`` (BOIL) or a
            predicate on parameter names; the others are shared by all tasks and only meta-learned.
        checkpoint_inner: bound memory for long inner loops: keep only each step's adapted parameters and
            recompute the step's activations during the backward pass (activation memory stops growing with
            ``inner_steps`` at the cost of about one extra forward and backward per step).
        zero_head: the "zeroing trick" (Kao et al., "MAML is a Noisy Contrastive Learner in Classification",
            ICLR 2022): every task's inner loop starts its head (the parameters ``adapt="heads"`` would select)
            at zero instead of at a meta-learned value, in training and at test time. One inner step from a
            zero classifier head gives each class a weight vector proportional to its support features minus
            their mean, so adaptation works from the first meta-step and the label permutation of each episode
            no longer fights a learned head. The head must be adapted (``adapt`` "all" or "heads").
        compiled: compute the meta-gradient of an MLP chain (``nn.Linear`` layers and element-wise activations)
            with one ``torch.compile``d function: inner loop, query loss and outer backward in one fused graph
            (:mod:`mtml.meta._compiled`; 1.1–1.8× faster per meta-step on the sinusoid MLP across MAML, FOMAML,
            ANIL and Meta-SGD, after 10–18 s of compiling, see docs/meta-learning.md). Meta-test adaptation stays
            eager. Other models are refused.
    """

    uses_inner_steps = True

    def __init__(
        self,
        model: nn.Module,
        /,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_lr: float | None = None,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        adapt: str | ParameterFilter = "all",
        checkpoint_inner: bool = False,
        zero_head: bool = False,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.inner_lr = check_positive("inner_lr", inner_lr, "Use a small step size such as 0.01.")
        self.inner_steps = check_int("inner_steps", inner_steps, 1, "Use at least one inner step.")
        self.test_inner_lr = self.inner_lr if test_inner_lr is None else check_positive(
            "test_inner_lr", test_inner_lr, "Use a step size such as 0.01, or omit it to reuse inner_lr.")
        self.test_inner_steps = self.inner_steps if test_inner_steps is None else check_int(
            "test_inner_steps", test_inner_steps, 0, "Use 0 or more steps, or omit it to reuse inner_steps.")
        for flag, value in (("first_order", first_order), ("checkpoint_inner", checkpoint_inner),
                            ("zero_head", zero_head), ("compiled", compiled)):
            if not isinstance(value, bool):
                raise ConfigError(f"`{flag}` must be true or false. Got {value!r}.")
        self.first_order = first_order
        self.checkpoint_inner = checkpoint_inner
        self.zero_head = zero_head
        self.compiled = compiled
        self.adapt_spec = adapt
        self._plan_key: tuple[object, ...] = ()
        self._plan = _ModelPlan(None, [], frozenset())
        self._compiled: tuple[tuple[object, ...], CompiledMetaGradient] | None = None
        self.fast_names(model)  # validates the filter now rather than at the first step
        if compiled:
            self._check_compilable(model)

    def _check_compilable(self, model: nn.Module) -> None:
        if self.checkpoint_inner:
            raise ConfigError("`compiled` and `checkpoint_inner` do not go together: the compiled meta-gradient "
                              "keeps no per-step activations of its own to checkpoint; drop one of them.")
        if type(self).meta_objective is not MAML.meta_objective or type(self)._step is not MAML._step \
                or type(self)._update is not MAML._update:
            raise ConfigError(f"`compiled` is for MAML, FOMAML, ANIL, BOIL and Meta-SGD; {type(self).__name__} "
                              "changes the inner loop, so it runs eagerly: drop `compiled`.")
        chain = linear_chain(model)
        if chain is None or not supports_gradients(chain):
            containers = (nn.Sequential, nn.ModuleDict, nn.ModuleList)
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if not list(m.children()) and not isinstance(m, containers)})
            raise ConfigError(f"`compiled` compiles the meta-gradient of an MLP chain (nn.Linear layers and ReLU, "
                              f"Tanh, Sigmoid, LeakyReLU or GELU), but this model is not one (its layers: "
                              f"{', '.join(kinds) or type(model).__name__}); drop `compiled` for it.")

    def _prepare(self, model: nn.Module) -> tuple[Params, Plan, list[str]]:
        """The model's parameters, its MLP chain (or ``None``) and the adapted names, cached per model.

        The cache key holds every parameter's name, identity and ``requires_grad`` and the speed-path switches,
        so replacing or freezing parameters, or switching a path off, rebuilds it.
        """
        params: Params = dict(model.named_parameters())
        key = (id(model), current_paths(), *((n, id(p), p.requires_grad) for n, p in params.items()))
        if key != self._plan_key:
            keep = parameter_filter(model, self.adapt_spec)
            names = [n for n, p in params.items() if p.requires_grad and keep(n)]
            if not names:
                raise ConfigError(f"`adapt={self.adapt_spec!r}` selects none of the model's trainable "
                                  f"parameters ({', '.join(params)}); choose a filter matching one or more.")
            zeroed: frozenset[str] = frozenset()
            if self.zero_head:
                head = parameter_filter(model, "heads")
                zeroed = frozenset(n for n in params if head(n))
                if not zeroed or not zeroed <= set(names):
                    raise ConfigError(f"`zero_head` starts every task's head at zero, so the inner loop must adapt "
                                      f"the head, but `adapt={self.adapt_spec!r}` leaves "
                                      f"{', '.join(sorted(zeroed - set(names))) or 'it'} fixed; use adapt "
                                      "'all' or 'heads', or drop zero_head.")
            chain = model_plan(model)
            self._plan_key = key
            self._plan = _ModelPlan(chain, names, zeroed)
        return params, self._plan.chain, self._plan.names

    def fast_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters the inner loop adapts (per task)."""
        return list(self._prepare(model)[2])

    def rate(self, name: str, train: bool) -> float | Tensor:
        """Inner step size for parameter ``name`` (a scalar here; Meta-SGD learns one per element)."""
        return self.inner_lr if train else self.test_inner_lr

    # -- inner loop ------------------------------------------------------------------------------------------
    def _start(self, params: Params, names: list[str], differentiable: bool) -> tuple[Params, Params]:
        """``(shared, fast)``: fast parameters start tied across tasks (their own shape) at ``θ`` (the head at
        zero with ``zero_head``)."""
        params = dict(params) if differentiable else {n: p.detach() for n, p in params.items()}
        fast = {n: params.pop(n) for n in names}
        for n in self._plan.zeroed:  # a fresh leaf: differentiable inner loops take gradients with respect to it
            fast[n] = torch.zeros_like(fast[n]).requires_grad_(differentiable)
        return params, fast

    def _update(self, name: str, w: Tensor, grad: Tensor, train: bool) -> Tensor:
        rate = self.rate(name, train)
        if isinstance(rate, Tensor):
            return torch.addcmul(w, rate, grad, value=-1.0)
        return torch.add(w, grad, alpha=-rate)

    def _step(self, model: nn.Module, chain: Plan, shared: Params, fast: Params, support: Split,
              train: bool, create_graph: bool, ways: int = 0) -> Params:
        grads = task_gradients(model, shared, fast, support, chain=chain, create_graph=create_graph, ways=ways)
        return {n: self._update(n, w, grads[n], train) for n, w in fast.items()}

    def _checkpointed_step(self, model: nn.Module, chain: Plan, shared: Params, fast: Params,
                           support: Split, ways: int = 0) -> Params:
        names = list(fast)

        def step(*values: Tensor) -> tuple[Tensor, ...]:
            out = self._step(model, chain, shared, dict(zip(names, values, strict=True)), support, True, True, ways)
            return tuple(out.values())

        values = checkpoint(step, *fast.values(), use_reentrant=False)
        return dict(zip(names, values, strict=True))

    def inner_loop(self, model: nn.Module, support: Split, *, steps: int, train: bool,
                   differentiable: bool, ways: int = 0) -> tuple[Params, Params]:
        """Adapt every task of ``support`` for ``steps`` steps → ``(shared, fast)`` parameter dicts.

        ``fast`` holds ``[tasks, *shape]`` adapted parameters (still tied, of the model's shapes, after zero
        steps). With ``differentiable`` they keep the graph back to the model's parameters (second order
        unless ``first_order``); otherwise they are detached. ``train`` picks the training step size. ``ways``
        (classification): the support loss takes the first ``ways`` logits of a head with more outputs.
        """
        shared, fast, _ = self._inner(model, support, steps, train, differentiable, ways)
        return shared, fast

    def _inner(self, model: nn.Module, support: Split, steps: int, train: bool,
               differentiable: bool, ways: int = 0) -> tuple[Params, Params, Plan]:
        params, chain, names = self._prepare(model)
        shared, fast = self._start(params, names, differentiable)
        create_graph = differentiable and not self.first_order
        for _ in range(steps):
            if self.checkpoint_inner and create_graph:
                fast = self._checkpointed_step(model, chain, shared, fast, support, ways)
            else:
                fast = self._step(model, chain, shared, fast, support, train, create_graph, ways)
            if not differentiable:
                fast = {n: w.detach() for n, w in fast.items()}
        return shared, fast, chain

    # -- MetaAlgorithm ---------------------------------------------------------------------------------------
    def adapt(self, model: nn.Module, support: Split, *, ways: int = 0, train: bool = True) -> Params:
        """Per-task adapted parameters ``{name: [tasks, *shape]}`` after the training (or test) inner loop."""
        steps = self.inner_steps if train else self.test_inner_steps
        return self._inner(model, support, steps, train, train, ways)[1]

    def predict(self, model: nn.Module, adapted: Params, x: Tensor) -> Tensor:
        params, chain, _ = self._prepare(model)
        shared = {n: p for n, p in params.items() if n not in adapted}
        return batched_forward(model, shared, adapted, x, chain=chain)

    def backward_chunk(self, episode: Episode) -> int:
        """One task per backward pass on images (the task loop builds one graph per task anyway: freeing each
        before the next needs a fifth of the step's memory at 16 tasks, for 2–7 % more time than one backward,
        see docs/backbones.md); all tasks at once otherwise (switch: ``task_backward``)."""
        if episode.support.x.ndim == 5 and current_paths().task_loop and current_paths().task_backward:
            return 1
        return episode.num_tasks

    def _compiled_objective(self, model: nn.Module, episode: Episode) -> MetaOutput | None:
        """The meta-objective through :class:`~mtml.meta._compiled.CompiledMetaGradient`, or ``None`` where it
        does not apply here (speed paths switched off, autocast on, not an MLP episode) or failed to compile."""
        params, chain, names = self._prepare(model)
        x = episode.support.x
        if (not isinstance(chain, list) or x.ndim != 3 or not supports_gradients(chain)
                or not current_paths().hand_gradients or torch.is_autocast_enabled(x.device.type)
                or not torch.is_grad_enabled()):
            return None
        key = (self._plan_key, self.inner_steps, self.inner_lr, self.first_order, episode.ways)
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = (key, CompiledMetaGradient(chain, names, self._plan.zeroed, steps=self.inner_steps,
                                                        lr=self.inner_lr, first_order=self.first_order,
                                                        ways=episode.ways))
        rates = {n: r for n in names if isinstance(r := self.rate(n, True), Tensor)}  # Meta-SGD's learned ones
        out = self._compiled[1](params, rates, x, episode.support.y, episode.query.x, episode.query.y)
        if out is None:
            return None
        objective, pred = out
        return MetaOutput(objective, episode_losses(pred, episode.query.y), self._accuracy(pred, episode))

    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """Mean query loss after the training inner loop, differentiable back to the model's parameters."""
        if self.compiled:
            compiled = self._compiled_objective(model, episode)
            if compiled is not None:
                return compiled
        shared, fast, chain = self._inner(model, episode.support, self.inner_steps, True, True, episode.ways)
        pred = way_logits(batched_forward(model, shared, fast, episode.query.x, chain=chain), episode.query.y,
                          episode.ways)
        with torch.no_grad():
            losses = episode_losses(pred, episode.query.y)
        return MetaOutput(mean_task_loss(pred, episode.query.y), losses, self._accuracy(pred, episode))

    def evaluate(self, model: nn.Module, episode: Episode, steps: Sequence[int]) -> dict[int, Scores]:
        """Query metrics after each of ``steps`` test-time inner steps, in one loop of ``max(steps)``."""
        wanted = sorted({check_int("steps", s, 0, "Use step counts >= 0.") for s in steps})
        params, chain, names = self._prepare(model)
        shared, fast = self._start(params, names, differentiable=False)
        out: dict[int, Scores] = {}
        for done in range(wanted[-1] + 1):
            if done in wanted:
                with torch.no_grad():
                    pred = batched_forward(model, shared, fast, episode.query.x, chain=chain)
                    out[done] = self.score(pred, episode)
            if done < wanted[-1]:
                fast = self._test_step(model, chain, shared, fast, episode.support, done, episode.ways)
                fast = {n: w.detach() for n, w in fast.items()}
        return out

    def _test_step(self, model: nn.Module, chain: Plan, shared: Params, fast: Params, support: Split,
                   done: int, ways: int = 0) -> Params:
        """Test-time inner step number ``done`` (from 0): a plain step at the test rate (MAML++: its learned one)."""
        return self._step(model, chain, shared, fast, support, False, False, ways)


def fomaml(
    model: nn.Module,
    /,
    *,
    inner_lr: float = 0.01,
    inner_steps: int = 1,
    test_inner_lr: float | None = None,
    test_inner_steps: int | None = None,
    adapt: str | ParameterFilter = "all",
    zero_head: bool = False,
    compiled: bool = False,
) -> MAML:
    """First-order MAML (Finn et al., ICML 2017, section 5.2): MAML without the second-order terms."""
    return MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_lr=test_inner_lr,
                test_inner_steps=test_inner_steps, first_order=True, adapt=adapt, zero_head=zero_head,
                compiled=compiled)
