"""Fonts and alphabets for the ``glyphs`` dataset: which fonts exist, which letters each covers, which script
each letter belongs to.

An *alphabet* is a Unicode script, read from the character's name (``ARMENIAN CAPITAL LETTER AYB`` → ``ARMENIAN``).
Its characters are the letters (categories Lu, Lt, Lo — lower case is left out so that ``o``/``O`` never become
two classes) without a canonical or compatibility decomposition (no accented Latin, no Arabic presentation forms)
that at least one font maps in its ``cmap``. A character's fonts are every font that maps it, so Latin letters
come in 16+ Noto families and weights while most historic scripts come in one.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mtml.errors import ConfigError

__all__ = ["NOTO_DIR", "FontInfo", "GlyphsFontWarning", "alphabet_letters", "discover_fonts", "matplotlib_font_dir",
           "script_of"]

NOTO_DIR = Path("/usr/share/fonts/truetype/noto")
FONT_DIR_ENV = "MTML_GLYPHS_FONT_DIR"
_FONT_SUFFIXES = (".ttf", ".otf")
# Words that end a script's name inside a character name ("TAI THAM LETTER HIGH KA" → "TAI THAM").
_NAME_STOP = {"LETTER", "CAPITAL", "SMALL", "SYLLABLE", "SYLLABICS", "SIGN", "CHARACTER", "IDEOGRAPH",
              "HIEROGLYPH", "IDEOGRAM", "INDEPENDENT", "VOWEL", "CONSONANT", "DIGIT", "LIGATURE"}
# Sub-blocks that are the same script under another name (same shapes must not straddle splits).
_SCRIPT_ALIAS = {"GEORGIAN MTAVRULI": "GEORGIAN", "PAHAWH HMONG CLAN": "PAHAWH HMONG",
                 "LATIN EPIGRAPHIC": "LATIN"}
# Font files that hold no letters of a writing system (symbols, music, numerals, notdef boxes).
_SKIP_FONTS = ("Symbols", "Math", "Music", "Numerals", "SignWriting", "LastResort", "cmex", "cmsy", "STIXSiz",
               "STIXNonUni")


class GlyphsFontWarning(UserWarning):
    """The Noto fonts are missing: the dataset falls back to the few fonts matplotlib ships."""


@dataclass(frozen=True)
class FontInfo:
    """One font file and the style labels read from its name."""

    path: Path
    style: str  # "sans", "serif", "mono" or "other" (Kufi, Naskh, Nastaliq, Looped, Rashi, ...)
    bold: bool
    italic: bool

    @property
    def name(self) -> str:
        return self.path.stem


def _font_info(path: Path) -> FontInfo:
    stem = path.stem
    if "Mono" in stem or stem.startswith("cmtt"):
        style = "mono"
    elif "Serif" in stem or stem.startswith(("STIX", "cmr", "cmb", "cmti", "cmmi")):
        style = "serif"
    elif "Sans" in stem or stem.startswith("cmss"):
        style = "sans"
    else:
        style = "other"
    weight = stem.rsplit("-", 1)[-1]  # "NotoSansOldItalic-Regular": the script name is no slant
    bold = "Bold" in weight or stem.endswith(("Bol", "BolIta")) or stem.startswith("cmb")
    italic = any(w in weight for w in ("Italic", "Oblique")) or stem.endswith("Ita") or stem.startswith(
        ("cmti", "cmmi"))
    return FontInfo(path, style, bold, italic)


def _font_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if p.suffix.lower() in _FONT_SUFFIXES]
    return sorted(p for p in files if not any(s in p.stem for s in _SKIP_FONTS))


def matplotlib_font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def discover_fonts(font_dir: str | os.PathLike[str] | None = None) -> tuple[list[FontInfo], bool]:
    """The usable font files of ``font_dir`` (default: ``$MTML_GLYPHS_FONT_DIR`` or Debian's Noto directory),
    and whether the matplotlib fallback had to be used.

    Without fonts there, warns with :class:`GlyphsFontWarning` and returns the fonts matplotlib ships
    (DejaVu, STIX, Computer Modern: Latin, Greek, Cyrillic and a few more scripts).
    """
    chosen = Path(font_dir if font_dir is not None else os.environ.get(FONT_DIR_ENV, NOTO_DIR))
    files = _font_files(chosen)
    if files:
        return [_font_info(p) for p in files], False
    fallback = _font_files(matplotlib_font_dir())
    warnings.warn(
        f"glyphs: no font files (.ttf/.otf) in {chosen}; falling back to the {len(fallback)} fonts matplotlib "
        "ships (DejaVu, STIX, Computer Modern), which cover only a few scripts. For the full ~140 scripts "
        "install Debian's Noto fonts (`apt-get install fonts-noto-core`) or point the `font_dir` option "
        f"(or ${FONT_DIR_ENV}) at a directory of Noto .ttf files.",
        GlyphsFontWarning, stacklevel=2,
    )
    if not fallback:
        raise ConfigError(f"glyphs: no fonts in {chosen} nor in matplotlib's {matplotlib_font_dir()}. Install "
                          "fonts-noto-core or set `font_dir` to a directory of .ttf files.")
    return [_font_info(p) for p in fallback], True


def script_of(char: str) -> str | None:
    """The script of a letter from its Unicode name (``"ETHIOPIC SYLLABLE HA"`` → ``"ETHIOPIC"``), or ``None``
    for characters without a name in this Python's Unicode database."""
    words = unicodedata.name(char, "").split()
    script: list[str] = []
    for word in words:
        if word in _NAME_STOP or ("-" in word and word.split("-")[0] in _NAME_STOP):
            break
        script.append(word)
    if not script or len(script) == len(words):
        return None
    name = " ".join(script)
    return _SCRIPT_ALIAS.get(name, name)


def _is_letter(char: str) -> bool:
    return unicodedata.category(char) in ("Lu", "Lt", "Lo") and not unicodedata.decomposition(char)


def _cmap(path: Path) -> set[int]:
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True, fontNumber=0) as font:
            table = font.getBestCmap() or {}
            return set(table)
    except Exception as exc:  # fontTools raises many kinds on unreadable files
        warnings.warn(f"glyphs: skipping unreadable font {path} ({exc}).", GlyphsFontWarning, stacklevel=3)
        return set()


def alphabet_letters(fonts: list[FontInfo]) -> dict[str, dict[str, list[int]]]:
    """``{script: {character: [font indices that map it]}}`` over every letter the fonts cover, sorted by
    script name and code point."""
    table: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for index, font in enumerate(fonts):
        for code in sorted(_cmap(font.path)):
            char = chr(code)
            if not _is_letter(char):
                continue
            script = script_of(char)
            if script is not None:
                table[script].setdefault(char, []).append(index)
    return {s: dict(sorted(table[s].items())) for s in sorted(table)}
