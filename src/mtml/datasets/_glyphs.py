"""``glyphs``: an offline Omniglot stand-in — letters of ~120 writing systems rendered from system fonts.

One class per character; every example is the character in a random font that covers it (Noto Sans, Serif,
Kufi, Naskh, … in regular and bold), with a random stroke width, affine pose and elastic warp
(:mod:`mtml.datasets._glyphs_augment`), ``uint8 [image_size, image_size]``, white ink on black. Alphabets
(Unicode scripts) are split whole into meta-train / val / test, like Omniglot's background and evaluation sets.
The set is a deterministic function of its options, rendered once and cached (:mod:`mtml.datasets._glyphs_cache`).
Without Debian's ``fonts-noto-core`` it warns and falls back to the fonts matplotlib ships.

:func:`load_glyphs` gives the arrays with per-image labels (character, alphabet, font, style, weight, slant) for
multi-task use; :func:`glyphs` is the few-shot task family; :func:`pixel_nn_accuracy` the raw-pixel baseline.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtml._checks import check_int
from mtml.datasets._glyphs_augment import GlyphAugment, augment
from mtml.datasets._glyphs_cache import cache_dir_for, cache_key, read_entry, write_entry
from mtml.datasets._glyphs_fonts import FontInfo, alphabet_letters, discover_fonts
from mtml.datasets._glyphs_render import Prototypes, render_alphabets
from mtml.errors import ConfigError

__all__ = ["STYLES", "GlyphAugment", "GlyphSet", "load_glyphs"]

VERSION = 1  # bump whenever rendering or augmentation changes the pixels of existing options
STYLES = ("sans", "serif", "mono", "other")


@dataclass(frozen=True)
class GlyphSet:
    """Rendered glyphs with their labels; examples are ordered class by class.

    ``images: uint8 [n, size, size]`` (ink 255 on 0); per image ``character``, ``alphabet``, ``font``,
    ``style`` (index into :data:`STYLES`), ``bold`` and ``italic`` (0/1), all ``int64 [n]``.
    ``characters[c]`` is class ``c``'s character and ``character_alphabet[c]`` its alphabet;
    ``alphabets`` and ``fonts`` name the ids. ``fallback`` is true when matplotlib's fonts were used.
    """

    images: Tensor
    character: Tensor
    alphabet: Tensor
    font: Tensor
    style: Tensor
    bold: Tensor
    italic: Tensor
    characters: tuple[str, ...]
    character_alphabet: Tensor
    alphabets: tuple[str, ...]
    fonts: tuple[str, ...]
    fallback: bool
    cache_path: Path

    @property
    def num_classes(self) -> int:
        return len(self.characters)

    def inputs(self) -> Tensor:
        """Images as float ``[n, 1, size, size]`` in [0, 1]."""
        return self.images.unsqueeze(1).float() / 255.0


def _pick_alphabets(table: dict[str, dict[str, list[int]]], wanted: Sequence[str] | None,
                    ) -> dict[str, dict[str, list[int]]]:
    if wanted is None:
        return table
    if isinstance(wanted, str) or not len(wanted):
        raise ConfigError(f"glyphs: `alphabets` must be a non-empty list of script names or null (all). Got "
                          f"{wanted!r}.")
    picked = {}
    for name in wanted:
        key = str(name).upper().replace("_", " ")
        if key not in table:
            near = difflib.get_close_matches(key, list(table), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"glyphs: unknown alphabet {name!r} for these fonts.{hint} Available: "
                              f"{', '.join(table)}.")
        picked[key] = table[key]
    return dict(sorted(picked.items()))


def _pillow_version() -> str:
    """Pillow's version; a :class:`ConfigError` with the install command if Pillow or fontTools is missing."""
    try:
        import fontTools  # noqa: F401
        import PIL
    except ImportError as exc:
        raise ConfigError(f"glyphs needs Pillow and fontTools to render fonts ({exc}); install the vision extra: "
                          "pip install 'mtml[vision]'") from None
    return str(PIL.__version__)


def _fingerprint(fonts: list[FontInfo]) -> list[list[Any]]:
    return [[f.path.name, f.path.stat().st_size] for f in fonts]


class _Progress:
    """A two-phase progress bar on stderr (rendering, then distorting), or nothing when ``show`` is false."""

    def __init__(self, show: bool) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self._bar = Progress(console=Console(stderr=True), transient=True, disable=not show)
        self._task = self._bar.add_task("glyphs: rendering letters (once, then cached)", total=None)

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def next_phase(self, description: str) -> None:
        self._bar.update(self._task, description=description, completed=0, total=None)


def _build(fonts: list[FontInfo], table: dict[str, dict[str, list[int]]], *, seed: int, examples: int,
           size: int, max_characters: int, min_characters: int, aug: GlyphAugment, progress: bool,
           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    with _Progress(progress) as bar:
        protos = render_alphabets(fonts, table, canvas=2 * size, max_characters=max_characters,
                                  min_characters=min_characters, generator=gen, progress=bar.update)
        if not protos.chars:
            raise ConfigError(f"glyphs: no alphabet has >= min_characters = {min_characters} renderable letters "
                              "in these fonts. Lower `min_characters` or choose other `alphabets`/fonts.")
        bar.next_phase("glyphs: distorting examples (once, then cached)")
        tensors = _examples(protos, examples, aug, gen, bar.update)
    return tensors, {"characters": protos.chars, "alphabets": protos.alphabets}


def _examples(protos: Prototypes, examples: int, aug: GlyphAugment, gen: torch.Generator,
              progress: Callable[[int, int], None]) -> dict[str, Tensor]:
    """``examples`` distorted images per character, each from a random one of its prototypes."""
    proto_char = torch.from_numpy(protos.proto_char)
    counts = torch.bincount(proto_char, minlength=len(protos.chars))
    starts = torch.cumsum(counts, 0) - counts
    character = torch.arange(len(protos.chars)).repeat_interleave(examples)
    pick = (torch.rand(len(character), generator=gen) * counts[character]).long().clamp_max(counts[character] - 1)
    proto = starts[character] + pick
    images = augment(torch.from_numpy(protos.images), proto, aug, gen, progress=progress)
    proto_font = torch.from_numpy(protos.proto_font)
    return {"images": images, "character": character, "font": proto_font[proto],
            "character_alphabet": torch.from_numpy(protos.char_alphabet)}


def load_glyphs(
    *, seed: int = 0, examples_per_class: int = 20, image_size: int = 28, max_characters: int = 40,
    min_characters: int = 14, alphabets: Sequence[str] | None = None, augmentation: GlyphAugment | None = None,
    font_dir: str | None = None, cache_dir: str | None = None, progress: bool = True,
) -> GlyphSet:
    """Render (or read from the cache) the glyphs dataset.

    Args:
        seed: drives which characters are picked, each example's font and every distortion.
        examples_per_class: images per character (Omniglot: 20).
        image_size: side of the square images (rendered at twice this, then average-pooled).
        max_characters, min_characters: characters kept per alphabet (a random distinct subset of at most
            ``max_characters``); alphabets with fewer than ``min_characters`` renderable letters are dropped.
        alphabets: Unicode script names to keep (e.g. ``["ARMENIAN", "RUNIC"]``); ``None`` keeps all.
        augmentation: distortion strengths; the default is calibrated to Omniglot's pixel baseline.
        font_dir: directory of .ttf/.otf files (default ``$MTML_GLYPHS_FONT_DIR`` or Debian's Noto).
        cache_dir: cache root (default ``$MTML_CACHE`` or ``~/.cache/mtml``).
        progress: show a progress bar on stderr while rendering.
    """
    examples = check_int("examples_per_class", examples_per_class, 1, "Render at least one image per class.")
    size = check_int("image_size", image_size, 8, "Images smaller than 8×8 cannot hold a glyph.")
    low = check_int("min_characters", min_characters, 1, "Keep alphabets with at least one character.")
    high = check_int("max_characters", max_characters, low, "It must be >= min_characters.")
    aug = augmentation if augmentation is not None else GlyphAugment()
    pillow = _pillow_version()
    fonts, fallback = discover_fonts(font_dir)
    table = _pick_alphabets(alphabet_letters(fonts), alphabets)
    options = {"version": VERSION, "pillow": pillow, "unicode": unicodedata.unidata_version, "seed": seed,
               "examples": examples, "size": size, "max_characters": high, "min_characters": low,
               "alphabets": list(table), "augment": asdict(aug), "fonts": _fingerprint(fonts)}
    directory = cache_dir_for(cache_key(options), cache_dir)
    entry = read_entry(directory)
    if entry is None or entry[1].get("options") != options:
        tensors, meta = _build(fonts, table, seed=seed, examples=examples, size=size, max_characters=high,
                               min_characters=low, aug=aug, progress=progress)
        write_entry(directory, tensors, {**meta, "options": options})
    else:
        tensors, meta = entry
    return _glyph_set(tensors, meta, fonts, fallback, directory)


def _glyph_set(tensors: dict[str, Tensor], meta: dict[str, Any], fonts: list[FontInfo], fallback: bool,
               directory: Path) -> GlyphSet:
    character, font = tensors["character"], tensors["font"]
    char_alpha = tensors["character_alphabet"]
    style_of = torch.tensor([STYLES.index(f.style) for f in fonts])
    bold_of = torch.tensor([int(f.bold) for f in fonts])
    italic_of = torch.tensor([int(f.italic) for f in fonts])
    return GlyphSet(
        images=tensors["images"], character=character, alphabet=char_alpha[character], font=font,
        style=style_of[font], bold=bold_of[font], italic=italic_of[font], characters=tuple(meta["characters"]),
        character_alphabet=char_alpha, alphabets=tuple(meta["alphabets"]), fonts=tuple(f.name for f in fonts),
        fallback=fallback, cache_path=directory,
    )
