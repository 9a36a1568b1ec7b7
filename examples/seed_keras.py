"""The seed architecture written in Keras 3: a shared meta-learner Dense(100→10), a task learner Dense(10→1) per task.

The same thirty synthetic linear-regression tasks as ``examples/seed_model.py`` (a shared hidden 100→10 projection,
80 training rows each), with the layers built in Keras (PyTorch backend) and wrapped by :func:`mtml.nn.from_keras`:

1. trained jointly by :func:`mtml.train_multitask` — multi-task (one shared trunk) against single-task (a trunk
   per task), as in ``seed_model.py``;
2. meta-learned with MAML (Finn et al. 2017), the head adapted in the inner loop (``adapt="heads"``, started at zero
   for each task): each meta-step draws 10 tasks and splits each one's training rows into 40 support and 40 query
   rows; at the end every task adapts on all its 80 training rows and is scored on its test rows.

``--torch`` runs the identical script on ``torch.nn.Linear`` layers instead, for comparison; ``--equivalence`` only
compares gradients of the Keras models with those of ``nn.Linear`` twins holding the same weights.

Run:  .venv/bin/python examples/seed_keras.py [--torch | --equivalence]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

import argparse
import time

import keras
import torch
from torch import nn

from mtml import StopRule, train_multitask
from mtml.datasets import shared_projection, synthetic_linear
from mtml.meta import ALGORITHMS, Episode, meta_evaluate, meta_step
from mtml.nn import MultiTaskModel, from_keras
from mtml.tasks import Split, Task


def dense(d_in: int, d_out: int, seed: int, use_torch: bool) -> nn.Module:
    """A ``d_in → d_out`` linear layer: a Keras ``Dense`` wrapped by :func:`from_keras`, or ``nn.Linear``.

    The Keras layer is initialised like ``nn.Linear`` (weights and bias ~ U(±1/√d_in)) rather than with Keras'
    Glorot default, whose 2.3× larger trunk weights make the same MAML inner step size too large.
    """
    if use_torch:
        return nn.Linear(d_in, d_out)
    bound = d_in**-0.5
    layer = keras.layers.Dense(d_out, kernel_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
                               bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed + 1))
    return from_keras(keras.Sequential([keras.Input((d_in,)), layer]))


def joint_model(tasks: list[Task], share: bool, use_torch: bool) -> MultiTaskModel:
    """``seed_model.py``'s model: a shared trunk (or, for the single-task baseline, a trunk per task as its stem
    in front of an identity trunk) and a linear head per task."""
    heads = {t.name: dense(10, 1, 1000 + 2 * i, use_torch) for i, t in enumerate(tasks)}
    if share:
        return MultiTaskModel(dense(100, 10, 0, use_torch), heads)
    stems = {t.name: dense(100, 10, 2000 + 2 * i, use_torch) for i, t in enumerate(tasks)}
    return MultiTaskModel(nn.Identity(), heads, stems)


def subspace_overlap(learned: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of the learned rows' energy inside the row space of ``true`` (1 = the same subspace)."""
    q, _ = torch.linalg.qr(true.T)
    return float(((learned @ q) ** 2).sum() / (learned**2).sum())


def trunk_rows(trunk: nn.Module) -> torch.Tensor:
    """The trunk's ``[10, 100]`` weight, however it was built (a Keras kernel is stored ``[in, out]``)."""
    params = dict(trunk.named_parameters())
    return (params["0.kernel"].T if "0.kernel" in params else params["weight"]).detach()


def meta_episode(tasks: list[Task], meta_batch: int, g: torch.Generator) -> Episode:
    """``meta_batch`` random tasks, each one's training rows split at random into support and query halves."""
    picks = torch.randperm(len(tasks), generator=g)[:meta_batch].tolist()
    rows = [torch.randperm(tasks[i].train.x.shape[0], generator=g) for i in picks]
    half = rows[0].numel() // 2

    def split(part: slice) -> Split:
        return Split(torch.stack([tasks[i].train.x[r[part]] for i, r in zip(picks, rows, strict=True)]),
                     torch.stack([tasks[i].train.y[r[part]] for i, r in zip(picks, rows, strict=True)]))

    return Episode(split(slice(None, half)), split(slice(half, None)))


def maml(tasks: list[Task], use_torch: bool, steps: int = 400) -> tuple[MultiTaskModel, dict[str, float]]:
    """Meta-learn the trunk with MAML adapting the head; score every task on its test rows after adapting on its
    training rows."""
    model = MultiTaskModel(dense(100, 10, 0, use_torch), {"task": dense(10, 1, 1000, use_torch)})
    algorithm = ALGORITHMS.create("maml", model, adapt="heads", zero_head=True, inner_lr=0.3, inner_steps=5)
    optimizer = torch.optim.Adam(model.trunk.parameters(), lr=3e-3)  # the head starts at zero: nothing to learn
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        meta_step(algorithm, model, meta_episode(tasks, 10, g), optimizer)
    test = Episode(Split(torch.stack([t.train.x for t in tasks]), torch.stack([t.train.y for t in tasks])),
                   Split(torch.stack([t.test.x for t in tasks]), torch.stack([t.test.y for t in tasks])))
    return model, meta_evaluate(algorithm, model, [test], steps=[0, 5, 50], num_tasks=len(tasks))


def as_torch(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` holding a wrapped Keras ``Dense``'s weights (its kernel is stored ``[in, out]``)."""
    kernel, bias = module.get_parameter("0.kernel"), module.get_parameter("0.bias")
    linear = nn.Linear(*kernel.shape)
    with torch.no_grad():
        linear.weight.copy_(kernel.T)
        linear.bias.copy_(bias)
    return linear


def worst_gap(keras_model: nn.Module, torch_model: nn.Module) -> float:
    """The largest gradient difference over all parameters, relative to each one's largest torch entry."""
    gaps = []
    for (name, k), (_, t) in zip(keras_model.named_parameters(), torch_model.named_parameters(), strict=True):
        assert k.grad is not None and t.grad is not None and float(t.grad.abs().max()) > 0
        kg = k.grad.T if name.endswith("kernel") else k.grad
        gaps.append(float((kg - t.grad).abs().max() / t.grad.abs().max()))
    return max(gaps)


def equivalence(tasks: list[Task]) -> None:
    """The Keras models against ``nn.Linear`` twins holding the same weights: a joint training gradient and a
    MAML meta-gradient, on the vmap path and on the task loop."""
    keras_model = joint_model(tasks, True, use_torch=False)
    torch_model = MultiTaskModel(as_torch(keras_model.trunk), {n: as_torch(h) for n, h in keras_model.heads.items()})
    outputs = []
    for model in (keras_model, torch_model):
        out = model.forward_many({t.name: t.train.x for t in tasks})
        sum(((out[t.name].squeeze(-1) - t.train.y) ** 2).mean() for t in tasks).backward()
        outputs.append(torch.cat(list(out.values())).detach())
    gap = float((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max())
    print(f"joint step: outputs differ by {gap:.1e}, gradients by {worst_gap(keras_model, torch_model):.1e} "
          "(relative to each tensor's largest entry)")
    episode = meta_episode(tasks, 10, torch.Generator().manual_seed(0))
    for label, vmap in (("vmap over tasks", None), ("task loop", False)):
        trunk = dense(100, 10, 0, use_torch=False)
        if vmap is False:
            trunk = from_keras(trunk.keras_model, vmap=False)
        keras_meta = MultiTaskModel(trunk, {"task": dense(10, 1, 1000, use_torch=False)})
        torch_meta = MultiTaskModel(as_torch(keras_meta.trunk), {"task": as_torch(keras_meta.heads["task"])})
        for model in (keras_meta, torch_meta):
            algorithm = ALGORITHMS.create("maml", model, adapt="heads", inner_lr=0.3, inner_steps=5)
            algorithm.meta_objective(model, episode).objective.backward()
        print(f"MAML meta-gradient ({label}): differs by {worst_gap(keras_meta, torch_meta):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="torch.nn.Linear layers instead of Keras Dense")
    parser.add_argument("--equivalence", action="store_true", help="only compare Keras and torch gradients")
    args = parser.parse_args()
    use_torch = args.torch
    torch.manual_seed(0)
    tasks = synthetic_linear(num_tasks=30, in_dim=100, latent_dim=10, n_train=80, seed=0)
    if args.equivalence:
        equivalence(tasks)
        return
    a = shared_projection(in_dim=100, latent_dim=10, seed=0)
    stop = StopRule(max_steps=4000, eval_every=50, patience=30)
    print(f"layers: {'torch.nn.Linear' if use_torch else f'keras {keras.__version__} Dense via mtml.nn.from_keras'}")
    for label, share in (("multi-task (shared Dense 100→10)", True), ("single-task (one trunk per task)", False)):
        start = time.perf_counter()
        model = joint_model(tasks, share, use_torch)
        result = train_multitask(model, tasks, lr=3e-3, batch_size=64, stop=stop, seed=0)
        mse = sum(m["mse"] for m in result.test.values()) / len(result.test)
        inside = subspace_overlap(trunk_rows(model.trunk), a) if share else 0.0
        overlap = f", trunk inside the true subspace {inside:.1%}" if share else ""
        print(f"{label:36s} mean test MSE {mse:.4f}   (best step {result.fit.best_step}{overlap}; "
              f"{time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    model, scores = maml(tasks, use_torch)
    print(f"{'MAML, head adapted (zero start)':36s} mean test MSE {scores['loss@5']:.4f} after 5 inner steps, "
          f"{scores['loss@50']:.4f} after 50 (before: {scores['loss@0']:.4f}; trunk inside the true subspace "
          f"{subspace_overlap(trunk_rows(model.trunk), a):.1%}; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
