"""The few-shot results table on `glyphs` (docs/glyphs.md, "Results"): one `mtml train` per shipped config.

Each row is one shipped config `src/mtml/configs/glyphs_<method>_<ways>w<shots>s.yaml`, trained with

    mtml train src/mtml/configs/glyphs_<row>.yaml --out OUT/<row> --quiet

under a wall-clock `--timeout`. The script records the wall-clock time and the CPU time (user + system, from
`os.wait4`) of that one command in `OUT/<row>/timing.json`, reads the meta-test score (mean ± 95% CI over
`training.meta_test_tasks` tasks) from `OUT/<row>/summary.json`, and prints a Markdown table with the published
Omniglot numbers of the same method and setting next to it (and writes it to `OUT/table.md`).

    .venv/bin/python benchmarks/glyphs_table.py --out /tmp/glyph_runs/table              # every row, one at a time
    .venv/bin/python benchmarks/glyphs_table.py --only protonet_20w1s,ridge_20w1s --jobs 2
    .venv/bin/python benchmarks/glyphs_table.py --collect --out /tmp/glyph_runs/table     # table only, no training

A row whose run directory already holds a completed run is not trained again (`--collect` trains nothing);
a row that has no completed run is listed as missing. Runs use the configs' `threads: 1`, so `--jobs 2` runs two
rows side by side on a 2-core machine.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "src" / "mtml" / "configs"
MTML = [sys.executable, "-m", "mtml"]

# Rows in order of importance (the order they are trained in and listed in).
ROWS = [
    "protonet_20w1s", "ridge_20w1s", "maml_20w1s",
    "protonet_5w1s", "ridge_5w1s", "maml_5w1s", "fomaml_5w1s", "anil_5w1s",
    "protonet_5w5s", "ridge_5w5s", "protonet_20w5s", "ridge_20w5s",
    "fomaml_20w1s", "anil_20w1s",
    # issue 16: ProtoNets trained 60-way (Snell et al.'s Omniglot protocol), then the newer methods' short rows
    "protonet_60wtrain_20w1s",
    "maml_pp_5w1s", "metaoptnet_5w1s", "proto_maml_5w1s", "baseline_pp_5w1s", "rfs_linear_5w1s",
]

METHODS = {"protonet": "ProtoNets", "ridge": "ridge (R2D2)", "maml": "MAML", "fomaml": "first-order MAML",
           "anil": "ANIL", "protonet_60wtrain": "ProtoNets, 60-way training", "maml_pp": "MAML++",
           "metaoptnet": "MetaOptNet-SVM", "proto_maml": "Proto-MAML", "baseline_pp": "Baseline++",
           "rfs_linear": "linear probe (RFS)"}

# Published Omniglot test accuracies (%), Conv-4-like networks, (ways, shots) -> value; None = not reported /
# not sure. MAML and first-order MAML: Finn et al. 2017, table 1; ProtoNets: Snell et al. 2017, table 1;
# R2-D2: Bertinetto et al. 2019, table 1; ANIL: Raghu et al. 2020 (20-way only); MAML++: Antoniou et al. 2019,
# table 1 (its 5-way 5-shot figure not re-checked here: n/a). MetaOptNet, Baseline++ and RFS report no Omniglot
# N-way figures (mini-/tiered-ImageNet, CIFAR-FS, FC100; Baseline++ Omniglot only cross-domain to EMNIST), nor
# does Proto-MAML outside Meta-Dataset's variable-way episodes: n/a.
PUBLISHED: dict[str, dict[tuple[int, int], float | None]] = {
    "maml": {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9},
    "fomaml": {(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9},
    "protonet": {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9},
    # R2-D2's 20-way figures are in its table 1 but were not re-checked against the paper here: n/a.
    "ridge": {(5, 1): 98.6, (5, 5): 99.7, (20, 1): None, (20, 5): None},
    "anil": {(5, 1): None, (5, 5): None, (20, 1): 96.2, (20, 5): 98.0},
    "protonet_60wtrain": {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9},  # Snell et al. train 60-way
    "maml_pp": {(5, 1): 99.47, (5, 5): None, (20, 1): 97.65, (20, 5): 99.33},
}
CITES = {"maml": "Finn et al. 2017", "fomaml": "Finn et al. 2017", "protonet": "Snell et al. 2017",
         "ridge": "Bertinetto et al. 2019", "anil": "Raghu et al. 2020", "maml_pp": "Antoniou et al. 2019"}


def config_path(row: str) -> Path:
    return CONFIGS / f"glyphs_{row}.yaml"


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def train(row: str, out: Path, timeout: float, start_before: float | None = None) -> None:
    """One `mtml train` of the row's config into out/row; wall and CPU seconds go to out/row/timing.json."""
    run_dir = out / row
    if completed(run_dir):
        print(f"[{row}] already completed in {run_dir}", file=sys.stderr)
        return
    if start_before is not None and time.time() > start_before:
        print(f"[{row}] not started: past --start-before", file=sys.stderr)
        return
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists but holds no completed run; remove it (or resume it by hand).")
    cmd = [*MTML, "train", str(config_path(row)), "--out", str(run_dir), "--quiet"]
    log = out / f"{row}.log"
    print(f"[{row}] {' '.join(cmd)}  (log: {log})", file=sys.stderr)
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = start + timeout
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                print(f"[{row}] killed after {timeout:.0f} s (timeout)", file=sys.stderr)
                break
            time.sleep(1.0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here by wait4, not by Popen
    wall = time.time() - start
    timing = {"command": " ".join(cmd[2:]).replace(str(ROOT) + "/", ""), "wall_s": round(wall, 1),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1) if usage else None,
              "exit_status": os.waitstatus_to_exitcode(status), "host": os.uname().nodename,
              "cpu_count": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]}
    if run_dir.is_dir():
        (run_dir / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(f"[{row}] exit {timing['exit_status']}, wall {wall / 60:.1f} min, cpu {timing['cpu_s']} s",
          file=sys.stderr)


def _cell(mean: float, ci: float) -> str:
    return f"{100 * mean:.1f} ± {100 * ci:.1f}"


def row_line(row: str, out: Path) -> str:
    method, setting = row.rsplit("_", 1)
    ways, shots = (int(x) for x in setting.rstrip("s").split("w"))
    cfg = yaml.safe_load(config_path(row).read_text()) if config_path(row).is_file() else None
    pub = PUBLISHED.get(method, {}).get((ways, shots))
    published = str(pub) if pub is not None else "n/a"
    name = f"{METHODS.get(method, method)}"
    run_dir = out / row
    if cfg is None or not completed(run_dir):
        why = "no config" if cfg is None else "not run / not completed"
        return f"| {name} | {ways}-way {shots}-shot | — ({why}) | {published} | | | | | `glyphs_{row}.yaml` |"
    summary = json.loads((run_dir / "summary.json").read_text())
    test = next(iter(summary["test"].values()))
    step = max(int(k.split("@")[1]) for k in test if k.startswith("accuracy@") and not k.endswith("_ci95"))
    acc = _cell(test[f"accuracy@{step}"], test[f"accuracy@{step}_ci95"])
    timing_file = run_dir / "timing.json"
    if timing_file.is_file():
        timing = json.loads(timing_file.read_text())
        wall, cpu = timing["wall_s"], timing.get("cpu_s")
        where = f"{timing.get('host', '?')}, {timing.get('cpu_count', '?')}-core CPU"
    else:  # trained by hand: wall time from run.json
        times = json.loads((run_dir / "run.json").read_text())
        wall, cpu = times["finished"] - times["started"], None
        where = "?"
    o, t = cfg["data"]["options"], cfg["training"]
    algo = t.get("algorithm_options", {})
    budget = (f"{summary['steps']} steps (best {summary['best_step']}) × {o.get('meta_batch', 4)} tasks, "
              f"{o.get('train_query_shots', o.get('query_shots', 15))} queries/class")
    if o.get("train_ways", ways) != ways:
        budget += f", trained {o['train_ways']}-way"
    schedule = t.get("scheduler")
    if schedule:
        budget += f", {schedule if isinstance(schedule, str) else schedule.get('name', 'constant')} lr"
    if "inner_steps" in algo:
        budget += f", {algo['inner_steps']} inner step(s) (test {algo.get('test_inner_steps', algo['inner_steps'])})"
        if algo.get("zero_head"):
            budget += ", zero head"
    cpu_txt = f"{cpu / 60:.1f}" if cpu is not None else "n/a"
    return (f"| {name} | {ways}-way {shots}-shot | **{acc}** ({int(test['num_tasks'])} tasks) | {published} | "
            f"{wall / 60:.1f} | {cpu_txt} | {budget} | {where} | `glyphs_{row}.yaml` |")


def table(rows: list[str], out: Path) -> str:
    head = ("| method | setting | glyphs meta-test accuracy, % (mean ± 95% CI) | Omniglot published, % | "
            "wall-clock, min | CPU time, min | training budget | ran on | config |\n"
            "|---|---|---|---|---|---|---|---|---|")
    cites = "; ".join(f"{METHODS[m]}: {c}" for m, c in CITES.items())
    return head + "\n" + "\n".join(row_line(r, out) for r in rows) + f"\n\nPublished numbers: {cites}.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated rows, e.g. protonet_20w1s,ridge_20w1s (default: all)")
    p.add_argument("--out", type=Path, default=Path("/tmp/glyph_runs/table"), help="parent of the run directories")
    p.add_argument("--timeout", type=float, default=2400.0, help="wall-clock seconds per row before it is killed")
    p.add_argument("--jobs", type=int, default=1, help="rows trained at the same time (each uses 1 thread)")
    p.add_argument("--start-before", metavar="HH:MM",
                   help="start no row after this UTC time today (rows already running finish)")
    p.add_argument("--collect", action="store_true", help="train nothing; build the table from --out")
    args = p.parse_args()
    rows = ROWS if not args.only else [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if not config_path(r).is_file()]
    if unknown and not args.collect:
        raise SystemExit(f"no shipped config for rows {unknown}; expected e.g. {config_path(unknown[0])}")
    args.out.mkdir(parents=True, exist_ok=True)
    start_before = None
    if args.start_before:
        hh, mm = (int(x) for x in args.start_before.split(":"))
        now = time.gmtime()
        start_before = calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, 0, 0, 0, 0))
    if not args.collect:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda r: train(r, args.out, args.timeout, start_before), rows))
    text = table(rows, args.out)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
