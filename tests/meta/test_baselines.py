"""Baseline, Baseline++ and the RFS linear probe: the cosine head by hand, the hand-written head gradients against
autograd, the unrolled meta-training against a per-task autograd loop, the pre-training objective against a
hand-written cross-entropy over global labels, convergence against scikit-learn's logistic regression, and every
one through ``mtml train`` (pre-training and unrolled), resumed and evaluated from its checkpoint."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.config import Config
from mtml.datasets import FAMILIES, EpisodeSource
from mtml.engine import load_checkpoint
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, Episode, FineTunedHead, baseline, baseline_pp, meta_parameters, meta_step, rfs_linear
from mtml.meta._baselines import cosine_logits, embedding_width
from mtml.nn import MultiTaskModel
from mtml.sampling import FewShotClassification
from mtml.workflows import build, evaluate_run, resume_run, train

from .conftest import TASKS, make_episode, make_model

NAMES = ["baseline", "baseline_pp", "rfs_linear"]
UNROLLED = {"pretrain": False}


def test_cosine_head_by_hand() -> None:
    f = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]], dtype=torch.float64)  # [1 task, 2 examples, 2 dims]
    w = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 2.0, 0.0]]], dtype=torch.float64)  # [1, 2 dims, 3 classes]
    # cos((3,4), (1,0)) = 3/5, cos((3,4), (0,2)) = 4/5, cos((3,4), (-2,0)) = -3/5; (1,0): 1, 0, -1
    expected = 2.5 * torch.tensor([[[0.6, 0.8, -0.6], [1.0, 0.0, -1.0]]], dtype=torch.float64)
    torch.testing.assert_close(cosine_logits(f, w, 2.5), expected)


def head_loss(head: FineTunedHead, x: Tensor, y: Tensor, w: Tensor, ways: int) -> Tensor:
    """The support objective each head descends, written with autograd-friendly ops (summed over tasks)."""
    if head.head == "cosine":
        logits = cosine_logits(x, w, head.scale)
        return sum(F.cross_entropy(logits[t], y[t]) for t in range(x.shape[0]))  # type: ignore[return-value]
    xb = F.pad(F.normalize(x, dim=-1) if head.normalize else x, (0, 1), value=1.0)
    n = x.shape[1]
    l2 = 1.0 / (head.c * n) if head.c is not None else head.l2
    total = torch.zeros((), dtype=x.dtype)
    for t in range(x.shape[0]):
        total = total + F.cross_entropy(xb[t] @ w[t], y[t]) + 0.5 * l2 * w[t, :-1].square().sum()
    return total


@pytest.mark.parametrize("name", NAMES)
def test_hand_gradients_equal_autograd(name: str) -> None:
    """After ``k`` steps the weights equal ``k`` plain gradient steps taken with autograd, at the stated step."""
    model = make_model("mlp")
    head = ALGORITHMS.create(name, model, lr=0.7, **UNROLLED, **({"l2": 0.3} if name == "baseline" else {}))
    assert isinstance(head, FineTunedHead)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    y = torch.arange(6).remainder(3).repeat(3, 1)
    w = head.fit(x, y, 3, 1)
    for steps in (1, 2, 3):
        current = head.fit(x, y, 3, steps)
        if steps == 1:  # from the start: zeros, or the imprinted normalised class means
            if head.head == "cosine":
                xn = F.normalize(x, dim=-1)
                start = F.normalize(torch.stack([torch.stack([xn[t][y[t] == k].mean(0) for k in range(3)], 1)
                                                 for t in range(3)]), dim=1)
            else:
                start = torch.zeros(3, 5, 3, dtype=torch.float64)
            previous = start
        inputs = F.normalize(x, dim=-1) if head.head == "cosine" or head.normalize else x
        if head.head == "linear":
            inputs = F.pad(inputs, (0, 1), value=1.0)
        top = torch.linalg.eigvalsh(inputs.transpose(1, 2) @ inputs).amax(-1).view(3, 1, 1)
        if head.head == "cosine":
            step = 0.7 / (head.scale.detach() ** 2 * top / 12)
        else:
            l2 = 1.0 / (head.c * 6) if head.c is not None else head.l2
            step = 0.7 / (top / 12 + l2)
        leaf = previous.clone().requires_grad_()
        (grad,) = torch.autograd.grad(head_loss(head, x, y, leaf, 3), leaf)  # per-task means, summed
        torch.testing.assert_close(current, previous - step * grad, rtol=1e-10, atol=1e-12)
        previous = current
    assert not torch.equal(w, head.fit(x, y, 3, 2))


@pytest.mark.parametrize("name", ["baseline", "rfs_linear"])
def test_linear_heads_descend_monotonically(name: str) -> None:
    head = ALGORITHMS.create(name, make_model("mlp"), **UNROLLED)
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(2, 10, 5, generator=g, dtype=torch.float64)
    y = torch.arange(10).remainder(5).repeat(2, 1)
    losses = [float(head_loss(head, x, y, head.fit(x, y, 5, k), 5)) for k in range(1, 40)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))
    assert losses[-1] < (0.5 if name == "baseline" else 0.9) * losses[0]  # rfs: the L2 penalty keeps it higher


def test_rfs_probe_converges_to_scikit_learn_logistic_regression() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    head = rfs_linear(make_model("mlp"), steps=2000, c=1.0, pretrain=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 15, 4, generator=g, dtype=torch.float64) + torch.arange(15).remainder(3).view(1, 15, 1)
    y = torch.arange(15).remainder(3).unsqueeze(0)
    q = torch.randn(1, 8, 4, generator=g, dtype=torch.float64)
    ours = torch.softmax(head.predict(torch.nn.Identity(), head.fit(x, y, 3, 2000), q), -1)[0]
    clf = linear_model.LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000)
    clf.fit(F.normalize(x[0], dim=-1).numpy(), y[0].numpy())
    theirs = torch.from_numpy(clf.predict_proba(F.normalize(q[0], dim=-1).numpy()))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def loop_objective(head: FineTunedHead, model: torch.nn.Module, steps: int) -> Tensor:
    """One task at a time: fit the head by autograd gradient steps (kept in the graph), score the query."""
    episode = make_episode("classification")
    losses = []
    for t in range(episode.num_tasks):
        s, q = model(episode.support.x[t])[None], model(episode.query.x[t])[None]
        ys = episode.support.y[t][None]
        if head.head == "cosine":
            sn = F.normalize(s, dim=-1)
            w = F.normalize(torch.stack([sn[0][ys[0] == k].mean(0) for k in range(episode.ways)], 1)[None], dim=1)
            step = head.lr / (head.scale.detach() ** 2 * torch.linalg.eigvalsh((sn.transpose(1, 2) @ sn).detach())
                              .amax() / (2 * s.shape[1]))
        else:
            xb = F.pad(s, (0, 1), value=1.0)
            w = torch.zeros(1, xb.shape[-1], episode.ways, dtype=s.dtype, requires_grad=True)
            step = head.lr / (torch.linalg.eigvalsh((xb.transpose(1, 2) @ xb).detach()).amax() / (2 * s.shape[1]))
        for _ in range(steps):
            (grad,) = torch.autograd.grad(head_loss(head, s, ys, w, episode.ways), w, create_graph=True)
            w = w - step * grad
        logits = cosine_logits(q, w, head.scale) if head.head == "cosine" else F.pad(q, (0, 1), value=1.0) @ w
        losses.append(F.cross_entropy(logits[0], episode.query.y[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("name", ["baseline", "baseline_pp"])
def test_meta_objective_and_gradient_equal_a_per_task_autograd_loop(name: str) -> None:
    model = make_model("mlp")
    head = ALGORITHMS.create(name, model, train_steps=3, lr=0.8, pretrain=False)
    assert isinstance(head, FineTunedHead)
    ours = head.meta_objective(model, make_episode("classification")).objective
    reference = loop_objective(head, model, 3)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    params = [*model.parameters(), *([head.scale] if name == "baseline_pp" else [])]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params), strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_meta_test_fits_steps_and_training_fits_train_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = FineTunedHead.fit

    def spy(self: FineTunedHead, features: Tensor, labels: Tensor, ways: int, steps: int) -> Tensor:
        seen.append(steps)
        return original(self, features, labels, ways, steps)

    monkeypatch.setattr(FineTunedHead, "fit", spy)
    model = make_model("mlp")
    head = baseline_pp(model, steps=17, train_steps=4, pretrain=False)
    episode = make_episode("classification")
    head.meta_objective(model, episode)
    with torch.no_grad():  # meta-test runs under no_grad: the hand gradients need no autograd
        scores = head.evaluate(model, episode, [0])
    assert seen == [4, 17] and torch.isfinite(scores[0]["loss"]).all()


def test_frozen_embedding_at_meta_test() -> None:
    model = make_model("mlp")
    for head in (baseline(model, pretrain=False), baseline(model, num_classes=7)):
        head.evaluate(model, make_episode("classification"), [0])
        assert all(p.grad is None for p in model.parameters())


def test_only_baseline_pp_learns_a_scale() -> None:
    model = make_model("mlp")
    for mode in (UNROLLED, {"num_classes": 7}):
        assert baseline_pp(model, **mode).scale.requires_grad
        assert not baseline_pp(model, learn_scale=False, **mode).scale.requires_grad
        assert not baseline(model, **mode).scale.requires_grad and not rfs_linear(model, **mode).scale.requires_grad
        assert math.isclose(float(baseline_pp(model, scale=4.0, **mode).scale.detach()), 4.0)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("baseline", "steps", 0), ("baseline", "train_steps", 0), ("baseline", "lr", -1.0), ("baseline", "l2", -0.5),
     ("baseline_pp", "scale", 0.0), ("baseline_pp", "lr", 0), ("rfs_linear", "c", 0.0), ("rfs_linear", "steps", -2),
     ("baseline", "pretrain", "yes")],
)
def test_bad_options_are_one_line_config_errors(name: str, option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option) as err:
        ALGORITHMS.create(name, make_model("mlp"), **{"pretrain": False, option: value})
    assert "Got" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [({}, r"needs `num_classes` \(the training sampler's num_classes; got None\)\. Pass num_classes, or "
          r"pretrain=False"),
     ({"num_classes": 1}, r"`num_classes` must be an integer >= 2\. Got 1\."),
     ({"num_classes": 7, "train_steps": 10}, r"`train_steps` sets the support fit that meta-training unrolls, which "
                                             r"only pretrain: false does.*Got train_steps=10\.")],
)
def test_pretraining_options_are_one_line_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        baseline(make_model("mlp"), **options)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_unknown_head_and_regression_are_rejected() -> None:
    model = make_model("mlp")
    with pytest.raises(ConfigError, match=r"`head` must be one of linear, cosine\. Got 'svm'"):
        FineTunedHead(model, head="svm")
    for mode in (UNROLLED, {"num_classes": 7}):
        with pytest.raises(ConfigError, match="classification"):
            baseline(model, **mode).meta_objective(model, make_episode("regression"))


# -- pre-training (the papers' protocol, the default) ----------------------------------------------------------------
NUM_CLASSES = 7


def global_episode(seed: int = 1) -> Episode:
    """The shared classification episode with global class ids: task ``t``'s label ``k`` is base class
    ``classes[t, k]`` of ``NUM_CLASSES`` (drawn without repeats per task)."""
    episode = make_episode("classification", seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    classes = torch.stack([torch.randperm(NUM_CLASSES, generator=g)[: episode.ways] for _ in range(TASKS)])
    return Episode(episode.support, episode.query, episode.ways, classes)


def features_of(model: torch.nn.Module, x: Tensor) -> Tensor:
    return model.features(x[None], "task")[0] if isinstance(model, MultiTaskModel) else model(x)


def reference_pretraining(head: FineTunedHead, model: torch.nn.Module, episode: Episode) -> tuple[Tensor, Tensor]:
    """Written out one example at a time: the mean cross-entropy of the global classifier over every support and
    query example of every task against its global label, and each task's accuracy over the base classes."""
    assert head.classifier is not None and episode.classes is not None
    weight = head.classifier.weight  # [num_classes, d]
    losses, accuracy = [], []
    for t in range(episode.num_tasks):
        right, task_losses = 0, []
        for split in (episode.support, episode.query):
            for i in range(split.x.shape[1]):
                f = features_of(model, split.x[t, i])
                if head.head == "cosine":
                    logits = head.scale * (weight @ f) / (weight.norm(dim=1) * f.norm())
                else:
                    logits = weight @ f + head.classifier.bias
                label = int(episode.classes[t, int(split.y[t, i])])
                task_losses.append(torch.logsumexp(logits, 0) - logits[label])
                right += int(int(logits.argmax()) == label)
        losses.append(torch.stack(task_losses).mean())
        accuracy.append(right / len(task_losses))
    return torch.stack(losses), torch.tensor(accuracy, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mlp", "multitask"])
@pytest.mark.parametrize("name", NAMES)
def test_pretraining_objective_is_the_cross_entropy_over_global_labels(name: str, kind: str) -> None:
    model = make_model(kind)
    head = ALGORITHMS.create(name, model, num_classes=NUM_CLASSES)
    assert isinstance(head, FineTunedHead) and head.pretrain and head.classifier is not None
    assert head.classifier.weight.shape == (NUM_CLASSES, embedding_width(model))
    assert (head.classifier.bias is None) == (name == "baseline_pp")
    episode = global_episode()
    out = head.meta_objective(model, episode)
    losses, accuracy = reference_pretraining(head, model, episode)
    torch.testing.assert_close(out.objective, losses.mean(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out.losses, losses.detach(), rtol=1e-12, atol=1e-13)
    assert out.accuracy is not None and torch.equal(out.accuracy, accuracy)
    assert any(p is head.classifier.weight for p in meta_parameters(head, model))  # the optimiser sees the global head
    unused = {id(p) for n, p in model.named_parameters() if n.startswith("heads.")}  # (the model's own few-way head)
    params = [p for p in meta_parameters(head, model) if id(p) not in unused]
    mine = torch.autograd.grad(out.objective, params)
    reference = torch.autograd.grad(losses.mean(), params)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(float(g.abs().max()) > 0 for g in mine)  # the trunk, the classifier (and Baseline++'s scale) all learn


@pytest.mark.parametrize("name", NAMES)
def test_training_moves_the_global_head_and_meta_test_is_the_support_fit(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fitted: list[int] = []
    original = FineTunedHead.fit

    def spy(self: FineTunedHead, features: Tensor, labels: Tensor, ways: int, steps: int) -> Tensor:
        fitted.append(steps)
        return original(self, features, labels, ways, steps)

    monkeypatch.setattr(FineTunedHead, "fit", spy)
    model = make_model("multitask", seed=2)
    head = ALGORITHMS.create(name, model, num_classes=NUM_CLASSES, steps=13)
    assert isinstance(head, FineTunedHead) and head.classifier is not None
    start = head.classifier.weight.detach().clone()
    optimizer = torch.optim.Adam(meta_parameters(head, model), lr=0.05)
    first = meta_step(head, model, global_episode(seed=0), optimizer)
    for seed in (1, 2, 3, 4, 5, 6, 7) * 5:
        last = meta_step(head, model, global_episode(seed=seed), optimizer)
    assert fitted == []  # training fits no support head
    assert not torch.equal(head.classifier.weight.detach(), start)
    assert last["loss"] < first["loss"]
    # meta-test: the same support fit (13 steps, frozen embedding) as the unrolled mode's, bit for bit
    unrolled = ALGORITHMS.create(name, model, steps=13, pretrain=False)
    with torch.no_grad():
        unrolled.scale.copy_(head.scale)
    episode = global_episode(seed=9)
    ours, theirs = head.evaluate(model, episode, [0]), unrolled.evaluate(model, episode, [0])
    assert fitted == [13, 13]
    assert torch.equal(ours[0]["loss"], theirs[0]["loss"]) and torch.equal(ours[0]["accuracy"], theirs[0]["accuracy"])


def test_an_episode_without_global_classes_is_refused_in_one_line() -> None:
    model = make_model("mlp")
    with pytest.raises(ConfigError, match=r"Episode\.classes is None.*or use pretrain=False") as err:
        baseline(model, num_classes=NUM_CLASSES).meta_objective(model, make_episode("classification"))
    assert "\n" not in str(err.value)


def test_embedding_width() -> None:
    assert embedding_width(make_model("mlp")) == 3  # an nn.Sequential embeds with its output: the last Linear's
    assert embedding_width(make_model("multitask")) == 4  # a MultiTaskModel with its features: the head's input
    with pytest.raises(ConfigError, match=r"cannot tell the width of Tanh's embedding.*use pretrain=False"):
        baseline(torch.nn.Tanh(), num_classes=NUM_CLASSES)


def small_config(name: str, **options: object) -> Config:
    return Config.from_dict({
        "name": f"{name}-tiny", "threads": 1,
        "data": {"dataset": "gaussian_classes",
                 "options": {"classes": 45, "dim": 6, "ways": 3, "shots": 2, "query_shots": 2, "meta_batch": 2}},
        "model": {"trunk_hidden": [8, 8]},
        "training": {"algorithm": name, "algorithm_options": {"steps": 20, **options}, "max_steps": 4,
                     "eval_every": 2, "meta_val_tasks": 6, "meta_test_tasks": 6}})


@pytest.mark.parametrize("name", NAMES)
def test_a_config_build_passes_the_training_samplers_num_classes(name: str) -> None:
    built = build(small_config(name))
    assert built.family is not None and isinstance(built.family.train, FewShotClassification)
    head = built.algorithm
    assert isinstance(head, FineTunedHead) and head.pretrain and head.classifier is not None
    assert head.num_classes == built.family.train.num_classes == 29  # round(0.64 · 45) training classes
    assert head.classifier.in_features == 8  # the trunk's output width
    unrolled = build(small_config(name, pretrain=False, train_steps=3)).algorithm
    assert isinstance(unrolled, FineTunedHead) and unrolled.classifier is None and unrolled.train_steps == 3
    with pytest.raises(ConfigError, match=r"algorithm_options\.num_classes: the number of base classes comes from "
                                          r"the data \(data\.dataset 'gaussian_classes'\); drop the option"):
        build(small_config(name, num_classes=5))


class _WithoutClasses:
    """A classification sampler whose episodes carry no global class ids (and that has no num_classes)."""

    def __init__(self, inner: FewShotClassification) -> None:
        self.inner = inner
        self.ways, self.shots, self.query_shots, self.meta_batch = inner.ways, inner.shots, inner.query_shots, 2

    def sample(self, generator: torch.Generator) -> Episode:
        e = self.inner.sample(generator)
        return Episode(e.support, e.query, e.ways)


def _classless_family(*, seed: int = 0) -> EpisodeSource:
    source = FAMILIES.get("gaussian_classes")(classes=45, dim=6, ways=3, shots=2, query_shots=2, meta_batch=2,
                                              seed=seed)
    train_, val, test = (_WithoutClasses(s) for s in (source.train, source.val, source.test))  # type: ignore[arg-type]
    return EpisodeSource(train_, val, test, source.input_shape, source.num_outputs, "classification")


def test_a_family_without_global_classes_refuses_pretraining_naming_the_dataset_and_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FAMILIES._items, "classless", _classless_family)
    config = small_config("baseline").model_dump()
    config["data"] = {"dataset": "classless", "options": {}}
    with pytest.raises(ConfigError) as err:
        build(Config.from_dict(config))
    message = str(err.value)
    assert "\n" not in message and "data.dataset 'classless'" in message
    assert "set training.algorithm_options.pretrain: false" in message
    config["training"]["algorithm_options"] = {"steps": 20, "pretrain": False}
    assert isinstance(build(Config.from_dict(config)).algorithm, FineTunedHead)  # the unrolled mode still trains


def test_pretrained_run_checkpoints_resumes_and_evaluates_with_its_global_head(tmp_path: Path) -> None:
    config = small_config("baseline_pp")
    start = build(config).algorithm
    assert isinstance(start, FineTunedHead) and start.classifier is not None
    run, result = train(config, tmp_path / "run")
    assert result.fit.steps == 4
    tensors = load_checkpoint(run.path / "checkpoints" / "best.safetensors").tensors
    saved = tensors["algorithm.classifier.weight"]
    assert saved.shape == start.classifier.weight.shape and not torch.equal(saved, start.classifier.weight.detach())
    assert "algorithm.scale" in tensors
    _, again = resume_run(run.path)
    assert again.fit.steps == 4
    from mtml.workflows import load_source  # the best checkpoint, global head included, back in a fresh build

    source, _ = load_source(run.path)
    assert isinstance(source.algorithm, FineTunedHead) and source.algorithm.classifier is not None
    assert torch.equal(source.algorithm.classifier.weight.detach(), saved)
    scores = evaluate_run(run.path, num_tasks=5)["gaussian_classes"]
    assert scores["num_tasks"] == 5 and 0 <= scores["accuracy@0"] <= 1


@pytest.mark.parametrize("mode", ["pretrain", "unrolled"])
@pytest.mark.parametrize("name", NAMES)
def test_mtml_train_from_yaml(tmp_path: Path, name: str, mode: str) -> None:
    options = "{steps: 20}" if mode == "pretrain" else "{pretrain: false, steps: 20, train_steps: 3}"
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}-tiny\nthreads: 1\n"
                   "data: {dataset: gaussian_classes, options: {classes: 45, dim: 6, ways: 3, shots: 2, "
                   "query_shots: 2, meta_batch: 2}}\nmodel: {trunk_hidden: [8, 8]}\n"
                   f"training: {{algorithm: {name}, algorithm_options: {options}, max_steps: 4, "
                   "eval_every: 2, meta_val_tasks: 6, meta_test_tasks: 6}\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "meta-test over 6 held-out tasks" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == name and summary["test"]["gaussian_classes"]["num_tasks"] == 6
    keys = load_checkpoint(out / "checkpoints" / "best.safetensors").tensors
    assert ("algorithm.classifier.weight" in keys) == (mode == "pretrain")
    if mode == "pretrain":  # an old config that sets train_steps without pretrain: false is told what changed
        bad = subprocess.run([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(tmp_path / "bad"),
                              "--quiet", "--set", "training.algorithm_options.train_steps=3"],
                             capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert "only pretrain: false does" in bad.stderr


def _uneven_family(*, shots: int = 1, query_shots: int = 2, seed: int = 0) -> EpisodeSource:
    """24 Gaussian classes, alternately with 6 and 12 examples (training: the first 12, validation 6, test 6): how
    many are eligible depends on the shots."""
    g = torch.Generator().manual_seed(seed)
    counts = [6, 12] * 12
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = 3.0 * torch.randn(24, 5, generator=g)[y] + torch.randn(len(y), 5, generator=g)
    samplers = [FewShotClassification(x, y, ways=3, shots=shots, query_shots=query_shots, meta_batch=2,
                                      classes=range(start, stop)) for start, stop in ((0, 12), (12, 18), (18, 24))]
    return EpisodeSource(*samplers, (5,), 3, "classification")


def test_evaluating_with_more_shots_keeps_the_trained_classifier_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mtml eval --shots`` rebuilds the family with other shots, which leaves fewer classes eligible here; the
    global classifier keeps the size the run trained (and checkpointed) with, so the checkpoint still loads."""
    monkeypatch.setitem(FAMILIES._items, "uneven", _uneven_family)
    config = small_config("baseline").model_dump()
    config["data"] = {"dataset": "uneven", "options": {"shots": 1, "query_shots": 2}}
    config = Config.from_dict(config)
    assert build(config, shots=6).family.train.num_classes < build(config).family.train.num_classes  # type: ignore[union-attr]
    run, _ = train(config, tmp_path / "run")
    scores = evaluate_run(run.path, num_tasks=4, shots=6)["uneven"]
    assert scores["num_tasks"] == 4
