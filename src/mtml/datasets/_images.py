"""Shared helpers for image readers: decoding files to uint8 tensors, scaling to floats, episode sources.

Images are decoded once, when a dataset is built, into one ``uint8`` tensor ``[n, channels, height, width]``
(mini-ImageNet: 60 000 × 3 × 84 × 84 = 1.3 GB). Models receive floats in ``[0, 1]`` (pixel / 255, no mean or
standard-deviation normalisation), converted per batch or per episode by :class:`ToFloat`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from mtml._checks import check_int
from mtml.errors import ConfigError, DataError
from mtml.sampling import FewShotClassification

__all__ = ["IMAGE_SUFFIXES", "Progress", "ToFloat", "check_classes", "check_flatten", "check_reader_options",
           "decode_images", "image_source", "list_images", "require_vision"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called while images are decoded."""


def require_vision(module: str, dataset: str) -> ModuleType:
    """Import Pillow / scikit-image or raise a :class:`ConfigError` saying how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"dataset '{dataset}' needs the Python package '{module}'; install the vision extra: "
                          "pip install 'mtml[vision]'") from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix, any case; hidden files skipped), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _decode_one(image_module: ModuleType, path: Path, size: int, mode: str) -> np.ndarray:
    """``[size, size, channels]`` uint8 pixels of ``path``; :class:`DataError` naming the file if unreadable."""
    try:
        with image_module.open(path) as img:
            img.load()
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), image_module.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file '{path}' does not exist; restore it or remove it from the listing that "
                        "names it.") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"image file '{path}' cannot be read as an image ({exc}); replace or delete the file.") \
            from None
    return pixels.reshape(size, size, -1)


def decode_images(paths: Sequence[Path], *, size: int, channels: int, dataset: str,
                  progress: Progress | None = None) -> Tensor:
    """Decode ``paths`` into ``uint8 [n, channels, size, size]`` (grayscale for 1 channel, RGB for 3).

    Every image is resized to ``size × size`` (bilinear) whatever its own size or aspect ratio.
    """
    image_module = require_vision("PIL.Image", dataset)
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, path in enumerate(paths):
        out[i] = _decode_one(image_module, path, size, mode)
        if progress is not None and ((i + 1) % 256 == 0 or i + 1 == len(paths)):
            progress(i + 1, len(paths))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ToFloat:
    """uint8 pixels ``[..., C, H, W]`` → float32 in ``[0, 1]``, flattened to ``[..., C·H·W]`` if ``flatten``."""

    flatten: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        out = x.to(torch.float32).div_(255.0)  # in place: one float copy per batch
        return out.flatten(-3) if self.flatten else out

    def shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-example shape the model sees for images of ``image_shape = (C, H, W)``."""
        return (int(np.prod(image_shape)),) if self.flatten else tuple(image_shape)


def check_flatten(flatten: object) -> bool:
    if not isinstance(flatten, bool):
        raise ConfigError(f"`flatten` must be true (inputs [C·H·W] for MLP models) or false ([C, H, W] for "
                          f"convolutional trunks). Got {flatten!r}.")
    return flatten


def check_reader_options(*, image_size: int, channels: int, flatten: bool, ways: int, shots: int, query_shots: int,
                  meta_batch: int) -> None:
    """Validate a reader's options before any file is opened (decoding may take minutes)."""
    check_int("image_size", image_size, 1, "Give the side length, in pixels, that every image is resized to.")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"`channels` must be 1 (grayscale) or 3 (RGB). Got {channels!r}.")
    check_flatten(flatten)
    check_int("ways", ways, 2, "An N-way task needs at least 2 classes.")
    check_int("shots", shots, 1, "Give each class at least one support image.")
    check_int("query_shots", query_shots, 1, "Give each class at least one query image.")
    check_int("meta_batch", meta_batch, 1, "Draw at least one task per episode.")


def check_classes(labels: Tensor, groups: Mapping[str, Tensor], where: Mapping[int, str], *, ways: int, shots: int,
                  query_shots: int) -> None:
    """Before decoding: every class of every split (``groups``: split → class ids; ``labels: [n]`` one class id per
    image) holds at least ``shots + query_shots`` images and every split at least ``ways`` classes. A
    :class:`DataError` names the first short class (``where[class]`` is its folder or file) and the fix."""
    need = shots + query_shots
    counts = torch.bincount(labels, minlength=len(where))
    for split, classes in groups.items():
        short = [int(c) for c in classes if counts[int(c)] < need]
        if short:
            c = short[0]
            raise DataError(
                f"class '{where[c]}' ({split} split) holds {int(counts[c])} images, fewer than shots + query_shots "
                f"= {shots} + {query_shots} = {need} ({len(short)} such class{'es' if len(short) > 1 else ''}); "
                "lower shots or query_shots, add images, or remove the class.")
    for split, classes in groups.items():
        if len(classes) < ways:
            raise ConfigError(f"`ways` must be <= the number of classes in every meta-split, but the {split} split "
                              f"holds {len(classes)} classes. Got ways={ways}. Lower ways or give that split more "
                              "classes.")


def image_source(images: Tensor, labels: Tensor, groups: Mapping[str, Tensor], *, ways: int, shots: int,
                 query_shots: int, meta_batch: int, flatten: bool) -> dict:
    """Keyword arguments of an ``EpisodeSource``: one :class:`FewShotClassification` per split in ``groups``
    (split → class ids) over ``images: uint8 [n, C, H, W]`` with class ids ``labels: long [n]``."""
    to_float = ToFloat(flatten)
    samplers = {split: FewShotClassification(images, labels, ways=ways, shots=shots, query_shots=query_shots,
                                             meta_batch=meta_batch, classes=classes, transform=to_float)
                for split, classes in groups.items()}
    return {**samplers, "input_shape": to_float.shape(tuple(images.shape[1:])), "num_outputs": ways,
            "kind": "classification"}
