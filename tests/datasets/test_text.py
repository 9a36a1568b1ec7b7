"""Text suite data: fortune parsing, cleaning, validation, label encoding, the embedding cache, the `texts` tasks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from mtml.datasets import DATASETS
from mtml.datasets._text import MODEL_ID, check_texts, clean_text, encode_labels, read_fortunes, texts
from mtml.datasets._text_cache import EmbeddingCache, default_cache_root, text_key
from mtml.errors import ConfigError, DataError

DIM = 8


class FakeEncoder:
    """A deterministic stand-in for the sentence encoder: counts the texts it encodes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, batch: list[str]) -> torch.Tensor:
        self.seen += batch
        return torch.stack([torch.tensor([float(len(t)), *(float(ord(c)) for c in (t + " " * DIM)[: DIM - 1])])
                            for t in batch])


def write_fortunes(root: Path, topic: str, entries: list[str]) -> Path:
    path = root / topic
    path.write_text("".join(f"{e}\n%\n" for e in entries))
    return path


# -- readers, cleaning, validation ---------------------------------------------------------------------
def test_read_fortunes_splits_on_percent_lines(tmp_path: Path) -> None:
    path = tmp_path / "science"
    path.write_text("%\nFirst one,\n\ttwo lines.\n%\n100% sure -- not a separator\n%  \nLast\n\t\t-- Someone\n%\n")
    got = read_fortunes(path)
    assert [clean_text(t) for t in got] == ["First one, two lines.", "100% sure -- not a separator",
                                            "Last -- Someone"]


def test_empty_fortune_entry_names_file_and_index(tmp_path: Path) -> None:
    path = tmp_path / "law"
    path.write_text("one\n%\n  \n%\nthree\n")
    assert len(read_fortunes(path)) == 3
    with pytest.raises(DataError, match=r"law: text 1 is empty"):
        check_texts([clean_text(t) for t in read_fortunes(path)], f"fortunes file {path}")


def test_clean_text_overstrike_markup_urls() -> None:
    assert clean_text("_\x08b_\x08o_\x08l_\x08d  text") == "bold text"
    assert clean_text("Good<br /><br />stuff &amp; more") == "Good stuff & more"
    assert clean_text("Read http://t.co/abc now", drop_urls=True) == "Read now"
    assert clean_text("http://t.co/abc", drop_urls=True) == ""


def test_check_texts_rejects_non_strings() -> None:
    with pytest.raises(DataError, match=r"reviews: text 2 is a NoneType"):
        check_texts(["a", "b", None], "reviews")


def test_unseen_label_is_a_clear_error() -> None:
    classes, idx = encode_labels({"train": ["b", "a", "b"], "val": ["a"], "test": ["b", "a"]}, "topic")
    assert classes == ["a", "b"] and idx["train"].tolist() == [1, 0, 1] and idx["test"].tolist() == [1, 0]
    with pytest.raises(DataError, match=r"task 'topic', test split: label 'c' \(example 1\) never occurs in the "
                                        r"train split"):
        encode_labels({"train": ["a", "b"], "test": ["a", "c"]}, "topic")


# -- embedding cache --------------------------------------------------------------------------------------
def test_cache_keys_hits_and_model_separation(tmp_path: Path) -> None:
    enc = FakeEncoder()
    cache = EmbeddingCache("fake/model", DIM, tmp_path)
    words = ["delta", "alpha", "beta", "alpha", "gamma"]
    first = cache.embed(words, enc, batch_size=2, shard_size=2, progress=False)
    assert first.shape == (5, DIM) and sorted(enc.seen) == ["alpha", "beta", "delta", "gamma"]
    torch.testing.assert_close(first, enc(words))
    assert cache.dir == tmp_path / "fake_model" and len(list(cache.dir.glob("shard-*.safetensors"))) == 2
    enc.seen.clear()
    again = EmbeddingCache("fake/model", DIM, tmp_path).embed(["gamma", "alpha", "epsilon"], enc, progress=False)
    assert enc.seen == ["epsilon"]
    torch.testing.assert_close(again, enc(["gamma", "alpha", "epsilon"]))
    enc.seen.clear()
    EmbeddingCache("other-model", DIM, tmp_path).embed(["alpha"], enc, progress=False)
    assert enc.seen == ["alpha"]
    assert text_key("m", "alpha") != text_key("m", "alpha ") != text_key("n", "alpha")
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_shard_is_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    enc = FakeEncoder()
    cache = EmbeddingCache("m", DIM, tmp_path)
    want = cache.embed(["one", "two", "three"], enc, progress=False)
    (shard,) = cache.dir.glob("shard-*.safetensors")
    raw = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # a flipped bit in the last embedding: only the checksum notices
        shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x40]))
    else:
        shard.write_bytes(b"not a safetensors file")
    enc.seen.clear()
    got = cache.embed(["one", "two", "three"], enc, progress=False)
    assert cache.rebuilt == [shard] and sorted(enc.seen) == ["one", "three", "two"]
    torch.testing.assert_close(got, want)
    assert EmbeddingCache("m", DIM, tmp_path).load().keys() == {text_key("m", t) for t in ("one", "two", "three")}


def test_cache_rejects_wrong_width_and_uses_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"expected \[2, 8\]"):
        EmbeddingCache("m", DIM, tmp_path).embed(["a", "b"], lambda b: torch.zeros(len(b), 3), progress=False)
    monkeypatch.setenv("MTML_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "embeddings"
    monkeypatch.delenv("MTML_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "mtml" / "embeddings"


# -- the `texts` dataset on fortune files with a pre-filled cache (no encoder is loaded) ------------------
def _fortune_topics(tmp_path: Path, sizes: dict[str, int]) -> tuple[Path, Path]:
    root, cache_root = tmp_path / "fortunes", tmp_path / "cache"
    root.mkdir()
    all_texts = []
    for topic, n in sizes.items():
        entries = [f"{topic} saying number {i}" for i in range(n)]
        write_fortunes(root, topic, entries)
        all_texts += entries
    cache = EmbeddingCache(f"{MODEL_ID}-max256", 384, cache_root)
    cache.save([text_key(cache.model_id, t) for t in all_texts], torch.randn(len(all_texts), 384))
    return root, cache_root


def test_texts_topic_task_from_fortune_files(tmp_path: Path) -> None:
    root, cache_root = _fortune_topics(tmp_path, {"cats": 30, "dogs": 20, "owls": 10})
    (task,) = DATASETS.create("texts", tasks=["topic"], topics=["cats", "dogs", "owls"], per_topic=25,
                              fortune_dir=str(root), cache_dir=str(cache_root), progress=False, seed=1)
    assert task.name == "topic" and task.num_outputs == 3 and task.input_shape == (384,)
    assert len(task.train) + len(task.val) + len(task.test) == 25 + 20 + 10
    assert math.isclose(float(task.train.x.norm(dim=1).mean()), float(torch.randn(100, 384).norm(dim=1).mean()
                        * math.sqrt(384)), rel_tol=0.1)


def test_texts_unseen_topic_in_test_split_raises(tmp_path: Path) -> None:
    root, cache_root = _fortune_topics(tmp_path, {"cats": 6, "dogs": 6, "owls": 1})
    errors = []
    for seed in range(12):
        try:
            texts(tasks=["topic"], topics=["cats", "dogs", "owls"], fortune_dir=str(root), cache_dir=str(cache_root),
                  progress=False, seed=seed)
        except DataError as e:
            errors.append(str(e))
    assert errors and all("'owls'" in e and "never occurs in the train split" in e for e in errors)


def test_texts_bad_options(tmp_path: Path) -> None:
    from mtml.errors import ConfigError
    with pytest.raises(ConfigError, match="`tasks` must be"):
        texts(tasks=["topic", "mood"])
    with pytest.raises(ConfigError, match="`inputs` must be"):
        texts(inputs="pixels")
    with pytest.raises(ConfigError, match="fortune topic 'nope'"):
        texts(tasks=["topic"], topics=["nope", "cats"], fortune_dir=str(tmp_path))


# -- the real encoder (loads MiniLM: a few seconds) ------------------------------------------------------------
@pytest.mark.slow
def test_real_encoder_through_the_cache(tmp_path: Path) -> None:
    from mtml.datasets._text import _lazy_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentences = ["The soup was delicious.", "Compilers translate programs.", "I hate this product.",
                 "Judges interpret the law.", "The team won the match."]
    cache = EmbeddingCache("real-minilm", 384, tmp_path)
    emb = cache.embed(sentences, _lazy_encoder(256), progress=False)
    assert emb.shape == (5, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    sims = emb @ emb.T
    assert sims[0, 2] > sims[0, 1]  # two food reviews are closer than food and compilers
    hit = EmbeddingCache("real-minilm", 384, tmp_path).embed(sentences, lambda b: pytest.fail("re-encoded"),
                                                             progress=False)
    torch.testing.assert_close(hit, emb)


@pytest.mark.slow
def test_texts_real_data_tiny_subsets(tmp_path: Path) -> None:
    tasks = texts(per_topic=4, reviews=12, tweets=12, cache_dir=str(tmp_path), progress=False)
    assert [t.name for t in tasks] == ["topic", "sentiment", "likes"]
    assert [t.kind.value for t in tasks] == ["multiclass", "binary", "regression"]
    assert all(t.input_shape == (384,) for t in tasks)
    assert tasks[0].num_outputs <= 8 and len(tasks[1].train) + len(tasks[1].val) + len(tasks[1].test) == 12
    tokens = texts(per_topic=4, reviews=12, tweets=12, inputs="tokens", progress=False)
    assert tokens[0].input_shape[0] <= 256 and bool((tokens[1].train.x[:, 0] == 101).all())  # [CLS]


def test_shipped_config_validates() -> None:
    from importlib import resources

    import yaml

    from mtml.config import Config

    cfg = Config.from_dict(yaml.safe_load(resources.files("mtml").joinpath("configs", "texts.yaml").read_text()))
    assert cfg.data.dataset == "texts" and cfg.threads == 1


@pytest.mark.slow
def test_fine_tuning_top_layer_on_token_inputs() -> None:
    """The opt-in fine-tuning path: token-id tasks, encoder with its top layer trainable, a few joint steps."""
    from mtml.datasets._text import load_sentence_encoder
    from mtml.engine import StopRule, train_multitask
    from mtml.nn import build_text_model

    tasks = texts(tasks=["sentiment", "likes"], reviews=16, tweets=16, inputs="tokens", max_length=64,
                  progress=False)
    encoder, _ = load_sentence_encoder(trainable_top_layers=1)
    model = build_text_model(tasks, encoder, trunk_hidden=[16])
    layers = encoder.transformer.encoder.layer
    top, low = layers[-1].output.dense.weight.clone(), layers[0].output.dense.weight.clone()
    result = train_multitask(model, tasks, lr=1e-3, batch_size=8, stop=StopRule(max_steps=3, eval_every=3))
    assert set(result.test) == {"sentiment", "likes"}
    assert not torch.equal(layers[-1].output.dense.weight, top)
    assert torch.equal(layers[0].output.dense.weight, low)


@pytest.mark.slow
def test_minilm_architecture_from_a_config() -> None:
    """``model.architecture: minilm`` fine-tunes the encoder's top layer from a config (token inputs)."""
    from mtml.config import Config
    from mtml.workflows import build

    cfg = Config.from_dict({
        "data": {"dataset": "texts", "options": {"tasks": ["sentiment", "likes"], "reviews": 16, "tweets": 16,
                                                 "inputs": "tokens", "max_length": 32, "progress": False}},
        "model": {"architecture": "minilm", "options": {"trainable_top_layers": 2}, "trunk_hidden": [8]},
    })
    model = build(cfg).model
    trainable = {n.split(".layer.")[-1].split(".")[0] for n, p in model.named_parameters()
                 if p.requires_grad and ".layer." in n}
    assert trainable == {"4", "5"}  # the top two of six transformer layers
    with pytest.raises(ConfigError, match="stem_width"):
        build(Config.from_dict({**cfg.model_dump(), "model": {"architecture": "minilm", "stem_width": 8}}))
