"""Step time of gradient weightings: mtml next to LibMTL 1.1.5 and TorchJD on the same model and batch.

One step = forward of every task's mini-batch through ``MultiTaskModel.forward_many`` (rows concatenated, the
trunk run once), per-task gradient information, the method, and gradients left in ``.grad`` (no optimiser
update, identical for all). All implementations run on the same mtml model and the same batch, interleaved
round by round in one process, so ratios are measured under the same machine load.

* mtml — ``joint_step``'s code path with the weighting's ``gramian`` backend (``auto`` = the fastest exact way,
  reported as ``used``; ``representation`` = the cheaper representation-level variant);
* LibMTL — its weighting class's ``backward(losses)`` (one ``backward`` per task, then the method on the flat
  per-task gradients); the library has no Nash-MTL, Aligned-MTL, UPGrad or DB-MTL;
* TorchJD — ``mtl_backward(losses, features)`` (one vmapped backward for the Jacobian) then ``jac_to_grad`` with
  the method's aggregator; it has no GradNorm, FAMO or DB-MTL.

    bash benchmarks/setup_mtl_peers.sh
    build/venv-mtl/bin/python benchmarks/weighting_speed.py --tasks 2 4 8 16 32

A missing peer is skipped with a message. Numbers are medians over ``--reps`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtml.engine.joint import joint_step
from mtml.nn import MultiTaskModel, mlp
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, GramianTape

METHODS = ["pcgrad", "mgda", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl", "gradvac", "gradnorm",
           "db_mtl"]
LIBMTL = {"pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {"mgda_gn": "none"}),
          "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}), "gradvac": ("GradVac", {"beta": 0.5}),
          "imtl_g": ("IMTL", {})}  # LibMTL's GradNorm only starts after epoch 0: not a comparable step here
TORCHJD: dict[str, Callable[[Any, int], Any]] = {
    "pcgrad": lambda a, m: a.PCGrad(), "mgda": lambda a, m: a.MGDA(), "cagrad": lambda a, m: a.CAGrad(c=0.5),
    "nash_mtl": lambda a, m: a.NashMTL(n_tasks=m), "upgrad": lambda a, m: a.UPGrad(), "imtl_g": lambda a, m: a.IMTLG(),
    "aligned_mtl": lambda a, m: a.AlignedMTL(), "gradvac": lambda a, m: a.GradVac(),
}


class _NoStep(torch.optim.SGD):
    """Zeroes gradients like any optimiser but does not update: the benchmark times gradient work only."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def build(m: int, per_task: int, in_dim: int, width: int, depth: int, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    trunk = mlp(in_dim, (width,) * depth)
    model = MultiTaskModel(trunk, {f"t{i}": nn.Linear(width, 1) for i in range(m)})
    g = torch.Generator().manual_seed(seed)
    tasks = {f"t{i}": Task(f"t{i}", TaskKind.REGRESSION, Split(torch.randn(per_task, in_dim, generator=g),
                                                               torch.randn(per_task, 1, generator=g)))
             for i in range(m)}
    batch = {n: (t.train.x, t.train.y) for n, t in tasks.items()}
    return model, tasks, batch


def _losses(model: MultiTaskModel, batch: dict, names: list[str]) -> torch.Tensor:
    out = model.forward_many({n: batch[n][0] for n in names})
    return torch.stack([((out[n] - batch[n][1]) ** 2).mean() for n in names])


def mtml_step(model: MultiTaskModel, tasks: dict, batch: dict, name: str, gramian: str) -> Callable[[], str]:
    w = WEIGHTINGS.create(name, list(tasks), **({"gramian": gramian} if name != "equal" else {}))
    opt = _NoStep(model.parameters(), lr=0.0)
    used = {"how": "-"}
    real_tape = GramianTape

    class Spy(real_tape):  # records which backend auto picked, without changing the step
        def gramian(self, *a: Any, **k: Any) -> torch.Tensor:
            out = super().gramian(*a, **k)
            used["how"] = self.used
            return out

    import mtml.engine.joint as joint

    def step() -> str:
        joint.GramianTape = Spy  # type: ignore[misc]
        try:
            joint_step(model, tasks, batch, w, opt)
        finally:
            joint.GramianTape = real_tape  # type: ignore[misc]
        return used["how"]

    return step


def libmtl_step(model: MultiTaskModel, batch: dict, name: str) -> Callable[[], str] | None:
    try:
        from LibMTL import weighting as lw
    except ImportError:
        return None
    if name not in LIBMTL:
        return None
    cls_name, kwargs = LIBMTL[name]
    base = getattr(lw, cls_name)
    names = list(model.task_names)

    class Host(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.task_name = len(names), torch.device("cpu"), False, names
            self.epoch, self.train_loss_buffer = 0, None
            self.encoder = model.trunk

        def get_share_params(self) -> Any:
            return model.shared_parameters()

        def zero_grad_share_params(self) -> None:
            for p in model.shared_parameters():
                p.grad = None if p.grad is None else p.grad.zero_()

    host = Host()
    host.init_param()

    def step() -> str:
        model.zero_grad(set_to_none=False)
        losses = _losses(model, batch, names)
        host.backward(losses, **kwargs)
        return "per-task backward"

    return step


def torchjd_step(model: MultiTaskModel, batch: dict, name: str) -> Callable[[], str] | None:
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    if name not in TORCHJD:
        return None
    names = list(model.task_names)
    aggregator = TORCHJD[name](aggregation, len(names))
    shared = list(model.shared_parameters())
    feats: list[torch.Tensor] = []
    model.trunk.register_forward_hook(lambda mod, args, out: feats.append(out))

    def step() -> str:
        model.zero_grad(set_to_none=True)
        feats.clear()
        losses = _losses(model, batch, names)
        mtl_backward(list(losses), features=feats, shared_params=shared, retain_graph=True)
        jac_to_grad(shared, aggregator)
        return "vmapped Jacobian"

    return step


def equal_step(model: MultiTaskModel, tasks: dict, batch: dict) -> Callable[[], str]:
    w = WEIGHTINGS.create("equal", list(tasks))
    opt = _NoStep(model.parameters(), lr=0.0)
    return lambda: (joint_step(model, tasks, batch, w, opt), "-")[1]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for m in args.tasks:
        per_task = max(1, args.batch // m)
        candidates: dict[tuple[str, str], Callable[[], str]] = {}
        model, tasks, batch = build(m, per_task, args.in_dim, args.width, args.depth)
        candidates[("equal", "mtml")] = equal_step(model, tasks, batch)
        candidates[("gramian loop", "mtml")] = mtml_step(model, tasks, batch, "mgda", "loop")
        candidates[("gramian batched", "mtml")] = mtml_step(model, tasks, batch, "mgda", "batched")
        for name in args.methods:
            candidates[(name, "mtml")] = mtml_step(model, tasks, batch, name, "auto")
            candidates[(name, "mtml repr")] = mtml_step(model, tasks, batch, name, "representation")
            for impl, make in (("LibMTL", libmtl_step), ("TorchJD", torchjd_step)):
                if impl in args.skip:
                    continue
                # each peer gets its own copy of the model (hooks, grads), same weights and batch
                peer_model, _, _ = build(m, per_task, args.in_dim, args.width, args.depth)
                step = make(peer_model, batch, name)
                if step is not None:
                    candidates[(name, impl)] = step
        times: dict[tuple[str, str], list[float]] = {k: [] for k in candidates}
        used: dict[tuple[str, str], str] = {}
        for key, fn in candidates.items():  # warm-up (and first-call solver set-up)
            with contextlib.redirect_stdout(sys.stderr):
                used[key] = fn()
        for _ in range(args.reps):
            for key, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        for (name, impl), ts in times.items():
            rows.append({"tasks": m, "method": name, "impl": impl, "ms": 1e3 * statistics.median(ts),
                         "used": used[(name, impl)]})
        print(f"# {m} tasks done", file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for m in sorted({r["tasks"] for r in rows}):
        sub = {(r["method"], r["impl"]): r for r in rows if r["tasks"] == m}
        floor = sub[("equal", "mtml")]["ms"]
        out.append(f"\n{m} tasks — equal-weight step {floor:.1f} ms (floor); loop Gramian "
                   f"{sub[('gramian loop', 'mtml')]['ms']:.1f} ms, batched Gramian "
                   f"{sub[('gramian batched', 'mtml')]['ms']:.1f} ms (both + MGDA)\n")
        out.append("| method | mtml exact (ms) | Gramian | ×equal | mtml repr (ms) | ×equal | LibMTL (ms) | "
                   "LibMTL/mtml | TorchJD (ms) | TorchJD/mtml |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for name in dict.fromkeys(r["method"] for r in rows):
            if (name, "mtml") not in sub or name in ("equal", "gramian loop", "gramian batched"):
                continue
            ours, rep = sub[(name, "mtml")], sub[(name, "mtml repr")]
            cells = [name, f"{ours['ms']:.1f}", ours["used"], f"{ours['ms'] / floor:.2f}", f"{rep['ms']:.1f}",
                     f"{rep['ms'] / floor:.2f}"]
            for impl in ("LibMTL", "TorchJD"):
                peer = sub.get((name, impl))
                cells += [f"{peer['ms']:.1f}", f"{peer['ms'] / ours['ms']:.1f}×"] if peer else ["—", "—"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--batch", type=int, default=256, help="rows per step, split evenly over the tasks")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=2, help="hidden layers of the trunk")
    p.add_argument("--in-dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="peers to leave out: LibMTL TorchJD")
    p.add_argument("--json", help="also write the raw rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for peer, module in (("LibMTL", "LibMTL"), ("TorchJD", "torchjd")):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                __import__(module)
        except ImportError as exc:
            print(f"# {peer} not installed ({exc}); skipped. Install: bash benchmarks/setup_mtl_peers.sh",
                  file=sys.stderr)
            args.skip.append(peer)
    print(f"# torch {torch.__version__}, {args.threads} thread(s); MLP trunk {args.in_dim}→" +
          "→".join([str(args.width)] * args.depth) + f", linear heads, {args.batch} rows per step")
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
