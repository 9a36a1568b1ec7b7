"""Rendering of clean glyph prototypes with Pillow for the ``glyphs`` dataset.

A prototype is one character in one font: drawn large, cropped to its ink, scaled (aspect kept) so its longer
side fills ``BOX`` of the canvas and centred — white ink (255) on black (0), ``uint8 [canvas, canvas]``.
Glyphs that render empty, or identical to the font's ``.notdef`` box, are dropped; so are characters that look
the same as an earlier character of their alphabet (near-duplicate shapes would be two classes of one image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtml.datasets._glyphs_fonts import FontInfo

__all__ = ["BOX", "Prototypes", "render_alphabets"]

BOX = 0.72  # the glyph's longer side as a fraction of the canvas
_DRAW_SIZE = 64  # font size (px) glyphs are drawn at before scaling down
_NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no font maps: renders the .notdef glyph
_DUPLICATE_COSINE = 0.97  # above this (on the canonical rendering) two characters count as one shape


@dataclass
class Prototypes:
    """Rendered prototypes and the characters they belong to.

    ``images: uint8 [P, canvas, canvas]``; ``proto_char[p]`` is the character index (into ``chars``) and
    ``proto_font[p]`` the font index of prototype ``p``; ``char_alphabet[c]`` indexes ``alphabets``.
    """

    images: np.ndarray
    proto_char: np.ndarray
    proto_font: np.ndarray
    chars: list[str]
    char_alphabet: np.ndarray
    alphabets: list[str]


class _Renderer:
    """Draws characters with Pillow, one ``FreeTypeFont`` per font file, loaded on first use."""

    def __init__(self, fonts: list[FontInfo], canvas: int) -> None:
        self.fonts, self.canvas = fonts, canvas
        self._loaded: dict[int, Any] = {}
        self._notdef: dict[int, np.ndarray | None] = {}

    def _font(self, index: int) -> Any:
        from PIL import ImageFont

        if index not in self._loaded:
            self._loaded[index] = ImageFont.truetype(str(self.fonts[index].path), _DRAW_SIZE)
        return self._loaded[index]

    def draw(self, char: str, index: int) -> np.ndarray | None:
        """``uint8 [canvas, canvas]`` or ``None`` when the glyph has no ink."""
        from PIL import Image, ImageDraw

        side = 4 * _DRAW_SIZE
        page = Image.new("L", (side, side), 0)
        ImageDraw.Draw(page).text((side // 2, side // 2), char, fill=255, font=self._font(index), anchor="mm")
        bbox = page.getbbox()
        if bbox is None:
            return None
        ink = page.crop(bbox)
        box = max(1, round(BOX * self.canvas))
        scale = box / max(ink.size)
        size = (max(1, round(ink.size[0] * scale)), max(1, round(ink.size[1] * scale)))
        ink = ink.resize(size, Image.Resampling.LANCZOS)
        out = Image.new("L", (self.canvas, self.canvas), 0)
        out.paste(ink, ((self.canvas - size[0]) // 2, (self.canvas - size[1]) // 2))
        image = np.asarray(out, dtype=np.uint8)
        return image if image.max() >= 64 else None

    def valid(self, char: str, index: int) -> np.ndarray | None:
        """The prototype, or ``None`` if it is empty or the font's ``.notdef`` box."""
        image = self.draw(char, index)
        if image is None:
            return None
        if index not in self._notdef:
            self._notdef[index] = self.draw(_NOTDEF_PROBE, index)
        notdef = self._notdef[index]
        if notdef is not None and np.abs(image.astype(np.int16) - notdef).mean() < 2.0:
            return None
        return image


def _unit(image: np.ndarray) -> np.ndarray:
    v = image.astype(np.float32).ravel()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def _render_alphabet(renderer: _Renderer, letters: dict[str, list[int]], order: list[int],
                     max_characters: int) -> list[tuple[str, list[tuple[int, np.ndarray]]]]:
    """Up to ``max_characters`` distinct characters (visited in ``order``) with their valid prototypes."""
    chars = list(letters)
    kept: list[tuple[str, list[tuple[int, np.ndarray]]]] = []
    canon: list[np.ndarray] = []
    for position in order:
        char = chars[position]
        protos = [(f, img) for f in letters[char] if (img := renderer.valid(char, f)) is not None]
        if not protos:
            continue
        unit = _unit(protos[0][1])
        if any(float(unit @ c) >= _DUPLICATE_COSINE for c in canon):
            continue
        kept.append((char, protos))
        canon.append(unit)
        if len(kept) == max_characters:
            break
    return kept


def render_alphabets(
    fonts: list[FontInfo], table: dict[str, dict[str, list[int]]], *, canvas: int, max_characters: int,
    min_characters: int, generator: torch.Generator, progress: Callable[[int, int], None] | None = None,
) -> Prototypes:
    """Prototypes of up to ``max_characters`` random distinct characters per alphabet of ``table`` (alphabets
    left with fewer than ``min_characters`` are dropped). ``progress(done, total)`` is called per alphabet."""
    renderer = _Renderer(fonts, canvas)
    images: list[np.ndarray] = []
    proto_char: list[int] = []
    proto_font: list[int] = []
    chars: list[str] = []
    char_alphabet: list[int] = []
    alphabets: list[str] = []
    for done, (script, letters) in enumerate(table.items()):
        order = torch.randperm(len(letters), generator=generator).tolist()
        if len(letters) >= min_characters:
            kept = _render_alphabet(renderer, letters, order, max_characters)
            if len(kept) >= min_characters:
                for char, protos in kept:
                    for font, image in protos:
                        images.append(image)
                        proto_char.append(len(chars))
                        proto_font.append(font)
                    chars.append(char)
                    char_alphabet.append(len(alphabets))
                alphabets.append(script)
        if progress is not None:
            progress(done + 1, len(table))
    stack = np.stack(images) if images else np.zeros((0, canvas, canvas), np.uint8)
    return Prototypes(stack, np.asarray(proto_char, np.int64), np.asarray(proto_font, np.int64), chars,
                      np.asarray(char_alphabet, np.int64), alphabets)
