"""A sentence encoder as a trunk: token ids → mean-pooled, L2-normalised sentence embeddings.

:class:`SentenceEncoder` wraps an already loaded transformer (a Hugging Face ``BertModel`` such as
all-MiniLM-L6-v2; loading its files is I/O and happens in :func:`mtml.nn.load_sentence_encoder`) and pools its
last hidden states exactly as sentence-transformers' ``Pooling(mean) → Normalize``
does (Reimers & Gurevych, EMNLP 2019).
By default every weight is frozen; ``trainable_top_layers=k`` lets the top ``k`` transformer layers learn.
:func:`build_text_model` composes encoder → MLP trunk → heads for tasks whose inputs are token ids.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtml.errors import ConfigError, ShapeError
from mtml.nn._mlp import mlp
from mtml.nn._model import MultiTaskModel
from mtml.tasks import Task

__all__ = ["SentenceEncoder", "build_text_model", "mean_pool"]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden: [n, tokens, d]`` over tokens where ``mask: [n, tokens]`` is 1, L2-normalised: ``[n, d]``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * m).sum(1)
    return F.normalize(summed / m.sum(1).clamp_min(1e-9), p=2, dim=1)


def _layers_of(transformer: nn.Module) -> nn.ModuleList:
    encoder = getattr(transformer, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"SentenceEncoder: cannot find the transformer layers of {type(transformer).__name__} at "
            "`.encoder.layer`; pass them explicitly with layers=<nn.ModuleList>."
        )
    return layers


class SentenceEncoder(nn.Module):
    """Token ids ``[n, tokens]`` → sentence embeddings ``[n, dim]`` (mean pooling, unit length).

    Args:
        transformer: called as ``transformer(input_ids=..., attention_mask=...)``; its output has
            ``last_hidden_state: [n, tokens, dim]`` (or is a tuple whose first item is that).
        trainable_top_layers: how many of the top transformer layers learn (0: all frozen).
        layers: the transformer's layer list (default: ``transformer.encoder.layer``, as in BERT).
        pad_id: the padding token id; the attention mask is ``ids != pad_id`` when none is given.

    Inputs may be float (a :class:`~mtml.tasks.Task` stores inputs as float; ids < 2**24 are exact). Padding
    columns beyond the longest sequence of a batch are trimmed before the transformer runs. Frozen parts stay in
    eval mode (no dropout) whatever ``train()`` is called with.
    """

    def __init__(
        self, transformer: nn.Module, *, trainable_top_layers: int = 0, layers: nn.ModuleList | None = None,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        stack = layers if layers is not None else _layers_of(transformer)
        if not 0 <= trainable_top_layers <= len(stack):
            raise ConfigError(
                f"trainable_top_layers must be in [0, {len(stack)}] (the transformer has {len(stack)} layers). "
                f"Got {trainable_top_layers}."
            )
        self.trainable_top_layers = trainable_top_layers
        self.pad_id = pad_id
        self._top = list(stack)[len(stack) - trainable_top_layers:] if trainable_top_layers else []
        for p in transformer.parameters():
            p.requires_grad_(False)
        for layer in self._top:
            for p in layer.parameters():
                p.requires_grad_(True)
        config = getattr(transformer, "config", None)
        self.dim = int(getattr(config, "hidden_size", 0)) or self._probe_dim()
        self.train(False)

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(self(torch.tensor([[1, 2]])).shape[1])

    def train(self, mode: bool = True) -> SentenceEncoder:
        super().train(mode)
        self.transformer.eval()
        for layer in self._top:
            layer.train(mode)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids: [n, tokens]`` (and optional ``attention_mask: [n, tokens]``) → ``[n, dim]``."""
        if input_ids.ndim != 2:
            raise ShapeError(f"SentenceEncoder takes token ids of shape [n, tokens]; got {tuple(input_ids.shape)}. "
                             "Tokenize the texts first (mtml.datasets._text.tokenize).")
        ids = input_ids.long()
        mask = (ids != self.pad_id).long() if attention_mask is None else attention_mask.long()
        if ids.shape[0] and ids.shape[1]:
            used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            ids, mask = ids[:, :used], mask[:, :used]
        out = self.transformer(input_ids=ids, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return mean_pool(hidden, mask)


def build_text_model(
    tasks: Sequence[Task], encoder: SentenceEncoder, *, trunk_hidden: Sequence[int] = (256,),
    head_hidden: Sequence[int] = (), activation: str = "relu", dropout: float = 0.0, share_trunk: bool = True,
) -> MultiTaskModel:
    """Encoder → MLP trunk → one head per task, for tasks whose inputs are token ids ``[n, tokens]``.

    With ``share_trunk=False`` every task gets its own deep copy of encoder and MLP (the single-task baseline).
    Tasks may have different token lengths; the model does not check input shapes.
    """
    if not tasks:
        raise ConfigError("build_text_model needs at least one task.")
    for t in tasks:
        if len(t.input_shape) != 1:
            raise ConfigError(f"task '{t.name}' has inputs of shape {t.input_shape}; a text model takes token ids "
                              "[n, tokens]. Build the tasks with texts(inputs='tokens').")
    d_feat = trunk_hidden[-1] if trunk_hidden else encoder.dim

    def trunk() -> nn.Module:
        return nn.Sequential(encoder if share_trunk else copy.deepcopy(encoder),
                             mlp(encoder.dim, trunk_hidden, activation=activation, dropout=dropout))

    heads = {t.name: mlp(d_feat, head_hidden, t.num_outputs, activation=activation) for t in tasks}
    if share_trunk:
        return MultiTaskModel(trunk(), heads)
    return MultiTaskModel(nn.Identity(), heads, {t.name: trunk() for t in tasks})
