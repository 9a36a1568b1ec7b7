"""Experiment trackers: a run's records sent on to TensorBoard and MLflow as they are logged (``logging:`` in the
config, optional extras ``mtml[tensorboard]`` and ``mtml[mlflow]``).

``metrics.jsonl`` stays the source of truth: a tracker receives each record after it was written there
(:meth:`mtml.engine.Run.attach`), and a tracker that fails (a full disk, a locked database) stops with one
warning while training and the log go on. What is sent: every number of each ``train`` record (loss, per-task
losses and weights, learning rate, gradient norm) under ``train/…`` and of each ``val`` record (objective,
per-task metrics, meta-validation means and their ``_ci95`` half-widths) under ``val/…``, keyed by step; at
the end the summary's test metrics under ``test/…``.

- TensorBoard: event files in ``RUN/tensorboard/`` (``tensorboard --logdir runs/`` shows every run). A resumed
  run's new event file purges the steps after its checkpoint that the interrupted one had logged.
- MLflow: one MLflow run per run directory (its id kept in ``RUN/mlflow.json``, so a resumed run continues it),
  named after the directory, in the experiment ``logging.experiment`` (default: the config's ``name``), with the
  resolved config as parameters. The store: ``logging.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite
  database ``mlflow.db`` beside the run directory (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``).
  MLflow keys allow no ``@``: ``loss@5`` is sent as ``loss_at_5``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mtml._optional import require
from mtml.atomic import atomic_write_text

__all__ = ["MlflowTracker", "TensorBoardTracker", "Trackers", "check_trackers", "open_trackers", "scalars"]

_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of ``record`` (nested mappings joined by ``/``), keyed ``prefix/path``; ``kind`` and
    ``step`` left out."""
    out: dict[str, float] = {}

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            tag = f"{path}/{key}"
            if isinstance(value, Mapping):
                walk(value, tag)
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[tag] = float(value)

    walk({k: v for k, v in record.items() if k not in ("kind", "step", "time")}, prefix)
    return out


class _Tracker:
    """A sink that warns once and stops when its backend fails; the run and its log carry on."""

    name = "tracker"

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, record: dict[str, Any]) -> None:
        self._guard(self.record, record)

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._guard(self.summary, summary)

    def close(self, status: str) -> None:
        self._guard(self.end, status)

    def _guard(self, fn: Any, arg: Any) -> None:
        if self.failed:
            return
        try:
            fn(arg)
        except Exception as exc:  # a tracker must never end a training run
            self.failed = True
            warnings.warn(f"{self.name} logging stopped: {type(exc).__name__}: {exc}. metrics.jsonl still holds "
                          "every record.", RuntimeWarning, stacklevel=3)

    def record(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def summary(self, summary: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def end(self, status: str) -> None:
        raise NotImplementedError


def _test_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    return scalars(summary.get("test") or {}, "test")


class TensorBoardTracker(_Tracker):
    """Scalars into ``folder`` with :class:`torch.utils.tensorboard.SummaryWriter`."""

    name = "TensorBoard"

    def __init__(self, folder: Path, config: Mapping[str, Any]) -> None:
        super().__init__()
        require("tensorboard", "logging.tensorboard", "tensorboard")
        self.folder, self.config = folder, dict(config)
        self.writer: Any = None
        self.last_step = 0

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step)
        if purge_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", 0)

    def record(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind"), int(record.get("step", 0))
        if self.writer is None:  # a resumed (or restarted) run drops what the old files logged after `step`
            self._open(step + 1 if kind in ("resume", "restart") else None)
        if kind in ("train", "val"):
            wall = float(record.get("time", time.time()))
            for tag, value in scalars(record, str(kind)).items():
                self.writer.add_scalar(tag, value, step, walltime=wall)
            self.last_step = max(self.last_step, step)

    def summary(self, summary: Mapping[str, Any]) -> None:
        if self.writer is None:
            self._open(None)
        step = int(summary.get("steps", self.last_step))
        for tag, value in _test_scalars(summary).items():
            self.writer.add_scalar(tag, value, step)

    def end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _mlflow_key(tag: str) -> str:
    return re.sub(r"[^\w./\- :]", "_", tag.replace("@", "_at_"))[:250]


def _flat(config: Mapping[str, Any], path: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, name))
        else:
            out[name] = json.dumps(value)[:6000]
    return out


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


class MlflowTracker(_Tracker):
    """Metrics into one MLflow run (see the module docstring for the store and the run's identity)."""

    name = "MLflow"

    def __init__(self, run_dir: Path, config: Mapping[str, Any], *, uri: str | None = None,
                 experiment: str | None = None) -> None:
        super().__init__()
        require("mlflow", "logging.mlflow", "mlflow")
        for noisy in ("mlflow.store.db.utils", "alembic"):  # database set-up chatter, unless configured by the user
            logger = logging.getLogger(noisy)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = run_dir / "mlflow.json"
        if id_file.is_file():
            saved = json.loads(id_file.read_text(encoding="utf-8"))
            if saved.get("tracking_uri") == self.uri:
                self.run_id = str(saved["run_id"])
                self.client.update_run(self.run_id, status="RUNNING")
                return
        name = experiment or str(config.get("name", "mtml"))
        found = self.client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"mtml.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in _flat(config).items()]
        for part in _chunks(params, 100):
            self.client.log_batch(self.run_id, params=part)
        atomic_write_text(id_file, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id,
                                               "experiment_id": exp_id}))

    def _send(self, values: Mapping[str, float], step: int, wall: float) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(_mlflow_key(k), v, int(wall * 1000), step) for k, v in values.items()]
        for part in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=part)

    def record(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind in ("train", "val"):
            self._send(scalars(record, str(kind)), int(record.get("step", 0)),
                       float(record.get("time", time.time())))

    def summary(self, summary: Mapping[str, Any]) -> None:
        self._send(_test_scalars(summary), int(summary.get("steps", 0)), time.time())

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))


class Trackers:
    """Every tracker of a run, called together; attach with ``run.attach(trackers)``."""

    def __init__(self, trackers: list[_Tracker]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __call__(self, record: dict[str, Any]) -> None:
        for t in self.trackers:
            t(record)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.finish(summary)

    def close(self, status: str) -> None:
        for t in self.trackers:
            t.close(status)


def check_trackers(*, tensorboard: bool, mlflow: bool) -> None:
    """:class:`~mtml.errors.ConfigError` naming the extra to install when a requested tracker's package is
    missing (called before a run directory is made)."""
    if tensorboard:
        require("tensorboard", "logging.tensorboard", "tensorboard")
    if mlflow:
        require("mlflow", "logging.mlflow", "mlflow")


def open_trackers(run_dir: Path, config: Mapping[str, Any], *, tensorboard: bool = False, mlflow: bool = False,
                  mlflow_uri: str | None = None, experiment: str | None = None) -> Trackers:
    """The trackers ``logging:`` asks for, for the run directory ``run_dir`` with resolved ``config``."""
    out: list[_Tracker] = []
    if tensorboard:
        out.append(TensorBoardTracker(run_dir / "tensorboard", config))
    if mlflow:
        out.append(MlflowTracker(run_dir, config, uri=mlflow_uri, experiment=experiment))
    return Trackers(out)
