"""MAML on conv backbones: mtml's execution engines side by side with learn2learn, in one process.

One meta-step (inner step(s) on the support set, query loss, outer backward, Adam) on random 1×28×28 N-way
K-shot episodes, for several meta-batch sizes. Implementations:

- ``mtml loop``: one task at a time through the model's own forward, one ``backward()`` per task (the default
  for image models);
- ``mtml one backward``: the same forward, one ``backward()`` for the episode (``speed_paths(task_backward=False)``);
- ``mtml loop bf16``: the same under bfloat16 autocast (``training.precision: bf16``);
- ``mtml vmap``: ``vmap(functional_call)`` (``speed_paths(task_loop=False)``);
- ``learn2learn``: ``l2l.algorithms.MAML``, ``clone()`` and ``adapt()`` per task and one ``backward()`` per
  task, as its own examples do (installed by ``benchmarks/setup_peers.sh`` into ``build/venv-bench``), on the
  textbook module a learn2learn user writes: ``nn.Sequential`` of ``nn.Conv2d → nn.GroupNorm → nn.ReLU →
  nn.MaxPool2d`` blocks (ResNet-12: ``pool(act(main + shortcut))``), same weights, default (NCHW) memory format;
- ``l2l + mtml Conv4``: learn2learn on mtml's own module (:class:`mtml.nn.Conv4` / ``ResNet12``, which run
  channels-last with a matmul first layer and the pool before the ReLU; see ``mtml.nn._conv``), so the table
  shows how much of mtml's speed is the module's and how much the engine's;
- ``higher``: ``higher.innerloop_ctx`` with a differentiable SGD per task, one ``backward()`` per task, on the
  textbook module (second-order MAML only).

All start from the same weights and see the same episodes; they run in interleaved rounds (so machine load hits
all alike) and the median ms per meta-step is printed with each one's speed relative to learn2learn
(``l2l ms / ms``). Before timing, each implementation's meta-gradient on the first episode is compared with
learn2learn's (largest entry-wise difference relative to the largest gradient entry) and with learn2learn's in
float64 (``vs float64``: the oracle, below both libraries' float32 rounding).

    bash benchmarks/setup_peers.sh
    build/venv-bench/bin/python benchmarks/conv_maml.py --tasks 4 16 --ways 5 20
    build/venv-bench/bin/python benchmarks/conv_maml.py --tasks 32 --peers learn2learn higher   # meta-batch 32
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml._allocator import keep_freed_memory
from mtml.engine import autocast
from mtml.meta import ALGORITHMS, Episode, meta_parameters, meta_step, speed_paths
from mtml.nn import MultiTaskModel, build_backbone, feature_dim
from mtml.nn._conv import ConvBlock, GroupNorm, ResidualBlock, StemConv2d
from mtml.tasks import Split

Step = Callable[[Episode], None]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
ENGINES: dict[str, tuple[dict[str, bool], str]] = {
    "mtml loop": ({}, "fp32"), "mtml loop bf16": ({}, "bf16"), "mtml one backward": ({"task_backward": False}, "fp32"),
    "mtml vmap": ({"task_loop": False}, "fp32"),
}
PEERS = ["learn2learn", "l2l + mtml Conv4", "higher"]


class TextbookResidual(nn.Module):
    """ResNet-12's stage as the papers write it: ``pool(act(main(x) + shortcut(x)))``."""

    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.main, self.shortcut, self.act, self.pool = block.main, block.shortcut, block.act, block.pool

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.main(x) + self.shortcut(x)))


class TextbookResNet12(nn.Module):
    def __init__(self, stages: nn.Module) -> None:
        super().__init__()
        self.stages = stages

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.stages(x).mean(dim=(2, 3)), 1)


def textbook(module: nn.Module) -> nn.Module:
    """A copy of mtml's Conv-4 / ResNet-12 built from plain torch modules in the textbook order (same weights)."""
    def plain(m: nn.Module) -> nn.Module:
        if isinstance(m, StemConv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,  # type: ignore[arg-type]
                             bias=m.bias is not None)
            conv.load_state_dict(m.state_dict())
            return conv
        if isinstance(m, GroupNorm):
            norm = nn.GroupNorm(m.num_groups, m.num_channels)
            norm.load_state_dict(m.state_dict())
            return norm
        if isinstance(m, ConvBlock):
            return nn.Sequential(*(plain(c) for c in m.children()))
        if isinstance(m, ResidualBlock):
            return TextbookResidual(plain_children(m))  # type: ignore[arg-type]
        return plain_children(m)

    def plain_children(m: nn.Module) -> nn.Module:
        for name, child in list(m.named_children()):
            setattr(m, name, plain(child))
        return m

    copy_ = copy.deepcopy(module)
    stages = getattr(copy_, "stages", None)
    if isinstance(stages, nn.Module):  # ResNet-12
        return TextbookResNet12(plain(stages))
    return nn.Sequential(*(plain(c) for c in copy_.children()))  # Conv-4: its blocks and the Flatten


def episode(tasks: int, ways: int, shots: int, query: int, generator: torch.Generator,
            image: tuple[int, int, int] = (1, 28, 28)) -> Episode:
    xs = torch.randn(tasks, ways * shots, *image, generator=generator)
    xq = torch.randn(tasks, ways * query, *image, generator=generator)
    ys = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    yq = torch.arange(ways).repeat_interleave(query).repeat(tasks, 1)
    return Episode(Split(xs, ys), Split(xq, yq), ways=ways)


def mtml_gradient(model: MultiTaskModel, args: argparse.Namespace, off: dict[str, bool], precision: str,
                  ep: Episode) -> list[Tensor]:
    with speed_paths(**off), autocast(precision, "cpu"):
        algorithm = ALGORITHMS.create(args.algorithm, model, inner_lr=args.inner_lr, inner_steps=args.steps)
        params = list(model.parameters())
        return list(torch.autograd.grad(algorithm.meta_objective(model, ep).objective, params))


def build_mtml(model: MultiTaskModel, args: argparse.Namespace, off: dict[str, bool], precision: str) -> Step:
    algorithm = ALGORITHMS.create(args.algorithm, model, inner_lr=args.inner_lr, inner_steps=args.steps)
    optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=1e-3)

    def step(ep: Episode) -> None:
        with speed_paths(**off), autocast(precision, "cpu"):
            meta_step(algorithm, model, ep, optimizer)

    return step


def l2l_losses(maml: nn.Module, ep: Episode, steps: int) -> Callable[[int], Tensor]:
    def task(t: int) -> Tensor:
        learner = maml.clone()  # type: ignore[operator]
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(ep.support.x[t]), ep.support.y[t]))
        return F.cross_entropy(learner(ep.query.x[t]), ep.query.y[t]) / ep.num_tasks

    return task


def build_l2l(model: nn.Module, args: argparse.Namespace) -> Step:
    l2l = importlib.import_module("learn2learn")
    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=args.algorithm == "fomaml")
    return per_task_step(maml, lambda ep: l2l_losses(maml, ep, args.steps))


def per_task_step(model: nn.Module, losses: Callable[[Episode], Callable[[int], Tensor]]) -> Step:
    """A peer's meta-step as its users write it: one ``backward()`` per task's query loss, then Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(ep: Episode) -> None:
        optimizer.zero_grad(set_to_none=True)
        task = losses(ep)
        for t in range(ep.num_tasks):
            task(t).backward()
        optimizer.step()

    return step


def l2l_gradient(model: nn.Module, args: argparse.Namespace, ep: Episode) -> list[Tensor] | None:
    try:
        l2l = importlib.import_module("learn2learn")
    except ImportError:
        return None
    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=args.algorithm == "fomaml")
    task = l2l_losses(maml, ep, args.steps)
    total = sum((task(t) for t in range(ep.num_tasks)), start=torch.zeros(()))
    return list(torch.autograd.grad(total, list(model.parameters())))


def higher_losses(model: nn.Module, ep: Episode, args: argparse.Namespace) -> Callable[[int], Tensor]:
    """higher's way: a functional copy of the model per task, adapted by a differentiable SGD (second-order MAML)."""
    higher = importlib.import_module("higher")
    inner = torch.optim.SGD(model.parameters(), lr=args.inner_lr)

    def task(t: int) -> Tensor:
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(args.steps):
                diffopt.step(F.cross_entropy(fmodel(ep.support.x[t]), ep.support.y[t]))
            return F.cross_entropy(fmodel(ep.query.x[t]), ep.query.y[t]) / ep.num_tasks

    return task


def build_higher(model: nn.Module, args: argparse.Namespace) -> Step:
    return per_task_step(model, lambda ep: higher_losses(model, ep, args))


def higher_gradient(model: nn.Module, args: argparse.Namespace, ep: Episode) -> list[Tensor] | None:
    try:
        importlib.import_module("higher")
    except ImportError:
        return None
    params = list(model.parameters())
    grads = [torch.zeros_like(p) for p in params]
    task = higher_losses(model, ep, args)
    for t in range(ep.num_tasks):  # one task at a time, as higher's users do (its graph is per task)
        for g, d in zip(grads, torch.autograd.grad(task(t), params, allow_unused=True), strict=True):
            if d is not None:
                g += d
    return grads


def relative_gap(a: list[Tensor], b: list[Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) / scale


def timed(step: Step, ep: Episode, iterations: int, clock: Callable[[], float]) -> list[float]:
    out = []
    for _ in range(iterations):
        start = clock()
        step(ep)
        out.append((clock() - start) * 1000)
    return out


def run(args: argparse.Namespace, tasks: int, ways: int) -> None:
    torch.manual_seed(0)
    options = {"width": args.width, "norm": "group", "groups": args.groups}
    trunk = build_backbone(args.backbone, tuple(args.image), options)
    base = MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), ways)})
    ep = episode(tasks, ways, args.shots, args.query, torch.Generator().manual_seed(tasks * 100 + ways),
                 tuple(args.image))
    engines = {name: ENGINES[name] for name in args.engines}
    reference = (l2l_gradient(nn.Sequential(textbook(base.trunk), copy.deepcopy(base.heads["task"])), args, ep)
                 if args.algorithm in ("maml", "fomaml") else None)  # learn2learn's MAML class: MAML and FOMAML
    gaps, gaps64 = {}, {}
    if reference is not None:
        textbook64 = nn.Sequential(textbook(base.trunk), copy.deepcopy(base.heads["task"])).double()
        ep64 = Episode(Split(ep.support.x.double(), ep.support.y), Split(ep.query.x.double(), ep.query.y), ways=ways)
        reference64 = l2l_gradient(textbook64, args, ep64)  # the float64 oracle: both libraries' rounding below it
        assert reference64 is not None
        gaps64["learn2learn"] = relative_gap([g.double() for g in reference], reference64)
        for name, (off, precision) in engines.items():
            grad = mtml_gradient(copy.deepcopy(base), args, off, precision, ep)
            gaps[name] = relative_gap(grad, reference)
            gaps64[name] = relative_gap([g.double() for g in grad], reference64)
        if "higher" in args.peers and args.algorithm == "maml":  # higher's differentiable optimiser: second order
            higher_grad = higher_gradient(nn.Sequential(textbook(base.trunk), copy.deepcopy(base.heads["task"])),
                                          args, ep)
            if higher_grad is not None:
                gaps["higher"] = relative_gap(higher_grad, reference)
                gaps64["higher"] = relative_gap([g.double() for g in higher_grad], reference64)
    steps: dict[str, Step] = {name: build_mtml(copy.deepcopy(base), args, off, precision)
                              for name, (off, precision) in engines.items()}
    if reference is not None and "learn2learn" in args.peers:
        steps["learn2learn"] = build_l2l(nn.Sequential(textbook(base.trunk), copy.deepcopy(base.heads["task"])),
                                         args)
    if reference is not None and "l2l + mtml Conv4" in args.peers:
        steps["l2l + mtml Conv4"] = build_l2l(nn.Sequential(copy.deepcopy(base.trunk),
                                                            copy.deepcopy(base.heads["task"])), args)
    if reference is not None and "higher" in args.peers and "higher" in gaps:
        steps["higher"] = build_higher(nn.Sequential(textbook(base.trunk), copy.deepcopy(base.heads["task"])), args)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(ep)  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name] += timed(step, ep, args.iterations, CLOCKS[args.clock])
    medians = {name: statistics.median(t) for name, t in times.items()}
    base_ms = medians.get("learn2learn")
    print(f"\n{args.algorithm}, {args.backbone} width {args.width} on {'x'.join(map(str, args.image))}, "
          f"{ways}-way {args.shots}-shot, {args.query} query/class, "
          f"{tasks} tasks, {args.steps} inner step(s), {args.threads} thread(s); median {args.clock} time of "
          f"{args.rounds}x{args.iterations} meta-steps")
    print(f"{'implementation':<18} {'ms/step':>9} {'l2l ms / ms':>12} {'grad gap vs l2l':>16} {'vs float64':>11}")
    for name, ms in medians.items():
        ratio = f"{base_ms / ms:11.2f}x" if base_ms else f"{'-':>12}"
        gap = f"{gaps[name]:16.1e}" if name in gaps else f"{'-':>16}"
        gap64 = f"{gaps64[name]:11.1e}" if name in gaps64 else f"{'-':>11}"
        print(f"{name:<18} {ms:9.1f} {ratio} {gap} {gap64}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=None, help="query examples per class (default 15 at 5-way, "
                        "5 otherwise)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--algorithm", default="maml", choices=["maml", "fomaml", "anil"])
    parser.add_argument("--backbone", default="conv4", choices=["conv4", "resnet12"])
    parser.add_argument("--width", type=int, default=64,
                        help="channels of every conv (Conv-4) or of the first stage (ResNet-12: 16 gives "
                             "16-40-80-160, affordable on a CPU)")
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups (must divide every width)")
    parser.add_argument("--image", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"),
                        help="one example's shape (default 1 28 28, the glyphs; 3 84 84 is miniImageNet's)")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                        help="mtml's implementations to time (default: all)")
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=PEERS,
                        help="peer rows to time (default: all; a peer not installed is left out)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: freed blocks stay in the heap, as the mtml command line sets for every run "
                             "(mtml._allocator); default: glibc's thresholds. Either way it holds for every "
                             "implementation, since they run in one process")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (with one thread, robust to other "
                             "load on a shared machine)")
    args = parser.parse_args()
    if args.malloc == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    for ways in args.ways:
        for tasks in args.tasks:
            query = args.query
            args.query = query if query is not None else (15 if ways == 5 else 5)
            run(args, tasks, ways)
            args.query = query


if __name__ == "__main__":
    main()
