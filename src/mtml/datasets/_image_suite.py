"""``images``: a multi-task image suite — several things learned at once from three image sources.

- **glyphs** (:func:`~mtml.datasets._glyphs.load_glyphs`, rendered once and cached): three heads on the same
  28×28 letter images, labels from the renderer — ``script`` (which alphabet), ``character`` (which letter)
  and ``font_style`` (the font's design × weight: sans regular, sans bold, serif regular, serif bold). Only
  sans and serif fonts are kept (mono and calligraphic "other" fonts are dropped), so every script comes in
  all four styles.
- **Fashion-MNIST** (:func:`~mtml.datasets._fashion.fashion`): ``category`` (10 classes) and ``group`` (tops,
  bottoms, footwear, bags) on the same 28×28 images, a seeded subset.
- **faces** (:func:`~mtml.datasets._faces.lfw_faces`): face vs non-face, 25×25 crops. With a conv backbone the
  model builder gives this task an image stem (1×1 conv, zero padding to 28×28) into the shared trunk.

Every input is ``[1, H, W]`` in [0, 1] with a dark background (glyph ink and clothes are bright).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml._checks import check_int
from mtml.datasets._faces import lfw_faces
from mtml.datasets._fashion import fashion
from mtml.datasets._glyphs import STYLES, load_glyphs
from mtml.datasets._images import check_flatten
from mtml.datasets._util import split_indices
from mtml.errors import ConfigError, DataError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["DEFAULT_ALPHABETS", "FONT_STYLES", "images"]

DEFAULT_ALPHABETS = ("ARMENIAN", "CYRILLIC", "GEORGIAN", "GREEK", "LATIN")
"""Scripts that the Noto fonts cover in sans and serif, regular and bold (measured: each style ~25% of images)."""
FONT_STYLES = ("sans regular", "sans bold", "serif regular", "serif bold")


def _stratified(labels: Tensor, fractions: tuple[float, float, float], gen: torch.Generator) -> list[Tensor]:
    """Train/val/test indices with every label's examples split in ``fractions`` (so each split holds each
    label whenever it has >= 3 examples)."""
    parts: list[list[Tensor]] = [[], [], []]
    for label in torch.unique(labels):
        rows = torch.nonzero(labels == label).flatten()
        for part, idx in zip(parts, split_indices(len(rows), fractions, gen), strict=True):
            part.append(rows[idx])
    return [torch.cat(p) for p in parts]


def check_seen_labels(task: Task) -> Task:
    """``task`` unchanged, or a :class:`DataError` if a val/test class label never occurs in its train split
    (the head could not have learned it: a metric on it would only measure the split)."""
    if task.kind != TaskKind.MULTICLASS:
        return task
    seen = set(task.train.y.tolist())
    for name in ("val", "test"):
        unseen = sorted(set(task.split(name).y.tolist()) - seen)
        if unseen:
            raise DataError(f"task '{task.name}': {name} labels {unseen[:10]} never occur in its train split; "
                            "every class needs training examples. Give more examples per class or drop the class.")
    return task


def glyph_tasks(*, alphabets: Sequence[str], characters: int, examples: int, fractions: tuple[float, float, float],
                gen: torch.Generator, render_seed: int = 0, cache_dir: str | None = None, flatten: bool = False,
                ) -> list[Task]:
    """``script``, ``character`` and ``font_style`` on the same glyph images ``[n, 1, 28, 28]`` (``[n, 784]``
    with ``flatten``): one ``x`` tensor per split shared by the three tasks, task group ``glyphs``.

    The set is rendered with ``render_seed`` (not the split seed), so every seed reuses one cache entry.
    """
    g = load_glyphs(seed=render_seed, examples_per_class=examples, max_characters=characters,
                    min_characters=min(characters, 14), alphabets=list(alphabets), cache_dir=cache_dir,
                    progress=False)
    keep = (g.style == STYLES.index("sans")) | (g.style == STYLES.index("serif"))
    if not bool(keep.any()):
        raise DataError(f"glyphs: none of the fonts covering {', '.join(g.alphabets)} is a sans or serif font; "
                        "install Debian's fonts-noto-core or choose other `alphabets`.")
    x = g.inputs()[keep]
    x = x.flatten(1) if flatten else x
    chars = torch.unique(g.character[keep], return_inverse=True)[1]  # characters renumbered 0..C-1
    labels = {"script": (g.alphabet[keep], len(g.alphabets)), "character": (chars, int(chars.max()) + 1),
              "font_style": (2 * (g.style[keep] == STYLES.index("serif")).long() + g.bold[keep], len(FONT_STYLES))}
    tr, va, te = _stratified(chars, fractions, gen)
    x_tr, x_va, x_te = x[tr], x[va], x[te]  # sliced once: the three tasks share these tensors (one trunk pass)
    return [check_seen_labels(Task(name, TaskKind.MULTICLASS, Split(x_tr, y[tr]), Split(x_va, y[va]),
                                   Split(x_te, y[te]), num_outputs=classes, group="glyphs"))
            for name, (y, classes) in labels.items()]


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
        raise ConfigError(f"`{name}` must be a number in (0, 0.5). Got {value!r}.")
    return float(value)


def images(
    *, seed: int = 0, alphabets: Sequence[str] = DEFAULT_ALPHABETS, characters_per_alphabet: int = 20,
    examples_per_character: int = 40, fashion_train: int = 4000, fashion_val: int = 1000, fashion_test: int = 2000,
    faces: bool = True, val_fraction: float = 0.2, test_fraction: float = 0.2, render_seed: int = 0,
    fashion_root: str | None = None, cache_dir: str | None = None, flatten: bool = False,
) -> list[Task]:
    """The image suite's tasks: ``script``, ``character``, ``font_style`` (glyphs), ``category``, ``group``
    (Fashion-MNIST) and ``faces``, in that order (the first task's shape, ``[1, 28, 28]``, is the trunk's).

    Args:
        seed: draws every split (glyphs stratified by character; faces by class; Fashion-MNIST subsets).
        alphabets: glyph scripts (Unicode script names); characters_per_alphabet: at most this many letters of
            each (a seeded subset, fixed by ``render_seed``); examples_per_character: rendered images per letter.
        fashion_train, fashion_val: images drawn from the official training set; fashion_test: from the test set.
        faces: include the 25×25 ``faces`` task (needs scikit-image).
        val_fraction, test_fraction: glyph and face splits.
        flatten: flat inputs (``[784]``, faces ``[625]``) for MLP models, whose stems then map the two widths;
            the default keeps images ``[1, H, W]`` for a conv backbone.
    """
    characters = check_int("characters_per_alphabet", characters_per_alphabet, 2, "A script needs 2+ letters.")
    examples = check_int("examples_per_character", examples_per_character, 5,
                         "Each letter needs examples in train, val and test.")
    fractions = (1 - _fraction("val_fraction", val_fraction) - _fraction("test_fraction", test_fraction),
                 val_fraction, test_fraction)
    gen = torch.Generator().manual_seed(seed)
    tasks = glyph_tasks(alphabets=alphabets, characters=characters, examples=examples, fractions=fractions, gen=gen,
                        render_seed=render_seed, cache_dir=cache_dir, flatten=check_flatten(flatten))
    tasks += fashion(root=fashion_root, train_size=fashion_train, val_size=fashion_val, test_size=fashion_test,
                     seed=seed, flatten=flatten)
    if faces:
        tasks.append(lfw_faces(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, flatten=flatten))
    return tasks
