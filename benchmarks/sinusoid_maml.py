"""Second-order MAML on sinusoid regression: mtml against learn2learn, higher and a hand-batched reference.

The configuration is the MAML paper's sinusoid setting (Finn et al., ICML 2017): an MLP 1-40-40-1 with ReLU,
K = 10 support and 10 query points per task, meta-batch 25, inner SGD with lr 0.01, outer Adam with lr 1e-3,
second-order meta-gradients. Every implementation starts from the same initial weights and sees the same
episodes, in the same process, so the ratios are measured under the same conditions. Implementations run in
interleaved rounds so that a change in machine load hits all of them alike.

``mtml compiled`` is mtml with ``MAML(..., compiled=True)``: its compile time falls in the warm-up iterations,
which are not timed (the ``warm-up s`` column shows it), and its memory reads n/a (saved-tensor hooks do not see
inside a compiled graph).

For each inner-step count it prints meta-train tasks/s, the ratio to mtml, the peak memory of one
meta-iteration (autograd's saved tensors on CPU; allocator peak on CUDA) and the meta-test MSE (mean ± 95% CI
over held-out tasks, after as many test steps as training steps, scored by one evaluator for all).

    bash benchmarks/setup_peers.sh           # learn2learn and higher into build/venv-bench (optional)
    build/venv-bench/bin/python benchmarks/sinusoid_maml.py --steps 1 5

A peer that is not installed is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml.meta import ALGORITHMS, MAML, Episode, meta_evaluate, meta_parameters, meta_step
from mtml.sampling import SinusoidTasks

Step = Callable[[Episode], None]


def adam(params: Iterable[Tensor], args: argparse.Namespace) -> torch.optim.Adam:
    """The outer optimiser, the same for every implementation (``--adam fused`` is PyTorch's fused kernel)."""
    return torch.optim.Adam(params, lr=args.outer_lr, fused=args.adam == "fused" or None)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


# -- implementations: each returns (step function, model to evaluate) ----------------------------------------
def build_mtml(model: nn.Module, steps: int, args: argparse.Namespace) -> tuple[Step, nn.Module]:
    algorithm = MAML(model, inner_lr=args.inner_lr, inner_steps=steps)
    optimizer = adam(model.parameters(), args)
    return (lambda episode: meta_step(algorithm, model, episode, optimizer) and None), model


def build_mtml_compiled(model: nn.Module, steps: int, args: argparse.Namespace) -> tuple[Step, nn.Module]:
    """mtml with ``compiled=True``: the meta-gradient as one ``torch.compile``d function (compiled in the warm-up)."""
    algorithm = MAML(model, inner_lr=args.inner_lr, inner_steps=steps, compiled=True)
    optimizer = adam(model.parameters(), args)
    return (lambda episode: meta_step(algorithm, model, episode, optimizer) and None), model


def _bmm_forward(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2, w3, b3 = params
    h = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    h = torch.relu(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
    return torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))


def build_bmm_reference(model: nn.Module, steps: int, args: argparse.Namespace) -> tuple[Step, nn.Module]:
    """Hand-written, fully batched MAML for this one MLP: per-task weights ``[tasks, out, in]``, ``bmm``."""
    params = list(model.parameters())
    optimizer = adam(params, args)

    def step(episode: Episode) -> None:
        xs, ys, xq, yq = episode.support.x, episode.support.y, episode.query.x, episode.query.y
        fast = [p.expand(xs.shape[0], *p.shape) for p in params]
        for _ in range(steps):
            loss = (_bmm_forward(fast, xs) - ys).square().mean((1, 2)).sum()
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - args.inner_lr * g for w, g in zip(fast, grads, strict=True)]
        optimizer.zero_grad()
        (_bmm_forward(fast, xq) - yq).square().mean().backward()
        optimizer.step()

    return step, model


def build_learn2learn(model: nn.Module, steps: int, args: argparse.Namespace) -> tuple[Step, nn.Module]:
    l2l = importlib.import_module("learn2learn")
    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=False)
    optimizer = adam(maml.parameters(), args)

    def step(episode: Episode) -> None:
        optimizer.zero_grad()
        total = torch.zeros(())
        for t in range(episode.num_tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.mse_loss(learner(episode.support.x[t]), episode.support.y[t]))
            total = total + F.mse_loss(learner(episode.query.x[t]), episode.query.y[t])
        (total / episode.num_tasks).backward()
        optimizer.step()

    return step, model


def build_higher(model: nn.Module, steps: int, args: argparse.Namespace) -> tuple[Step, nn.Module]:
    higher = importlib.import_module("higher")
    optimizer = adam(model.parameters(), args)
    inner = torch.optim.SGD(model.parameters(), lr=args.inner_lr)

    def step(episode: Episode) -> None:
        optimizer.zero_grad()
        for t in range(episode.num_tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.mse_loss(fmodel(episode.support.x[t]), episode.support.y[t]))
                (F.mse_loss(fmodel(episode.query.x[t]), episode.query.y[t]) / episode.num_tasks).backward()
        optimizer.step()

    return step, model


BUILDERS: dict[str, Callable[[nn.Module, int, argparse.Namespace], tuple[Step, nn.Module]]] = {
    "mtml": build_mtml,
    "mtml compiled": build_mtml_compiled,
    "bmm reference": build_bmm_reference,
    "learn2learn": build_learn2learn,
    "higher": build_higher,
}
PEERS = {"learn2learn": "learn2learn", "higher": "higher"}


# -- measurement ---------------------------------------------------------------------------------------------
def peak_memory_mb(step: Step, episode: Episode) -> float:
    """Peak memory of one meta-iteration: CUDA allocator peak, or on CPU the peak of live saved tensors."""
    if episode.support.x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(episode)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    live: dict[int, list[int]] = {}
    state = {"now": 0, "peak": 0}

    def release(key: int) -> None:
        entry = live[key]
        entry[1] -= 1
        if entry[1] == 0:
            state["now"] -= entry[0]
            del live[key]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in live:
            live[key] = [storage.nbytes(), 0]
            state["now"] += storage.nbytes()
            state["peak"] = max(state["peak"], state["now"])
        live[key][1] += 1
        weakref.finalize(t, release, key)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(episode)
    return state["peak"] / 2**20


def run(steps: int, args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    sampler = SinusoidTasks(shots=args.shots, meta_batch=args.meta_batch, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    episodes = [sampler.sample(gen) for _ in range(args.iterations + args.warmup)]
    init = make_model(args.seed).to(device)
    impls = {name: BUILDERS[name](copy.deepcopy(init), steps, args) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    warmup = dict.fromkeys(names, 0.0)
    for name, (step, _) in impls.items():
        begin = time.perf_counter()
        for episode in episodes[: args.warmup]:
            step(episode)
        warmup[name] = time.perf_counter() - begin
    timed = episodes[args.warmup :]
    chunk = max(1, len(timed) // args.rounds)
    for start in range(0, len(timed), chunk):
        for name, (step, _) in impls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for episode in timed[start : start + chunk]:
                step(episode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - begin
    test = SinusoidTasks(shots=args.shots, query_shots=100, meta_batch=100, device=device)
    rows = []
    for name, (step, model) in impls.items():
        memory = peak_memory_mb(step, episodes[0])
        scorer = MAML(model, inner_lr=args.inner_lr, inner_steps=steps)
        result = meta_evaluate(scorer, model, test, steps=[steps], num_tasks=args.eval_tasks,
                               generator=torch.Generator().manual_seed(args.seed + 1))
        tasks_per_s = len(timed) * args.meta_batch / seconds[name]
        rows.append({"name": name, "tasks/s": tasks_per_s, "memory": memory, "warmup": warmup[name],
                     "mse": result[f"loss@{steps}"], "ci": result[f"loss@{steps}_ci95"]})
    return rows


def report(steps: int, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ours = next(r["tasks/s"] for r in rows if r["name"] == "mtml")
    print(f"\ninner steps = {steps}  ({args.iterations} timed meta-iterations of {args.meta_batch} tasks, "
          f"K = {args.shots}, {torch.get_num_threads()} thread(s), {args.adam} Adam, {args.device})")
    print(f"{'implementation':<16}{'tasks/s':>10}{'mtml / it':>11}{'peak MB':>10}{'warm-up s':>11}   "
          f"test MSE after {steps} step(s)")
    for r in rows:
        # saved-tensor hooks do not see inside a compiled graph: its memory is not measured this way
        memory = "n/a" if r["name"] == "mtml compiled" else f"{r['memory']:.2f}"
        print(f"{r['name']:<16}{r['tasks/s']:>10.0f}{ours / r['tasks/s']:>10.2f}x{memory:>10}"
              f"{r['warmup']:>11.2f}   {r['mse']:.3f} ± {r['ci']:.3f}")
    if any(r["name"] == "mtml compiled" for r in rows):
        fast = next(r["tasks/s"] for r in rows if r["name"] == "mtml compiled")
        print("mtml compiled / it: " + ", ".join(f"{r['name']} {fast / r['tasks/s']:.2f}x" for r in rows
                                                  if r["name"] != "mtml compiled"))


# -- the MAML paper protocol: long meta-training, then the meta-test table ----------------------------------
def protocol(args: argparse.Namespace) -> None:
    """K = 5, meta-batch 25, one inner step in training; meta-validation every ``--validate-every``
    iterations keeps the best weights; meta-test on ``--eval-tasks`` new tasks after 0, 1 and 10 steps."""
    header = "".join(f"{f'MSE@{s}':>18}" for s in (0, 1, 10))
    print(f"{'algorithm':<10}{'train s':>9}{'best it':>9}   {header}")
    for name in args.protocol:
        seed = args.seed
        model = make_model(seed)
        if name == "ridge":  # the closed-form head replaces the last layer
            model = model[:-1]
            algorithm = ALGORITHMS.create(name, model)
        else:
            algorithm = ALGORITHMS.create(name, model, inner_lr=args.inner_lr, inner_steps=1,
                                          test_inner_steps=10)
        optimizer = adam(meta_parameters(algorithm, model), args)
        train = SinusoidTasks(shots=5, meta_batch=25)
        val = SinusoidTasks(shots=5, query_shots=100, meta_batch=100)
        gen = torch.Generator().manual_seed(seed)
        val_steps = {"ridge": 0, "metasgd": 1}.get(name, 10)  # Meta-SGD's rates are learned for one step
        best, best_it = float("inf"), 0
        best_state = copy.deepcopy((model.state_dict(), algorithm.state_dict()))
        begin = time.perf_counter()
        for it in range(1, args.protocol_iterations + 1):
            meta_step(algorithm, model, train.sample(gen), optimizer)
            if it % args.validate_every == 0:
                score = meta_evaluate(algorithm, model, val, steps=[val_steps], num_tasks=200,
                                      generator=torch.Generator().manual_seed(seed + 2))[f"loss@{val_steps}"]
                if score < best:
                    best, best_it = score, it
                    best_state = copy.deepcopy((model.state_dict(), algorithm.state_dict()))
        seconds = time.perf_counter() - begin
        model.load_state_dict(best_state[0])
        algorithm.load_state_dict(best_state[1])
        test = meta_evaluate(algorithm, model, val, steps=[0, 1, 10], num_tasks=args.eval_tasks,
                             generator=torch.Generator().manual_seed(seed + 1))
        cells = "".join(f"{test[f'loss@{s}']:>10.3f} ± {test[f'loss@{s}_ci95']:.3f}" for s in (0, 1, 10))
        print(f"{name:<10}{seconds:>9.0f}{best_it:>9}   {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps (one table each)")
    parser.add_argument("--iterations", type=int, default=300, help="timed meta-iterations, each")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny ops: 1 is fastest)")
    parser.add_argument("--adam", choices=["fused", "default"], default="fused",
                        help="outer Adam implementation, shared by all (fused: one kernel per step)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), help="run only these implementations")
    parser.add_argument("--protocol", nargs="+", choices=["maml", "metasgd", "ridge"],
                        help="instead of the speed table: the MAML paper protocol (K = 5) for these")
    parser.add_argument("--protocol-iterations", type=int, default=70_000)
    parser.add_argument("--validate-every", type=int, default=5_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.protocol:
        protocol(args)
        return
    names = []
    for name in args.only or list(BUILDERS):
        if name in PEERS and importlib.util.find_spec(PEERS[name]) is None:
            print(f"skipping {name}: not installed (bash benchmarks/setup_peers.sh installs it)")
            continue
        names.append(name)
    if "mtml" not in names:
        names.insert(0, "mtml")
    for steps in args.steps:
        report(steps, run(steps, args, names), args)


if __name__ == "__main__":
    main()
