"""Proto-MAML: MAML whose linear head starts every task at the class prototypes of its support set.

Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol & Larochelle,
"Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml._checks import check_int
from mtml.errors import ConfigError
from mtml.meta._base import MetaOutput, Scores
from mtml.meta._episode import Episode, episode_losses, mean_task_loss
from mtml.meta._functional import Plan, batched_forward, parameter_filter
from mtml.meta._maml import MAML, Params
from mtml.meta._mlp import single_head
from mtml.meta._protonet import class_means
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

__all__ = ["ProtoMAML", "prototype_head"]


def prototype_head(prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of the linear head whose logits are the negative squared distances to ``prototypes``, up to a
    per-example constant: ``W = 2cₖ``, ``b = −‖cₖ‖²``, since ``−‖f − cₖ‖² = 2cₖ·f − ‖cₖ‖² − ‖f‖²``.

    ``prototypes: [tasks, ways, dim]`` → ``W: [tasks, ways, dim]``, ``b: [tasks, ways]``.
    """
    return 2 * prototypes, -prototypes.square().sum(-1)


class _Head(NamedTuple):
    module: str  # the head's nn.Linear, by its name in the model
    weight: str
    bias: str
    ways: int  # its out_features


class ProtoMAML(MAML):
    """Proto-MAML (Triantafillou et al., ICLR 2020, "Meta-Dataset"): MAML with a prototype-initialised head.

    Every task's inner loop starts the model's linear head at its support set's class prototypes instead of a
    meta-learned value: with ``cₖ`` the mean of the head's inputs (the embeddings) over the support examples of
    class ``k``, the head starts at ``W = 2cₖ``, ``b = −‖cₖ‖²`` (:func:`prototype_head`), whose logits are
    ProtoNet's negative squared distances plus a per-query constant — the same softmax, so before any inner step
    Proto-MAML predicts (and scores) exactly as :class:`~mtml.meta.ProtoNet`. MAML's inner steps then fine-tune the
    head (``adapt="heads"``, the default, as ANIL) or the whole model (``adapt="all"``); the outer gradient flows
    through the inner loop and through the initialisation into the embedding (with ``first_order=True`` the inner
    gradients are constants, so it reaches the embedding through the initialisation and the query pass only:
    fo-Proto-MAML, the variant the paper trains). The prototypes are computed once, at the model's parameters: in
    the inner loop the head is a variable of its own (with ``adapt="all"`` the trunk's inner gradient does not run
    back into the head's starting value). The model's own head parameters are not used.

    The head is found as for ``adapt="heads"`` (``heads.*`` of a :class:`~mtml.nn.MultiTaskModel`, the last layer of
    an ``nn.Sequential``) and must be one ``nn.Linear`` with a bias and at least ``ways`` outputs (a config's
    ``model.head_hidden: []``; an episode with fewer ways than outputs, as in variable-way families, gets a
    prototype head of its own ways). Its inputs are read with a forward pre-hook during one forward pass of the
    support set through the model (all tasks in one call). With ``adapt="heads"`` the trunk is the same for every
    task and every step, so the support and query embeddings are computed once and the inner loop runs on them
    alone: per task, the softmax cross-entropy gradient of a linear head, ``(softmax(fWᵀ + b) − onehot)/n`` against
    the features, in batched products over tasks (differentiable, so the second-order terms reach the trunk). With
    ``adapt="all"`` the inner loop is MAML's: the vectorised speed paths (MLP chain, task loop on images) run it
    with the per-task prototype heads stacked ``[tasks, ways, dim]``. Classification episodes only.

    Args:
        model: the meta-learner (embedding plus a linear head).
        inner_lr, inner_steps, test_inner_lr, test_inner_steps, first_order, checkpoint_inner: as for
            :class:`~mtml.meta.MAML`.
        adapt: ``"heads"`` (the head only) or ``"all"`` (the head and every other parameter).
    """

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
        adapt: str = "heads",
        checkpoint_inner: bool = False,
    ) -> None:
        if adapt not in ("heads", "all"):
            raise ConfigError(f"`adapt` must be 'heads' or 'all' for proto_maml (the prototype-initialised head "
                              f"is always adapted). Got {adapt!r}.")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_lr=test_inner_lr,
                         test_inner_steps=test_inner_steps, first_order=first_order, adapt=adapt,
                         checkpoint_inner=checkpoint_inner)
        self.head_of(model)  # checks the head now rather than at the first step

    def head_of(self, model: nn.Module) -> _Head:
        """The model's linear head: its module name, parameter names and number of outputs."""
        keep = parameter_filter(model, "heads")
        names = sorted(n for n, _ in model.named_parameters() if keep(n))
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and names == [f"{path}.bias",
                                                                                        f"{path}.weight"]:
                return _Head(path, f"{path}.weight", f"{path}.bias", module.out_features)
        raise ConfigError(f"proto_maml initialises the head from class prototypes, so the head must be one nn.Linear "
                          f"with a bias, but this model's head holds {', '.join(names) or 'no parameters'}; use a "
                          "single linear head (in a config: model.head_hidden: []).")

    def check_episode(self, episode: Episode) -> None:
        if not episode.is_classification:
            raise ConfigError("proto_maml starts its head at class prototypes, so it needs a classification "
                              "episode (integer labels); for regression use 'maml' or 'maml_pp'.")

    def _check(self, model: nn.Module, episode: Episode) -> None:
        self.check_episode(episode)
        ways = self.head_of(model).ways
        if ways < episode.ways:
            raise ConfigError(f"proto_maml: the model's head has {ways} outputs but the episode has {episode.ways} "
                              "ways; build the head with one output per way (of the largest episode).")

    def head_inputs(self, model: nn.Module, x: Tensor) -> Tensor:
        """The head's inputs ``[tasks, n, dim]`` for ``x: [tasks, n, *input]`` at the model's own parameters
        (every task's inner loop starts there), from one call of the model on all tasks' examples."""
        head = model.get_submodule(self.head_of(model).module)
        seen: list[Tensor] = []

        def grab(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append(args[0])

        handle = head.register_forward_pre_hook(grab)
        try:
            flat = x.flatten(0, 1)
            model(flat, single_head(model)) if isinstance(model, MultiTaskModel) else model(flat)
        finally:
            handle.remove()
        return seen[-1].reshape(x.shape[0], x.shape[1], -1)

    def _proto_start(self, model: nn.Module, params: Params, names: list[str], support: Split,
                     differentiable: bool, ways: int) -> tuple[Params, Params]:
        """MAML's start, with the head replaced by each task's prototype head (stacked per task, ``ways`` rows:
        an episode with fewer ways than the head has outputs gets a head of its own ways)."""
        shared, fast = self._start(params, names, differentiable)
        head = self.head_of(model)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            weight, bias = prototype_head(class_means(self.head_inputs(model, support.x), support.y,
                                                      ways or head.ways))
        fast[head.weight], fast[head.bias] = weight, bias
        return shared, fast

    # -- adapt="heads": the inner loop on the embeddings ----------------------------------------------------------
    def _head_only(self) -> bool:
        return self.adapt_spec == "heads"

    def _head_loop(self, feats: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, steps: int, train: bool,
                   differentiable: bool) -> tuple[Tensor, Tensor]:
        """``steps`` gradient steps of every task's linear head ``(weight [tasks, ways, dim], bias [tasks, ways])``
        on its support embeddings ``feats [tasks, shots, dim]`` (mean cross-entropy over its shots)."""
        lr = self.inner_lr if train else self.test_inner_lr
        onehot = F.one_hot(labels, weight.shape[1]).to(feats.dtype)
        create_graph = differentiable and not self.first_order and torch.is_grad_enabled()
        for _ in range(steps):
            with torch.set_grad_enabled(create_graph):
                logits = self._head_logits(feats, weight, bias)
                error = (logits.softmax(-1) - onehot) / feats.shape[1]  # d loss / d logits, [tasks, shots, ways]
                grad_w, grad_b = error.transpose(1, 2) @ feats, error.sum(1)
            weight, bias = weight - lr * grad_w, bias - lr * grad_b
            if not differentiable:
                weight, bias = weight.detach(), bias.detach()
        return weight, bias

    def _head_start(self, model: nn.Module, episode: Episode,
                    differentiable: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support embeddings, query embeddings, W, b)``: the embeddings at the model's parameters (one call of
        the model for the support sets, one for the query sets, as ProtoNet) and the stacked prototype heads."""
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            feats_s = self.head_inputs(model, episode.support.x)
            feats_q = self.head_inputs(model, episode.query.x)
            weight, bias = prototype_head(class_means(feats_s, episode.support.y, episode.ways))
        return feats_s, feats_q, weight, bias

    @staticmethod
    def _head_logits(feats: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))

    def backward_chunk(self, episode: Episode) -> int:
        """With ``adapt="heads"`` all tasks in one backward pass (their embeddings are one batched call, as
        ProtoNet's); otherwise MAML's choice (one task at a time on images)."""
        return episode.num_tasks if self._head_only() else super().backward_chunk(episode)

    # -- MAML's loops, started at the prototypes ---------------------------------------------------------------
    def _inner(self, model: nn.Module, support: Split, steps: int, train: bool,
               differentiable: bool, ways: int = 0) -> tuple[Params, Params, Plan]:
        params, chain, names = self._prepare(model)
        shared, fast = self._proto_start(model, params, names, support, differentiable, ways)
        create_graph = differentiable and not self.first_order
        for _ in range(steps):
            if self.checkpoint_inner and create_graph:
                fast = self._checkpointed_step(model, chain, shared, fast, support, ways)
            else:
                fast = self._step(model, chain, shared, fast, support, train, create_graph, ways)
            if not differentiable:
                fast = {n: w.detach() for n, w in fast.items()}
        return shared, fast, chain

    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """Mean query loss after the training inner loop from the prototype heads (differentiable)."""
        self._check(model, episode)
        if not self._head_only():
            return super().meta_objective(model, episode)
        feats_s, feats_q, weight, bias = self._head_start(model, episode, differentiable=True)
        weight, bias = self._head_loop(feats_s, episode.support.y, weight, bias, self.inner_steps, True, True)
        pred = self._head_logits(feats_q, weight, bias)
        with torch.no_grad():
            losses = episode_losses(pred, episode.query.y)
        return MetaOutput(mean_task_loss(pred, episode.query.y), losses, self._accuracy(pred, episode))

    def evaluate(self, model: nn.Module, episode: Episode, steps: Sequence[int]) -> dict[int, Scores]:
        """Query metrics after each of ``steps`` test-time inner steps (0: ProtoNet's), in one loop."""
        self._check(model, episode)
        wanted = sorted({check_int("steps", s, 0, "Use step counts >= 0.") for s in steps})
        if self._head_only():
            return self._evaluate_head(model, episode, wanted)
        params, chain, names = self._prepare(model)
        shared, fast = self._proto_start(model, params, names, episode.support, False, episode.ways)
        out: dict[int, Scores] = {}
        for done in range(wanted[-1] + 1):
            if done in wanted:
                with torch.no_grad():
                    out[done] = self.score(batched_forward(model, shared, fast, episode.query.x, chain=chain),
                                           episode)
            if done < wanted[-1]:
                fast = self._step(model, chain, shared, fast, episode.support, False, False, episode.ways)
                fast = {n: w.detach() for n, w in fast.items()}
        return out

    def _evaluate_head(self, model: nn.Module, episode: Episode, wanted: list[int]) -> dict[int, Scores]:
        with torch.no_grad():
            feats_s, feats_q, weight, bias = self._head_start(model, episode, differentiable=False)
            out: dict[int, Scores] = {}
            done = 0
            for target in wanted:
                weight, bias = self._head_loop(feats_s, episode.support.y, weight, bias, target - done, False, False)
                done = target
                out[target] = self.score(self._head_logits(feats_q, weight, bias), episode)
        return out
