"""Fine-tuned heads on a frozen embedding: Baseline, Baseline++ and the RFS logistic-regression probe.

- Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019 (Baseline, Baseline++).
- Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good Embedding Is All
  You Need?", ECCV 2020 (logistic regression on L2-normalised embeddings).

At meta-test all three follow their papers: a new classifier is trained on the embeddings of the support set for
a fixed number of steps while the embedding stays frozen, then scores the query.

Training follows them too by default (``pretrain=True``): the embedding is pre-trained with one classifier over
all ``num_classes`` base classes by ordinary cross-entropy, as a standard classification network — Baseline and
the RFS probe with a linear layer on the raw features, Baseline++ with its cosine classifier (Chen et al. train
Baseline++ with the cosine layer as well). Every episode is a mini-batch: the support and query examples of all
its tasks, pooled, labelled with their global class ids (``episode.classes[t, y]``, which
:class:`~mtml.sampling.FewShotClassification` records). The global classifier (:attr:`FineTunedHead.classifier`)
is a submodule of the algorithm, so :func:`~mtml.meta.meta_parameters` trains it and checkpoints carry it; it
plays no part at meta-test. The papers' other training details (data augmentation, Tian et al.'s
self-distillation) are not reproduced.

``pretrain=False`` keeps the episodic stand-in mtml had before episodes carried class ids: during meta-training
each task's head is fitted on its support embeddings by ``train_steps`` steps of the test-time procedure, from
the same start, and the query cross-entropy is back-propagated through those unrolled steps into the embedding
(and Baseline++'s scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml._checks import check_int, check_positive
from mtml.errors import ConfigError
from mtml.meta._base import MetaAlgorithm, MetaOutput
from mtml.meta._episode import Episode, episode_losses, task_accuracy
from mtml.meta._functional import embed
from mtml.meta._mlp import single_head
from mtml.nn import MultiTaskModel
from mtml.tasks import Split

__all__ = ["FineTunedHead", "baseline", "baseline_pp", "cosine_logits", "embedding_width", "rfs_linear"]

_HEADS = ("linear", "cosine")


def cosine_logits(features: Tensor, weights: Tensor, scale: Tensor | float) -> Tensor:
    """Baseline++ logits ``scale · cos(f, w_k)``: ``features: [tasks, n, d]``, ``weights: [tasks, d, ways]``."""
    return scale * (F.normalize(features, dim=-1) @ F.normalize(weights, dim=1))


def _with_bias(features: Tensor) -> Tensor:
    return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)


def embedding_width(model: nn.Module) -> int:
    """The width of the embedding :func:`~mtml.meta.embed` gives: for a :class:`~mtml.nn.MultiTaskModel` the
    input width of its head's first ``nn.Linear`` (else its trunk's ``out_features``), for any other module the
    ``out_features`` of its last ``nn.Linear``; :class:`ConfigError` when neither is there."""
    if isinstance(model, MultiTaskModel):
        for module in model.heads[single_head(model)].modules():
            if isinstance(module, nn.Linear):
                return int(module.in_features)
        width = getattr(model.trunk, "out_features", None)
    else:
        width = next((m.out_features for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if not isinstance(width, int):
        raise ConfigError(f"cannot tell the width of {type(model).__name__}'s embedding (no nn.Linear head or "
                          "trunk out_features) to build the pre-training classifier; use pretrain=False.")
    return width


def _top_eigenvalue(x: Tensor) -> Tensor:
    """``λ_max(xᵀx)`` per task ``[tasks, 1, 1]`` of ``x: [tasks, n, d]`` (detached; from the smaller Gram)."""
    x = x.detach()
    gram = x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x
    return torch.linalg.eigvalsh(gram).amax(-1).view(-1, 1, 1)


class FineTunedHead(MetaAlgorithm):
    """A classifier trained from scratch on each task's support embeddings, by full-batch gradient descent.

    ``head="linear"``: logits ``[f, 1] W`` (Baseline; with ``normalize``, ``f`` is L2-normalised first, the RFS
    probe), starting from ``W = 0``; the loss is the mean support cross-entropy plus ``l2/2 · ‖W‖²`` (bias row
    unpenalised), convex, and the step is ``lr / L`` with ``L = λ_max(f̃ᵀf̃)/(2n) + l2`` its curvature bound
    (Böhning's bound on the softmax Hessian), so ``lr ≤ 1`` descends monotonically.

    ``head="cosine"``: logits ``scale · cos(f, w_k)`` (Baseline++), starting from the normalised class means of
    the normalised support embeddings (weight imprinting; the paper starts from a random matrix, which would
    need a generator), step ``lr / L`` with ``L = scale² · λ_max(f̂ᵀf̂)/(2n)``; steps are orthogonal to each
    ``w_k``, so ``‖w_k‖`` never shrinks below 1 and the bound holds. ``scale`` is a parameter of this module,
    meta-learned unless ``learn_scale`` is false.

    The gradients are written by hand, so the fit runs under ``torch.no_grad`` at meta-test. Training
    (:meth:`meta_objective`) is the papers' pre-training by default: cross-entropy of a global classifier over
    ``num_classes`` base classes on every example of the episode (support and query pooled) against its global
    class id (see the module docstring); with ``pretrain=False`` it is the unrolled support fit of
    ``train_steps`` steps, differentiated by autograd. Classification episodes only. The embedding is
    ``model.features(x)`` for a :class:`~mtml.nn.MultiTaskModel` and ``model(x)`` otherwise.

    Args:
        model: the feature extractor (its first parameter fixes dtype and device of ``scale`` and of the
            global classifier; its embedding width, :func:`embedding_width`, the classifier's inputs).
        head: ``"linear"`` or ``"cosine"``.
        normalize: L2-normalise the embeddings before a linear head (at meta-test; pre-training, as Tian et
            al.'s, classifies the raw embeddings).
        steps: head-fitting steps at meta-test (Chen et al. train 100 iterations).
        train_steps: head-fitting steps during meta-training, back-propagated through (``pretrain=False`` only;
            default 10).
        lr: step size as a fraction of ``1 / L``.
        l2: weight decay of a linear head (``ridge`` on ``W``, not the bias).
        c: inverse regularisation strength as in scikit-learn's ``LogisticRegression(C=c)`` (what Tian et al.
            call), i.e. ``l2 = 1 / (c · n_support)``; overrides ``l2`` when given.
        scale: initial cosine scale (of the test-time head and, pre-training, of the global cosine classifier).
        learn_scale: meta-learn the cosine scale.
        pretrain: train as the papers do, by classifying the base classes (``True``), or through the unrolled
            support fit (``False``).
        num_classes: the base classes the global classifier tells apart (needed by ``pretrain``): the training
            sampler's ``num_classes``, which episodes' ``classes`` index (config runs pass it).
    """

    #: the global classifier of pre-training (``None`` with ``pretrain=False``)
    classifier: nn.Linear | None

    def __init__(self, model: nn.Module, /, *, head: str = "linear", normalize: bool = False, steps: int = 100,
                 train_steps: int | None = None, lr: float = 1.0, l2: float = 0.0, c: float | None = None,
                 scale: float = 10.0, learn_scale: bool = True, pretrain: bool = True,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if head not in _HEADS:
            raise ConfigError(f"`head` must be one of {', '.join(_HEADS)}. Got {head!r}.")
        for name, flag in (("normalize", normalize), ("learn_scale", learn_scale), ("pretrain", pretrain)):
            if not isinstance(flag, bool):
                raise ConfigError(f"`{name}` must be true or false. Got {flag!r}.")
        self.head = head
        self.normalize = normalize
        self.pretrain = pretrain
        self.steps = check_int("steps", steps, 1, "Fit the head for at least one step; Chen et al. use 100.")
        if pretrain and train_steps is not None:
            raise ConfigError(f"`train_steps` sets the support fit that meta-training unrolls, which only pretrain: "
                              f"false does; pre-training (pretrain: true, the default) fits no support head while "
                              f"training. Got train_steps={train_steps!r}. Drop it, or set pretrain: false to keep the "
                              "unrolled training.")
        self.train_steps = None if pretrain else check_int(
            "train_steps", 10 if train_steps is None else train_steps, 1,
            "Fit the head for at least one step while meta-training; try 10.")
        self.lr = check_positive("lr", lr, "The step is lr / L for the curvature bound L; try 1.0.")
        if isinstance(l2, bool) or not isinstance(l2, int | float) or not 0 <= l2 < float("inf"):
            raise ConfigError(f"`l2` must be a finite number >= 0. Got {l2!r}. Use 0 for no weight decay.")
        self.l2 = float(l2)
        self.c = None if c is None else check_positive("c", c, "It is scikit-learn's C; Tian et al. use 1.0.")
        check_positive("scale", scale, "The cosine scale must be positive; try 10.0.")
        like = next(iter(model.parameters()), None)
        dtype, device = (like.dtype, like.device) if like is not None else (None, None)
        self.scale = nn.Parameter(torch.tensor(float(scale), dtype=dtype, device=device),
                                  requires_grad=learn_scale and head == "cosine")
        self.classifier = None
        self.num_classes: int | None = None
        if pretrain:
            if num_classes is None:
                raise ConfigError("pretrain (the default of baseline, baseline_pp and rfs_linear) trains one "
                                  "classifier over all base classes, so it needs `num_classes` (the training "
                                  "sampler's num_classes; got None). Pass num_classes, or pretrain=False for the "
                                  "unrolled meta-training.")
            self.num_classes = check_int("num_classes", num_classes, 2,
                                         "Pre-training tells at least 2 base classes apart.")
            self.classifier = nn.Linear(embedding_width(model), self.num_classes, bias=head == "linear",
                                        dtype=dtype, device=device)

    def check_episode(self, episode: Episode) -> None:
        if not episode.is_classification:
            raise ConfigError(f"{type(self).__name__} trains a classifier on the support set, so it needs a "
                              "classification episode (integer labels); for regression use 'ridge' or MAML.")

    # -- pre-training ------------------------------------------------------------------------------------------
    def global_logits(self, features: Tensor) -> Tensor:
        """The global classifier's logits ``[tasks, n, num_classes]`` of ``features: [tasks, n, d]``: ``f Wᵀ + b``
        (linear) or ``scale · cos(f, w_k)`` (cosine)."""
        if self.classifier is None:
            raise ConfigError("this FineTunedHead was built with pretrain=False, so it has no global classifier.")
        if self.head == "cosine":
            return cosine_logits(features, self.classifier.weight.t().unsqueeze(0), self.scale)
        return self.classifier(features)

    @staticmethod
    def global_labels(episode: Episode) -> Tensor:
        """The global class ids ``[tasks, shots + query_shots]`` of the support then query examples of each task."""
        if episode.classes is None:
            raise ConfigError("pretrain trains one classifier over the base classes' global ids, but this episode "
                              "carries none (Episode.classes is None); draw episodes with a sampler that records them "
                              "(mtml.sampling.FewShotClassification does) or use pretrain=False.")
        return episode.classes.gather(1, torch.cat([episode.support.y, episode.query.y], 1))

    def pretrain_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """Mean cross-entropy of the global classifier on all the episode's examples (support and query pooled)
        against their global labels; per-task losses and accuracies over the ``num_classes`` base classes."""
        self.check_episode(episode)
        labels = self.global_labels(episode)
        logits = self.global_logits(embed(model, torch.cat([episode.support.x, episode.query.x], 1)))
        losses = episode_losses(logits, labels)
        with torch.no_grad():
            accuracy = task_accuracy(logits, labels)
        return MetaOutput(losses.mean(), losses.detach(), accuracy)

    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """Training: :meth:`pretrain_objective` (``pretrain``), else the query loss after the unrolled support
        fit of ``train_steps`` steps."""
        if self.pretrain:
            return self.pretrain_objective(model, episode)
        return super().meta_objective(model, episode)

    def _inputs(self, features: Tensor) -> Tensor:
        if self.head == "cosine":
            return F.normalize(features, dim=-1)
        return _with_bias(F.normalize(features, dim=-1) if self.normalize else features)

    def fit(self, features: Tensor, labels: Tensor, ways: int, steps: int) -> Tensor:
        """Head weights after ``steps`` gradient steps: ``[tasks, d + 1, ways]`` (linear, last row the bias) or
        ``[tasks, d, ways]`` (cosine) from ``features: [tasks, n, d]`` and ``labels: [tasks, n]``."""
        x = self._inputs(features)
        n = x.shape[1]
        onehot = F.one_hot(labels, ways).to(x.dtype)  # [tasks, n, ways]
        if self.head == "cosine":
            counts = onehot.sum(1).clamp_min(1.0).unsqueeze(1)
            w = F.normalize(x.transpose(1, 2) @ onehot / counts, dim=1)  # imprinted class means
            step = self.lr / (self.scale.detach() ** 2 * _top_eigenvalue(x) / (2 * n)).clamp_min(1e-12)
            for _ in range(steps):
                norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
                unit = w / norm
                residual = torch.softmax(self.scale * (x @ unit), -1) - onehot
                grad_unit = self.scale * (x.transpose(1, 2) @ residual) / n
                grad = (grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True)) / norm
                w = w - step * grad
            return w
        l2 = 1.0 / (self.c * n) if self.c is not None else self.l2
        decay = torch.ones(x.shape[-1], 1, dtype=x.dtype, device=x.device)
        decay[-1] = 0.0  # the bias row is not penalised
        step = self.lr / (_top_eigenvalue(x) / (2 * n) + l2).clamp_min(1e-12)
        w = x.new_zeros(x.shape[0], x.shape[-1], ways)
        for _ in range(steps):
            residual = torch.softmax(x @ w, -1) - onehot
            w = w - step * (x.transpose(1, 2) @ residual / n + l2 * decay * w)
        return w

    def adapt(self, model: nn.Module, support: Split, *, ways: int = 0, train: bool = True) -> Tensor:
        if support.y.is_floating_point() or ways <= 0:
            raise ConfigError(f"{type(self).__name__} needs integer labels and the number of ways (> 0). "
                              f"Got ways={ways}.")
        steps = self.train_steps if train and self.train_steps is not None else self.steps
        return self.fit(embed(model, support.x), support.y, ways, steps)

    def predict(self, model: nn.Module, adapted: Tensor, x: Tensor) -> Tensor:
        """Logits ``[tasks, n, ways]`` of the fitted heads."""
        features = embed(model, x)
        if self.head == "cosine":
            return cosine_logits(features, adapted, self.scale)
        return self._inputs(features) @ adapted


def baseline(model: nn.Module, /, *, steps: int = 100, train_steps: int | None = None, lr: float = 1.0,
             l2: float = 0.0, pretrain: bool = True, num_classes: int | None = None) -> FineTunedHead:
    """Baseline (Chen et al., ICLR 2019): an embedding pre-trained as a classifier of the base classes, then a
    linear classifier trained on the frozen support embeddings of each test task."""
    return FineTunedHead(model, head="linear", steps=steps, train_steps=train_steps, lr=lr, l2=l2, pretrain=pretrain,
                         num_classes=num_classes)


def baseline_pp(model: nn.Module, /, *, steps: int = 100, train_steps: int | None = None, lr: float = 1.0,
                scale: float = 10.0, learn_scale: bool = True, pretrain: bool = True,
                num_classes: int | None = None) -> FineTunedHead:
    """Baseline++ (Chen et al., ICLR 2019): as Baseline with a cosine-similarity classifier (learned scale), in
    pre-training and at test time."""
    return FineTunedHead(model, head="cosine", steps=steps, train_steps=train_steps, lr=lr, scale=scale,
                         learn_scale=learn_scale, pretrain=pretrain, num_classes=num_classes)


def rfs_linear(model: nn.Module, /, *, steps: int = 300, train_steps: int | None = None, lr: float = 1.0,
               c: float = 1.0, pretrain: bool = True, num_classes: int | None = None) -> FineTunedHead:
    """The RFS linear probe (Tian et al., ECCV 2020): an embedding pre-trained as a classifier of the base classes,
    then L2-regularised logistic regression (scikit-learn's ``C = c``) on L2-normalised frozen support
    embeddings, fitted by ``steps`` gradient steps rather than L-BFGS to convergence."""
    return FineTunedHead(model, head="linear", normalize=True, steps=steps, train_steps=train_steps, lr=lr, c=c,
                         pretrain=pretrain, num_classes=num_classes)
