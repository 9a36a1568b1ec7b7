"""``mtml export``: a run's best model as ONNX or TorchScript files, one per task head, with a model card.

Joint runs export each task's whole path, ``head[task](trunk(stem[task](x)))``, as ``<task>.onnx`` (or
``<task>.pt``). Meta-learning runs export the meta-learned model as it is before adaptation: ``trunk`` (the
feature extractor every algorithm adapts on top of, what ProtoNets and ridge heads use) and ``task`` (the
initialisation of the task learner, what MAML-family methods adapt). Every file is loaded back and run on real
rows of its task (meta-learning: on inputs of the family's shape) by onnxruntime (ONNX) or ``torch.jit.load``
(TorchScript); the export fails unless it matches PyTorch within ``rtol = atol = 1e-5``. The batch dimension is
dynamic. Inputs are what mtml's dataset gives the model (tables: standardised features, texts: sentence
embeddings), which ``MODEL_CARD.md`` states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtml._optional import require
from mtml._version import __version__
from mtml.atomic import atomic_write_text
from mtml.engine import Run, load_checkpoint, restore
from mtml.errors import CheckpointError, ConfigError, MtmlError
from mtml.nn import MultiTaskModel
from mtml.workflows._build import Built, build, read_config

__all__ = ["EXPORT_FORMATS", "ExportResult", "ExportedHead", "export_run"]

EXPORT_FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-5


@dataclass
class ExportedHead:
    """One exported graph: its file, input shape (``batch`` first), outputs and how far it is from PyTorch."""

    name: str
    file: str
    kind: str
    input_shape: list[int | str]
    outputs: int
    max_abs_diff: float
    rows_checked: int


@dataclass
class ExportResult:
    run: str
    format: str
    folder: Path
    heads: list[ExportedHead] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "format": self.format, "folder": str(self.folder), "mtml_version": __version__,
                "tolerance": TOLERANCE, "heads": [asdict(h) for h in self.heads]}


class _Path(nn.Module):
    """``x → model(x, task)`` (or the trunk's features): the graph of one exported head."""

    def __init__(self, model: MultiTaskModel, task: str, trunk_only: bool = False) -> None:
        super().__init__()
        self.model, self.task, self.trunk_only = model, task, trunk_only

    def forward(self, x: Tensor) -> Tensor:
        if self.trunk_only:
            return self.model.features(x, self.task)
        return self.model(x, self.task)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' chatter (deprecations, progress lines, optional torchvision ops) kept off the terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _examples(built: Built, name: str, rows: int = 64) -> Tensor:
    if built.family is not None:
        g = torch.Generator().manual_seed(built.config.seed)
        return torch.randn((rows, *built.family.input_shape), generator=g)
    task = next(t for t in built.tasks if t.name == name)
    split = task.test if task.test is not None and len(task.test) else task.train
    return split.x[:rows].float()


def _export_one(graph: nn.Module, x: Tensor, path: Path, fmt: str) -> np.ndarray:
    """Write ``graph`` to ``path`` and return what the written file computes on ``x``."""
    tmp = path.with_name(path.name + ".tmp")
    with _quiet():
        if fmt == "onnx":
            require("onnxscript", "mtml export --format onnx", "export")
            ort = require("onnxruntime", "mtml export --format onnx", "export")
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(graph, (x,), str(tmp), input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            out = np.asarray(session.run(None, {"x": x.numpy()})[0])
        else:
            traced = torch.jit.trace(graph, (x,), check_trace=False)
            torch.jit.save(traced, str(tmp))
            out = torch.jit.load(str(tmp))(x).detach().numpy()
    tmp.replace(path)
    return out


def export_run(path: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export the best checkpoint of the run at ``path`` into ``out`` (default ``RUN/export/``) in format
    ``fmt`` (``onnx`` or ``torchscript``), with ``MODEL_CARD.md`` and ``export.json``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}. Got {fmt!r}.")
    run = Run.open(path)
    if not run.best_checkpoint.is_file():
        raise CheckpointError(f"{run.path} has no best checkpoint (checkpoints/best.safetensors): the run never "
                              "reached a validation. Continue it (`mtml train --resume RUN`) and export after.")
    config = read_config(run)
    built = build(config)
    modules: dict[str, nn.Module] = {"model": built.model}
    if built.algorithm is not None:
        modules["algorithm"] = built.algorithm
    restore(load_checkpoint(run.best_checkpoint), modules=modules)
    model = built.model.eval()
    refit = getattr(model, "refit", None)
    if callable(refit):  # hierarchical heads: the per-task BLUPs from the training rows, as evaluation does
        with torch.no_grad():
            refit(built.tasks)
    folder = Path(out) if out is not None else run.path / "export"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    kinds = built.kinds()
    graphs: list[tuple[str, str, str, bool]] = (
        [("trunk", "task", "features", True), ("task", "task", kinds["task"], False)] if built.is_meta else
        [(t.name, t.name, kinds[t.name], False) for t in built.tasks])
    result = ExportResult(run=str(run.path), format=fmt, folder=folder)
    for name, task, kind, trunk_only in graphs:
        graph = _Path(model, task, trunk_only).eval()
        x = _examples(built, task)
        with torch.no_grad():
            expected = graph(x).numpy()
        file = folder / f"{_safe(name)}{suffix}"
        try:
            got = _export_one(graph, x, file, fmt)
        except MtmlError:
            raise
        except Exception as exc:  # an operator the exporter cannot translate, and the like: say which head
            raise MtmlError(f"exporting '{name}' of {run.path} as {fmt} failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}. Try --format "
                            f"{'torchscript' if fmt == 'onnx' else 'onnx'}.") from None
        diff = float(np.abs(got - expected).max()) if expected.size else 0.0
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
            file.unlink(missing_ok=True)
            raise MtmlError(f"the {fmt} export of '{name}' computes outputs up to {diff:.3g} away from PyTorch's "
                            f"(allowed {TOLERANCE}); not written. Try --format "
                            f"{'torchscript' if fmt == 'onnx' else 'onnx'}.")
        result.heads.append(ExportedHead(name, file.name, kind, ["batch", *x.shape[1:]], int(expected.shape[-1]),
                                         diff, int(x.shape[0])))
    atomic_write_text(folder / "export.json", json.dumps(result.to_dict(), indent=2))
    atomic_write_text(folder / "MODEL_CARD.md", _card(run, built, result))
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "task"


def _card(run: Run, built: Built, result: ExportResult) -> str:
    config = built.config
    try:
        summary = run.summary()
    except CheckpointError:
        summary = {}
    lines = [f"# Model card: {config.name}", "",
             f"Exported by mtml {__version__} on {time.strftime('%Y-%m-%d')} from `{run.path}` (its best "
             f"checkpoint, step {summary.get('best_step', '?')}), format **{result.format}**.", ""]
    if built.is_meta:
        lines += [f"A meta-learned model (`{config.training.algorithm}` on `{config.data.dataset}`), as it is "
                  "before adaptation: `trunk` gives the features every algorithm adapts on (ProtoNets compare "
                  "their prototypes, ridge heads solve on them); `task` is the initialisation of the task learner "
                  "that MAML-family methods fine-tune on a support set. Neither adapts by itself.", ""]
    else:
        lines += [f"Multi-task model (`{config.model.architecture}` trunk, weighting "
                  f"`{config.training.weighting.name}`) on `{config.data.dataset}`: one file per task.", ""]
    lines += ["| graph | file | kind | input | outputs | max abs diff vs PyTorch |", "|---|---|---|---|---|---|"]
    for h in result.heads:
        shape = "[" + ", ".join(str(d) for d in h.input_shape) + "]"
        lines.append(f"| {h.name} | `{h.file}` | {h.kind} | {shape} float32 | {h.outputs} | {h.max_abs_diff:.2e} "
                     f"({h.rows_checked} rows) |")
    outputs = {"regression": "predicted values (in the dataset's target scale as mtml trained on it)",
               "binary": "a logit per target (apply a sigmoid)", "multiclass": "class logits (apply a softmax)",
               "multilabel": "a logit per label (apply a sigmoid)", "features": "feature vectors"}
    lines += ["", "Outputs: " + "; ".join(f"{k}: {v}" for k, v in outputs.items()
                                           if any(h.kind == k for h in result.heads)) + ".",
              "", "**Inputs** are what mtml's dataset gives the model, not raw data: tables are standardised "
              "with the training split's mean and deviation, texts are sentence embeddings, images are scaled "
              "pixels. Apply the same preprocessing before calling the model.", ""]
    test = summary.get("test") or {}
    if test:
        lines += ["## Test metrics (from summary.json)", "", "| task | metric | value |", "|---|---|---|"]
        for task, scores in test.items():
            for metric, value in scores.items():
                if isinstance(value, int | float):
                    lines.append(f"| {task} | {metric} | {value:.4f} |")
        lines.append("")
    first = result.heads[0].file
    if result.format == "onnx":
        lines += ["## Load", "", "```python", "import numpy as np, onnxruntime as ort",
                  f"session = ort.InferenceSession('{first}', providers=['CPUExecutionProvider'])",
                  f"y = session.run(None, {{'x': x.astype(np.float32)}})[0]   # x: {result.heads[0].input_shape}",
                  "```", ""]
    else:
        lines += ["## Load", "", "```python", "import torch", f"model = torch.jit.load('{first}')",
                  "y = model(x)   # x: a float32 tensor, batch first", "```", ""]
    lines += ["## Config", "", "```json", json.dumps(config.to_dict(), indent=2), "```", ""]
    return "\n".join(lines)
