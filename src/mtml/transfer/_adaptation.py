"""Unsupervised domain adaptation: a source model, labelled source rows and unlabelled target rows → a predictor
for the target domain.

Every method in :data:`ADAPTERS` starts from the source run's trunk ``ψ`` and its classification head ``f`` for
the task, and trains both with Adam on batches of labelled source rows ``(x_s, y_s)`` and unlabelled target rows
``x_t`` (the target's labels are never read), minimising the source cross-entropy plus a transfer term:

- ``dann`` — a domain discriminator on the trunk features behind a gradient reversal layer (Ganin et al., JMLR 2016);
- ``cdan`` — the discriminator on the multilinear map ``f ⊗ g`` of features and class predictions, each row
  weighted by ``1 + e^{−H(g)}`` (CDAN+E, Long et al., NeurIPS 2018);
- ``mcc`` — minimum class confusion of the target predictions at temperature ``T`` (Jin et al., ECCV 2020);
- ``mdd`` — margin disparity discrepancy with an adversarial auxiliary head, margin ``γ`` (Zhang et al., ICML 2019).

The pieces (:class:`GradientReversal`, :func:`dann_lambda`, :func:`multilinear_map`, :func:`entropy_weights`,
:func:`class_confusion`, :func:`mcc_loss`, :func:`margin_disparity`) are pure functions, tested against hand
computations. :func:`supervised_target` is the upper bound: the same start fine-tuned on labelled target rows.
Pure torch, no I/O.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml._checks import check_int, check_positive
from mtml.errors import ConfigError, DivergedError
from mtml.registry import Registry
from mtml.tasks import Split, Task, TaskKind
from mtml.transfer._parts import Source, features, seed_from

__all__ = ["ADAPTERS", "CDAN", "DANN", "MCC", "MDD", "Adapter", "GradientReversal", "class_confusion",
           "dann_lambda", "domain_loss", "entropy_weights", "grad_reverse", "margin_disparity", "mcc_loss",
           "multilinear_map", "supervised_target"]


# -- the pieces ---------------------------------------------------------------------------------------------------
class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``−λ`` (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """``x`` unchanged, with the gradient flowing back through it scaled by ``−lam``."""
    out: Tensor = GradientReversal.apply(x, lam)
    return out


def dann_lambda(progress: float) -> float:
    """DANN's adaptation factor ``λ_p = 2 / (1 + exp(−10 p)) − 1`` at training progress ``p ∈ [0, 1]``: 0 at the
    start, rising to ≈1, so the discriminator's noisy early signal does not disturb the features."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def multilinear_map(feats: Tensor, probs: Tensor) -> Tensor:
    """CDAN's ``T(h) = f ⊗ g``: the outer product of features ``[n, d]`` and predictions ``[n, c]``, flattened to
    ``[n, c·d]`` (entry ``j·d + k`` is ``g_j · f_k``)."""
    return torch.bmm(probs.unsqueeze(2), feats.unsqueeze(1)).flatten(1)


def entropy_weights(probs: Tensor) -> Tensor:
    """CDAN+E's example weights ``w = 1 + e^{−H(g)}``, ``H(g) = −Σ_j g_j log g_j`` (no gradient): confident
    predictions count more."""
    p = probs.detach()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return 1.0 + torch.exp(-entropy)


def domain_loss(logit_s: Tensor, logit_t: Tensor, w_s: Tensor | None = None, w_t: Tensor | None = None) -> Tensor:
    """The discriminator's binary cross-entropy, source labelled 1 and target 0, each domain weighing half.

    With weights, each domain's per-row losses are averaged with its weights normalised to sum to 1 there."""
    ls = F.binary_cross_entropy_with_logits(logit_s.reshape(-1), torch.ones_like(logit_s.reshape(-1)),
                                            reduction="none")
    lt = F.binary_cross_entropy_with_logits(logit_t.reshape(-1), torch.zeros_like(logit_t.reshape(-1)),
                                            reduction="none")
    if w_s is None or w_t is None:
        return 0.5 * (ls.mean() + lt.mean())
    return 0.5 * ((w_s / w_s.sum()) @ ls + (w_t / w_t.sum()) @ lt)


def class_confusion(logits: Tensor, temperature: float) -> Tensor:
    """MCC's category-normalised class-confusion matrix ``C̃ [c, c]`` of a batch of target ``logits [n, c]``.

    ``Ŷ = softmax(logits / T)``; row weights ``W_i = n·(1 + e^{−H(Ŷ_i)}) / Σ_k (1 + e^{−H(Ŷ_k)})`` (detached);
    ``C = Ŷᵀ diag(W) Ŷ``; ``C̃_jj' = C_jj' / Σ_j'' C_jj''`` (each row sums to 1)."""
    probs = F.softmax(logits / temperature, dim=1)
    w = entropy_weights(probs)
    w = probs.shape[0] * w / w.sum()
    conf = (probs * w.unsqueeze(1)).T @ probs
    return conf / conf.sum(1, keepdim=True)


def mcc_loss(logits: Tensor, temperature: float) -> Tensor:
    """Minimum class confusion ``L = (1/c) Σ_j Σ_{j'≠j} C̃_jj'`` (:func:`class_confusion`): the off-diagonal
    mass, which is 0 when every prediction is one-hot and no two classes are confused."""
    conf = class_confusion(logits, temperature)
    return (conf.sum() - conf.trace()) / conf.shape[0]


def margin_disparity(y_s: Tensor, y_s_adv: Tensor, y_t: Tensor, y_t_adv: Tensor, margin: float) -> Tensor:
    """MDD's empirical margin disparity ``D_γ = E_t[log(1 − σ_{ŷ}(f'))] + γ·E_s[log σ_{ŷ}(f')]``.

    ``ŷ = argmax f`` (the main head's prediction, no gradient), ``σ_{ŷ}(f')`` the auxiliary head's softmax
    probability of it. The auxiliary head maximises ``D_γ`` (agree with ``f`` on source, disagree on target);
    the features minimise it through a gradient reversal layer."""
    pred_s, pred_t = y_s.detach().argmax(1), y_t.detach().argmax(1)
    log_agree_s = -F.cross_entropy(y_s_adv, pred_s)
    p_t = F.softmax(y_t_adv, dim=1).gather(1, pred_t.unsqueeze(1)).squeeze(1)
    return torch.log((1.0 - p_t).clamp_min(1e-6)).mean() + margin * log_agree_s


class _Discriminator(nn.Module):
    """A domain discriminator ``[n, d] → [n, 1]`` logits: two hidden ReLU layers with dropout 0.5 (as in DANN)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


# -- the methods --------------------------------------------------------------------------------------------------
def _check_target(source: Source, task: Task) -> None:
    if task.kind is not TaskKind.MULTICLASS:
        raise ConfigError(f"domain adaptation needs a multiclass target task, and '{task.name}' is {task.kind.value}; "
                          "pick a classification task.")
    if task.name not in source.model.heads:
        raise ConfigError(f"target task '{task.name}' has no head of the same name in {source.label} (heads: "
                          f"{', '.join(source.model.heads)}); adapt a source trained on the same task.")
    if source.model.stems:
        raise ConfigError("the source model has per-task stems, so it has no single trunk to adapt; train the source "
                          "with one input width and a shared trunk.")


class Adapter(ABC):
    """An unsupervised domain adaptation method: the source's trunk and head trained on labelled source rows plus
    a transfer term on unlabelled target rows.

    Args:
        steps, lr, batch_size, weight_decay: the Adam loop; each step draws ``batch_size`` source rows and as many
            target rows.
        trade_off: the transfer term's weight.
        trunk_lr: the trunk's learning rate as a multiple of ``lr`` (the head and the method's own modules train
            at ``lr``). Default 0.1, as the reference implementations train the pretrained backbone 10× slower.
            Measured on the noise shift (``docs/transfer-strategies.md``): at 1.0 DANN's accuracy varies by ±0.34
            over seeds and MDD's collapses below source-only.
    """

    trunk_lr_default: float = 0.1

    def __init__(self, *, steps: int = 300, lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0,
                 trade_off: float = 1.0, trunk_lr: float | None = None) -> None:
        self.steps = check_int("steps", steps, 1, "Use at least one training step, e.g. 300.")
        self.lr = check_positive("lr", lr, "Use a step size such as 0.001.")
        self.batch_size = check_int("batch_size", batch_size, 2, "Use a batch size such as 64.")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or not weight_decay >= 0:
            raise ConfigError(f"`weight_decay` must be a number >= 0. Got {weight_decay!r}.")
        self.weight_decay = float(weight_decay)
        self.trade_off = check_positive("trade_off", trade_off, "Use a transfer-term weight such as 1.")
        self.trunk_lr = self.trunk_lr_default if trunk_lr is None else check_positive(
            "trunk_lr", trunk_lr, "Use a multiple of lr such as 0.1 (or 1 to train the trunk at lr).")
        self.last_transfer: float = float("nan")  # the transfer term at the last step (a test can see it ran)

    def modules(self, width: int, classes: int, head: nn.Module, seed: int) -> nn.ModuleList:
        """Extra trainable modules (discriminators, auxiliary heads) for features of ``width``; none here."""
        return nn.ModuleList()

    @abstractmethod
    def transfer(self, extra: nn.ModuleList, f_s: Tensor, f_t: Tensor, y_s: Tensor, y_t: Tensor,
                 progress: float) -> Tensor:
        """The transfer term of one step from source / target features ``f`` and head logits ``y``."""

    def fit(self, source: Source, task: Task, source_rows: Split, target_x: Tensor, *,
            generator: torch.Generator) -> nn.Module:
        """The adapted predictor ``x → logits`` (eval mode) for ``task``; ``source_rows`` labelled, ``target_x``
        the unlabelled target inputs."""
        _check_target(source, task)
        if len(target_x) == 0:
            raise ConfigError(f"target task '{task.name}' has no unlabelled training rows to adapt to; give the "
                              "target config a train split (its labels are not read).")
        trunk = copy.deepcopy(source.model.trunk).requires_grad_(True).train()
        head = copy.deepcopy(source.model.heads[task.name]).requires_grad_(True).train()
        width = int(features(source.model.trunk, source_rows.x[:1]).shape[1])
        with torch.random.fork_rng():
            torch.manual_seed(seed_from(generator))
            extra = self.modules(width, task.num_outputs, head, seed_from(generator))
            extra.train()
            groups: list[dict[str, Any]] = [{"params": list(trunk.parameters()), "lr": self.lr * self.trunk_lr},
                      {"params": [*head.parameters(), *extra.parameters()]}]
            opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
            ns, nt = len(source_rows), len(target_x)
            for step in range(self.steps):
                i_s = torch.randint(0, ns, (min(self.batch_size, ns),), generator=generator)
                i_t = torch.randint(0, nt, (min(self.batch_size, nt),), generator=generator)
                x = torch.cat([source_rows.x[i_s], target_x[i_t]])
                f = trunk(x)
                y = head(f)
                k = len(i_s)
                cls = F.cross_entropy(y[:k], source_rows.y[i_s])
                term = self.transfer(extra, f[:k], f[k:], y[:k], y[k:], step / self.steps)
                total = cls + self.trade_off * term
                if not torch.isfinite(total):
                    raise DivergedError(f"adaptation of task '{task.name}' diverged at step {step} (loss "
                                        f"{float(total)}); lower `lr` (now {self.lr}).")
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                self.last_transfer = float(term.detach())
        return nn.Sequential(trunk, head).requires_grad_(False).eval()


class DANN(Adapter):
    """Domain-adversarial training: a discriminator tells source from target trunk features, and the trunk learns
    to fool it through a gradient reversal layer of strength ``λ_p`` (:func:`dann_lambda`).

    Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand & Lempitsky, "Domain-Adversarial Training of
    Neural Networks", JMLR 17(59), 2016.

    Args:
        hidden: the discriminator's hidden width (the paper's image experiments: 1024).
        steps, lr, batch_size, weight_decay, trade_off, trunk_lr: as :class:`Adapter`.
    """

    def __init__(self, *, hidden: int = 256, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                 weight_decay: float = 0.0, trade_off: float = 1.0, trunk_lr: float | None = None) -> None:
        super().__init__(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, trade_off=trade_off,
                         trunk_lr=trunk_lr)
        self.hidden = check_int("hidden", hidden, 1, "Use a discriminator width such as 256.")

    def modules(self, width: int, classes: int, head: nn.Module, seed: int) -> nn.ModuleList:
        return nn.ModuleList([_Discriminator(width, self.hidden)])

    def transfer(self, extra: nn.ModuleList, f_s: Tensor, f_t: Tensor, y_s: Tensor, y_t: Tensor,
                 progress: float) -> Tensor:
        lam = dann_lambda(progress)
        disc = extra[0]
        return domain_loss(disc(grad_reverse(f_s, lam)), disc(grad_reverse(f_t, lam)))


class CDAN(Adapter):
    """Conditional adversarial adaptation: the discriminator sees the multilinear map ``f ⊗ g`` of trunk features
    and (detached) class predictions (:func:`multilinear_map`); with ``entropy=True`` (CDAN+E) each row's loss is
    weighted by ``1 + e^{−H(g)}`` (:func:`entropy_weights`). Gradient reversal of strength ``λ_p`` as DANN.

    Long, Cao, Wang & Jordan, "Conditional Adversarial Domain Adaptation", NeurIPS 2018.

    Args:
        hidden: the discriminator's hidden width.
        entropy: entropy conditioning (CDAN+E, the default) or plain CDAN.
        steps, lr, batch_size, weight_decay, trade_off, trunk_lr: as :class:`Adapter`.
    """

    def __init__(self, *, hidden: int = 256, entropy: bool = True, steps: int = 300, lr: float = 1e-3,
                 batch_size: int = 64, weight_decay: float = 0.0, trade_off: float = 1.0,
                 trunk_lr: float | None = None) -> None:
        super().__init__(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, trade_off=trade_off,
                         trunk_lr=trunk_lr)
        self.hidden = check_int("hidden", hidden, 1, "Use a discriminator width such as 256.")
        if not isinstance(entropy, bool):
            raise ConfigError(f"`entropy` must be true (CDAN+E) or false (CDAN). Got {entropy!r}.")
        self.entropy = entropy

    def modules(self, width: int, classes: int, head: nn.Module, seed: int) -> nn.ModuleList:
        return nn.ModuleList([_Discriminator(width * classes, self.hidden)])

    def transfer(self, extra: nn.ModuleList, f_s: Tensor, f_t: Tensor, y_s: Tensor, y_t: Tensor,
                 progress: float) -> Tensor:
        lam = dann_lambda(progress)
        g_s, g_t = F.softmax(y_s, 1).detach(), F.softmax(y_t, 1).detach()
        disc = extra[0]
        out_s = disc(grad_reverse(multilinear_map(f_s, g_s), lam))
        out_t = disc(grad_reverse(multilinear_map(f_t, g_t), lam))
        if not self.entropy:
            return domain_loss(out_s, out_t)
        return domain_loss(out_s, out_t, entropy_weights(g_s), entropy_weights(g_t))


class MCC(Adapter):
    """Minimum class confusion: source cross-entropy plus :func:`mcc_loss` of the target predictions, which
    pushes the target predictions apart into confident, non-confused classes. No discriminator.

    Jin, Wang, Long & Wang, "Minimum Class Confusion for Versatile Domain Adaptation", ECCV 2020.

    Args:
        temperature: ``T`` of the probability rescaling (default 2.5).
        steps, lr, batch_size, weight_decay, trade_off, trunk_lr: as :class:`Adapter`.
    """

    def __init__(self, *, temperature: float = 2.5, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                 weight_decay: float = 0.0, trade_off: float = 1.0, trunk_lr: float | None = None) -> None:
        super().__init__(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, trade_off=trade_off,
                         trunk_lr=trunk_lr)
        self.temperature = check_positive("temperature", temperature, "Use a temperature such as 2.5.")

    def transfer(self, extra: nn.ModuleList, f_s: Tensor, f_t: Tensor, y_s: Tensor, y_t: Tensor,
                 progress: float) -> Tensor:
        return mcc_loss(y_t, self.temperature)


class MDD(Adapter):
    """Margin disparity discrepancy: an auxiliary head ``f'`` (a fresh copy of the head's architecture, behind a
    gradient reversal layer of strength ``λ_p``) maximises :func:`margin_disparity` ``D_γ``, the trunk minimises it.
    The training loss is ``CE_s(f) − trade_off · D_γ``.

    Zhang, Liu, Long & Jordan, "Bridging Theory and Algorithm for Domain Adaptation", ICML 2019.

    Args:
        margin: ``γ`` (default 4).
        reversal: the gradient reversal's final strength, reached along ``reversal · λ_p`` (default 0.1, as the
            authors' code caps its warm-start reversal layer).
        steps, lr, batch_size, weight_decay, trade_off, trunk_lr: as :class:`Adapter`.
    """

    def __init__(self, *, margin: float = 4.0, reversal: float = 0.1, steps: int = 300, lr: float = 1e-3,
                 batch_size: int = 64, weight_decay: float = 0.0, trade_off: float = 1.0,
                 trunk_lr: float | None = None) -> None:
        super().__init__(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, trade_off=trade_off,
                         trunk_lr=trunk_lr)
        self.margin = check_positive("margin", margin, "Use a margin such as 4.")
        self.reversal = check_positive("reversal", reversal, "Use a reversal strength such as 0.1.")

    def modules(self, width: int, classes: int, head: nn.Module, seed: int) -> nn.ModuleList:
        aux = copy.deepcopy(head)
        torch.manual_seed(seed)
        for m in aux.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        return nn.ModuleList([aux])

    def transfer(self, extra: nn.ModuleList, f_s: Tensor, f_t: Tensor, y_s: Tensor, y_t: Tensor,
                 progress: float) -> Tensor:
        lam = self.reversal * dann_lambda(progress)
        aux = extra[0]
        return -margin_disparity(y_s, aux(grad_reverse(f_s, lam)), y_t, aux(grad_reverse(f_t, lam)), self.margin)


def supervised_target(source: Source, task: Task, *, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                      generator: torch.Generator) -> nn.Module:
    """The upper bound: the source's trunk and head fine-tuned with Adam on the *labelled* target train rows."""
    _check_target(source, task)
    if task.train.labelled == 0:
        raise ConfigError(f"target task '{task.name}' has no labelled training rows for the target-supervised bound.")
    rows = task.train if task.train.mask is None else Split(task.train.x[task.train.mask],
                                                             task.train.y[task.train.mask])
    trunk = copy.deepcopy(source.model.trunk).requires_grad_(True).train()
    head = copy.deepcopy(source.model.heads[task.name]).requires_grad_(True).train()
    with torch.random.fork_rng():
        torch.manual_seed(seed_from(generator))
        opt = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, len(rows), (min(batch_size, len(rows)),), generator=generator)
            loss = F.cross_entropy(head(trunk(rows.x[idx])), rows.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return nn.Sequential(trunk, head).requires_grad_(False).eval()


ADAPTERS: Registry[Adapter] = Registry("adaptation method")
ADAPTERS.register("dann", DANN, help="domain discriminator on trunk features behind gradient reversal (Ganin et al., "
                  "JMLR 2016)")
ADAPTERS.register("cdan", CDAN, help="discriminator on features ⊗ predictions, entropy-weighted CDAN+E (Long et al., "
                  "NeurIPS 2018)")
ADAPTERS.register("mcc", MCC, help="minimum class confusion of target predictions at temperature T (Jin et al., "
                  "ECCV 2020)")
ADAPTERS.register("mdd", MDD, help="margin disparity discrepancy with an adversarial auxiliary head (Zhang et al., "
                  "ICML 2019)")
