"""GPU check of the Jacobian path: on CUDA, ``train_multitask`` with each Jacobian weighting uses the ``batched``
Jacobian every step and lowers the validation loss; four float64 ``joint_step`` updates on CUDA equal CPU's.
Prints one OK/FAIL line per check.

    python benchmarks/jacobian_gpu_check.py        # needs a CUDA device
"""

from __future__ import annotations

import torch

import mtml.engine._joint as joint
from mtml.datasets import synthetic_linear
from mtml.engine import StopRule, evaluate, joint_step, objective, train_multitask
from mtml.nn import build_multitask_model
from mtml.weighting import WEIGHTINGS

assert torch.cuda.is_available()
tasks = synthetic_linear(num_tasks=4, in_dim=10, latent_dim=3, n_train=30, n_val=30, n_test=20, seed=2)
backends: list[str] = []
real = joint.task_jacobian
joint.task_jacobian = lambda losses, params, backend: (backends.append(backend),  # type: ignore[assignment]
                                                       real(losses, params, backend=backend))[1]
names = ["graddrop", "moco", "excess_mtl", "trimmed_mean"]
for name in names:
    torch.manual_seed(1)
    model = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh")
    before = objective(evaluate(model, tasks, "val"))
    backends.clear()
    r = train_multitask(model, tasks, weighting=name, lr=3e-2, batch_size=16,
                        stop=StopRule(max_steps=60, eval_every=20, patience=0), seed=0, device="cuda")
    after = objective(r.val)
    ok = after < 0.6 * before and set(backends) == {"batched"} and len(backends) == 60
    print(f"train {name}: backends {set(backends)} x{len(backends)}, val {before:.4f} -> {after:.4f}",
          "OK" if ok else "FAIL")
for name in names:
    states = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh").double().to(dev)
        w = WEIGHTINGS.create(name, [t.name for t in tasks], jacobian="batched").to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = {t.name: (t.train.x.double().to(dev), t.train.y.double().to(dev)) for t in tasks}
        for _ in range(4):
            joint_step(model, {t.name: t for t in tasks}, batch, w, opt)
        states.append({k: v.cpu() for k, v in model.state_dict().items()})
    diff = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
    print(f"cpu vs cuda, 4 float64 steps, {name}: max |Δθ| = {diff:.2e}", "OK" if diff < 1e-9 else "FAIL")
