"""Does ``torch.compile`` speed up the memory-bound part of a Conv-4 query pass on the CPU?

In second-order MAML the query pass needs only a first-order backward (the second-order terms come from the support
pass's graph), so its group norm → 2×2 max-pool → ReLU could be a compiled, once-differentiable function while the
convolutions stay with oneDNN. This times one task's query forward + backward (75 images of 1×28×28, per-task
weights as leaves) through mtml's eager Conv4 and through the same network with each block's norm–pool–ReLU
compiled by inductor, and checks that both give the same weight gradients.

    .venv/bin/python benchmarks/conv_compile_check.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from mtml.nn import Conv4
from mtml.nn._conv import conv_as_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Conv4((1, 28, 28))
    x = torch.randn(args.images, 1, 28, 28)
    y = torch.randint(0, 5, (args.images,))
    head = torch.randn(5, model.out_features)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def eager() -> tuple[Tensor, ...]:
        out = functional_call(model, dict(zip(names, params, strict=True)), (x,))
        return torch.autograd.grad(F.cross_entropy(out @ head.t(), y), params)

    def norm_pool_relu(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.relu(F.max_pool2d(F.group_norm(h, 8, w, b), 2))

    fused = torch.compile(norm_pool_relu)

    def compiled() -> tuple[Tensor, ...]:
        p = dict(zip(names, params, strict=True))
        h = x.contiguous(memory_format=torch.channels_last)
        for i in range(4):
            w, b = p[f"{i}.0.weight"], p[f"{i}.0.bias"]
            h = conv_as_matmul(h, w, b, (1, 1)) if i == 0 else F.conv2d(h, w, b, padding=1)
            h = fused(h, p[f"{i}.1.weight"], p[f"{i}.1.bias"])
        return torch.autograd.grad(F.cross_entropy(h.flatten(1) @ head.t(), y), params)

    start = time.perf_counter()
    got = compiled()
    print(f"compile: {time.perf_counter() - start:.1f} s")
    want = eager()
    print("largest gradient difference:", max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)))

    def ms(fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - start) / args.repeats * 1e3

    for _ in range(2):
        print(f"eager Conv4 {ms(eager):.1f} ms, compiled norm-pool-ReLU {ms(compiled):.1f} ms per forward + backward")


if __name__ == "__main__":
    main()
