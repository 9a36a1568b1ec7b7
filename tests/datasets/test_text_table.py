"""The `text_table` dataset (a user's CSV/Parquet texts): tasks, the embedding cache, masks, the token route,
hostile input through the command line, and train / eval / transfer / rank end to end.

The CSV is written in each test from the Debian ``fortunes`` files that the ``texts`` suite reads (one saying
per row; targets: its topic, whether it is long, its log length). Fast tests fill the embedding cache with
random vectors first, so no encoder is loaded; the real-encoder tests say so in their names.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtml.cli import main
from mtml.datasets import DATASETS, text_table
from mtml.datasets._text import FORTUNE_DIR, MODEL_ID, clean_text, read_fortunes
from mtml.datasets._text_cache import EmbeddingCache, text_key
from mtml.datasets._util import split_indices
from mtml.errors import ConfigError, DataError
from mtml.groups import labelled_only, task_groups

pytestmark = pytest.mark.skipif(not (FORTUNE_DIR / "food").is_file(), reason="needs the Debian package fortunes")

DIM = 384
TOPICS = ("food", "law", "science")
UNLABELLED = (3, 10, 17)  # data rows (0-based) whose topic cell is left blank
TARGETS: dict[str, Any] = {"topic": "topic", "long": {"column": "long", "kind": "binary"}, "size": "chars"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "2000", "PYTHONUNBUFFERED": "1"}


def sayings(per_topic: int) -> pd.DataFrame:
    """``per_topic`` short fortunes of each of TOPICS: columns saying, topic, long (0/1), chars (float)."""
    rows = []
    for topic in TOPICS:
        entries = [t for t in (clean_text(e) for e in read_fortunes(FORTUNE_DIR / topic)) if 0 < len(t) <= 160]
        rows += [{"saying": t, "topic": topic} for t in entries[:per_topic]]
    df = pd.DataFrame(rows)
    df["long"] = (df["saying"].str.len() > df["saying"].str.len().median()).astype(int)
    df["chars"] = np.log(df["saying"].str.len().astype(float))
    df.loc[[r for r in UNLABELLED if r < len(df)], "topic"] = None
    return df


def write_csv(root: Path, df: pd.DataFrame, name: str = "sayings.csv") -> Path:
    path = root / name
    df.to_csv(path, index=False)
    return path


def fake_cache(root: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Fill the cache under ``root`` with random embeddings of ``texts``; return them by text."""
    unique = list(dict.fromkeys(texts))
    emb = torch.randn(len(unique), DIM, generator=torch.Generator().manual_seed(0))
    cache = EmbeddingCache(f"{MODEL_ID}-max256", DIM, root)
    cache.save([text_key(cache.model_id, t) for t in unique], emb)
    return dict(zip(unique, emb, strict=True))


@pytest.fixture
def no_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the sentence encoder fails the test: every embedding must come from the cache."""
    def refuse(**_: Any) -> None:
        pytest.fail("the sentence encoder was loaded: the cache missed")
    monkeypatch.setattr("mtml.datasets._text.load_sentence_encoder", refuse)


# -- tasks from a filled cache (no encoder) -----------------------------------------------------------------------
def test_three_targets_one_shared_rows_group(tmp_path: Path, no_encoder: None) -> None:
    df = sayings(20)
    known = fake_cache(tmp_path / "cache", df["saying"].tolist())
    tasks = DATASETS.create("text_table", path=str(write_csv(tmp_path, df)), text="saying", targets=TARGETS,
                            cache_dir=str(tmp_path / "cache"), progress=False, seed=5)
    topic, long, size = tasks
    assert [t.name for t in tasks] == ["topic", "long", "size"]
    assert [t.kind.value for t in tasks] == ["multiclass", "binary", "regression"]
    assert topic.num_outputs == 3 and long.num_outputs == 1 and size.num_outputs == 1
    assert {t.group for t in tasks} == {"text_table"} and len(task_groups(tasks)) == 1
    assert all(t.input_shape == (DIM,) for t in tasks)
    assert all(t.train.x is topic.train.x and t.test.x is topic.test.x for t in tasks)  # same rows, one tensor
    parts = split_indices(len(df), (0.6, 0.2, 0.2), torch.Generator().manual_seed(5))
    assert [len(topic.train), len(topic.val), len(topic.test)] == [len(p) for p in parts] == [36, 12, 12]
    for split, rows in zip((topic.train, topic.val, topic.test), parts, strict=True):
        want = torch.stack([known[df["saying"][i]] for i in rows.tolist()]) * math.sqrt(DIM)
        torch.testing.assert_close(split.x, want)
        classes = sorted(TOPICS)
        labels = [classes.index(v) if isinstance(v, str) else 0 for v in df["topic"][rows.tolist()]]
        assert split.y.tolist() == labels
    torch.testing.assert_close(long.train.y, torch.tensor(df["long"].to_numpy()[parts[0]], dtype=torch.float32))
    chars = torch.tensor(df["chars"].to_numpy(), dtype=torch.float32)
    train = chars[parts[0]]
    torch.testing.assert_close(size.test.y[:, 0], (chars[parts[2]] - train.mean()) / train.std())


def test_blank_labels_are_masked_and_dropna_drops_the_rows(tmp_path: Path, no_encoder: None) -> None:
    df = sayings(20)
    fake_cache(tmp_path / "cache", df["saying"].tolist())
    path = str(write_csv(tmp_path, df))
    topic, long = text_table(path=path, text="saying", targets={"topic": "topic", "long": "long"},
                             cache_dir=str(tmp_path / "cache"), progress=False)
    masks = [s.mask for s in (topic.train, topic.val, topic.test)]  # None: every row of that split labelled
    assert any(m is not None for m in masks)
    assert sum(int((~m).sum()) for m in masks if m is not None) == len(UNLABELLED)
    assert long.train.mask is None and long.kind.value == "multiclass"  # an int column is multiclass by default
    alone = labelled_only(topic)
    assert len(alone.train) + len(alone.val) + len(alone.test) == len(df) - len(UNLABELLED)
    assert alone.train.mask is None
    dropped = text_table(path=path, text="saying", targets={"topic": "topic", "long": "long"}, dropna=True,
                         cache_dir=str(tmp_path / "cache"), progress=False)
    assert all(len(t.train) + len(t.val) + len(t.test) == len(df) - len(UNLABELLED) for t in dropped)
    assert all(s.mask is None for t in dropped for s in (t.train, t.val, t.test))


def test_parquet_gives_the_same_tasks_and_one_target_has_no_group(tmp_path: Path, no_encoder: None) -> None:
    df = sayings(15)
    fake_cache(tmp_path / "cache", df["saying"].tolist())
    df.to_parquet(tmp_path / "sayings.parquet")
    opts: dict[str, Any] = {"text": "saying", "targets": {"size": "chars"}, "cache_dir": str(tmp_path / "cache"),
                            "progress": False}
    (from_csv,) = text_table(path=str(write_csv(tmp_path, df)), **opts)
    (from_parquet,) = text_table(path=str(tmp_path / "sayings.parquet"), **opts)
    assert from_parquet.group is None and from_parquet.kind.value == "regression"
    torch.testing.assert_close(from_parquet.train.x, from_csv.train.x)
    torch.testing.assert_close(from_parquet.test.y, from_csv.test.y)


def test_clean_strips_markup_before_the_cache_key(tmp_path: Path, no_encoder: None) -> None:
    df = pd.DataFrame({"t": ["<b>Good</b>  soup &amp; bread", "Bad\n\ncoffee", "Fine tea"] * 4,
                       "y": [1.0, 0.0, 0.5] * 4})
    known = fake_cache(tmp_path / "cache", ["Good soup & bread", "Bad coffee", "Fine tea"])
    (task,) = text_table(path=str(write_csv(tmp_path, df)), text="t", targets={"y": "y"}, clean=True,
                         cache_dir=str(tmp_path / "cache"), progress=False)
    got = {round(float(x[0]), 4) for x in torch.cat([task.train.x, task.val.x, task.test.x])}
    assert got == {round(float(e[0]) * math.sqrt(DIM), 4) for e in known.values()}


def test_token_route_gives_the_tokenizers_ids(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from mtml.nn import minilm_dir

    df = sayings(8)
    tasks = text_table(path=str(write_csv(tmp_path, df)), text="saying", targets=TARGETS, inputs="tokens",
                       max_length=32, progress=False, cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()  # tokens never touch the embedding cache
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    want = tok(df["saying"].tolist(), padding=True, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
    parts = split_indices(len(df), (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
    assert tasks[0].input_shape == (want.shape[1],) and want.shape[1] <= 32
    torch.testing.assert_close(tasks[0].train.x.long(), want[parts[0]])
    assert tasks[1].test.x is tasks[0].test.x


# -- the real encoder ------------------------------------------------------------------------------------------
def test_real_encoder_matches_sentence_transformers_and_the_cache_hits(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    st = pytest.importorskip("sentence_transformers")
    from mtml.nn import minilm_dir

    df = sayings(20)
    opts: dict[str, Any] = {"path": str(write_csv(tmp_path, df)), "text": "saying", "targets": {"topic": "topic"},
                            "cache_dir": str(tmp_path / "cache"), "progress": False, "seed": 3}
    (task,) = text_table(**opts)
    # transformers' weight-loading bar would leave tqdm's monitor thread running, and later tests in this process
    # (the launcher's fork-or-spawn choice) see a second thread
    monkeypatch.setattr("tqdm.std.tqdm.monitor_interval", 0)
    model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    texts = df["saying"].tolist()
    want = torch.as_tensor(model.encode(texts, convert_to_numpy=True, show_progress_bar=False)) * math.sqrt(DIM)
    parts = split_indices(len(df), (0.6, 0.2, 0.2), torch.Generator().manual_seed(3))
    for split, rows in zip((task.train, task.val, task.test), parts, strict=True):
        torch.testing.assert_close(split.x, want[rows], atol=2e-4, rtol=0)
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")}
    assert shards

    def refuse(**_: Any) -> None:
        pytest.fail("the second build loaded the encoder")
    monkeypatch.setattr("mtml.datasets._text.load_sentence_encoder", refuse)
    started = time.perf_counter()
    (again,) = text_table(**opts)
    assert time.perf_counter() - started < 5.0
    torch.testing.assert_close(again.train.x, task.train.x, atol=0, rtol=0)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")} == shards


# -- hostile input: one clear line each, library and command line ---------------------------------------------
def _hostile(tmp_path: Path, case: str) -> dict[str, Any]:
    """Dataset options for one bad input."""
    df = sayings(4)
    opts: dict[str, Any] = {"path": str(tmp_path / "sayings.csv"), "text": "saying", "targets": {"topic": "topic"},
                            "cache_dir": str(tmp_path / "cache"), "progress": False}
    if case == "nan_text":
        df.loc[4, "saying"] = None
    if case == "empty_text":
        df.loc[6, "saying"] = "   "
    write_csv(tmp_path, df)
    if case == "latin1":
        (tmp_path / "sayings.csv").write_bytes("saying,topic\nCaf\xe9 au lait,food\n".encode("latin-1"))
    return {**opts, **{
        "missing_file": {"path": str(tmp_path / "nope.csv")},
        "missing_column": {"text": "sayings"},
        "numeric_text": {"text": "chars"},
        "no_targets": {"targets": {}},
        "target_is_text": {"targets": {"topic": "topic", "echo": "saying"}},
        "unknown_target": {"targets": {"topic": "topics"}},
        "regression_on_text": {"targets": {"topic": {"column": "topic", "kind": "regression"}}},
    }.get(case, {})}


HOSTILE = [
    ("missing_file", ConfigError, r"data.options.path: \S*nope.csv does not exist"),
    ("missing_column", ConfigError, r"data.options.text: column 'sayings' is not in the table; columns are saying, "
                                    r"topic, long, chars. Did you mean 'saying'\?"),
    ("nan_text", DataError, r"column 'saying' has no text \(the value is missing\) in data row 5; fill it in or set "
                            r"data.options.dropna: true"),
    ("empty_text", DataError, r"column 'saying' is empty in data row 7; an empty text has no embedding"),
    ("numeric_text", ConfigError, r"column 'chars' holds numbers \(float64\), not text; name the column with the "
                                  r"texts \(columns holding text: saying, topic\)"),
    ("latin1", DataError, r"is not UTF-8 text: byte 0xe9 on line 2 is no UTF-8 character; save the file as UTF-8"),
    ("no_targets", ConfigError, r"data.options.targets: give at least one target"),
    ("target_is_text", ConfigError, r"data.options.targets.echo: column 'saying' is the text column"),
    ("unknown_target", ConfigError, r"column 'topics' is not in the table; .* Did you mean 'topic'\?"),
    ("regression_on_text", DataError, r"regression target column 'topic' holds 'food' in data row 1"),
]


@pytest.mark.parametrize(("case", "error", "match"), HOSTILE, ids=[c for c, _, _ in HOSTILE])
def test_hostile_input_raises_one_clear_error(tmp_path: Path, no_encoder: None, case: str, error: type,
                                             match: str) -> None:
    with pytest.raises(error, match=match) as info:
        text_table(**_hostile(tmp_path, case))
    assert "\n" not in str(info.value)


def _config(options: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {"name": "text-table-test", "seed": 0, "threads": 1, "data": {"dataset": "text_table", "options": options},
            "model": {"trunk_hidden": [16]},
            "training": {"lr": 0.003, "batch_size": 16, "max_steps": 30, "eval_every": 10, "patience": 0,
                         **training}}


@pytest.mark.parametrize(("case", "error", "match"), HOSTILE, ids=[c for c, _, _ in HOSTILE])
def test_hostile_input_on_the_command_line(tmp_path: Path, no_encoder: None, capsys: pytest.CaptureFixture[str],
                                           case: str, error: type, match: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(_hostile(tmp_path, case))))
    with pytest.raises(SystemExit) as stop:
        main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in captured.out + err
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


def mtml(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def test_a_non_utf8_csv_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(_hostile(tmp_path, "latin1"))))
    proc = mtml("train", config, "--out", tmp_path / "run", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "sayings.csv is not UTF-8 text: byte 0xe9 on line 2" in line and "iconv" in line


# -- end to end (real encoder, several processes) --------------------------------------------------------------
@pytest.mark.slow
def test_train_eval_and_as_transfer_and_rank_target(tmp_path: Path) -> None:
    """Source: the `texts` suite's topic task (fortunes); target: the user's CSV of sayings (three targets)."""
    env_cache = {"cache_dir": str(tmp_path / "cache"), "progress": False}
    target = tmp_path / "target.yaml"
    opts = {"path": str(write_csv(tmp_path, sayings(40))), "text": "saying", "targets": TARGETS, **env_cache}
    target.write_text(yaml.safe_dump(_config(opts)))
    source = tmp_path / "source.yaml"
    texts = {"dataset": "texts", "options": {"tasks": ["topic"], "per_topic": 12, **env_cache}}
    source.write_text(yaml.safe_dump({**_config({}), "name": "texts-source", "data": texts}))
    run, src = tmp_path / "run", tmp_path / "src"

    proc = mtml("train", target, "--out", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["tasks"]) == ["long", "size", "topic"] and summary["steps"] == 30
    proc = mtml("eval", run)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in ("topic", "long", "size", "accuracy", "mse"))

    proc = mtml("train", source, "--out", src, "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "transfer"
    proc = mtml("transfer", src, "--target", target, "--sizes", "2,all", "--repeats", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "transfer.json").read_text())
    assert result["sizes"] == [2, "all"] and "scratch" in result["strategies"]
    assert set(result["scores"]) >= {"accuracy", "mse"}  # the classification and regression targets
    proc = mtml("rank", "--target", target, src, run, "--out", tmp_path / "rank.json")
    assert proc.returncode == 0, proc.stderr
    ranking = json.loads((tmp_path / "rank.json").read_text())
    assert sorted(ranking) == ["long", "size", "topic"]
    assert all(len(rows) == 2 and rows[0]["scores"]["logme"] is not None for rows in ranking.values())


@pytest.mark.slow
def test_fine_tuning_route_from_a_config(tmp_path: Path) -> None:
    """``inputs: tokens`` + ``model.architecture: minilm``: the encoder's top layer learns, the rest stays."""
    from mtml.config import Config
    from mtml.engine import StopRule, train_multitask
    from mtml.workflows import build

    opts = {"path": str(write_csv(tmp_path, sayings(16))), "text": "saying", "targets": TARGETS,
            "inputs": "tokens", "max_length": 48, "progress": False}
    cfg = Config.from_dict({"data": {"dataset": "text_table", "options": opts},
                            "model": {"architecture": "minilm", "options": {"trainable_top_layers": 1},
                                      "trunk_hidden": [16]}})
    built = build(cfg)
    layers = built.model.trunk[0].transformer.encoder.layer
    top, low = layers[-1].output.dense.weight.clone(), layers[0].output.dense.weight.clone()
    result = train_multitask(built.model, built.tasks, lr=1e-3, batch_size=8, stop=StopRule(max_steps=3,
                                                                                           eval_every=3))
    assert set(result.test) == {"topic", "long", "size"}
    assert not torch.equal(layers[-1].output.dense.weight, top)
    assert torch.equal(layers[0].output.dense.weight, low)


@pytest.mark.slow
def test_the_example_script_and_config_run(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "make_tweets_csv.py"), "tweets.csv", "--rows",
                           "150"], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 150 tweets to tweets.csv" in proc.stdout
    proc = mtml("train", root / "examples" / "configs" / "text_table.yaml", "--out", "run", "--quiet",
                "--set", "training.max_steps=20", "--set", "training.eval_every=10",
                "--set", f"data.options.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["tasks"]) == ["device", "likes", "year"]
