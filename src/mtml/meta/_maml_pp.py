"""MAML++: MAML with learned per-layer per-step inner rates, a multi-step loss and derivative-order annealing.

Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtml._checks import check_int
from mtml.errors import ConfigError
from mtml.meta._base import MetaOutput
from mtml.meta._episode import Episode, episode_losses, mean_task_loss, way_logits
from mtml.meta._functional import ParameterFilter, Plan, batched_forward, task_gradients
from mtml.meta._maml import MAML, Params
from mtml.tasks import Split

__all__ = ["MAMLPlusPlus", "msl_weights"]

#: MAML++'s floor for the weight of every step but the last, as a fraction of the uniform weight ``1/S``.
MSL_FLOOR = 0.03


def _key(name: str) -> str:
    return name.replace(".", "__")


def msl_weights(steps: int, meta_step: int, anneal_steps: int) -> list[float]:
    """Weights of the query losses after inner steps ``1..steps`` at outer step ``meta_step`` (multi-step loss).

    They start uniform (``1/S`` each) and move linearly towards the last step: after ``t`` outer steps every
    earlier step has ``max(1/S − t/(S·T), 0.03/S)`` and the last ``min(1/S + t(S−1)/(S·T), 1 − 0.03(S−1)/S)``,
    with ``T = anneal_steps``, so the weights sum to one throughout. From ``t ≥ T`` on (or with ``T = 0``) only the
    last step counts, the plain MAML objective. This is the schedule of the paper's code, with outer steps in place
    of epochs.
    """
    if steps == 1 or meta_step >= anneal_steps:
        return [0.0] * (steps - 1) + [1.0]
    uniform = 1.0 / steps
    decay = uniform / anneal_steps
    floor = MSL_FLOOR * uniform
    early = max(uniform - meta_step * decay, floor)
    last = min(uniform + meta_step * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]


class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML"): MAML made stable and faster.

    Three of the paper's changes to MAML, on top of :class:`~mtml.meta.MAML`'s vectorised inner loop:

    - **learned per-layer per-step inner rates (LSLR)**: inner step ``i`` updates parameter tensor ``p`` with its
      own learned scalar, ``φ ← φ − αₚ,ᵢ ∇L(φ)``. The rates are ``nn.Parameter`` s of this module
      (``rates.<name with . replaced by __>``, shape ``[inner_steps]``, starting at ``inner_lr``), so the
      optimiser must get :meth:`parameters` of the algorithm too (:func:`~mtml.meta.meta_parameters` does) and
      checkpoints carry them. They are not constrained to stay positive (the paper learns "a learning rate and
      direction"). At meta-test time they are used detached; steps beyond ``inner_steps`` reuse the last step's.
    - **multi-step loss (MSL)**: the outer objective is ``Σᵢ wᵢ · L_query(φᵢ)`` over the query losses after every
      inner step, with weights annealed from uniform towards the last step over ``msl_steps`` outer steps
      (:func:`msl_weights`); afterwards it is MAML's last-step loss.
    - **derivative-order annealing (DA)**: the first ``first_order_steps`` outer steps use first-order gradients
      (no second-order terms, cheaper and steadier early on); from then on second-order ones.

    The outer-step counter is the buffer ``meta_steps`` (in ``state_dict``, so a resumed run continues the
    schedules): the first episode is step 0. It advances once per episode that :func:`~mtml.meta.meta_backward`
    (hence :func:`~mtml.meta.meta_step`) back-propagates, after the episode's last chunk (see
    :meth:`backward_chunk`), so an episode back-propagated task by task still counts once; with gradient
    accumulation every accumulated episode counts. A loop that calls :meth:`meta_objective` itself advances it
    with :meth:`advance`. The paper counts epochs of 500 iterations (first order for the first 50; its code's
    Omniglot configs anneal the multi-step loss over 20); the defaults here, 500 outer steps each, suit mtml's
    shorter runs.

    The paper's other changes do not carry over: per-step batch-normalisation statistics and weights (BNRS,
    BNWB) because mtml's backbones normalise each example on its own (group or layer norm, no batch statistics
    shared between examples), and cosine annealing of the outer learning rate, which is the optimiser's
    schedule (``training.scheduler: cosine``), not the algorithm's.

    Args:
        model: the meta-learner, whose adapted parameters fix the rates.
        inner_lr: initial value of every learned inner rate.
        inner_steps: inner steps during meta-training (also the number of rates per parameter tensor).
        test_inner_steps: inner steps at meta-test time (default: ``inner_steps``).
        multi_step_loss: use the multi-step loss (``False``: the last step's query loss only, as MAML).
        msl_steps: outer steps over which the multi-step loss weights anneal to the last step.
        first_order_steps: outer steps trained first order before switching to second order (0: second order
            from the start).
        first_order: first order throughout (the annealing then has nothing to switch).
        adapt, zero_head: as for :class:`~mtml.meta.MAML`.
    """

    def __init__(
        self,
        model: nn.Module,
        /,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        test_inner_steps: int | None = None,
        multi_step_loss: bool = True,
        msl_steps: int = 500,
        first_order_steps: int = 500,
        first_order: bool = False,
        adapt: str | ParameterFilter = "all",
        zero_head: bool = False,
    ) -> None:
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         first_order=first_order, adapt=adapt, zero_head=zero_head)
        if not isinstance(multi_step_loss, bool):
            raise ConfigError(f"`multi_step_loss` must be true or false. Got {multi_step_loss!r}.")
        self.multi_step_loss = multi_step_loss
        self.msl_steps = check_int("msl_steps", msl_steps, 0,
                                   "Use 0 (last-step loss only) or more outer steps to anneal over, such as 500.")
        self.first_order_steps = check_int("first_order_steps", first_order_steps, 0,
                                           "Use 0 (second order from the start) or more outer steps, such as 500.")
        params = dict(model.named_parameters())
        self.rates = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr, dtype=params[n].dtype,
                                             device=params[n].device))
            for n in self.fast_names(model)
        })
        self.meta_steps: Tensor
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))
        self._chunks_left = 0  # meta_objective calls left in the episode meta_backward is running

    # -- schedules ---------------------------------------------------------------------------------------------
    def advance(self) -> None:
        """Count one outer step (what :meth:`backward_chunk` does for every episode :func:`meta_backward` runs)."""
        self.meta_steps += 1

    def second_order_now(self) -> bool:
        """Whether the current outer step differentiates through the inner gradients (derivative-order annealing)."""
        return not self.first_order and int(self.meta_steps) >= self.first_order_steps

    def loss_weights(self) -> list[float]:
        """Weights of the query losses after inner steps ``1..inner_steps`` at the current outer step."""
        if not self.multi_step_loss:
            return [0.0] * (self.inner_steps - 1) + [1.0]
        return msl_weights(self.inner_steps, int(self.meta_steps), self.msl_steps)

    def backward_chunk(self, episode: Episode) -> int:
        """As :meth:`MAML.backward_chunk`. :func:`~mtml.meta.meta_backward` asks once per episode, before its first
        chunk: the answer fixes how many :meth:`meta_objective` calls the episode takes, and the counter advances
        after the last of them, so every chunk of the episode sees the same outer step."""
        chunk = super().backward_chunk(episode)
        n = episode.num_tasks
        self._chunks_left = -(-n // max(1, min(n, chunk)))
        return chunk

    # -- inner loop --------------------------------------------------------------------------------------------
    def step_rate(self, name: str, step: int, train: bool) -> Tensor:
        """The learned rate of parameter ``name`` at inner step ``step`` (the last one beyond ``inner_steps``)."""
        rate = self.rates[_key(name)][min(step, self.inner_steps - 1)]
        return rate if train else rate.detach()

    def _lslr_step(self, model: nn.Module, chain: Plan, shared: Params, fast: Params, support: Split, step: int,
                   train: bool, create_graph: bool, ways: int = 0) -> Params:
        grads = task_gradients(model, shared, fast, support, chain=chain, create_graph=create_graph, ways=ways)
        return {n: w - self.step_rate(n, step, train) * grads[n] for n, w in fast.items()}

    def _inner(self, model: nn.Module, support: Split, steps: int, train: bool,
               differentiable: bool, ways: int = 0) -> tuple[Params, Params, Plan]:
        params, chain, names = self._prepare(model)
        shared, fast = self._start(params, names, differentiable)
        create_graph = differentiable and self.second_order_now()
        for i in range(steps):
            fast = self._lslr_step(model, chain, shared, fast, support, i, train, create_graph, ways)
            if not differentiable:
                fast = {n: w.detach() for n, w in fast.items()}
        return shared, fast, chain

    # -- MetaAlgorithm -----------------------------------------------------------------------------------------
    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """``Σᵢ wᵢ · (mean query loss after inner step i)``, differentiable back to the model and the rates."""
        weights = self.loss_weights()
        params, chain, names = self._prepare(model)
        shared, fast = self._start(params, names, differentiable=True)
        create_graph = self.second_order_now()
        objective: Tensor | None = None
        pred = None
        for i, weight in enumerate(weights):
            fast = self._lslr_step(model, chain, shared, fast, episode.support, i, True, create_graph, episode.ways)
            if weight > 0:
                pred = way_logits(batched_forward(model, shared, fast, episode.query.x, chain=chain), episode.query.y,
                                  episode.ways)
                term = weight * mean_task_loss(pred, episode.query.y)
                objective = term if objective is None else objective + term
        assert pred is not None and objective is not None  # the last weight is always > 0
        with torch.no_grad():
            losses = episode_losses(pred, episode.query.y)
        if self._chunks_left > 0:
            self._chunks_left -= 1
            if self._chunks_left == 0:
                self.advance()
        return MetaOutput(objective, losses, self._accuracy(pred, episode))

    def _test_step(self, model: nn.Module, chain: Plan, shared: Params, fast: Params, support: Split,
                   done: int, ways: int = 0) -> Params:
        """Test-time step ``done`` with its learned rates (detached; steps past ``inner_steps`` reuse the last)."""
        return self._lslr_step(model, chain, shared, fast, support, done, False, False, ways)
