"""TensorBoard and MLflow trackers (``logging:``): what a run logs is read back from the event files and the MLflow
store and compared with metrics.jsonl, through resume, a failing backend and a missing package."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mtml.config import Config
from mtml.engine import Run
from mtml.errors import ConfigError
from mtml.report import open_trackers
from mtml.report._tracking import TensorBoardTracker, scalars
from mtml.workflows import resume_run, train

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

JOINT: dict[str, Any] = {
    "name": "tracked", "seed": 1, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 6, "latent_dim": 2, "n_train": 30,
                                                 "n_val": 10, "n_test": 10}},
    "model": {"trunk_hidden": [8]},
    "training": {"weighting": "uncertainty", "lr": 0.02, "batch_size": 8, "max_steps": 30, "eval_every": 10,
                 "patience": 0, "keep_checkpoints": 5, "scheduler": {"name": "cosine", "warmup": 3},
                 "grad_clip": 1.0},
    "logging": {"tensorboard": True, "mlflow": True},
}
META: dict[str, Any] = {
    "name": "tracked-meta", "seed": 2, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 3, "query_shots": 3, "meta_batch": 2}},
    "model": {"trunk_hidden": [8]},
    "training": {"algorithm": "maml", "max_steps": 10, "eval_every": 5, "meta_val_tasks": 6, "meta_test_tasks": 6,
                 "patience": 0},
    "logging": {"tensorboard": True, "mlflow": True, "experiment": "few-shot"},
}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path / "tensorboard"))
    acc.Reload()
    return acc


def _mlflow(path: Path) -> tuple[MlflowClient, str]:
    ids = json.loads((path / "mlflow.json").read_text())
    return MlflowClient(tracking_uri=ids["tracking_uri"]), ids["run_id"]


def test_a_joint_run_sends_every_logged_number_to_tensorboard_and_mlflow(tmp_path: Path) -> None:
    run, _ = train(Config.from_dict(JOINT), tmp_path / "run")
    records = _records(run.path)
    acc = _events(run.path)
    tags = set(acc.Tags()["scalars"])
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        if r["kind"] in ("train", "val"):
            for tag, value in scalars(r, r["kind"]).items():
                expected.setdefault(tag, {})[r["step"]] = value
    assert {"train/lr", "train/grad_norm", "train/weights/task_0", "train/task_losses/task_1", "val/objective",
            "val/tasks/task_0/r2"} <= set(expected)
    assert set(expected) <= tags
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag  # event files hold float32
    summary = json.loads((run.path / "summary.json").read_text())
    assert acc.Scalars("test/task_0/mse")[0].value == pytest.approx(summary["test"]["task_0"]["mse"], rel=1e-6)

    client, run_id = _mlflow(run.path)
    assert (tmp_path / "mlflow.db").is_file()  # the default store: beside the run directory
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params["training.lr"] == "0.02" and json.loads(got.data.params["training.scheduler.name"]) == \
        "cosine"
    for tag in ("train/lr", "val/objective", "val/tasks/task_1/loss"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert history == pytest.approx(expected[tag], rel=1e-12), tag
    assert got.data.metrics["test/task_1/r2"] == pytest.approx(summary["test"]["task_1"]["r2"], rel=1e-12)
    assert client.get_experiment(got.info.experiment_id).name == "tracked"


def test_meta_validation_curves_carry_their_confidence_intervals(tmp_path: Path) -> None:
    run, _ = train(Config.from_dict(META), tmp_path / "run")
    vals = [r for r in _records(run.path) if r["kind"] == "val"]
    keys = [k for k in vals[0]["meta_val"] if k.endswith("_ci95")]
    assert keys
    acc = _events(run.path)
    for key in keys:
        got = {e.step: e.value for e in acc.Scalars(f"val/meta_val/{key}")}
        assert got == pytest.approx({r["step"]: r["meta_val"][key] for r in vals}, rel=1e-6)
    client, run_id = _mlflow(run.path)
    metric = f"val/meta_val/{keys[0].replace('@', '_at_')}"  # MLflow keys allow no '@'
    assert [m.value for m in client.get_metric_history(run_id, metric)] == pytest.approx(
        [r["meta_val"][keys[0]] for r in vals], rel=1e-12)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "few-shot"


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_drops_the_lost_steps(tmp_path: Path) -> None:
    config = Config.from_dict({**JOINT, "training": {**JOINT["training"], "eval_every": 5}})
    run, _ = train(config, tmp_path / "run")
    first = _mlflow(run.path)[1]
    # killed just after the step-15 checkpoint: later checkpoints gone, the log keeps what it had written
    for ckpt in (run.path / "checkpoints").glob("step-*.safetensors"):
        if int(ckpt.stem.split("-")[1]) > 15:
            ckpt.unlink()
    Run.open(run.path).set_status("running")
    resume_run(run.path)
    acc = _events(run.path)
    steps = [e.step for e in acc.Scalars("val/objective")]
    assert steps == [5, 10, 15, 20, 25, 30]  # each once: the resumed file purged the first file's 20, 25, 30
    client, run_id = _mlflow(run.path)
    assert run_id == first and client.get_run(run_id).info.status == "FINISHED"
    assert len(list(client.search_runs([client.get_run(run_id).info.experiment_id]))) == 1


def test_a_failing_tracker_warns_once_and_the_run_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def full_disk(self: TensorBoardTracker, record: dict[str, Any]) -> None:
        calls.append(record["kind"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "record", full_disk)
    config = Config.from_dict({**JOINT, "logging": {"tensorboard": True}})
    with pytest.warns(RuntimeWarning, match="TensorBoard logging stopped: OSError.*No space left on device.*"
                                            "metrics.jsonl still holds every record"):
        run, result = train(config, tmp_path / "run")
    assert len(calls) == 1 and result.fit.steps == 30
    assert json.loads((run.path / "run.json").read_text())["status"] == "completed"
    assert sum(r["kind"] == "val" for r in _records(run.path)) == 3


@pytest.mark.parametrize(("key", "extra"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_refused_before_the_run_directory_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, key, None)  # import fails as if not installed
    config = Config.from_dict({**JOINT, "logging": {key: True}})
    with pytest.raises(ConfigError, match=rf"logging\.{key} needs the Python package '{key}'; install the {extra} "
                                          rf"extra: pip install 'mtml\[{extra}\]'"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_logging_section_opens_no_tracker(tmp_path: Path) -> None:
    assert not open_trackers(tmp_path, {})
    run, _ = train(Config.from_dict({**JOINT, "logging": {}}), tmp_path / "run")
    assert not (run.path / "tensorboard").exists() and not (run.path / "mlflow.json").exists()


def test_bad_logging_keys_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"logging\.tensorbaord: unknown key\. Did you mean 'tensorboard'\?"):
        Config.from_dict({"logging": {"tensorbaord": True}})
    with pytest.raises(ConfigError, match=r"logging\.mlflow: Input should be a valid boolean"):
        Config.from_dict({"logging": {"mlflow": "yes please"}})
