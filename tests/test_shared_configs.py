"""Every shipped config whose tasks share rows makes one trunk pass per task group per step (and no more).

Each config is built as ``mtml train`` builds it (shrunk data), one batch is drawn by the trainer's batcher and
one :func:`~mtml.engine._joint.joint_step` counts the rows that go through the trunk: every group's batch exactly
once. Tasks on the same rows used to run the trunk once per task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mtml.config import load_config
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.engine._joint import TaskBatcher, joint_step
from mtml.groups import task_groups
from mtml.weighting import WEIGHTINGS
from mtml.workflows import build

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FASHION = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
TINY_IMAGES = ["data.options.characters_per_alphabet=3", "data.options.examples_per_character=6",
               "data.options.fashion_train=40", "data.options.fashion_val=20", "data.options.fashion_test=20",
               "data.options.alphabets=[GREEK,LATIN]"]
CASES: list[Any] = [
    ("penguins", [], "mgda"),
    ("movies", ["data.options.n=300"], "equal"),
    ("tables", ["data.options.movies_n=300"], "pcgrad"),
    pytest.param("fashion", ["data.options.train_size=64", "data.options.val_size=32", "data.options.test_size=32"],
                 "equal", marks=pytest.mark.skipif(not FASHION, reason="needs dataset-fashion-mnist")),
    pytest.param("images", TINY_IMAGES, "equal",
                 marks=[pytest.mark.skipif(not FASHION, reason="needs dataset-fashion-mnist"), pytest.mark.slow]),
]


@pytest.mark.parametrize(("name", "overrides", "weighting"), CASES)
def test_one_trunk_pass_per_group(name: str, overrides: list[str], weighting: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTML_CACHE", str(tmp_path))
    config = load_config(CONFIGS / f"{name}.yaml", overrides)
    exp = build(config)
    groups = task_groups(exp.tasks)
    assert any(g.shared for g in groups), f"{name}: no task group shares rows"
    batch_size = config.training.batch_size
    batch = TaskBatcher(exp.tasks, batch_size).sample(torch.Generator().manual_seed(0))
    rows: list[int] = []
    exp.model.trunk.register_forward_hook(lambda mod, a, out: rows.append(int(a[0].shape[0])))
    w = WEIGHTINGS.create(weighting, [t.name for t in exp.tasks])
    joint_step(exp.model, {t.name: t for t in exp.tasks}, batch, w, torch.optim.SGD(exp.model.parameters(), lr=0.0))
    want = sum(min(batch_size, g.rows("train")) for g in groups)
    assert sum(rows) == want, f"{name}: trunk saw {rows} rows in {len(rows)} calls for {len(groups)} groups"
    assert len(rows) <= len(groups)
