"""Step time of gradient weightings on two data shapes: mtml next to LibMTL 1.1.5 and TorchJD.

Model: an MLP trunk ``--in-dim`` → ``--width`` × ``--depth`` (default 64 → 512 → 512, ReLU), or with
``--trunk conv4`` a Conv-4 of ``--width`` filters (GroupNorm, 4 groups) on 1×28×28 images (mtml's ``auto``
Gramian is then ``loop`` on CPU: conv layers are not layer-wise), and one linear regression head per task. A
step covers ``--batch`` rows (default 256) in one of two shapes (``--shapes``, default both):

* ``shared`` — every task gets the *same* ``x`` tensor (all 256 rows) and its own targets: the trunk runs once
  on the 256 rows and every head reads the same features. mtml's ``auto`` Gramian is then ``layerwise/batched``
  (per-task gradients of the shared layers' outputs from one batched backward);
* ``own`` — the 256 rows split evenly over the T tasks (``batch // T`` rows each), concatenated into one trunk
  pass; mtml's ``auto`` Gramian is ``layerwise/rows`` (one ordinary backward split by rows).

One step = forward, per-task gradient information, the method, and gradients left in ``.grad`` (no optimiser
update, identical for all). Every implementation gets its own copy of the model with the same weights and the
same batch; all candidates of both shapes for one task count run interleaved round by round in one process, so
ratios are measured under the same machine load. Per task count T the benchmark times:

* floor — one trunk pass, all heads, the summed loss and one ``backward`` (what any step costs at least);
* mtml ``equal`` — :func:`mtml.engine._joint.joint_step` with equal weights;
* mtml, per method — ``joint_step`` with ``gramian: auto`` (the fastest exact way; ``used`` = the backend
  ``GramianTape`` picked) and with ``gramian: representation`` (the cheaper representation-level variant);
* LibMTL — its weighting class's ``backward(losses)`` with ``rep_grad=False`` (one ``backward`` per task, then
  the method on the flat per-task gradients); it has no Nash-MTL, Aligned-MTL, UPGrad, GradNorm step (its
  GradNorm only starts after epoch 0) or DB-MTL;
* TorchJD route ``jac`` — ``mtl_backward(losses, features=trunk output)`` (one vmapped backward for the
  Jacobian) then ``jac_to_grad(shared params, aggregator)``;
* TorchJD route ``autogram`` — ``torchjd.autogram.Engine(trunk, batch_dim=None)``,
  ``gramian = engine.compute_gramian(losses)``, ``weights = <Method>Weighting()(gramian)``,
  ``losses.backward(weights)`` (Nash-MTL has no Gramian weighting in TorchJD: jac route only); TorchJD has no
  GradNorm or DB-MTL. ``TorchJD best`` is the faster of its two routes.

All implementations compute the task losses with :func:`mtml.engine._joint.task_losses` (one MSE reduction).
Numbers are medians over ``--reps`` interleaved rounds after one warm-up call, on ``--threads`` threads
(default 1). TorchJD's autogram route is slow at many tasks (about 2 s per step at T = 64 on one thread):
``--autogram-reps K`` times it in the first K rounds only, ``--skip TorchJD-autogram`` leaves it out.

    bash benchmarks/setup_mtl_peers.sh
    build/venv-mtl/bin/python benchmarks/weighting_speed.py --tasks 2 4 16 64 --reps 5 --json /tmp/ws.json
    build/venv-mtl/bin/python benchmarks/weighting_speed.py --check     # correctness only, exits 1 on failure

``--check`` (T = 4, both shapes, float64): for every method the ``.grad`` that ``joint_step`` with
``gramian: auto`` leaves on the shared parameters (and the heads) must equal a plain per-task-loop reference —
one ``autograd.grad`` per task, ``G = J Jᵀ``, weights from a copy of the same weighting object taken before the
step, update ``Σ wᵢ gᵢ`` — within 1e-6 relative, over two consecutive steps (so stateful methods are checked on
their state too). It prints the largest relative error per method and exits non-zero on a failure.

A missing peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mtml.engine._joint as joint
from mtml.engine._joint import joint_step, task_losses
from mtml.nn import MultiTaskModel, mlp
from mtml.nn._conv import Conv4
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, GramianTape

METHODS = ["pcgrad", "mgda", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl", "gradvac", "gradnorm",
           "db_mtl"]
SHAPES = ("shared", "own")
CONV_INPUT = (1, 28, 28)
PEERS = ("LibMTL", "TorchJD-jac", "TorchJD-autogram")
#: LibMTL class and ``backward`` kwargs per method (LibMTL's GradNorm only starts after epoch 0: not comparable)
LIBMTL = {"pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {"mgda_gn": "none"}),
          "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}), "gradvac": ("GradVac", {"beta": 0.5}),
          "imtl_g": ("IMTL", {})}
#: TorchJD aggregator (jac route) per method: ``(aggregation module, tasks) -> Aggregator``
TORCHJD_AGG: dict[str, Callable[[Any, int], Any]] = {
    "pcgrad": lambda a, m: a.PCGrad(), "mgda": lambda a, m: a.MGDA(), "cagrad": lambda a, m: a.CAGrad(c=0.5),
    "nash_mtl": lambda a, m: a.NashMTL(n_tasks=m), "upgrad": lambda a, m: a.UPGrad(), "imtl_g": lambda a, m: a.IMTLG(),
    "aligned_mtl": lambda a, m: a.AlignedMTL(), "gradvac": lambda a, m: a.GradVac(),
}
#: TorchJD Gramian weighting (autogram route) per method: ``aggregation module -> Weighting``
TORCHJD_WEIGHTING: dict[str, Callable[[Any], Any]] = {
    "pcgrad": lambda a: a.PCGradWeighting(), "mgda": lambda a: a.MGDAWeighting(),
    "cagrad": lambda a: a.CAGradWeighting(c=0.5), "upgrad": lambda a: a.UPGradWeighting(),
    "imtl_g": lambda a: a.IMTLGWeighting(), "aligned_mtl": lambda a: a.AlignedMTLWeighting(),
    "gradvac": lambda a: a.GradVacWeighting(),
}

Step = Callable[[], str]  # one timed step; returns how the Gramian was computed


class _NoStep(torch.optim.SGD):
    """Zeroes gradients like any optimiser but does not update: the benchmark times gradient work only."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


@dataclass
class Problem:
    """One data shape at one task count: tasks, the batch ``{task: (x, y)}`` and how to build a model copy."""

    shape: str
    m: int
    tasks: dict[str, Task]
    batch: dict[str, tuple[torch.Tensor, torch.Tensor]]
    in_dim: int
    width: int
    depth: int
    dtype: torch.dtype
    seed: int
    trunk: str = "mlp"

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def rows(self) -> int:
        """Rows through the trunk per step."""
        return self.batch[self.names[0]][0].shape[0] * (1 if self.shape == "shared" else self.m)

    def model(self) -> MultiTaskModel:
        """A fresh model copy; every copy has the same weights."""
        torch.manual_seed(self.seed)
        if self.trunk == "conv4":  # Conv-4 (GroupNorm, 4 groups) on 1×28×28 images: a few-shot-style backbone
            conv = Conv4(CONV_INPUT, width=self.width, groups=4)
            model = MultiTaskModel(conv, {n: nn.Linear(conv.out_features, 1) for n in self.names})
        else:
            model = MultiTaskModel(mlp(self.in_dim, (self.width,) * self.depth),
                                   {n: nn.Linear(self.width, 1) for n in self.names})
        return model.to(self.dtype)


def make_problem(shape: str, m: int, batch: int, in_dim: int, width: int, depth: int, *,
                 dtype: torch.dtype = torch.float32, seed: int = 0, trunk: str = "mlp") -> Problem:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    g = torch.Generator().manual_seed(seed + 1000 * m + (0 if shape == "shared" else 1))
    example = CONV_INPUT if trunk == "conv4" else (in_dim,)
    names = [f"t{i}" for i in range(m)]
    if shape == "shared":
        x = torch.randn(batch, *example, generator=g, dtype=dtype)
        splits = {n: Split(x, torch.randn(batch, 1, generator=g, dtype=dtype)) for n in names}
        group: str | None = "shared"
    else:
        rows = max(1, batch // m)
        splits = {n: Split(torch.randn(rows, *example, generator=g, dtype=dtype),
                           torch.randn(rows, 1, generator=g, dtype=dtype)) for n in names}
        group = None
    tasks = {n: Task(n, TaskKind.REGRESSION, s, group=group) for n, s in splits.items()}
    data = {n: (s.x, s.y) for n, s in splits.items()}  # shared: the very same x tensor object for every task
    return Problem(shape, m, tasks, data, in_dim, width, depth, dtype, seed, trunk)


# -- candidates ------------------------------------------------------------------------------------------------

def floor_step(p: Problem) -> Step:
    model, names = p.model(), p.names

    def step() -> str:
        model.zero_grad(set_to_none=True)
        task_losses(model, p.tasks, p.batch, names).sum().backward()
        return "-"

    return step


class _Spy:
    """Swaps ``joint.GramianTape`` for a subclass that records which backend ran, for one ``joint_step`` call."""

    def __init__(self) -> None:
        self.used = "-"
        spy = self

        class Tape(GramianTape):
            def gramian(self, *a: Any, **k: Any) -> torch.Tensor:
                out = super().gramian(*a, **k)
                spy.used = self.used
                return out

        self.tape = Tape

    @contextlib.contextmanager
    def active(self) -> Any:
        joint.GramianTape = self.tape  # type: ignore[misc]
        try:
            yield
        finally:
            joint.GramianTape = GramianTape  # type: ignore[misc]


def mtml_step(p: Problem, name: str, gramian: str | None, model: MultiTaskModel | None = None,
              weighting: Any = None) -> Step:
    model = model if model is not None else p.model()
    w = weighting if weighting is not None else \
        WEIGHTINGS.create(name, p.names, **({"gramian": gramian} if gramian is not None else {}))
    opt = _NoStep(model.parameters(), lr=0.0)
    spy = _Spy()

    def step() -> str:
        with spy.active():
            joint_step(model, p.tasks, p.batch, w, opt)
        return spy.used

    return step


def libmtl_step(p: Problem, name: str) -> Step | None:
    try:
        from LibMTL import weighting as lw
    except ImportError:
        return None
    if name not in LIBMTL:
        return None
    cls_name, kwargs = LIBMTL[name]
    base = getattr(lw, cls_name)
    model, names = p.model(), p.names

    class Host(base):  # type: ignore[misc, valid-type]
        """What LibMTL's trainer provides to a weighting: task list, device, shared parameters."""

        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.task_name = len(names), torch.device("cpu"), False, names
            self.epoch, self.train_loss_buffer = 0, None
            self.encoder = model.trunk

        def get_share_params(self) -> Any:
            return model.shared_parameters()

        def zero_grad_share_params(self) -> None:
            for q in model.shared_parameters():
                q.grad = None if q.grad is None else q.grad.zero_()

    host = Host()
    host.init_param()

    def step() -> str:
        model.zero_grad(set_to_none=False)
        host.backward(task_losses(model, p.tasks, p.batch, names), **kwargs)
        return "per-task backward"

    return step


def torchjd_jac_step(p: Problem, name: str) -> Step | None:
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    if name not in TORCHJD_AGG:
        return None
    model, names = p.model(), p.names
    aggregator = TORCHJD_AGG[name](aggregation, len(names))
    shared = list(model.shared_parameters())
    feats: list[torch.Tensor] = []
    model.trunk.register_forward_hook(lambda mod, args, out: feats.append(out))

    def step() -> str:
        model.zero_grad(set_to_none=True)
        feats.clear()
        losses = task_losses(model, p.tasks, p.batch, names)
        mtl_backward(list(losses), features=feats, shared_params=shared, retain_graph=True)
        jac_to_grad(shared, aggregator)
        return "vmapped Jacobian"

    return step


def torchjd_autogram_step(p: Problem, name: str) -> Step | None:
    try:
        from torchjd import aggregation
        from torchjd.autogram import Engine
    except ImportError:
        return None
    if name not in TORCHJD_WEIGHTING:
        return None
    model, names = p.model(), p.names
    weighting = TORCHJD_WEIGHTING[name](aggregation)
    engine = Engine(model.trunk, batch_dim=None)  # hooks the trunk's Linear layers (the shared parameters)

    def step() -> str:
        model.zero_grad(set_to_none=True)
        losses = task_losses(model, p.tasks, p.batch, names)
        gramian = engine.compute_gramian(losses)
        losses.backward(weighting(gramian))
        return "autogram"

    return step


def candidates(p: Problem, methods: list[str], skip: list[str]) -> dict[tuple[str, str], Step]:
    out: dict[tuple[str, str], Step] = {("floor", "plain"): floor_step(p),
                                        ("equal", "mtml"): mtml_step(p, "equal", None)}
    makers = {"LibMTL": libmtl_step, "TorchJD-jac": torchjd_jac_step, "TorchJD-autogram": torchjd_autogram_step}
    for name in methods:
        out[(name, "mtml")] = mtml_step(p, name, "auto")
        out[(name, "mtml repr")] = mtml_step(p, name, "representation")
        for impl, make in makers.items():
            if impl in skip or impl.split("-")[0] in skip:
                continue
            step = make(p, name)
            if step is not None:
                out[(name, impl)] = step
    return out


# -- timing ----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in args.tasks:
        cands: dict[tuple[str, str, str], Step] = {}
        problems = {}
        for shape in args.shapes:
            p = make_problem(shape, m, args.batch, args.in_dim, args.width, args.depth, trunk=args.trunk)
            problems[shape] = p
            for (name, impl), fn in candidates(p, args.methods, args.skip).items():
                cands[(shape, name, impl)] = fn
        times: dict[tuple[str, str, str], list[float]] = {k: [] for k in cands}
        used: dict[tuple[str, str, str], str] = {}
        for key, fn in cands.items():  # warm-up (and first-call solver set-up); peers may print
            with contextlib.redirect_stdout(sys.stderr):
                used[key] = fn()
        order = list(cands)
        for r in range(args.reps):
            for key in order if r % 2 == 0 else order[::-1]:  # alternate the order: no fixed position bias
                if key[2] == "TorchJD-autogram" and args.autogram_reps is not None and r >= args.autogram_reps:
                    continue
                fn = cands[key]
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    how = fn()
                times[key].append(time.perf_counter() - t0)
                if how != used[key]:
                    used[key] = f"{used[key]}|{how}"
            print(f"# {m} tasks: round {r + 1}/{args.reps} done", file=sys.stderr)
        for (shape, name, impl), ts in times.items():
            rows.append({"shape": shape, "tasks": m, "rows": problems[shape].rows, "method": name, "impl": impl,
                         "ms": 1e3 * statistics.median(ts), "reps": len(ts), "used": used[(shape, name, impl)]})
    return rows


def _ms(row: dict[str, Any] | None) -> str:
    return "—" if row is None else f"{row['ms']:.1f}"


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    return "—" if num is None or den is None else f"{num['ms'] / den['ms']:.1f}×"


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        what = ("every task gets the same x (trunk once on the batch), own targets" if shape == "shared"
                else "the batch split evenly over the tasks (own rows, one concatenated trunk pass)")
        out.append(f"\n## shape `{shape}` — {what}")
        for m in sorted({r["tasks"] for r in rows if r["shape"] == shape}):
            sub = {(r["method"], r["impl"]): r for r in rows if r["shape"] == shape and r["tasks"] == m}
            floor, equal = sub[("floor", "plain")], sub[("equal", "mtml")]
            per = "" if shape == "shared" else f", {floor['rows'] // m} per task"
            out.append(f"\n### {shape}, {m} tasks ({floor['rows']} trunk rows{per})\n")
            out.append(f"floor (one trunk pass + heads + Σ loss + one backward): {floor['ms']:.1f} ms; "
                       f"mtml equal (joint_step): {equal['ms']:.1f} ms ({equal['ms'] / floor['ms']:.2f}× floor)\n")
            out.append("| method | mtml ms | used | ×floor | mtml repr ms | LibMTL ms | LibMTL/mtml | TorchJD jac ms | "
                       "TorchJD autogram ms | TorchJD best/mtml |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for name in dict.fromkeys(r["method"] for r in rows):
                if name in ("floor", "equal") or (name, "mtml") not in sub:
                    continue
                ours, lib = sub[(name, "mtml")], sub.get((name, "LibMTL"))
                jac, auto = sub.get((name, "TorchJD-jac")), sub.get((name, "TorchJD-autogram"))
                best = min((r for r in (jac, auto) if r is not None), key=lambda r: r["ms"], default=None)
                auto_cell = _ms(auto) + ("" if auto is None or auto["reps"] == ours["reps"] else f" (n={auto['reps']})")
                best_cell = _ratio(best, ours) + ("" if best is None else
                                                  f" ({'jac' if best is jac else 'autogram'})")
                cells = [name, _ms(ours), ours["used"], f"{ours['ms'] / floor['ms']:.2f}",
                         _ms(sub.get((name, "mtml repr"))), _ms(lib), _ratio(lib, ours), _ms(jac), auto_cell,
                         best_cell]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- correctness -----------------------------------------------------------------------------------------------

def reference_grads(p: Problem, model: MultiTaskModel, w: Any) -> dict[str, torch.Tensor]:
    """The update by a plain per-task loop: ``gᵢ = ∇Lᵢ`` by one ``autograd.grad`` each, ``G = J Jᵀ``, weights
    from ``w`` (consumed like one ``joint_step`` consumes it), gradient of ``Σ wᵢ Lᵢ``."""
    names = p.names
    shared = list(model.shared_parameters())
    losses = task_losses(model, p.tasks, p.batch, names)
    per_task = [torch.autograd.grad(losses[i], shared, retain_graph=True) for i in range(len(names))]
    jac = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in per_task])
    weights = w(losses, jac @ jac.T).detach()
    out = {}
    for k, (pname, _) in enumerate(model.named_shared_parameters()):
        out[pname] = sum(weights[i] * per_task[i][k] for i in range(len(names)))
    heads = [(n, q) for n, q in model.named_parameters() if n.startswith("heads.")]
    head_grads = torch.autograd.grad((weights * losses).sum(), [q for _, q in heads])
    out.update({n: g for (n, _), g in zip(heads, head_grads, strict=True)})
    return out


def check(args: argparse.Namespace, steps: int = 2, tol: float = 1e-6) -> bool:
    ok = True
    print(f"# --check: T=4, float64, {steps} consecutive steps, tolerance {tol:g} relative (‖Δ‖/‖ref‖ per tensor)")
    for shape in args.shapes:
        p = make_problem(shape, 4, args.batch, args.in_dim, args.width, args.depth, dtype=torch.float64,
                         trunk=args.trunk)
        print(f"\n### {shape}: {p.rows} trunk rows\n")
        print("| method | used | max rel err shared | max rel err heads | ok |")
        print("|---|---|---|---|---|")
        for name in args.methods:
            model, ref_model = p.model(), p.model()
            w = WEIGHTINGS.create(name, p.names, gramian="auto").double()
            step = mtml_step(p, name, "auto", model=model, weighting=w)
            err_shared = err_heads = 0.0
            for _ in range(steps):
                w_ref = copy.deepcopy(w)  # the same state the step is about to use
                used = step()
                ref = reference_grads(p, ref_model, w_ref)
                for pname, q in model.named_parameters():
                    g = q.grad if q.grad is not None else torch.zeros_like(q)
                    err = float((g - ref[pname]).norm() / ref[pname].norm().clamp_min(1e-300))
                    if pname.startswith("trunk."):
                        err_shared = max(err_shared, err)
                    else:
                        err_heads = max(err_heads, err)
            good = err_shared <= tol and err_heads <= tol
            ok &= good
            print(f"| {name} | {used} | {err_shared:.2e} | {err_heads:.2e} | {'yes' if good else 'NO'} |")
    print("\ncheck " + ("passed" if ok else "FAILED"))
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 16, 64])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--batch", type=int, default=256, help="rows per step (shape own: split evenly over the tasks)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=2, help="hidden layers of the trunk")
    p.add_argument("--in-dim", type=int, default=64)
    p.add_argument("--trunk", choices=["mlp", "conv4"], default="mlp",
                   help="mlp (--in-dim → --width × --depth) or conv4 (Conv-4 of --width filters on 1×28×28 images)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--autogram-reps", type=int, default=None,
                   help="time TorchJD's autogram route in the first K rounds only (it is slow at many tasks)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help=f"peers to leave out: {' '.join(PEERS)} (TorchJD = both)")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--check", action="store_true", help="only verify mtml's update against a per-task loop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        sys.exit(0 if check(args) else 1)
    for peer, module in (("LibMTL", "LibMTL"), ("TorchJD", "torchjd")):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                __import__(module)
        except ImportError as exc:
            print(f"# {peer} not installed ({exc}); skipped. Install: bash benchmarks/setup_mtl_peers.sh",
                  file=sys.stderr)
            args.skip.append(peer)
    versions = []
    for module in ("LibMTL", "torchjd"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions.append(f"{module} {version(module)}")
    trunk = (f"Conv-4 trunk, width {args.width}, GroupNorm 4, 1×28×28" if args.trunk == "conv4" else
             f"MLP trunk {args.in_dim}→" + "→".join([str(args.width)] * args.depth))
    print(f"# torch {torch.__version__}, {', '.join(versions)}; {args.threads} thread(s); {trunk}"
          + f", linear heads, {args.batch} rows per step; "
          f"medians of {args.reps} interleaved rounds" +
          (f" (TorchJD autogram: first {args.autogram_reps})" if args.autogram_reps is not None else ""))
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
