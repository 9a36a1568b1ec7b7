"""Validates the layout rules of ``mtml.nn._conv`` on whole second-order MAML steps, on this machine.

Two choices in mtml's Conv-4 / ResNet-12 CPU execution are fixed rules rather than timings (a run and its resume
must take the same path, since the paths round differently):

- ``stem_pays``: a one-channel first convolution with enough filters runs as ``unfold`` + matmul (and the network
  channels-last after it); otherwise ``conv2d`` (whose output keeps the input's layout);
- ``channels_last_group_norm_pays``: group norm takes PyTorch's channels-last kernel with enough channels per
  group, otherwise a default-layout copy.

For each model and episode shape this times one second-order MAML meta-step (per task: support loss, inner
gradient with ``create_graph``, query loss, ``backward()``; the loop mtml and learn2learn run) under all four
forced combinations — matmul stem on/off × channels-last group norm on/off — in interleaved rounds, and prints
each one's CPU time (the minimum over rounds: robust to other load on a shared machine), marks the combination
the rules pick, and the rules' time over the fastest's. A rule that loses by more than the noise (a few %) is a
rule to change.

    taskset -c 0 .venv/bin/python benchmarks/conv_layout_rules.py
    taskset -c 0 .venv/bin/python benchmarks/conv_layout_rules.py --shapes conv4:1x28x28:64:8 --ways 20 --query 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import mtml.nn._conv as conv

DEFAULT_SHAPES = ["conv4:1x28x28:16:4", "conv4:1x28x28:32:8", "conv4:1x28x28:64:8", "conv4:3x32x32:32:8",
                  "conv4:3x84x84:32:8", "resnet12:1x28x28:16:8", "resnet12:3x32x32:16:8"]


def meta_step(model: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, lr: float) -> None:
    params = dict(model.named_parameters())
    for t in range(xs.shape[0]):
        support = F.cross_entropy(functional_call(model, params, (xs[t],)), ys[t])
        grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
        fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
        (F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]) / xs.shape[0]).backward()


def run(spec: str, args: argparse.Namespace) -> None:
    kind, image, width, groups = spec.split(":")
    c, h, w = (int(s) for s in image.split("x"))
    torch.manual_seed(0)
    cls = conv.Conv4 if kind == "conv4" else conv.ResNet12
    trunk = cls((c, h, w), width=int(width), groups=int(groups))
    model = nn.Sequential(trunk, nn.Linear(trunk.out_features, args.ways))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(args.tasks, args.ways * args.shots, c, h, w, generator=g)
    xq = torch.randn(args.tasks, args.ways * args.query, c, h, w, generator=g)
    ys = torch.arange(args.ways).repeat_interleave(args.shots).repeat(args.tasks, 1)
    yq = torch.arange(args.ways).repeat_interleave(args.query).repeat(args.tasks, 1)
    rule_stem, rule_norm = conv.stem_pays, conv.channels_last_group_norm_pays
    stems: dict[bool, Callable[[int, int, int], bool]] = {
        True: lambda i, o, p: p <= conv.STEM_MAX_PATCH, False: lambda i, o, p: False}
    norms: dict[bool, Callable[[int, torch.dtype], bool]] = {
        True: lambda d, t: t in (torch.float32, torch.float64), False: lambda d, t: False}
    first = next(m for m in trunk.modules() if isinstance(m, conv.StemConv2d))
    norm = next((m for m in trunk.modules() if isinstance(m, conv.GroupNorm)), None)
    chosen_stem = rule_stem(first.in_channels, first.out_channels, first.weight[0].numel())
    chosen_norm = norm is not None and rule_norm(norm.num_channels // norm.num_groups, torch.float32)
    combos = list(product((True, False), (True, False)))
    times: dict[tuple[bool, bool], list[float]] = {k: [] for k in combos}
    try:
        for r in range(args.rounds + 1):
            for stem, cl_norm in combos:
                conv.stem_pays, conv.channels_last_group_norm_pays = stems[stem], norms[cl_norm]
                start = time.process_time()
                meta_step(model, xs, ys, xq, yq, args.inner_lr)
                if r:  # round 0 warms up
                    times[(stem, cl_norm)].append((time.process_time() - start) * 1e3)
                model.zero_grad(set_to_none=True)
    finally:
        conv.stem_pays, conv.channels_last_group_norm_pays = rule_stem, rule_norm
    best = {k: min(v) for k, v in times.items()}
    fastest = min(best.values())
    rule = (chosen_stem, chosen_norm)
    per_group = norm.num_channels // norm.num_groups if norm is not None else "-"
    print(f"\n{spec} ({args.ways}-way {args.shots}-shot, {args.query} query/class, {args.tasks} tasks, "
          f"{per_group} channels per group): CPU ms per meta-step, min of {args.rounds} rounds")
    if c == 1:
        print("(one input channel: without the matmul stem the whole network runs in the default layout, so its "
              "two rows take the same path)")
    print(f"{'matmul stem':>12} {'CL group norm':>14} {'ms':>9} {'/ fastest':>10}")
    for (stem, cl_norm), ms in best.items():
        mark = "  <- rules" if (stem, cl_norm) == rule else ""
        print(f"{stem!s:>12} {cl_norm!s:>14} {ms:9.1f} {ms / fastest:9.2f}x{mark}")
    print(f"rules' choice: {best[rule] / fastest:.2f}x the fastest", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                        help="model:CxHxW:width:groups, e.g. conv4:1x28x28:64:8 (default: a spread of both)")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, one thread")
    for spec in args.shapes:
        run(spec, args)


if __name__ == "__main__":
    main()
