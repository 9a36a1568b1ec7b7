"""``mtml report``: one self-contained HTML page comparing run directories.

The page has no external resource (styles inline, every picture a ``data:`` PNG), so it opens offline, can be
mailed, and survives the runs being deleted. It holds: a table of the runs (status, steps, best step, time), the
config keys whose values differ between them (the whole config for one run), the test metrics of every task
side by side (meta-learning scores with their 95% half-widths, the best value of each row in bold), the
validation objective of every run in one plot, and each run's own plots from ``RUN/plots/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtml._version import __version__
from mtml.atomic import atomic_write_text
from mtml.engine import Run
from mtml.errors import CheckpointError
from mtml.report._plots import new_figure

__all__ = ["RunView", "load_runs", "render_report", "write_report"]

#: metric names where a larger value is better (everything else that ends in loss/mse/mae/error is smaller-better)
_HIGHER = ("accuracy", "acc", "r2", "f1", "macro_f1", "auroc", "auc", "precision", "recall", "spearman")
_LOWER = ("loss", "mse", "mae", "rmse", "log_loss", "error", "nll")


class RunView:
    """What the report reads of one run directory (read once; a missing summary marks the run unfinished)."""

    def __init__(self, path: str | Path) -> None:
        run = Run.open(path)
        self.path = run.path
        self.config: dict[str, Any] = run.config()
        self.status: dict[str, Any] = run.status()
        self.records = list(run.records())
        try:
            self.summary: dict[str, Any] = run.summary()
        except CheckpointError:
            self.summary = {}
        self.plots = sorted((run.path / "plots").glob("*.png")) if (run.path / "plots").is_dir() else []

    @property
    def label(self) -> str:
        return self.path.name

    def objective(self) -> dict[int, float]:
        out = {int(r["step"]): float(r["objective"]) for r in self.records
               if r.get("kind") == "val" and isinstance(r.get("objective"), int | float)}
        return dict(sorted(out.items()))


class SweepView:
    """What the report reads of one ``mtml sweep`` folder: its parameters, trials table, summary and plots."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.spec = json.loads((self.path / "sweep.json").read_text(encoding="utf-8"))
            trials = self.path / "trials.json"
            self.trials: list[dict[str, Any]] = (json.loads(trials.read_text(encoding="utf-8"))
                                                 if trials.is_file() else [])
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot read the sweep ({exc}).") from None
        self.plots = sorted((self.path / "plots").glob("sweep_*.png")) if (self.path / "plots").is_dir() else []

    @staticmethod
    def is_sweep(path: str | Path) -> bool:
        return (Path(path) / "sweep.json").is_file()

    def best_runs(self, k: int = 5) -> list[Path]:
        """The run directories of the ``k`` best completed trials, best first."""
        done = sorted((r for r in self.trials
                       if r.get("state") == "complete" and isinstance(r.get("value"), int | float)),
                      key=lambda r: r["value"])
        return [self.path / str(r["run"]) for r in done[:k] if (self.path / str(r["run"]) / "config.yaml").is_file()]


def load_runs(paths: Sequence[str | Path]) -> list[RunView]:
    """Each path as a :class:`RunView`; a path that is no run directory raises :class:`CheckpointError` naming it."""
    if not paths:
        raise CheckpointError("mtml report needs at least one run directory.")
    return [RunView(p) for p in paths]


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, name))
        else:
            out[name] = json.dumps(value)
    return out


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _direction(metric: str) -> int:
    """+1 when larger is better, -1 when smaller is, 0 when unknown (no value is marked best)."""
    base = metric.split("@")[0].lower()
    if base in _HIGHER:
        return 1
    if base in _LOWER or base.endswith(("loss", "mse", "mae", "error")):
        return -1
    return 0


def _metric_rows(views: Sequence[RunView]) -> list[tuple[str, str, list[tuple[float, float | None] | None]]]:
    """``(task, metric, per run (value, 95% half-width or None) or None)`` from each run's summary ``test``."""
    keys: dict[tuple[str, str], None] = {}
    for v in views:
        for task, scores in (v.summary.get("test") or {}).items():
            for metric, value in scores.items():
                if not metric.endswith("_ci95") and metric != "num_tasks" and isinstance(value, int | float):
                    keys[(task, metric)] = None
    rows = []
    for task, metric in keys:
        cells: list[tuple[float, float | None] | None] = []
        for v in views:
            scores = (v.summary.get("test") or {}).get(task) or {}
            if metric in scores:
                half = scores.get(f"{metric}_ci95")
                cells.append((float(scores[metric]), float(half) if half is not None else None))
            else:
                cells.append(None)
        rows.append((task, metric, cells))
    return rows


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _objective_plot(views: Sequence[RunView]) -> bytes | None:
    curves = [(v.label, v.objective()) for v in views]
    if not any(c for _, c in curves):
        return None
    fig = new_figure((7.5, 4.2))
    ax = fig.subplots()
    for label, curve in curves:
        if curve:
            ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=label)
    ax.set(title="validation objective (lower is better)", xlabel="step", ylabel="objective")
    ax.legend(fontsize=8)
    return _png(fig)


def _img(data: bytes, alt: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{src}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child,td.key{text-align:left}td.key{font-family:monospace}
b{color:#0a5}figure{display:inline-block;margin:6px;vertical-align:top}
img{max-width:640px;border:1px solid #eee}figcaption{font-size:0.8em;color:#666}
.muted{color:#888}
"""

# counts the pictures that decoded, for a headless browser (and a reader) to check: <html data-images="3/3">
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.documentElement.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def _sweep_section(s: SweepView) -> str:
    e = html.escape
    keys = [p["key"] for p in s.spec.get("params", [])]
    rows = sorted(s.trials, key=lambda r: (r.get("state") != "complete",
                                           r["value"] if isinstance(r.get("value"), int | float) else math.inf))
    best = rows[0]["trial"] if rows and rows[0].get("state") == "complete" else None
    body = []
    for r in rows:
        value = _number(r["value"]) if isinstance(r.get("value"), int | float) else "—"
        cells = [e(str(r.get("trial"))), e(str(r.get("state"))), f"<b>{value}</b>" if r.get("trial") == best else value,
                 *(e(json.dumps(r.get(k))) if not isinstance(r.get(k), float) else _number(r[k]) for k in keys),
                 e(str(r.get("best_step") if r.get("best_step") is not None else "—")), e(str(r.get("run")))]
        body.append(cells)
    head = f"<h2>Sweep {e(s.path.name)}</h2><p>{len(s.trials)} of {e(str(s.spec.get('trials')))} trials; value: " \
           "the best validation objective of the trial's run (lower is better; pruned trials: their last " \
           f"validation). Searched: {e('; '.join(_describe(p) for p in s.spec.get('params', [])))}.</p>"
    table = _table(["trial", "state", "objective", *(e(k) for k in keys), "best step", "run"], body)
    plots = "".join(_img(p.read_bytes(), f"{s.path.name}: {p.stem.replace('_', ' ')}") for p in s.plots)
    return head + table + plots


def _describe(p: Mapping[str, Any]) -> str:
    if p.get("kind") == "choice":
        return f"{p['key']} ∈ {{{', '.join(json.dumps(c) for c in p.get('choices', []))}}}"
    return f"{p['key']} ∈ [{p.get('low'):g}, {p.get('high'):g}] ({p.get('kind')})"


def render_report(views: Sequence[RunView], *, title: str | None = None,
                  sweeps: Sequence[SweepView] = ()) -> str:
    """The HTML page comparing ``views`` (see the module docstring), after a section per sweep in ``sweeps``."""
    e = html.escape
    if title is None and sweeps:
        title = (f"mtml report: sweep {sweeps[0].path.name}" if len(sweeps) == 1
                 else f"mtml report: {len(sweeps)} sweeps")
    title = title or (f"mtml report: {views[0].label}" if len(views) == 1 else f"mtml report: {len(views)} runs")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body><h1>{e(title)}</h1>",
             f"<p class='muted'>mtml {e(__version__)}, {e(time.strftime('%Y-%m-%d %H:%M'))}</p>"]
    parts.extend(_sweep_section(s) for s in sweeps)
    if sweeps and views:
        parts.append("<p>Below: the runs of each sweep's best completed trials (up to 5), and any other runs "
                     "given.</p>")
    if not views:
        parts.append("</body></html>")
        return "\n".join(parts)
    rows = []
    for v in views:
        s, c = v.summary, v.config
        method = c.get("training", {}).get("algorithm", "joint")
        if method == "joint":
            method = f"joint · {c.get('training', {}).get('weighting', {}).get('name', '')}"
        best = s.get("best_objective")
        rows.append([e(v.label), e(str(c.get("data", {}).get("dataset", ""))), e(method),
                     e(str(v.status.get("status", "unknown"))), e(str(s.get("steps", "—"))),
                     e(str(s.get("best_step", "—"))), _number(best) if isinstance(best, int | float) else "—",
                     e(str(s.get("seconds", "—"))), f"<span class='muted'>{e(str(v.path))}</span>"])
    parts.append("<h2>Runs</h2>" + _table(["run", "dataset", "method", "status", "steps", "best step",
                                            "best objective", "seconds", "directory"], rows))
    flats = [_flat(v.config) for v in views]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    if len(views) == 1:
        parts.append("<h2>Config</h2>" + _table(["key", "value"], [[f"<span class='key'>{e(k)}</span>",
                                                                      e(flats[0][k])] for k in keys]))
    else:
        differ = [k for k in keys if len({f.get(k, "—") for f in flats}) > 1]
        body = [[f"<span class='key'>{e(k)}</span>", *(e(f.get(k, "—")) for f in flats)] for k in differ]
        parts.append("<h2>Config differences</h2>" + (
            _table(["key", *(e(v.label) for v in views)], body) if body else
            "<p>The runs have the same config.</p>"))
    metric_rows = _metric_rows(views)
    if metric_rows:
        body = []
        for task, metric, cells in metric_rows:
            sign = _direction(metric)
            values = [c[0] for c in cells if c is not None and math.isfinite(c[0])]
            target = (max(values) if sign > 0 else min(values)) if values and sign and len(values) > 1 else None
            shown = []
            for cell in cells:
                if cell is None:
                    shown.append("<span class='muted'>—</span>")
                    continue
                text = _number(cell[0]) + (f" ± {_number(cell[1])}" if cell[1] is not None else "")
                shown.append(f"<b>{text}</b>" if target is not None and cell[0] == target else text)
            body.append([e(task), e(metric), *shown])
        parts.append("<h2>Test metrics</h2><p class='muted'>meta-learning scores: mean ± 95% half-width over "
                     "the meta-test tasks; bold: the best run of a row.</p>"
                     + _table(["task", "metric", *(e(v.label) for v in views)], body))
    else:
        parts.append("<h2>Test metrics</h2><p>No run has a summary yet (unfinished runs).</p>")
    compare = _objective_plot(views)
    if compare is not None and len(views) > 1:
        parts.append("<h2>Validation objective</h2>" + _img(compare, "validation objective of every run"))
    for v in views:
        if v.plots:
            parts.append(f"<h2>Plots of {e(v.label)}</h2>" + "".join(
                _img(p.read_bytes(), f"{v.label}: {p.stem.replace('_', ' ')}") for p in v.plots))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Render the runs (and ``mtml sweep`` folders) at ``paths`` into the HTML file ``out`` (written atomically);
    returns its path. A sweep shows its trials and plots, then the runs of its best trials."""
    if not paths:
        raise CheckpointError("mtml report needs at least one run directory.")
    sweeps = [SweepView(p) for p in paths if SweepView.is_sweep(p)]
    runs = [p for s in sweeps for p in s.best_runs()] + [p for p in paths if not SweepView.is_sweep(p)]
    page = render_report([RunView(p) for p in runs], title=title, sweeps=sweeps)
    out = Path(out)
    atomic_write_text(out, page)
    return out
