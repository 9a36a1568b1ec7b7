"""Offline domain shifts for unsupervised domain adaptation, built from Fashion-MNIST on disk.

:func:`fashion_shift` gives one domain of a shift per call, so a source run and a target config each name theirs:

- ``domain: source`` — clean Fashion-MNIST images with their labels (train / val / test), to train the source run;
- ``domain: target`` — other images of the same 10 categories, transformed by ``shift``. Its ``train`` rows are the
  *unlabelled* target rows of ``mtml adapt`` (the adaptation methods never read their labels; only the
  target-supervised upper bound does) and its ``test`` rows the labelled target test set.

Source and target draw disjoint images from the official training set (source from the start of one seeded
permutation, target from its end); both test splits are the same official test images, clean or shifted.

Shifts (``SHIFTS``), applied to pixels in [0, 1]: ``invert`` (``1 − x``), ``rotate`` (90° anticlockwise),
``blur`` (a Gaussian blur of standard deviation ``severity`` pixels), ``noise`` (additive Gaussian noise of standard
deviation ``severity``, clipped to [0, 1], drawn once from ``seed``), ``none`` (the identity: a sanity check).

:func:`glyph_shift` is a font-style shift on the rendered glyphs of :func:`~mtml.datasets.load_glyphs`: the same
characters, source images in one font style (``sans``) and target images in another (``serif``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.datasets._fashion import CLASSES, SIZES, _check_size, load_fashion_mnist
from mtml.datasets._glyphs import STYLES, load_glyphs
from mtml.datasets._images import check_flatten
from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["SHIFTS", "apply_shift", "fashion_shift", "glyph_shift"]

SHIFTS = ("none", "invert", "rotate", "blur", "noise")
_DEFAULT_SEVERITY = {"blur": 1.5, "noise": 0.5}


def _check_shift(shift: object, severity: float | None) -> float:
    if shift not in SHIFTS:
        raise ConfigError(f"`shift` must be one of {', '.join(SHIFTS)}. Got {shift!r}.")
    if severity is None:
        return _DEFAULT_SEVERITY.get(str(shift), 0.0)
    if shift not in _DEFAULT_SEVERITY:
        raise ConfigError(f"`severity` applies to the blur and noise shifts only; shift {shift!r} has none: drop it.")
    if isinstance(severity, bool) or not isinstance(severity, int | float) or not 0 < severity < float("inf"):
        raise ConfigError(f"`severity` must be a finite number > 0. Got {severity!r}. Use e.g. 1.5 (blur σ in "
                          "pixels) or 0.5 (noise σ in intensity).")
    return float(severity)


def apply_shift(x: Tensor, shift: str, *, severity: float | None = None, seed: int = 0) -> Tensor:
    """Images ``x: float [n, 1, H, W]`` in [0, 1] under ``shift`` (see the module docstring), as a new tensor."""
    sev = _check_shift(shift, severity)
    if shift == "none":
        return x.clone()
    if shift == "invert":
        return 1.0 - x
    if shift == "rotate":
        return torch.rot90(x, 1, dims=(-2, -1)).contiguous()
    if shift == "blur":
        radius = max(1, math.ceil(3 * sev))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sev) ** 2)
        k = k / k.sum()
        out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (x + sev * noise).clamp_(0.0, 1.0)


def fashion_shift(
    *, domain: str = "source", shift: str = "invert", severity: float | None = None, root: str | None = None,
    train_size: int = 5_000, val_size: int = 1_000, test_size: int | None = 2_000, seed: int = 0,
    flatten: bool = True,
) -> list[Task]:
    """One domain of a Fashion-MNIST shift: a single multiclass task ``category`` (the 10 ``CLASSES``).

    Args:
        domain: ``"source"`` (clean images) or ``"target"`` (images under ``shift``; its train rows are the
            unlabelled rows of domain adaptation, its test rows the labelled target test set).
        shift: one of ``SHIFTS``; ignored for the source domain except for being checked.
        severity: blur σ in pixels (default 1.5) or noise σ (default 0.5); only for those shifts.
        train_size, val_size: images drawn for this domain from the official training set (disjoint from the
            other domain's with the same ``seed``).
        test_size: a random subset of the official test images (the same for both domains), or ``None`` for all.
        flatten: inputs ``[784]`` (MLP trunks, the default) or ``[1, 28, 28]``.
    """
    if domain not in ("source", "target"):
        raise ConfigError(f"`domain` must be 'source' or 'target'. Got {domain!r}.")
    sev = _check_shift(shift, severity)
    train_size = _check_size("train_size", train_size, SIZES["train"] // 2)
    val_size = _check_size("val_size", val_size, SIZES["train"] // 2)
    if train_size + val_size > SIZES["train"] // 2:
        raise ConfigError(f"`train_size` + `val_size` must be <= {SIZES['train'] // 2} (half the training images, "
                          f"so source and target rows stay disjoint). Got {train_size} + {val_size}.")
    if test_size is not None:
        test_size = _check_size("test_size", test_size, SIZES["test"], " or null (all of them)")
    flat = check_flatten(flatten)
    data = load_fashion_mnist(root)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(SIZES["train"], generator=gen)
    test_idx = torch.randperm(SIZES["test"], generator=gen)[:test_size] if test_size else torch.arange(SIZES["test"])
    rows = perm[: train_size + val_size] if domain == "source" else perm.flip(0)[: train_size + val_size]
    picks = {"train": ("train", rows[:train_size]), "val": ("train", rows[train_size:]), "test": ("test", test_idx)}
    splits = {}
    for i, (split, (part, idx)) in enumerate(picks.items()):
        images, labels = data[part]
        x = images[idx].unsqueeze(1).to(torch.float32).div_(255.0)
        if domain == "target":
            x = apply_shift(x, shift, severity=sev if shift in _DEFAULT_SEVERITY else None, seed=seed * 31 + i)
        splits[split] = Split(x.flatten(1) if flat else x, labels[idx])
    return [Task("category", TaskKind.MULTICLASS, splits["train"], splits["val"], splits["test"],
                 num_outputs=len(CLASSES))]


def glyph_shift(
    *, domain: str = "source", source_style: str = "sans", target_style: str = "serif",
    alphabets: Sequence[str] = ("LATIN", "GREEK", "CYRILLIC"), max_characters: int = 26, examples_per_class: int = 40,
    test_fraction: float = 0.25, val_fraction: float = 0.1, seed: int = 0, flatten: bool = True,
) -> list[Task]:
    """One domain of a font-style shift: a multiclass task ``character`` over the characters of ``alphabets``.

    The glyphs are rendered by :func:`~mtml.datasets.load_glyphs` (each image in a random font, pose and warp);
    the ``source`` domain keeps the images whose font has ``source_style``, the ``target`` domain those with
    ``target_style`` (``STYLES``). Each domain's images are split at random (``seed``) into test
    (``test_fraction``), val (``val_fraction``) and train (the rest). Inputs ``[784]`` or ``[1, 28, 28]``.
    """
    if domain not in ("source", "target"):
        raise ConfigError(f"`domain` must be 'source' or 'target'. Got {domain!r}.")
    for name, style in (("source_style", source_style), ("target_style", target_style)):
        if style not in STYLES:
            raise ConfigError(f"`{name}` must be one of {', '.join(STYLES)}. Got {style!r}.")
    if source_style == target_style:
        raise ConfigError(f"`source_style` and `target_style` are both {source_style!r}; a shift needs two styles.")
    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 0.5:
            raise ConfigError(f"`{name}` must be a fraction in (0, 0.5). Got {frac!r}.")
    flat = check_flatten(flatten)
    glyphs = load_glyphs(seed=seed, examples_per_class=examples_per_class, max_characters=max_characters,
                         alphabets=list(alphabets), progress=False)
    style_id = STYLES.index(source_style if domain == "source" else target_style)
    rows = torch.nonzero(glyphs.style == style_id).reshape(-1)
    if len(rows) < 10:
        raise ConfigError(f"only {len(rows)} glyph images have style {STYLES[style_id]!r} (the fonts installed give "
                          "few of that style); choose another style or install fonts-noto-core.")
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    n_test, n_val = max(1, int(test_fraction * len(rows))), max(1, int(val_fraction * len(rows)))
    parts = {"test": rows[:n_test], "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}
    splits = {}
    for split, idx in parts.items():
        x = glyphs.images[idx].unsqueeze(1).to(torch.float32).div_(255.0)
        splits[split] = Split(x.flatten(1) if flat else x, glyphs.character[idx])
    return [Task("character", TaskKind.MULTICLASS, splits["train"], splits["val"], splits["test"],
                 num_outputs=len(glyphs.characters))]
