"""The seed architecture: a shared meta-learner Dense(100→10) and a task learner Dense(10→1) per task.

Thirty synthetic linear-regression tasks share a hidden 100→10 projection A (y = wᵢ·(A x) + noise) but each has
only 80 training examples — too few to fit 100 weights alone. Trained jointly, the shared layer recovers A's
row space; trained separately (same architecture, one trunk per task), each model overfits.

Run:  .venv/bin/python examples/seed_model.py
"""

from __future__ import annotations

import torch

from mtml import StopRule, build_multitask_model, train_multitask
from mtml.datasets import shared_projection, synthetic_linear


def subspace_overlap(learned: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of the learned rows' energy inside the row space of ``true`` (1 = the same subspace)."""
    q, _ = torch.linalg.qr(true.T)  # orthonormal basis of the true row space, [in_dim, latent]
    inside = learned @ q
    return float((inside**2).sum() / (learned**2).sum())


def main() -> None:
    torch.manual_seed(0)
    tasks = synthetic_linear(num_tasks=30, in_dim=100, latent_dim=10, n_train=80, seed=0)
    stop = StopRule(max_steps=4000, eval_every=50, patience=30)
    results = {}
    for label, share in (("multi-task (shared Dense 100→10)", True), ("single-task (one trunk per task)", False)):
        model = build_multitask_model(tasks, trunk_hidden=[10], activation="linear", share_trunk=share)
        result = train_multitask(model, tasks, lr=3e-3, batch_size=64, stop=stop, seed=0)
        mse = sum(m["mse"] for m in result.test.values()) / len(result.test)
        results[label] = (model, mse, result.fit.best_step)
    for label, (_, mse, step) in results.items():
        print(f"{label:36s} mean test MSE {mse:.4f}   (best step {step})")
    shared = next(iter(results.values()))[0].trunk[0].weight.detach()  # the Dense(100→10) meta-learner
    a = shared_projection(in_dim=100, latent_dim=10, seed=0)
    random = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    print(f"shared layer inside the true 10-d subspace: {subspace_overlap(shared, a):.1%} of its energy "
          f"(a random 100→10 layer: {subspace_overlap(random, a):.1%})")


if __name__ == "__main__":
    main()
