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
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import mtml.nn._conv as conv

DEFAULT_SHAPES = ["conv4:1x28x28:16:4", "conv4:1x28x28:32:8", "conv4:1x28x28:64:8", "conv4:3x32x32:32:8",
                  "conv4:3x84x84:32:8", "resnet12:1x28x28:16:8", "resnet12:1x28x28:32:8", "resnet12:3x32x32:16:8",
                  "resnet12:3x84x84:16:8"]


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
    trunk: conv.Conv4 | conv.ResNet12 = cls((c, h, w), width=int(width), groups=int(groups))
    model = nn.Sequential(trunk, nn.Linear(trunk.out_features, args.ways))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(args.tasks, args.ways * args.shots, c, h, w, generator=g)
    xq = torch.randn(args.tasks, args.ways * args.query, c, h, w, generator=g)
    ys = torch.arange(args.ways).repeat_interleave(args.shots).repeat(args.tasks, 1)
    yq = torch.arange(args.ways).repeat_interleave(args.query).repeat(args.tasks, 1)
    rule_entry = conv.channels_last_pays(kind, (c, h, w))
    rule_stem, rule_norm = conv.stem_pays, conv.channels_last_group_norm_pays
    never = lambda *a: False  # noqa: E731
    # (channels-last entry, matmul stem, channels-last group norm) forced in every layer, then the rules' own
    # choices layer by layer; with one input channel the entry layout is moot (such a batch is both layouts),
    # with several the default layout throughout is a fifth forced combination
    combos: list[tuple[bool, bool, bool] | None] = [
        (True, stem, cl_norm) for stem, cl_norm in product((True, False), (True, False))]
    if c > 1:
        combos.append((False, False, False))
    combos.append(None)
    times: dict[tuple[bool, bool, bool] | None, list[float]] = {k: [] for k in combos}
    try:
        for r in range(args.rounds + 1):
            for combo in combos:
                if combo is None:
                    trunk.set_channels_last(rule_entry)
                    conv.stem_pays, conv.channels_last_group_norm_pays = rule_stem, rule_norm
                else:
                    entry, stem, cl_norm = combo
                    trunk.set_channels_last(entry)
                    conv.stem_pays = (lambda i, o, p: p <= conv.STEM_MAX_PATCH) if stem else never
                    conv.channels_last_group_norm_pays = (
                        (lambda d, t: t in (torch.float32, torch.float64)) if cl_norm else never)
                start = time.process_time()
                meta_step(model, xs, ys, xq, yq, args.inner_lr)
                if r:  # round 0 warms up
                    times[combo].append((time.process_time() - start) * 1e3)
                model.zero_grad(set_to_none=True)
    finally:
        trunk.set_channels_last(rule_entry)
        conv.stem_pays, conv.channels_last_group_norm_pays = rule_stem, rule_norm
    best = {k: min(v) for k, v in times.items()}
    fastest = min(v for k, v in best.items() if k is not None)
    norms = [m.num_channels // m.num_groups for m in trunk.modules() if isinstance(m, conv.GroupNorm)]
    print(f"\n{spec} ({args.ways}-way {args.shots}-shot, {args.query} query/class, {args.tasks} tasks; channels "
          f"per group {sorted(set(norms)) or '-'}): CPU ms per meta-step, min of {args.rounds} rounds")
    if c == 1:
        print("(one input channel: without the matmul stem the whole network runs in the default layout, so the "
              "group-norm choice does not apply there)")
    print(f"{'CL entry':>9} {'matmul stem':>12} {'CL group norm':>14} {'ms':>9} {'/ fastest':>10}")
    for combo, ms in best.items():
        cells = ("the rules, layer by layer", "", "") if combo is None else tuple(str(v) for v in combo)
        line = f"{cells[0]:>9} {cells[1]:>12} {cells[2]:>14}" if combo else f"{cells[0]:>37}"
        print(f"{line} {ms:9.1f} {ms / fastest:9.2f}x")
    print(f"the rules: {best[None] / fastest:.2f}x the fastest forced combination", flush=True)


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
