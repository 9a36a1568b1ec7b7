"""An on-disk cache of sentence embeddings, keyed by model and text.

Layout: ``<root>/<model-id>/shard-<hash>.safetensors``, where ``root`` is ``$MTML_CACHE/embeddings`` when the
environment variable ``MTML_CACHE`` is set and ``~/.cache/mtml/embeddings`` otherwise. Each shard holds
``keys: uint8 [n, 32]`` (sha256 of model id + text) and ``embeddings: float32 [n, dim]``, with the model id, the
width and a sha256 of both tensors in its metadata. Shards are written atomically (temporary file, then rename);
a shard that cannot be read, belongs to another model or fails its checksum is deleted, and its texts are encoded
again. Encoding shows a progress bar on stderr.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from mtml.atomic import atomic_write_bytes
from mtml.errors import DataError

__all__ = ["EmbeddingCache", "EncodeFn", "default_cache_root", "text_key"]

EncodeFn = Callable[[list[str]], Tensor]
"""Encodes a batch of texts → ``float [batch, dim]``."""


def default_cache_root() -> Path:
    """``$MTML_CACHE/embeddings`` if set, else ``~/.cache/mtml/embeddings``."""
    env = os.environ.get("MTML_CACHE")
    return Path(env) / "embeddings" if env else Path.home() / ".cache" / "mtml" / "embeddings"


def text_key(model_id: str, text: str) -> bytes:
    """The 32-byte cache key of ``text`` under ``model_id``: sha256 of both (NUL-separated)."""
    return hashlib.sha256(model_id.encode() + b"\0" + text.encode()).digest()


def _checksum(keys: Tensor, emb: Tensor) -> str:
    h = hashlib.sha256(keys.contiguous().numpy().tobytes())
    h.update(emb.contiguous().numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings of ``model_id`` for texts, read from and added to ``root/<model-id>/``.

    Args:
        model_id: names the encoder (``/`` and other unsafe characters become ``_`` in the folder name).
        dim: embedding width; shards of another width are treated as corrupt.
        root: cache root (default :func:`default_cache_root`).
    """

    def __init__(self, model_id: str, dim: int, root: str | Path | None = None) -> None:
        self.model_id, self.dim = model_id, dim
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
        self.dir = Path(root) if root is not None else default_cache_root()
        self.dir = self.dir / safe
        self.rebuilt: list[Path] = []  # shards found corrupt (and deleted) by the last load

    def _load_shard(self, path: Path) -> tuple[Tensor, Tensor] | None:
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                data = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None
        keys, emb = data.get("keys"), data.get("embeddings")
        if (keys is None or emb is None or meta.get("model_id") != self.model_id or keys.dtype != torch.uint8
                or keys.ndim != 2 or keys.shape[1] != 32 or emb.shape != (keys.shape[0], self.dim)
                or meta.get("sha256") != _checksum(keys, emb)):
            return None
        return keys, emb

    def load(self) -> dict[bytes, Tensor]:
        """Every cached embedding of this model: key → ``[dim]``. Corrupt shards are deleted (see ``rebuilt``)."""
        found: dict[bytes, Tensor] = {}
        self.rebuilt = []
        if not self.dir.is_dir():
            return found
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            shard = self._load_shard(path)
            if shard is None:
                path.unlink(missing_ok=True)
                self.rebuilt.append(path)
                continue
            for k, e in zip(shard[0], shard[1], strict=True):
                found[bytes(k.tolist())] = e
        return found

    def save(self, keys: Sequence[bytes], embeddings: Tensor) -> Path:
        """Write one shard holding ``embeddings: [n, dim]`` under ``keys`` (atomically)."""
        if embeddings.shape != (len(keys), self.dim):
            raise DataError(f"embedding cache: expected embeddings of shape [{len(keys)}, {self.dim}], got "
                            f"{tuple(embeddings.shape)}; the encoder's width must match dim={self.dim}.")
        k = torch.tensor([list(key) for key in keys], dtype=torch.uint8).reshape(len(keys), 32)
        emb = embeddings.detach().float().cpu().contiguous()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"shard-{hashlib.sha256(k.numpy().tobytes()).hexdigest()[:24]}.safetensors"
        meta = {"model_id": self.model_id, "dim": str(self.dim), "sha256": _checksum(k, emb)}
        atomic_write_bytes(path, save({"keys": k, "embeddings": emb}, metadata=meta))
        return path

    def embed(
        self, texts: Sequence[str], encode: EncodeFn, *, batch_size: int = 32, shard_size: int = 512,
        progress: bool = True, description: str = "encoding texts",
    ) -> Tensor:
        """Embeddings ``[len(texts), dim]`` of ``texts``: cached ones are read, the others encoded by
        ``encode`` (in batches, longest texts together) and written in shards of ``shard_size``."""
        keys = [text_key(self.model_id, t) for t in texts]
        known = self.load()
        todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in known}.items(),
                      key=lambda kt: len(kt[1]))
        if todo:
            self._encode_missing(todo, known, encode, batch_size, shard_size, progress, description)
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([known[k] for k in keys])

    def _encode_missing(
        self, todo: list[tuple[bytes, str]], known: dict[bytes, Tensor], encode: EncodeFn, batch_size: int,
        shard_size: int, progress: bool, description: str,
    ) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar = Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False)
        with bar:
            job = bar.add_task(f"{description} ({self.model_id})", total=len(todo))
            pending_k: list[bytes] = []
            pending_e: list[Tensor] = []
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                with torch.no_grad():
                    emb = encode([t for _, t in chunk]).detach().float().cpu()
                if emb.shape != (len(chunk), self.dim):
                    raise DataError(f"encoder returned shape {tuple(emb.shape)} for {len(chunk)} texts; expected "
                                    f"[{len(chunk)}, {self.dim}]. Check the encoder and the cache's dim.")
                pending_k += [k for k, _ in chunk]
                pending_e.append(emb)
                for k, e in zip(chunk, emb, strict=True):
                    known[k[0]] = e.clone()
                if len(pending_k) >= shard_size or i + batch_size >= len(todo):
                    self.save(pending_k, torch.cat(pending_e))
                    pending_k, pending_e = [], []
                bar.advance(job, len(chunk))
