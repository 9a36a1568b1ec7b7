"""Issue 17's hostile catalogue, run from outside: the command line as a new user drives it, one case per line.

Each case writes its files into a fresh temporary directory, runs ``python -m mtml ...`` there and is judged:

- ``clean``: it was refused (exit status 2, or 130/143 for signals) with exactly one ``error:`` line, no traceback;
- ``ok``: a valid request that succeeded (exit status 0, no traceback);
- ``WRONG``: anything else — a traceback, a refusal of valid input, acceptance of invalid input, several lines.

    .venv/bin/python benchmarks/hostile_catalogue.py            # every case (about 3 minutes on one core)
    .venv/bin/python benchmarks/hostile_catalogue.py --only seed  # cases whose name contains "seed"

The exit status is 1 when any case is ``WRONG``. Cases the test suite also covers are repeated here on purpose:
this script is the outside view (a fresh process, the installed entry point's behaviour, real files).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTH = """\
name: synth
seed: 0
threads: 1
data:
  dataset: synthetic
  options: {num_tasks: 3, n_train: 40}
model: {trunk_hidden: [8]}
training: {lr: 0.01, batch_size: 16, max_steps: 20, eval_every: 10, patience: 5}
"""

SINE = """\
name: sine
seed: 0
threads: 1
data:
  dataset: sinusoid
  options: {shots: 5, query_shots: 5, meta_batch: 2}
model: {trunk_hidden: [16, 16]}
training: {algorithm: maml, lr: 0.001, max_steps: 4, eval_every: 2, patience: 5, meta_val_tasks: 10,
           meta_test_tasks: 10}
"""


def table_config(targets: str, options: str = "", path: str = "t.csv") -> str:
    """A ``table`` config on ``path``; ``options`` adds ``key: value`` lines to ``data.options``."""
    extra = "".join(f"    {line}\n" for line in options.splitlines())
    return ("name: tab\nseed: 0\nthreads: 1\ndata:\n  dataset: table\n  options:\n"
            f"    path: {path}\n    targets: {targets}\n{extra}model: {{trunk_hidden: [8]}}\n"
            "training: {lr: 0.01, batch_size: 16, max_steps: 10, eval_every: 5, patience: 5}\n")


def write_csv(d: Path, rows: int = 120, inf_row: int | None = None) -> None:
    rng = np.random.default_rng(0)
    a, b, cont = rng.normal(size=rows), rng.normal(size=rows), rng.normal(size=rows)
    if inf_row is not None:
        a[inf_row] = np.inf
    label = rng.integers(0, 3, rows)
    lines = ["a,b,cont,label,half,one"] + [f"{a[i]},{b[i]},{cont[i]},{label[i]},{label[i] + 0.5},1"
                                             for i in range(rows)]
    (d / "t.csv").write_text("\n".join(lines) + "\n")


@dataclass
class Case:
    name: str
    argv: list[str]
    files: Mapping[str, str | bytes]
    expect: str  # "refuse" or "accept"
    needle: str = ""  # a phrase the error line must contain (refusals)
    setup: Callable[[Path], object] | None = None


def cases() -> list[Case]:
    train = ["train", "c.yaml", "--out", "run"]
    synth: dict[str, str | bytes] = {"c.yaml": SYNTH}
    return [
        # config misread silently
        Case("duplicate training key", train, {"c.yaml": SYNTH + "training: {lr: 0.5}\n"}, "refuse", "twice"),
        Case("unknown top-level key", train, {"c.yaml": SYNTH + "trainig: {lr: 0.5}\n"}, "refuse", "trainig"),
        Case("lr 3e-4 (YAML 1.1 string)", train, {"c.yaml": SYNTH.replace("lr: 0.01", "lr: 3e-4")}, "accept"),
        Case("--set training.lr=1e-4", [*train, "--set", "training.lr=1e-4"], synth, "accept"),
        Case("seed 2**64", train, {"c.yaml": SYNTH.replace("seed: 0", "seed: 18446744073709551616")}, "refuse",
             "seed"),
        Case("--set trunk_hidden list", [*train, "--set", "model.trunk_hidden=[8]"], synth, "accept"),
        Case("--set model.options.trunk_hidden", [*train, "--set", "model.options.trunk_hidden=[8]"], synth,
             "refuse", "trunk_hidden"),
        Case("--set unknown key", [*train, "--set", "training.lrr=0.1"], synth, "refuse", "lrr"),
        Case("lr nan", train, {"c.yaml": SYNTH.replace("lr: 0.01", "lr: .nan")}, "refuse", "lr"),
        Case("lr a word", train, {"c.yaml": SYNTH.replace("lr: 0.01", "lr: fast")}, "refuse", "lr"),
        Case("batch_size 1e12 (above the rows: one full batch)", train,
             {"c.yaml": SYNTH.replace("batch_size: 16", "batch_size: 1000000000000")}, "accept"),
        Case("max_steps -1", train, {"c.yaml": SYNTH.replace("max_steps: 20", "max_steps: -1")}, "refuse",
             "max_steps"),
        Case("empty config", train, {"c.yaml": "# nothing yet\n"}, "refuse", "empty"),
        Case("config is a list", train, {"c.yaml": "- a\n- b\n"}, "refuse", "c.yaml"),
        Case("unknown dataset", train, {"c.yaml": SYNTH.replace("dataset: synthetic", "dataset: synthetc")},
             "refuse", "synthetic"),
        Case("unknown weighting", [*train, "--set", "training.weighting.name=pcgradd"], synth, "refuse", "pcgrad"),
        Case("null option", train, {"c.yaml": SYNTH.replace("num_tasks: 3", "num_tasks: null")}, "refuse",
             "num_tasks"),
        Case("precision fp8", [*train, "--set", "training.precision=fp8"], synth, "refuse", "precision"),
        Case("compiled on a model that is no MLP chain", [*train, "--set", "training.algorithm_options.compiled=true",
                                                           "--set", "model.activation=silu"],
             {"c.yaml": SINE}, "refuse", "compiled"),
        Case("compiled: 1 (a number for a flag)", train,
             {"c.yaml": SINE.replace("algorithm: maml,", "algorithm: maml, algorithm_options: {compiled: 1},")},
             "refuse", "compiled"),
        # data accepted silently
        Case("table: misspelt kind", train, {"c.yaml": table_config("{y: {column: label, knd: regression}}")},
             "refuse", "kind", setup=write_csv),
        Case("table: fractional labels", train, {"c.yaml": table_config("{y: {column: half, kind: multiclass}}")},
             "refuse", "fractional", setup=write_csv),
        Case("table: continuous as classes", train,
             {"c.yaml": table_config("{y: {column: cont, kind: multiclass}}")}, "refuse", "cont", setup=write_csv),
        Case("table: one class", train, {"c.yaml": table_config("{y: {column: one, kind: binary}}")}, "refuse",
             "single class", setup=write_csv),
        Case("table: target among features", train,
             {"c.yaml": table_config("{y: {column: label, kind: multiclass}}", "features: [a, b, label]")},
             "refuse", "label", setup=write_csv),
        Case("table: targets as a list", train, {"c.yaml": table_config("[label]")}, "refuse", "targets",
             setup=write_csv),
        Case("table: 4 rows", train, {"c.yaml": table_config("{y: {column: a, kind: regression}}")}, "refuse",
             "rows", setup=lambda d: write_csv(d, rows=4)),
        Case("table: one inf", train, {"c.yaml": table_config("{y: {column: b, kind: regression}}")}, "refuse",
             "row", setup=lambda d: write_csv(d, inf_row=37)),
        Case("table: test_fraction 0", train,
             {"c.yaml": table_config("{y: {column: b, kind: regression}}", "test_fraction: 0")}, "refuse",
             "test_fraction", setup=write_csv),
        Case("table: missing file", train, {"c.yaml": table_config("{y: {column: b, kind: regression}}",
                                                                   path="nope.csv")}, "refuse", "nope.csv"),
        Case("table: non-UTF-8 csv", train, {"c.yaml": table_config("{y: {column: b, kind: regression}}"),
                                             "t.csv": b"a,b\n\xff\xfe,1\n" * 30}, "refuse", "t.csv"),
        Case("table: a valid table", train, {"c.yaml": table_config("{y: {column: label, kind: multiclass}}")},
             "accept", setup=write_csv),
        # OS errors and paths
        Case("config missing", ["train", "missing.yaml", "--out", "run"], {}, "refuse", "missing.yaml"),
        Case("config is a directory", ["train", "cdir", "--out", "run"], {}, "refuse", "cdir",
             setup=lambda d: (d / "cdir").mkdir()),
        Case("non-UTF-8 config", train, {"c.yaml": b"name: \xff\xfe\n"}, "refuse", "c.yaml"),
        Case("--out names a file", ["train", "c.yaml", "--out", "afile"], {**synth, "afile": "x"}, "refuse",
             "afile"),
        Case("--out under /proc", ["train", "c.yaml", "--out", "/proc/mtml-run"], synth, "refuse", "/proc"),
        Case("--resume of nothing", ["train", "--resume", "nothing"], {}, "refuse", "nothing"),
        Case("eval of nothing", ["eval", "nothing"], {}, "refuse", "nothing"),
        # resource bombs (need a finished run first)
        Case("--nproc 1000", [*train, "--nproc", "1000"], synth, "refuse", "nproc"),
        Case("eval --shots 1e8", ["eval", "run", "--shots", "100000000"], {"c.yaml": SINE}, "refuse", "memory",
             setup=lambda d: _run(d, ["train", "c.yaml", "--out", "run", "--quiet"])),
        Case("corrupt checkpoint", ["train", "--resume", "run"], synth, "refuse", "checkpoint",
             setup=lambda d: (_run(d, ["train", "c.yaml", "--out", "run", "--quiet",
                                       "--set", "training.max_steps=100000", "--set", "training.patience=100000",
                                       "--set", "training.checkpoint_every=10"],
                                   kill_after=1.0), _corrupt(d / "run"))),
        Case("torn metrics line and a .tmp, then resume", ["train", "--resume", "run", "--quiet"], synth, "accept",
             setup=lambda d: (_run(d, ["train", "c.yaml", "--out", "run", "--quiet",
                                       "--set", "training.max_steps=400", "--set", "training.patience=1000",
                                       "--set", "training.checkpoint_every=10"],
                                   kill_after=0.5), _tear(d / "run"))),
        Case("train a valid config", [*train, "--quiet"], synth, "accept"),
        Case("meta-train a valid config", [*train, "--quiet"], {"c.yaml": SINE}, "accept"),
    ]


def _run(d: Path, argv: list[str], kill_after: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in ``d``; with ``kill_after``, SIGKILL it that many seconds after its first checkpoint."""
    cmd = [sys.executable, "-m", "mtml", *argv]
    env = {**os.environ, "COLUMNS": "200"}
    if kill_after is None:
        return subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env, timeout=600)
    proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list((d / "run").rglob("*.safetensors")):
        time.sleep(0.2)
    time.sleep(kill_after)
    proc.kill()
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _corrupt(run: Path) -> bool:
    for f in sorted(run.rglob("*.safetensors")) + sorted(run.rglob("*.pt")):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return True


def _tear(run: Path) -> bool:
    log = run / "metrics.jsonl"
    if log.exists():
        with log.open("a") as fh:
            fh.write('{"step": 99999, "val')
    (run / "checkpoint.tmp").write_bytes(b"partial")
    return True


def judge(case: Case, proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The verdict and the line to show. A refusal is one ``error:`` line, optionally followed by indented lines
    that list each problem (the config validator names every bad key on its own line)."""
    text = proc.stdout + proc.stderr
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    first = errors[0] if errors else (text.strip().splitlines() or [""])[-1]
    if errors:
        at = lines.index(errors[0])
        detail = [line.strip() for line in lines[at + 1:] if line.startswith("  ")]
        first = " ".join([first, *detail])
    if "Traceback (most recent call last)" in text:
        return "WRONG", "traceback: " + (text.strip().splitlines() or [""])[-1][:150]
    if case.expect == "accept":
        return ("ok", first[:150]) if proc.returncode == 0 else ("WRONG", f"refused valid input: {first[:150]}")
    if proc.returncode == 0:
        return "WRONG", "accepted"
    if len(errors) != 1:
        return "WRONG", f"{len(errors)} error lines, exit {proc.returncode}: {first[:150]}"
    if case.needle and case.needle.lower() not in first.lower():
        return "WRONG", f"message does not name {case.needle!r}: {first[:150]}"
    return "clean", first[:150]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    verdicts: dict[str, int] = {}
    for case in cases():
        if args.only not in case.name:
            continue
        with tempfile.TemporaryDirectory(prefix="mtml-hostile-") as tmp:
            d = Path(tmp)
            for name, content in case.files.items():
                (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
            if case.setup is not None:
                case.setup(d)
            start = time.perf_counter()
            proc = _run(d, case.argv)
            verdict, line = judge(case, proc)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        print(f"{verdict:<6} {time.perf_counter() - start:5.1f}s  {case.name:<42} {line}", flush=True)
    print(", ".join(f"{v}: {n}" for v, n in sorted(verdicts.items())))
    sys.exit(1 if verdicts.get("WRONG") else 0)


if __name__ == "__main__":
    main()
