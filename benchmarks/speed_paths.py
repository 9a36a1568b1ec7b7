"""Do the speed paths earn their place? Whole shipped runs with each one switched off.

DESIGN.md's rule: a speed path stays only while switching it off makes a shipped config's *whole run* (training,
meta-validation and the meta-test protocol, as ``mtml train`` runs it) at least 1.2x slower, and an oracle test
covers each of its branches. This benchmark runs ``mtml train`` in this process on shipped configs, once with
every path on and once with each applicable path off (:func:`mtml.meta.speed_paths`), in interleaved rounds so
that machine load hits all variants alike, and prints the whole-run time of each variant, its ratio to all-on
(``off/on``: how much the path buys) and the final meta-test loss (the paths compute the same thing, so the
losses agree up to floating-point reordering).

Runs are shortened by ``--scale``: ``max_steps``, ``eval_every``, ``meta_val_tasks`` and ``meta_test_tasks``
are all multiplied by it, so the mix of training, validation and testing stays that of a shipped run that goes
to ``max_steps``; patience is switched off so every variant runs the same steps. ``compiled on`` is the opposite
kind of variant: an opt-in option (``compiled: true``, MAML's compiled meta-gradient) switched on, so its
``off/on`` below 1 is its gain; its first round pays an uncached compile, later rounds hit torch's compile cache.

    .venv/bin/python benchmarks/speed_paths.py                          # every config below, 3 rounds
    .venv/bin/python benchmarks/speed_paths.py --configs sinusoid --rounds 5 --scale 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from mtml.cli import main
from mtml.meta import speed_paths

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "mtml" / "configs"

#: config → (default scale, the variants that apply: name → switches turned off)
MLP = {"all on": {}, "hand gradients off": {"hand_gradients": False}, "MLP chain off (vmap)": {"mlp_chain": False},
       "compiled on": {}}
#: variants that are an opt-in option rather than a switched-off path: the config overrides they add
OPT_IN = {"compiled on": ["training.algorithm_options.compiled=true"]}
CONV = {"all on": {}, "task loop off (vmap)": {"task_loop": False}}
PACKED = {"all on": {}, "packed rows off": {"packed_rows": False}}
PLAN: dict[str, tuple[float, dict[str, dict[str, bool]]]] = {
    "sinusoid": (0.05, MLP),
    "glyphs_maml_5w1s": (0.1, CONV),
    "glyphs_fomaml_5w1s": (0.1, CONV),
    "glyphs_anil_5w1s": (0.1, CONV),
    "glyphs_maml_20w1s": (0.04, CONV),
    "schools": (0.5, PACKED),
    "schools_mixed": (0.5, PACKED),
    "groups2000": (1.0, PACKED),
    "groups2000_mixed": (1.0, PACKED),
}
#: generated grouped tables (not shipped): 2,000 groups of 20 rows, a random intercept per group, two features
GENERATED = {"groups2000": {"trunk_hidden": [16]},
             "groups2000_mixed": {"trunk_hidden": [], "head": "hierarchical", "head_options": {"random": "all"}}}


def generated_config(name: str, root: Path) -> Path:
    """Write the CSV and config of a generated grouped workload under ``root``; the config's path."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    groups, rows = 2000, 20
    owner = np.repeat(np.arange(groups), rows)
    x1, x2 = rng.normal(size=groups * rows), rng.normal(size=groups * rows)
    y = 1 + 0.5 * rng.normal(size=groups)[owner] + 2 * x1 - x2 + rng.normal(size=groups * rows)
    csv = root / "groups.csv"
    if not csv.exists():
        pd.DataFrame({"store": owner, "x1": x1, "x2": x2, "sales": y}).to_csv(csv, index=False)
    config = {"name": name, "seed": 0, "threads": 1,
              "data": {"dataset": "table", "options": {"path": str(csv), "targets": {"sales": "sales"},
                                                       "group_by": "store"}},
              "model": GENERATED[name],
              "training": {"weighting": {"name": "equal"}, "lr": 0.01, "batch_size": 16, "max_steps": 1000,
                           "eval_every": 50, "patience": 20}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def overrides(config: Path, scale: float) -> list[str]:
    loaded = yaml.safe_load(config.read_text())
    training = loaded["training"]
    if "algorithm" not in training:  # joint training: steps and validations
        steps = max(1, round(training["max_steps"] * scale))
        every = max(1, round(training.get("eval_every", 100) * scale))
        out = [f"training.max_steps={steps}", f"training.eval_every={every}", "training.patience=1000000"]
        return [a for o in out for a in ("--set", o)]
    meta_batch = max(1, int(yaml.safe_load(config.read_text())["data"]["options"].get("meta_batch", 1)))
    steps = max(1, round(training["max_steps"] * scale))
    every = max(1, round(training.get("eval_every", 1000) * scale))
    val = max(meta_batch, round(training.get("meta_val_tasks", 200) * scale))
    test = max(meta_batch, round(training.get("meta_test_tasks", 600) * scale))
    out = [f"training.max_steps={steps}", f"training.eval_every={every}", f"training.meta_val_tasks={val}",
           f"training.meta_test_tasks={test}", "training.patience=1000000"]
    return [a for o in out for a in ("--set", o)]


def one_run(config: Path, scale: float, off: dict[str, bool], root: Path,
            clock: Callable[[], float] = time.perf_counter, extra: list[str] | None = None) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(dir=root)) / "run"
    sets = [a for o in extra or [] for a in ("--set", o)]
    with speed_paths(**off), contextlib.redirect_stdout(io.StringIO()):
        start = clock()
        main(["train", str(config), "--quiet", "--out", str(out), *overrides(config, scale), *sets])
        seconds = clock() - start
    test = json.loads((out / "summary.json").read_text())["test"]
    scores = next(iter(test.values()))
    if not any(k.startswith("loss@") for k in scores):  # joint training: the mean test loss over tasks
        return seconds, statistics.fmean(float(m["loss"]) for m in test.values())
    last = max((k for k in scores if k.startswith("loss@") and not k.endswith("_ci95")),
               key=lambda k: int(k.split("@")[1]))
    return seconds, float(scores[last])


def main_(args: argparse.Namespace) -> None:
    clock = time.process_time if args.cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            default_scale, variants = PLAN[name]
            scale = args.scale or default_scale
            config = generated_config(name, Path(tmp)) if name in GENERATED else CONFIGS / f"{name}.yaml"
            if args.variants:
                variants = {v: off for v, off in variants.items() if v == "all on" or v in args.variants}
            times: dict[str, list[float]] = {v: [] for v in variants}
            losses: dict[str, float] = {}
            one_run(config, scale * 0.1, {}, Path(tmp))  # warm-up: imports, data caches, first-call kernels
            for _ in range(args.rounds):
                for variant, off in variants.items():
                    seconds, loss = one_run(config, scale, off, Path(tmp), clock, OPT_IN.get(variant))
                    times[variant].append(seconds)
                    losses[variant] = loss
            base = statistics.median(times["all on"])
            print(f"\n{name}.yaml at scale {scale} ({' '.join(overrides(config, scale)[1::2])}), "
                  f"{args.rounds} rounds, whole `mtml train` run in this process, "
                  f"{'CPU' if args.cpu_time else 'wall-clock'} seconds")
            best = min(times["all on"])
            print(f"{'variant':<26} {'median s':>9} {'min s':>7} {'off/on median':>14} {'off/on min':>11} "
                  f"{'test loss':>10}  rounds s")
            for variant in variants:
                t = times[variant]
                rounds = " ".join(f"{s:.2f}" for s in t)
                print(f"{variant:<26} {statistics.median(t):9.2f} {min(t):7.2f} {statistics.median(t) / base:14.2f} "
                      f"{min(t) / best:11.2f} {losses[variant]:10.4f}  {rounds}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true", help="time CPU seconds of this process (less noisy "
                        "on a shared machine; the runs use one thread)")
    parser.add_argument("--scale", type=float, default=None, help="override each config's default scale")
    parser.add_argument("--variants", nargs="+", help="run only these variants (and 'all on')")
    main_(parser.parse_args())
