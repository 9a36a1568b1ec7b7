"""Few-shot task families over image folders kept on disk: any class-per-folder tree, Omniglot, mini-ImageNet.

Every reader decodes its images once, at build, into ``uint8 [n, C, H, W]`` and gives models floats in
``[0, 1]``: ``[C, H, W]``, or ``[C·H·W]`` with ``flatten=True`` (for MLP meta-learners). Layouts, options and
errors are in ``docs/images.md``.

- :func:`image_folder` — ``root/<class>/*.png`` (classes split by fractions) or ``root/{train,val,test}/<class>/``.
- :func:`omniglot` — Lake et al. (Science 2015): ``images_background/`` (meta-train, minus ``val_alphabets``
  alphabets held out for meta-validation) and ``images_evaluation/`` (meta-test), ``<alphabet>/<character>/*.png``;
  optional rotations by 90°, 180°, 270° as new classes (Santoro et al. 2016; Vinyals et al. 2016).
- :func:`miniimagenet` — Vinyals et al. (2016) with the split of Ravi & Larochelle (ICLR 2017):
  ``train.csv``/``val.csv``/``test.csv`` (``filename,label``) and ``images/``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mtml.datasets._families import EpisodeSource
from mtml.datasets._images import (
    IMAGE_SUFFIXES,
    Progress,
    check_classes,
    check_reader_options,
    decode_images,
    image_source,
    list_images,
)
from mtml.errors import ConfigError, DataError
from mtml.sampling import split_classes

__all__ = ["image_folder", "miniimagenet", "omniglot"]

SPLITS = ("train", "val", "test")
_ALIASES = {"val": ("valid", "validation", "dev"), "test": ("testing", "eval", "evaluation"), "train": ("training",)}
ClassList = list[tuple[str, Path, list[Path]]]  # (class name, its folder, its image files)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"{what} '{path}' {state}; {fix}")
    return path


def scan_classes(root: Path, *, depth: int = 1, what: str = "image folder") -> ClassList:
    """Classes of a class-per-folder tree: ``root/<class>/*`` (``depth=1``) or ``root/<group>/<class>/*``
    (``depth=2``, class named ``group/class``), sorted by name. Raises :class:`DataError` naming the folder
    when a level holds no folders or a class folder holds no images."""
    levels = [(root, "")]
    for level in range(depth):
        nxt = []
        for folder, prefix in levels:
            subs = _subdirs(folder)
            if not subs:
                kind = "class" if level == depth - 1 else "group"
                direct = " It holds images directly: put each class's images in its own sub-folder " \
                         f"'{folder}/<class>/'." if list_images(folder) else ""
                raise DataError(f"{what} '{folder}' holds no {kind} folders.{direct} Expected layout: "
                                f"'{root}/{'<group>/' * (depth - 1)}<class>/<image files>'.")
            nxt += [(s, f"{prefix}/{s.name}" if prefix else s.name) for s in subs]
        levels = nxt
    classes = []
    for folder, name in levels:
        files = list_images(folder)
        if not files:
            deeper = " It holds sub-folders: is `root` one level too high?" if _subdirs(folder) else ""
            raise DataError(f"class folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)});{deeper} add "
                            "images or remove the folder.")
        classes.append((name, folder, files))
    return classes


@dataclass
class _Index:
    """Every image file of every split, before decoding: ``labels[i]`` is the class id of ``paths[i]``,
    ``groups`` maps split → class ids, ``where`` class id → folder (for error messages)."""

    paths: list[Path]
    labels: torch.Tensor
    groups: dict[str, torch.Tensor]
    where: dict[int, str]
    rotations: int = 1  # > 1: class c of the files becomes classes c·r … c·r + r − 1 (turned by k·90°)


def _index(splits: dict[str, ClassList]) -> _Index:
    paths: list[Path] = []
    labels: list[int] = []
    groups: dict[str, torch.Tensor] = {}
    where: dict[int, str] = {}
    for split, classes in splits.items():
        ids = []
        for _, folder, files in classes:
            cid = len(where)
            where[cid] = str(folder)
            ids.append(cid)
            paths += files
            labels += [cid] * len(files)
        groups[split] = torch.tensor(ids, dtype=torch.long)
    return _Index(paths, torch.tensor(labels, dtype=torch.long), groups, where)


def _rotated(index: _Index) -> _Index:
    """Every class four times: rotated by 0°, 90°, 180°, 270° (class ``4c + k`` is class ``c`` turned ``k·90°``);
    ``labels`` follow the decoded layout ``[n, 4]`` flattened."""
    quarter = torch.arange(4)
    return _Index(index.paths, (index.labels.unsqueeze(1) * 4 + quarter).reshape(-1),
                  {s: (ids.unsqueeze(1) * 4 + quarter).reshape(-1) for s, ids in index.groups.items()},
                  {4 * c + k: f"{w} (rotated {90 * k}°)" for c, w in index.where.items() for k in range(4)}, 4)


def _build(index: _Index, *, dataset: str, image_size: int, channels: int, ways: int, shots: int, query_shots: int,
           meta_batch: int, flatten: bool, progress: Progress | None) -> EpisodeSource:
    """Check class sizes (before any decoding), decode ``uint8 [n, C, H, W]`` and build the three samplers."""
    check_classes(index.labels, index.groups, index.where, ways=ways, shots=shots, query_shots=query_shots)
    images = decode_images(index.paths, size=image_size, channels=channels, dataset=dataset, progress=progress)
    if index.rotations > 1:
        turned = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(index.rotations)], 1)
        images = turned.reshape(-1, *images.shape[1:])  # [n·4, C, H, W]
    return EpisodeSource(**image_source(images, index.labels, index.groups, ways=ways, shots=shots,
                                        query_shots=query_shots, meta_batch=meta_batch, flatten=flatten))


def _split_folders(root: Path) -> dict[str, Path] | None:
    """``{split: folder}`` when ``root`` holds ``train/``, ``val/``, ``test/``; ``None`` when it holds none of them."""
    names = {p.name for p in _subdirs(root)}
    found = {s: root / s for s in SPLITS if s in names}
    if not found:
        return None
    for split in SPLITS:
        if split not in found:
            alias = next((a for a in _ALIASES[split] if a in names), None)
            fix = f"rename '{root / alias}' to '{root / split}'" if alias else f"add '{root / split}/<class>/'"
            raise DataError(f"image folder '{root}' has split folders {sorted(found)} but no '{split}/'; {fix} "
                            "(split folders must be named train/, val/ and test/).")
    return found


def image_folder(
    *, root: str, image_size: int = 84, channels: int = 3, fractions: Sequence[float] = (0.64, 0.16, 0.20),
    ways: int = 5, shots: int = 1, query_shots: int = 15, meta_batch: int = 4, seed: int = 0,
    flatten: bool = False, progress: Progress | None = None,
) -> EpisodeSource:
    """N-way K-shot episodes over a class-per-folder image tree of your own.

    ``root/<class>/*.png``: classes are shuffled by ``seed`` into disjoint meta-train/val/test groups by
    ``fractions``. ``root/train/<class>/``, ``root/val/<class>/``, ``root/test/<class>/``: the folders are the
    splits (``fractions`` is ignored). Images are resized to ``image_size × image_size``, grayscale
    (``channels=1``) or RGB (``channels=3``); inputs ``[channels, image_size, image_size]`` in [0, 1].
    """
    check_reader_options(image_size=image_size, channels=channels, flatten=flatten, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch)
    base = _check_dir(Path(root).expanduser(), "image folder", "set `root` to the folder holding one sub-folder "
                      "per class (or train/, val/ and test/ folders of classes).")
    folders = _split_folders(base)
    if folders is None:
        classes = scan_classes(base)
        if len(classes) < 3:
            raise DataError(f"image folder '{base}' holds {len(classes)} class folders; class-disjoint "
                            "meta-train/val/test splits need at least 3 (and at least `ways` per split).")
        index = _index({"all": classes})
        index.groups = split_classes(index.labels, fractions=fractions,
                                     generator=torch.Generator().manual_seed(seed))
    else:
        index = _index({s: scan_classes(f) for s, f in folders.items()})
    return _build(index, dataset="image_folder", image_size=image_size, channels=channels, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch, flatten=flatten, progress=progress)


def _omniglot_dir(root: Path, name: str) -> Path:
    path = root / name
    if path.is_dir():
        return path
    zipped = root / f"{name}.zip"
    near = sorted(p.name for p in _subdirs(root) if p.name.startswith(name)) if root.is_dir() else []
    fix = (f"unzip '{zipped}' there" if zipped.exists() else f"rename '{root / near[0]}' to '{path}'" if near
           else "set `root` to the folder holding images_background/ and images_evaluation/ (from the Omniglot "
           "repository, github.com/brendenlake/omniglot, python/*.zip, unzipped)")
    raise DataError(f"omniglot: folder '{path}' does not exist; {fix}.")


def omniglot(
    *, root: str, image_size: int = 28, rotations: bool = False, val_alphabets: int = 5, ways: int = 5,
    shots: int = 1, query_shots: int = 15, meta_batch: int = 4, seed: int = 0, flatten: bool = False,
    progress: Progress | None = None,
) -> EpisodeSource:
    """Omniglot characters (1623 classes of 20 drawings): grayscale ``[1, image_size, image_size]`` in [0, 1].

    Meta-train: the characters of ``images_background`` alphabets except ``val_alphabets`` of them (drawn by
    ``seed``), which are meta-validation; meta-test: ``images_evaluation``. With ``rotations`` every character
    also appears rotated by 90°, 180° and 270°, each a class of its own, in every split (×4 classes).
    """
    check_reader_options(image_size=image_size, channels=1, flatten=flatten, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch)
    base = _check_dir(Path(root).expanduser(), "omniglot root", "set `root` to the folder holding "
                      "images_background/ and images_evaluation/.")
    background = scan_classes(_omniglot_dir(base, "images_background"), depth=2, what="omniglot folder")
    evaluation = scan_classes(_omniglot_dir(base, "images_evaluation"), depth=2, what="omniglot folder")
    alphabets = sorted({name.split("/")[0] for name, _, _ in background})
    if isinstance(val_alphabets, bool) or not isinstance(val_alphabets, int) or \
            not 1 <= val_alphabets < len(alphabets):
        raise ConfigError(f"`val_alphabets` must be an integer in [1, {len(alphabets) - 1}] (images_background "
                          f"holds {len(alphabets)} alphabets). Got {val_alphabets!r}.")
    order = torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(seed))
    held = {alphabets[int(i)] for i in order[:val_alphabets]}
    splits = {"train": [c for c in background if c[0].split("/")[0] not in held],
              "val": [c for c in background if c[0].split("/")[0] in held], "test": evaluation}
    index = _rotated(_index(splits)) if rotations else _index(splits)
    return _build(index, dataset="omniglot", image_size=image_size, channels=1, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch, flatten=flatten, progress=progress)


def _read_split_csv(path: Path, images: Path) -> list[tuple[str, Path]]:
    """``(label, image path)`` rows of a mini-ImageNet split file with header ``filename,label``."""
    if not path.is_file():
        raise DataError(f"miniimagenet: split file '{path}' does not exist; put train.csv, val.csv and test.csv "
                        "(columns filename,label; the Ravi & Larochelle split) next to the images/ folder.")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        head = ",".join(rows[0]) if rows else "(empty file)"
        raise DataError(f"miniimagenet: '{path}' must start with the header 'filename,label'; found '{head}'. "
                        "Fix the first line of the file.")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"miniimagenet: '{path}' line {line} is {','.join(row)!r}; every row must be "
                            "'<filename>,<label>'. Fix or delete the line.")
        file = images / row[0].strip()
        if not file.is_file():
            raise DataError(f"miniimagenet: '{path}' line {line} names '{row[0].strip()}', but '{file}' does not "
                            "exist; put the image in images/ or delete the line.")
        out.append((row[1].strip(), file))
    if not out:
        raise DataError(f"miniimagenet: '{path}' lists no images; give it one 'filename,label' row per image.")
    return out


def miniimagenet(
    *, root: str, image_size: int = 84, ways: int = 5, shots: int = 1, query_shots: int = 15, meta_batch: int = 4,
    seed: int = 0, flatten: bool = False, progress: Progress | None = None,
) -> EpisodeSource:
    """mini-ImageNet (100 classes × 600 images; 64/16/20 classes for meta-train/val/test from the split files):
    RGB ``[3, image_size, image_size]`` in [0, 1]. ``seed`` is accepted for uniformity; the splits are fixed."""
    check_reader_options(image_size=image_size, channels=3, flatten=flatten, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch)
    base = _check_dir(Path(root).expanduser(), "miniimagenet root", "set `root` to the folder holding "
                      "train.csv, val.csv, test.csv and images/.")
    images_dir = _check_dir(base / "images", "miniimagenet: image folder", "put the image files in "
                            f"'{base / 'images'}/' (the filename column of the split files is relative to it).")
    splits: dict[str, ClassList] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        rows = _read_split_csv(base / f"{split}.csv", images_dir)
        by_label: dict[str, list[Path]] = {}
        for label, file in rows:
            if owner.setdefault(label, split) != split:
                raise DataError(f"miniimagenet: class '{label}' is listed in both {owner[label]}.csv and "
                                f"{split}.csv; meta-splits must hold disjoint classes. Remove it from one file.")
            by_label.setdefault(label, []).append(file)
        splits[split] = [(label, Path(f"{label} (in {split}.csv)"), files) for label, files in by_label.items()]
    return _build(_index(splits), dataset="miniimagenet", image_size=image_size, channels=3, ways=ways, shots=shots,
                  query_shots=query_shots, meta_batch=meta_batch, flatten=flatten, progress=progress)
