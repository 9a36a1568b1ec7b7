"""The glyphs dataset: determinism, labels, alphabet-disjoint splits, cache hit/miss/corruption, font fallback,
episodes, the pixel baseline and option errors. Small script subsets keep every render to a second or two."""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mtml.datasets import FAMILIES
from mtml.datasets import _glyphs_render as glyphs_render
from mtml.datasets._glyphs import STYLES, GlyphAugment, GlyphSet, load_glyphs
from mtml.datasets._glyphs_cache import GlyphsCacheWarning
from mtml.datasets._glyphs_fewshot import glyph_splits, pixel_nn_accuracy
from mtml.datasets._glyphs_fonts import (
    NOTO_DIR,
    GlyphsFontWarning,
    _font_info,
    discover_fonts,
    matplotlib_font_dir,
    script_of,
)
from mtml.errors import ConfigError
from mtml.sampling import split_groups

pytestmark = pytest.mark.skipif(not any(NOTO_DIR.glob("NotoSans*.ttf")),
                                reason="needs Debian's fonts-noto-core (make sysdata)")

SMALL: dict[str, Any] = {"alphabets": ["OGHAM", "RUNIC", "GOTHIC", "OLD ITALIC"], "max_characters": 12,
                         "min_characters": 10, "examples_per_class": 6, "progress": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(scope="module")
def small(cache: Path) -> GlyphSet:
    return load_glyphs(seed=0, cache_dir=str(cache), **SMALL)


def test_shapes_dtypes_and_labels(small: GlyphSet) -> None:
    n = small.num_classes * 6
    assert small.images.shape == (n, 28, 28) and small.images.dtype == torch.uint8
    assert small.alphabets == ("GOTHIC", "OGHAM", "OLD ITALIC", "RUNIC")
    assert 40 <= small.num_classes <= 48
    for labels in (small.character, small.alphabet, small.font, small.style, small.bold, small.italic):
        assert labels.shape == (n,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(small.character), torch.full((small.num_classes,), 6))
    assert torch.equal(small.alphabet, small.character_alphabet[small.character])
    assert int(small.style.max()) < len(STYLES) and int(small.font.max()) < len(small.fonts)
    for c, a in zip(small.characters, small.character_alphabet.tolist(), strict=True):
        assert script_of(c) == small.alphabets[a]
    assert len(set(small.characters)) == small.num_classes
    ink = small.images.flatten(1).float().mean(1)
    assert bool((ink > 3).all()), "every image holds a visible glyph"
    x = small.inputs()
    assert x.shape == (n, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_same_seed_same_set_other_seed_differs(small: GlyphSet, tmp_path: Path) -> None:
    again = load_glyphs(seed=0, cache_dir=str(tmp_path), **SMALL)
    assert again.cache_path != small.cache_path.parent  # rendered afresh in another cache root
    assert torch.equal(again.images, small.images) and again.characters == small.characters
    other = load_glyphs(seed=1, cache_dir=str(tmp_path), **SMALL)
    assert other.cache_path != again.cache_path
    assert not torch.equal(other.images, again.images)


def test_cache_hit_does_not_render(small: GlyphSet, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered although the cache holds this set")

    # the package re-exports the family function ``glyphs``, so reach the module through importlib
    monkeypatch.setattr(importlib.import_module("mtml.datasets._glyphs"), "render_alphabets", fail)
    hit = load_glyphs(seed=0, cache_dir=str(cache), **SMALL)
    assert torch.equal(hit.images, small.images) and torch.equal(hit.font, small.font)
    assert (small.cache_path / "glyphs.safetensors").exists()
    meta = json.loads((small.cache_path / "meta.json").read_text())
    assert meta["options"]["version"] >= 1 and len(meta["sha256"]) == 64


def test_options_change_the_cache_key(small: GlyphSet, cache: Path) -> None:
    changed = load_glyphs(seed=0, cache_dir=str(cache), augmentation=GlyphAugment(rotation=0.0),
                          **SMALL)
    assert changed.cache_path != small.cache_path
    assert changed.characters == small.characters and not torch.equal(changed.images, small.images)


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_corrupt_cache_is_detected_and_rebuilt(small: GlyphSet, tmp_path: Path, damage: str) -> None:
    entry = tmp_path / "glyphs" / small.cache_path.name
    shutil.copytree(small.cache_path, entry)  # a good entry, then damaged
    tensors, meta = entry / "glyphs.safetensors", entry / "meta.json"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "flip":
        blob = bytearray(tensors.read_bytes())
        blob[-10] ^= 0xFF
        tensors.write_bytes(bytes(blob))
    else:
        meta.write_text("{not json")
    with pytest.warns(GlyphsCacheWarning, match="corrupt"):
        rebuilt = load_glyphs(seed=0, cache_dir=str(tmp_path), **SMALL)
    assert torch.equal(rebuilt.images, small.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next read is a clean hit
        load_glyphs(seed=0, cache_dir=str(tmp_path), **SMALL)


def test_without_noto_falls_back_to_matplotlib_fonts(tmp_path: Path) -> None:
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    with pytest.warns(GlyphsFontWarning, match="fonts-noto-core"):
        fonts, fallback = discover_fonts(empty)
    assert fallback and any(f.name.startswith("DejaVu") for f in fonts)
    with pytest.warns(GlyphsFontWarning):
        data = load_glyphs(font_dir=str(empty), cache_dir=str(tmp_path / "c"), alphabets=["GREEK", "CYRILLIC"],
                           max_characters=12, min_characters=10, examples_per_class=4, progress=False)
    assert data.fallback and data.alphabets == ("CYRILLIC", "GREEK")
    shipped = {p.stem for p in matplotlib_font_dir().iterdir()}
    assert {data.fonts[f] for f in data.font.tolist()} <= shipped


def test_alphabet_disjoint_splits(small: GlyphSet) -> None:
    splits = glyph_splits(small, ways=5, shots=1, query_shots=2, fractions=(0.5, 0.25, 0.25), seed=0)
    seen: dict[str, set[int]] = {}
    for name, sampler in splits.items():
        seen[name] = set(small.character_alphabet[sampler.classes].tolist())
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    covered = torch.cat([s.classes for s in splits.values()]).sort().values
    assert torch.equal(covered, torch.arange(small.num_classes))


def test_split_groups_keeps_groups_whole() -> None:
    group = torch.tensor([0] * 10 + [1] * 5 + [2] * 3 + [3] * 7 + [4] * 20)
    parts = split_groups(group, fractions=(0.6, 0.2, 0.2), generator=torch.Generator().manual_seed(3))
    owners = [set(group[p].tolist()) for p in parts.values()]
    assert all(owners) and sum(len(o) for o in owners) == 5 and len(set().union(*owners)) == 5
    with pytest.raises(ConfigError, match="at least 3 groups"):
        split_groups(torch.tensor([0, 0, 1]), generator=torch.Generator())


def test_family_episodes(cache: Path, small: GlyphSet) -> None:
    options = {k: v for k, v in SMALL.items() if k != "progress"}
    source = FAMILIES.create("glyphs", ways=5, shots=2, query_shots=3, meta_batch=3, fractions=[0.5, 0.25, 0.25],
                             cache_dir=str(cache), **options)
    assert source.input_shape == (1, 28, 28) and source.num_outputs == 5 and source.kind == "classification"
    ep = source.train.sample(torch.Generator().manual_seed(0))
    assert ep.support.x.shape == (3, 10, 1, 28, 28) and ep.query.x.shape == (3, 15, 1, 28, 28)
    assert ep.support.x.dtype == torch.float32 and float(ep.support.x.max()) <= 1.0
    assert set(ep.query.y.unique().tolist()) == set(range(5))
    again = source.train.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again.support.x, ep.support.x) and torch.equal(again.query.y, ep.query.y)


def test_pixel_baseline_is_perfect_without_distortion_and_worse_with_it(small: GlyphSet, cache: Path) -> None:
    none = GlyphAugment(rotation=0, shear=0, scale=0, aspect=0, translate=0, elastic=0, thin=0, thick=0)
    clean = load_glyphs(seed=0, cache_dir=str(cache), augmentation=none, **SMALL)
    clean_acc, _ = pixel_nn_accuracy(glyph_splits(clean, ways=5, query_shots=3)["train"], tasks=40)
    assert clean_acc == 100.0  # one font per script here: undistorted copies are identical
    acc, ci = pixel_nn_accuracy(glyph_splits(small, ways=5, query_shots=3)["train"], tasks=200)
    assert 20.0 < acc < 90.0 and 0 < ci < 10


def test_script_of() -> None:
    assert script_of("\u1200") == "ETHIOPIC"  # ETHIOPIC SYLLABLE HA
    assert script_of("\u1c90") == "GEORGIAN"  # GEORGIAN MTAVRULI CAPITAL LETTER AN (aliased)
    assert script_of("\u1a20") == "TAI THAM"
    assert script_of("A") == "LATIN" and script_of("\u0391") == "GREEK"
    assert script_of("\uffff") is None


@pytest.mark.parametrize(("name", "style", "bold", "italic"), [
    ("NotoSerifArmenian-Bold", "serif", True, False), ("NotoSansOldItalic-Regular", "sans", False, False),
    ("NotoNaskhArabic-Regular", "other", False, False), ("DejaVuSansMono-BoldOblique", "mono", True, True),
    ("STIXGeneralBolIta", "serif", True, True), ("NotoSans-Italic", "sans", False, True),
])
def test_font_style_labels_from_file_names(name: str, style: str, bold: bool, italic: bool) -> None:
    info = _font_info(Path(f"/fonts/{name}.ttf"))
    assert (info.style, info.bold, info.italic) == (style, bold, italic)


def test_notdef_and_empty_glyphs_are_dropped() -> None:
    fonts, _ = discover_fonts()
    runic = next(i for i, f in enumerate(fonts) if f.name == "NotoSansRunic-Regular")
    renderer = glyphs_render._Renderer(fonts, 56)
    assert renderer.valid("\u16a0", runic) is not None  # RUNIC LETTER FEHU
    assert renderer.valid("\u0e01", runic) is None  # a Thai letter the font lacks renders as .notdef
    assert renderer.valid(" ", runic) is None


@pytest.mark.parametrize(("options", "message"), [
    ({"ways": 30}, "exceeds the .* characters of the"),
    ({"shots": 4, "query_shots": 5}, "exceeds examples_per_class = 6"),
    ({"alphabets": ["RUNNIC"]}, "Did you mean 'RUNIC'"),
    ({"alphabets": "RUNIC"}, r"must be a list .*not one string: write \[RUNIC\]"),
    ({"max_characters": 5}, "max_characters"),
    ({"alphabets": ["OGHAM"], "min_characters": 30, "max_characters": 30}, "min_characters = 30"),
])
def test_bad_options_name_the_fix(cache: Path, options: dict[str, Any], message: str) -> None:
    base = {k: v for k, v in SMALL.items() if k != "progress"} | {"fractions": [0.5, 0.25, 0.25], "query_shots": 2}
    with pytest.raises(ConfigError, match=message):
        FAMILIES.create("glyphs", cache_dir=str(cache), **(base | options))


def test_bad_augmentation() -> None:
    with pytest.raises(ConfigError, match="`rotation` must be a finite number >= 0"):
        GlyphAugment(rotation=-1)
    with pytest.raises(ConfigError, match="sum to <= 1"):
        GlyphAugment(thin=0.7, thick=0.6)
