"""``mtml eval`` of a run that is not finished says so (issue 17: it printed a run's interim numbers as final)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
CONFIG = {
    "name": "interim", "seed": 0,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 6, "latent_dim": 2, "n_train": 20,
                                                 "n_val": 10, "n_test": 10}},
    "model": {"trunk_hidden": [8]},
    "training": {"lr": 0.01, "batch_size": 10, "max_steps": 400_000, "eval_every": 20, "patience": 0},
}


def mtml(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_eval_of_a_run_in_training_then_of_a_killed_one_says_the_numbers_are_interim(tmp_path: Path) -> None:
    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump(CONFIG))
    trainer = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoints" / "best.safetensors").exists():
            assert trainer.poll() is None, trainer.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        during = mtml("eval", out)
        assert during.returncode == 0, during.stderr
        assert "still being trained by another process" in " ".join(during.stderr.split())
        trainer.kill()
        trainer.communicate()
        after = mtml("eval", out)
        assert after.returncode == 0, after.stderr
        flat = " ".join(after.stderr.split())
        assert "is running, not completed" in flat and "mtml train --resume" in flat
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.communicate()


def test_eval_of_a_completed_run_adds_no_note(tmp_path: Path) -> None:
    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump({**CONFIG, "training": {**CONFIG["training"], "max_steps": 40}}))
    assert mtml("train", cfg, "--out", out, "--quiet").returncode == 0
    done = mtml("eval", out)
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr
