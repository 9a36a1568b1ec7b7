"""``mtml export``: every exported head, loaded by onnxruntime or ``torch.jit.load`` on fresh inputs of another batch
size, equals the PyTorch model of the run's best checkpoint to 1e-5; bad requests are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mtml.workflows._export as export_mod
from mtml.config import Config
from mtml.engine import Run, load_checkpoint, restore
from mtml.errors import CheckpointError, ConfigError, MtmlError
from mtml.workflows import build, export_run, read_config, train

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnxruntime as ort

JOINT: dict[str, Any] = {
    "name": "export", "seed": 3, "threads": 1,
    "data": {"dataset": "penguins"},  # a classification and a regression head on shared rows
    "model": {"trunk_hidden": [16], "head_hidden": [8]},
    "training": {"lr": 0.01, "batch_size": 16, "max_steps": 20, "eval_every": 10, "patience": 0},
}
META: dict[str, Any] = {
    "name": "export-meta", "seed": 2, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 3, "query_shots": 3, "meta_batch": 2}},
    "model": {"trunk_hidden": [8, 8]},
    "training": {"algorithm": "maml", "max_steps": 4, "eval_every": 2, "meta_val_tasks": 4, "meta_test_tasks": 4},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {"joint": train(Config.from_dict(JOINT), root / "joint")[0].path,
            "meta": train(Config.from_dict(META), root / "meta")[0].path}


def _reference(run: Path) -> Any:
    """The run's best model, built and restored here (independently of the export)."""
    built = build(read_config(Run.open(run)))
    modules = {"model": built.model, **({"algorithm": built.algorithm} if built.algorithm is not None else {})}
    restore(load_checkpoint(run / "checkpoints" / "best.safetensors"), modules=modules)
    return built


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_task_head_equals_the_pytorch_model_on_fresh_rows(runs: dict[str, Path], tmp_path: Path,
                                                                fmt: str) -> None:
    result = export_run(runs["joint"], fmt, tmp_path / fmt)
    built = _reference(runs["joint"])
    model = built.model.eval()
    assert [h.name for h in result.heads] == [t.name for t in built.tasks] == ["species", "body_mass"]
    for head, task in zip(result.heads, built.tasks, strict=True):
        x = task.val.x[:37].float()  # another batch size than the export's example: the batch is dynamic
        with torch.no_grad():
            want = model(x, task.name).numpy()
        file = tmp_path / fmt / head.file
        if fmt == "onnx":
            got = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        else:
            got = torch.jit.load(str(file))(x).detach().numpy()
        assert got.shape == want.shape == (37, head.outputs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert head.max_abs_diff <= 1e-5 and head.input_shape == ["batch", x.shape[1]]
    info = json.loads((tmp_path / fmt / "export.json").read_text())
    assert info["format"] == fmt and [h["file"] for h in info["heads"]] == [h.file for h in result.heads]
    card = (tmp_path / fmt / "MODEL_CARD.md").read_text()
    summary = json.loads((runs["joint"] / "summary.json").read_text())
    assert "species" in card and "body_mass" in card and "## Load" in card and '"max_steps": 20' in card
    assert f"| species | accuracy | {summary['test']['species']['accuracy']:.4f} |" in card


def test_a_meta_run_exports_its_trunk_and_the_task_learners_initialisation(runs: dict[str, Path]) -> None:
    result = export_run(runs["meta"])  # default: onnx into RUN/export
    assert [h.name for h in result.heads] == ["trunk", "task"] and result.folder == runs["meta"] / "export"
    built = _reference(runs["meta"])
    x = torch.linspace(-5, 5, 11)[:, None]
    with torch.no_grad():
        feats, out = built.model.features(x, "task").numpy(), built.model(x, "task").numpy()
    trunk = ort.InferenceSession(str(result.folder / "trunk.onnx"), providers=["CPUExecutionProvider"])
    task = ort.InferenceSession(str(result.folder / "task.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(trunk.run(None, {"x": x.numpy()})[0], feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(task.run(None, {"x": x.numpy()})[0], out, rtol=1e-5, atol=1e-5)
    assert result.heads[0].kind == "features" and result.heads[0].outputs == 8
    assert "before adaptation" in (result.folder / "MODEL_CARD.md").read_text()


def test_an_export_that_does_not_match_pytorch_is_refused_and_not_kept(runs: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod._export_one

    def off_by_a_bit(graph: Any, x: torch.Tensor, path: Path, fmt: str) -> np.ndarray:
        return real(graph, x, path, fmt) + 1e-3

    monkeypatch.setattr(export_mod, "_export_one", off_by_a_bit)
    with pytest.raises(MtmlError, match=r"the onnx export of 'species' computes outputs up to 0\.001 away from "
                                        r"PyTorch's \(allowed 1e-05\); not written"):
        export_run(runs["joint"], "onnx", tmp_path / "bad")
    assert not (tmp_path / "bad" / "species.onnx").exists() and not (tmp_path / "bad" / "export.json").exists()


def test_bad_export_requests_are_one_line_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--format must be one of onnx, torchscript\. Got 'tflite'"):
        export_run(runs["joint"], "tflite")
    with pytest.raises(CheckpointError, match="is not an mtml run directory"):
        export_run(tmp_path)
    unvalidated = tmp_path / "young"
    shutil.copytree(runs["joint"], unvalidated)
    (unvalidated / "checkpoints" / "best.safetensors").unlink()
    cli = subprocess.run([sys.executable, "-m", "mtml", "export", str(unvalidated)], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode != 0 and "Traceback" not in cli.stderr
    message = " ".join(cli.stderr.split())
    assert "has no best checkpoint" in message and "mtml train --resume RUN" in message
    helped = subprocess.run([sys.executable, "-m", "mtml", "export", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "onnx or torchscript" in " ".join(helped.stdout.split())
