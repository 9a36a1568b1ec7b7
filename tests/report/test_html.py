"""``mtml report``: the HTML page from real runs — its tables against the runs' files, no external resource, and
headless Chromium (Debian ``chromium``) opening it offline with every picture decoded and plots on screen."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtml.config import Config
from mtml.report import plot_run, render_report, write_report
from mtml.report._html import RunView
from mtml.workflows import train

JOINT: dict[str, Any] = {
    "name": "report", "seed": 1, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 6, "latent_dim": 2, "n_train": 30,
                                                 "n_val": 10, "n_test": 10}},
    "model": {"trunk_hidden": [8]},
    "training": {"weighting": "uncertainty", "lr": 0.02, "batch_size": 8, "max_steps": 20, "eval_every": 5,
                 "patience": 0},
}
META: dict[str, Any] = {
    "name": "report-meta", "seed": 2, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 3, "query_shots": 3, "meta_batch": 2}},
    "model": {"trunk_hidden": [8]},
    "training": {"algorithm": "maml", "max_steps": 10, "eval_every": 5, "meta_val_tasks": 6, "meta_test_tasks": 6,
                 "patience": 0, "scheduler": "cosine"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    out["a"] = train(Config.from_dict(JOINT), root / "a")[0].path
    out["b"] = train(Config.from_dict({**JOINT, "training": {**JOINT["training"], "lr": 0.005,
                                                              "scheduler": {"name": "step", "every": 5}}}),
                     root / "b")[0].path
    out["meta"] = train(Config.from_dict(META), root / "meta")[0].path
    return out


class _Page(HTMLParser):
    """Tables (as lists of rows of cell text), image sources and every URL-bearing attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.bold: list[str] = []
        self._cell: list[str] | None = None
        self._in_b = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(str(a[key]))
        if tag == "img":
            self.images.append(str(a.get("src")))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "b":
            self._in_b = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "b":
            self._in_b = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_b:
            self.bold.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def test_the_page_compares_the_runs_from_their_own_files(runs: dict[str, Path]) -> None:
    views = [RunView(runs["a"]), RunView(runs["b"]), RunView(runs["meta"])]
    page = _parse(render_report(views))
    assert all(u.startswith("data:image/png;base64,") for u in page.urls)  # nothing to fetch: opens offline
    pngs = sum(len(list((runs[k] / "plots").glob("*.png"))) for k in runs)
    assert len(page.images) == pngs + 1  # every run's plots and the objective comparison
    overview, differences, metrics = page.tables[:3]
    assert [row[0] for row in overview[1:]] == ["a", "b", "meta"] and all(r[3] == "completed" for r in overview[1:])
    keys = {row[0]: row[1:] for row in differences[1:]}
    assert keys["training.lr"] == ["0.02", "0.005", "0.001"]
    assert keys["training.scheduler.name"] == ['"constant"', '"step"', '"cosine"']
    assert "threads" not in keys and "model.trunk_hidden" not in keys  # the same in every run: left out
    rows = {(r[0], r[1]): r[2:] for r in metrics[1:]}
    summaries = {k: json.loads((runs[k] / "summary.json").read_text()) for k in runs}
    a, b = summaries["a"]["test"]["task_0"]["mse"], summaries["b"]["test"]["task_0"]["mse"]
    assert rows["task_0", "mse"][:2] == [f"{a:.4f}", f"{b:.4f}"] and rows["task_0", "mse"][2] == "—"
    assert f"{min(a, b):.4f}" in page.bold  # smaller mse is the better run
    s = summaries["meta"]["test"]["sinusoid"]
    key = next(k for k in s if k.startswith("loss@") and not k.endswith("_ci95"))
    assert rows["sinusoid", key][2] == f"{s[key]:.4f} ± {s[key + '_ci95']:.4f}"  # the CI travels with the mean


def test_one_run_gets_its_whole_config_and_a_run_without_summary_says_so(runs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    page = _parse(render_report([RunView(runs["meta"])]))
    config = dict(row for row in page.tables[1][1:])
    assert config["training.algorithm"] == '"maml"' and config["data.dataset"] == '"sinusoid"'
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["a"], unfinished)
    (unfinished / "summary.json").unlink()
    text = render_report([RunView(unfinished)])
    assert "No run has a summary yet" in text


def test_every_run_kind_writes_its_pictures(runs: dict[str, Path]) -> None:
    def names(path: Path) -> set[str]:
        return {p.name for p in (path / "plots").glob("*.png")}

    assert names(runs["a"]) == {"learning_curves.png", "task_weights.png"}  # constant rate: no rate plot
    assert names(runs["b"]) == {"learning_curves.png", "task_weights.png", "learning_rate.png"}
    assert names(runs["meta"]) == {"meta_validation.png", "learning_rate.png"}
    assert plot_run([{"kind": "done", "step": 1}], runs["a"] / "none") == []


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("the report's browser test needs Debian's chromium: apt-get install chromium "
                    "(make sysdata installs it)")
    return exe


OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--proxy-server=127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking"]


def test_headless_chromium_opens_the_page_offline_with_every_image_and_plots_on_screen(
        runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    page = write_report([runs["a"], runs["b"], runs["meta"]], tmp_path / "page.html")
    exe = _chromium()
    dom = subprocess.run([exe, *OFFLINE, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded is not None, dom[:400]
    assert loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 6  # every image decoded
    shot = tmp_path / "shot.png"
    subprocess.run([exe, *OFFLINE, "--window-size=1300,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int).reshape(-1, 3)
    ink = float((px.min(1) < 200).mean())
    # matplotlib's tab:blue and tab:orange lines: the plots rendered, not just the tables
    blue = (np.abs(px - [31, 119, 180]) < 30).all(1)
    orange = (np.abs(px - [255, 127, 14]) < [20, 30, 50]).all(1)
    assert ink > 0.02 and blue.sum() > 300 and orange.sum() > 300, (ink, blue.sum(), orange.sum())


def test_cli_report_writes_the_page_and_refuses_a_folder_that_is_no_run(runs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "cmp.html"
    ok = subprocess.run([sys.executable, "-m", "mtml", "report", str(runs["a"]), str(runs["meta"]), "--out",
                         str(out)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and "2 runs" in " ".join(ok.stdout.split())
    bad = subprocess.run([sys.executable, "-m", "mtml", "report", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "is not an mtml run directory (no config.yaml)" in " ".join(bad.stderr.split())
    helped = subprocess.run([sys.executable, "-m", "mtml", "report", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "self-contained HTML" in " ".join(helped.stdout.split())
