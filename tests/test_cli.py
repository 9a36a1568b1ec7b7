"""End-to-end runs of the ``mtml`` command line in a subprocess, into temporary directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtml.datasets import DATASETS
from mtml.weighting import WEIGHTINGS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
SMALL = {
    "name": "cli-test",
    "seed": 0,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 20,
                                                 "n_val": 20, "n_test": 20}},
    "model": {"trunk_hidden": [6]},
    "training": {"weighting": "uncertainty", "lr": 0.01, "batch_size": 10, "max_steps": 30, "eval_every": 10,
                 "patience": 0},
}


def mtml(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mtml", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess[str] | tuple[int, str, str], *needles: str) -> str:
    code, out, err = (proc.returncode, proc.stdout, proc.stderr) if not isinstance(proc, tuple) else proc
    assert code != 0, (out, err)
    assert "Traceback" not in out + err, err
    assert err.strip(), "the reason goes to stderr"
    assert len(err.strip().splitlines()) <= 8, err
    flat = " ".join(err.split())  # the terminal may wrap long messages at spaces
    for needle in needles:
        assert " ".join(needle.split()) in flat, (needle, err)
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of the small synthetic config (shared by the tests that read a run)."""
    root = tmp_path_factory.mktemp("cli")
    cfg = write_config(root / "small.yaml", SMALL)
    out = root / "run"
    proc = mtml("train", cfg, "--out", out, "--quiet", "--set", "training.max_steps=40", "--set", "seed=1")
    assert proc.returncode == 0, proc.stderr
    assert "test metrics" in proc.stdout and str(out) in proc.stdout.replace("\n", "")
    return out


def test_list_shows_every_registered_name() -> None:
    proc = mtml("list")
    assert proc.returncode == 0, proc.stderr
    from mtml.datasets import FAMILIES
    from mtml.meta import ALGORITHMS
    from mtml.nn import ARCHITECTURES, BACKBONES
    from mtml.transfer import ADAPTERS, ESTIMATORS, STRATEGIES

    for registry in (DATASETS, FAMILIES, WEIGHTINGS, ALGORITHMS, ARCHITECTURES, BACKBONES, STRATEGIES, ESTIMATORS,
                     ADAPTERS):
        for name in registry.names():
            assert name in proc.stdout, (registry.kind, name)
    # the short names issue 20 asks `mtml list` to show
    for name in ("gls", "graddrop", "moco", "sdmgrad", "modo", "stch", "excess_mtl", "fairgrad", "config_grad",
                 "dualproj", "si", "auto_lambda", "mtan", "dselect_k", "delta", "bss", "co_tuning", "stochnorm",
                 "lwf", "dann", "cdan", "mdd", "mcc", "transrate"):
        assert f"│ {name} " in proc.stdout, name


def test_train_writes_a_complete_run_directory(trained: Path) -> None:
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "plots/learning_curves.png",
                 "checkpoints/best.safetensors"):
        assert (trained / name).is_file(), name
    assert list((trained / "checkpoints").glob("step-*.safetensors"))
    assert (trained / "plots/learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["training"]["max_steps"] == 40 and config["seed"] == 1  # --set applied and recorded
    assert config["training"]["weighting"]["name"] == "uncertainty"
    assert json.loads((trained / "run.json").read_text())["status"] == "completed"
    summary = json.loads((trained / "summary.json").read_text())
    assert set(summary["test"]) == {"task_0", "task_1", "task_2"} and summary["steps"] == 40
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val", "done"} <= {r["kind"] for r in records}
    assert not [p for p in trained.rglob("*") if p.name.endswith(".tmp")]


def test_eval_reproduces_the_summary(trained: Path) -> None:
    proc = mtml("eval", trained)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((trained / "summary.json").read_text())
    for task, metrics in summary["test"].items():
        assert task in proc.stdout
        assert f"{metrics['mse']:.4f}" in proc.stdout


def test_training_into_an_existing_run_fails_and_changes_nothing(trained: Path, tmp_path: Path) -> None:
    before = snapshot(trained)
    cfg = write_config(tmp_path / "c.yaml", SMALL)
    assert_clean_failure(mtml("train", cfg, "--out", trained, "--quiet"), "already exists", str(trained))
    assert snapshot(trained) == before


def test_bad_input_fails_cleanly(trained: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", SMALL)
    typo = write_config(tmp_path / "typo.yaml", {**SMALL, "training": {**SMALL["training"], "lrr": 0.1}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [1,\n")
    resumable = tmp_path / "resumable"
    shutil.copytree(trained, resumable)
    latest = sorted((resumable / "checkpoints").glob("step-*.safetensors"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    q = "--quiet"
    cases = {
        "typo": (["train", typo, "--out", tmp_path / "o1", q], ["training.lrr", "Did you mean 'lr'?"]),
        "type": (["train", cfg, "--out", tmp_path / "o2", q, "--set", "training.lr=fast"], ["training.lr", "fast"]),
        "dataset": (["train", cfg, "--out", tmp_path / "o4", q, "--set", "data.dataset=pengiuns"],
                    ["data.dataset", "Did you mean 'penguins'?"]),
        "weighting": (["train", cfg, "--out", tmp_path / "o5", q, "--set", "training.weighting=uncertainity"],
                      ["training.weighting.name", "Did you mean 'uncertainty'?"]),
        # infinite noise makes the generated targets non-finite: the Task check must catch it
        "nan": (["train", cfg, "--out", tmp_path / "o6", q, "--set", "data.options.noise=.inf"],
                ["task_0", "NaN/inf", "row"]),
        "yaml": (["train", broken, "--out", tmp_path / "o7", q], [str(broken), "not valid YAML"]),
        "set": (["train", cfg, "--out", tmp_path / "o8", q, "--set", "training.lr"], ["KEY=VALUE"]),
        "truncated": (["train", "--resume", resumable, q], [latest.name, "corrupt or truncated"]),
        "not a run": (["eval", tmp_path], ["not an mtml run directory"]),
        "no config": (["train", q], ["CONFIG"]),
        "resume with config": (["train", cfg, "--resume", trained, q], ["--resume"]),
        "bad split": (["eval", trained, "--split", "bogus"], ["--split"]),
    }
    procs = {}
    pending = list(cases)
    while pending or procs:  # two at a time: one per core
        while pending and len(procs) < 2:
            name = pending.pop(0)
            procs[name] = start(*cases[name][0])
        name = next(iter(procs))
        proc = procs.pop(name)
        out, err = proc.communicate(timeout=120)
        assert_clean_failure((proc.returncode, out, err), *cases[name][1])
    for i in (1, 2, 4, 5, 6, 7, 8):  # a failed start leaves no run directory behind
        assert not (tmp_path / f"o{i}").exists(), i


def _wait_for_a_checkpoint(proc: subprocess.Popen[str], out: Path) -> None:
    """Until the run in ``out`` has written a checkpoint (failing if ``proc`` ends first, or after 180 s: process
    start, torch import and 10 steps on a slow, busy host)."""
    deadline = time.monotonic() + 180
    while not list((out / "checkpoints").glob("step-*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_sigkill_then_resume_finishes(tmp_path: Path) -> None:
    data = {**SMALL, "data": {**SMALL["data"], "options": {**SMALL["data"]["options"], "num_tasks": 8}},
            "training": {**SMALL["training"], "max_steps": 600, "eval_every": 50, "checkpoint_every": 10,
                         "keep_checkpoints": 2}}
    cfg = write_config(tmp_path / "long.yaml", data)
    out = tmp_path / "run"
    proc = start("train", cfg, "--out", out, "--quiet")
    try:
        _wait_for_a_checkpoint(proc, out)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()

    resumed = mtml("train", "--resume", out, "--quiet", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 600 or summary["stopped_early"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 10
    assert records[-1]["kind"] == "done"
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert len(list((out / "checkpoints").glob("step-*.safetensors"))) <= 2


def _processes_with(tag: str) -> list[int]:
    """Pids of this machine's processes whose environment holds ``tag`` (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _terminal_sigint() -> None:
    """In the child, before exec: SIGINT as a terminal's foreground process has it. A shell without job control
    starts background jobs (``pytest ... &`` in a script, some CI runners) with SIGINT ignored, children inherit
    that, and Python then installs no Ctrl-C handler: the test's SIGINT would be dropped and the run go on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _end(proc: subprocess.Popen[str], tag: str | None = None) -> None:
    """Kill ``proc`` (and every process carrying ``tag``) if a failed test left it running: these runs are set to
    100 000 steps and would hold a core for the rest of the suite."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=30)
    for pid in _processes_with(tag) if tag else []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_stops_every_rank_with_one_line_and_status_130(tmp_path: Path, nproc: int) -> None:
    data = {**SMALL, "threads": 1, "training": {**SMALL["training"], "max_steps": 100_000, "eval_every": 50,
                                                "checkpoint_every": 10}}
    cfg = write_config(tmp_path / "long.yaml", data)
    out, tag = tmp_path / "run", f"MTML_TEST_TAG={os.getpid()}-{nproc}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet",
                             "--nproc", str(nproc)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, tag.split("=")[0]: tag.split("=")[1]}, preexec_fn=_terminal_sigint)
    try:
        _wait_for_a_checkpoint(proc, out)
        assert len(_processes_with(tag)) == 1 + (nproc if nproc > 1 else 0)  # the launcher and its ranks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _end(proc, tag)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.count("interrupted") == 1 and "mtml train --resume" in err, err
    assert _processes_with(tag) == []  # no rank outlives the launcher
    assert list((out / "checkpoints").glob("step-*.safetensors"))  # the run can be continued


def test_sigterm_stops_like_ctrl_c_marks_the_run_interrupted_and_resumes(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) used to end the process silently with run.json saying running."""
    data = {**SMALL, "threads": 1, "training": {**SMALL["training"], "max_steps": 100_000, "eval_every": 50,
                                                "checkpoint_every": 10}}
    cfg = write_config(tmp_path / "long.yaml", data)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_a_checkpoint(proc, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _end(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.count("terminated") == 1 and "mtml train --resume" in err, err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    resumed = subprocess.Popen([sys.executable, "-m", "mtml", "train", "--resume", str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 180  # process start, torch import and 10 steps on a slow, busy host
        while '"resume"' not in (out / "metrics.jsonl").read_text():
            assert resumed.poll() is None, resumed.communicate()
            assert time.monotonic() < deadline, "the resumed run did not start"
            time.sleep(0.02)
        assert json.loads((out / "run.json").read_text())["status"] == "running"
        resumed.send_signal(signal.SIGTERM)
        _, err = resumed.communicate(timeout=60)
    finally:
        _end(resumed)
    assert resumed.returncode == 143 and "Traceback" not in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked ranks and /proc are Linux's")
def test_ranks_end_when_the_launcher_is_killed(tmp_path: Path) -> None:
    data = {**SMALL, "threads": 1, "training": {**SMALL["training"], "max_steps": 100_000, "eval_every": 50}}
    cfg = write_config(tmp_path / "long.yaml", data)
    out, tag = tmp_path / "run", f"{os.getpid()}-killed-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet",
                             "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**ENV, "MTML_TEST_TAG": tag, "MTML_LAUNCH": "fork"})
    try:
        deadline = time.monotonic() + 180  # process start, torch import and 10 steps on a slow, busy host
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.02)
        assert len(_processes_with(tag)) == 3
        proc.kill()  # SIGKILL: the launcher cannot pass anything on
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _processes_with(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _processes_with(tag)
    finally:
        _end(proc, tag)
    assert left == []  # no orphaned rank keeps training


def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = mtml("demo", "--quick", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for dataset in ("penguins", "schools"):
        for label in ("multitask", "singletask"):
            run = out / dataset / label
            assert (run / "summary.json").is_file() and (run / "plots/learning_curves.png").is_file(), run
        assert dataset in proc.stdout
    assert "multi-task" in proc.stdout and "single-task" in proc.stdout


def test_table_with_missing_targets_trains_masked_tasks_and_refuses_an_empty_one(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, generator=g)
    price = (x @ torch.tensor([1.0, -2.0, 0.5])).tolist()
    kind = (x[:, 0] > 0).long().tolist()
    lines = ["a,b,c,price,kind,empty"]
    for i, row in enumerate(x.tolist()):
        p = "" if i % 5 == 0 else f"{price[i]:.4f}"  # every fifth price unknown
        lines.append(f"{row[0]:.4f},{row[1]:.4f},{row[2]:.4f},{p},k{kind[i]},")
    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(lines) + "\n")
    data = {"dataset": "table", "options": {"path": str(csv), "features": ["a", "b", "c"],
                                            "targets": {"price": {"column": "price", "kind": "regression"},
                                                        "kind": {"column": "kind", "kind": "multiclass"}}}}
    config = {"name": "rows", "seed": 0, "threads": 1, "data": data, "model": {"trunk_hidden": [8]},
              "training": {"weighting": {"name": "mgda"}, "lr": 0.01, "batch_size": 32, "max_steps": 30,
                           "eval_every": 10, "patience": 0}}
    out = tmp_path / "run"
    proc = mtml("train", write_config(tmp_path / "rows.yaml", config), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test"]) == {"price", "kind"} and summary["test"]["price"]["mse"] < 1.0
    empty = {**config, "data": {**data, "options": {**data["options"], "targets": {
        **data["options"]["targets"], "nothing": {"column": "empty", "kind": "regression"}}}}}
    proc = mtml("train", write_config(tmp_path / "empty.yaml", empty), "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(proc, "nothing", "empty")
    assert not (tmp_path / "o").exists()


def test_an_mtml_warning_is_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    """bf16 on a CPU without bfloat16 arithmetic (an AVX2-only /proc/cpuinfo stands in for one): the command
    line shows mtml's warning as one `warning:` line, without Python's file name, category and source line."""
    config = write_config(tmp_path / "c.yaml", {**SMALL, "training": {**SMALL["training"], "precision": "bf16"}})
    code = ("import sys, mtml.engine._precision as p; p._cpuinfo = lambda: 'flags : fpu sse2 avx2'; "
            "from mtml.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(config), "--out", str(tmp_path / "run"),
                           "--quiet"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: training.precision: bf16 on this CPU is emulated: it has no bf16 "
                               "arithmetic"), proc.stderr
    assert lines[0].endswith("; use fp32."), proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 30
