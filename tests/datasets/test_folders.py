"""Image-folder task families on small trees written here: layouts, pixels, splits, rotations and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtml.config import Config
from mtml.datasets import FAMILIES, image_folder, miniimagenet, omniglot
from mtml.errors import ConfigError, DataError
from mtml.workflows import train

GEN = torch.Generator().manual_seed(0)


def _image(path: Path, value: int, size: tuple[int, int] = (10, 12), mode: str = "RGB") -> None:
    """A flat image of grey level ``value`` (``size`` = width, height), saved as PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, value, value)
    Image.new(mode, size, fill).save(path)


def _classes(root: Path, n: int, per_class: int = 4, suffix: str = ".png") -> None:
    """``root/c<k>/<i>.png`` holding grey level 20·k (one level per class)."""
    for k in range(n):
        for i in range(per_class):
            _image(root / f"c{k}" / f"{i}{suffix}", 20 * k)


def _level_of(x: torch.Tensor) -> torch.Tensor:
    """Grey level (0..255) of each flat image ``[..., C, H, W]`` → ``[...]``."""
    return (x.flatten(-3).mean(-1) * 255).round()


def _check_episode_labels(source, split: str = "train") -> None:  # type: ignore[no-untyped-def]
    """Every support and query image with episode label k shows the same class (grey level)."""
    ep = getattr(source, split).sample(GEN)
    for t in range(ep.num_tasks):
        sup, qry = _level_of(ep.support.x[t]), _level_of(ep.query.x[t])
        for k in range(ep.ways):
            levels = torch.cat([sup[ep.support.y[t] == k], qry[ep.query.y[t] == k]]).unique()
            assert len(levels) == 1
        assert len(sup.unique()) == ep.ways


def test_class_per_folder_gives_disjoint_class_splits_and_float_pixels(tmp_path: Path) -> None:
    _classes(tmp_path, 10)
    seen = []
    src = image_folder(root=str(tmp_path), image_size=8, channels=3, ways=2, shots=1, query_shots=2, meta_batch=3)
    assert src.input_shape == (3, 8, 8) and src.num_outputs == 2 and src.kind == "classification"
    for split in ("train", "val", "test"):
        sampler = getattr(src, split)
        seen.append(set(sampler.classes.tolist()))
        assert sampler.x.dtype == torch.uint8 and sampler.x.shape == (40, 3, 8, 8)  # decoded once, kept compact
        _check_episode_labels(src, split)
    assert [len(s) for s in seen] == [6, 2, 2] and set().union(*seen) == set(range(10))
    ep = src.train.sample(GEN)
    assert ep.support.x.shape == (3, 2, 3, 8, 8) and ep.query.x.shape == (3, 4, 3, 8, 8)
    assert ep.support.x.dtype == torch.float32 and 0 <= float(ep.support.x.min()) <= float(ep.support.x.max()) <= 1
    other = image_folder(root=str(tmp_path), image_size=8, ways=2, shots=1, query_shots=2, seed=1)
    assert [set(getattr(other, s).classes.tolist()) for s in ("train", "val", "test")] != seen


def test_grayscale_resize_flatten_and_jpeg(tmp_path: Path) -> None:
    _classes(tmp_path, 8, suffix=".jpg")
    _image(tmp_path / "c0" / "wide.JPEG", 0, size=(30, 7))  # any size, upper-case suffix
    calls: list[tuple[int, int]] = []
    src = image_folder(root=str(tmp_path), image_size=5, channels=1, fractions=(0.5, 0.25, 0.25), ways=2,
                       shots=1, query_shots=1, flatten=True, progress=lambda done, total: calls.append((done, total)))
    assert src.input_shape == (25,) and calls[-1] == (33, 33)
    ep = src.train.sample(GEN)
    assert ep.support.x.shape == (4, 2, 25)
    levels = sorted(int(v) for v in (src.train.x.float().mean((1, 2, 3))).round().unique())
    assert len(levels) == 8 and all(abs(v - 20 * round(v / 20)) <= 2 for v in levels)  # JPEG is lossy


def test_split_folders_are_the_meta_splits(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _classes(tmp_path / split, n)
    src = image_folder(root=str(tmp_path), image_size=4, ways=2, shots=2, query_shots=2)
    assert [len(getattr(src, s).classes) for s in ("train", "val", "test")] == [4, 2, 3]
    assert len(src.test.x) == 4 * (4 + 2 + 3)
    _check_episode_labels(src, "test")


@pytest.mark.parametrize(("make", "match"), [
    (lambda r: None, r"image folder '.*missing' does not exist; set `root`"),
    (lambda r: _image(r / "a.png", 3), r"holds images directly: put each class's images in its own sub-folder"),
    (lambda r: (r / "c0").mkdir(parents=True), r"class folder '.*c0' holds no images \(\.png"),
    (lambda r: _image(r / "c0" / "x" / "1.png", 3), r"holds sub-folders: is `root` one level too high\?"),
    (lambda r: (_classes(r / "train", 3), _classes(r / "validation", 3), _classes(r / "test", 3)),
     r"no 'val/'; rename '.*validation' to '.*val'"),
    (lambda r: (_classes(r / "train", 3), _classes(r / "test", 3)), r"no 'val/'; add '.*val/<class>/'"),
    (lambda r: _classes(r, 2), r"holds 2 class folders; class-disjoint .* need at least 3"),
])
def test_layout_errors_name_the_path_and_fix(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "missing"
    make(root)
    with pytest.raises(DataError, match=match):
        image_folder(root=str(root), image_size=4, ways=2, shots=1, query_shots=1)


def test_unreadable_and_truncated_images_are_named(tmp_path: Path) -> None:
    _classes(tmp_path, 10)
    (tmp_path / "c1" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"image file '.*c1/bad\.png' cannot be read as an image.*replace or delete"):
        image_folder(root=str(tmp_path), image_size=4, ways=2, shots=1, query_shots=1)
    (tmp_path / "c1" / "bad.png").unlink()
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "c2" / "cut.png")
    data = (tmp_path / "c2" / "cut.png").read_bytes()
    (tmp_path / "c2" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"image file '.*c2/cut\.png' cannot be read"):
        image_folder(root=str(tmp_path), image_size=4, ways=2, shots=1, query_shots=1)


def test_small_classes_and_bad_options_are_rejected(tmp_path: Path) -> None:
    _classes(tmp_path, 6, per_class=3)
    (tmp_path / "c4" / "0.png").unlink()
    with pytest.raises(DataError, match=r"class '.*c4' \(\w+ split\) holds 2 images, fewer than shots \+ "
                                        r"query_shots = 1 \+ 2 = 3.*lower shots or query_shots, add images"):
        image_folder(root=str(tmp_path), image_size=4, ways=2, shots=1, query_shots=2)
    with pytest.raises(ConfigError, match=r"`channels` must be 1 \(grayscale\) or 3 \(RGB\)\. Got 2"):
        image_folder(root=str(tmp_path), image_size=4, channels=2)
    with pytest.raises(ConfigError, match="`flatten` must be true"):
        image_folder(root=str(tmp_path), image_size=4, ways=2, shots=1, query_shots=1, flatten="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="image_size"):
        image_folder(root=str(tmp_path), image_size=0)
    with pytest.raises(ConfigError, match=r"the val split holds 1 classes\. Got ways=3"):
        image_folder(root=str(tmp_path), image_size=4, ways=3, shots=1, query_shots=1)
    with pytest.raises(ConfigError, match=r"^data\.options: missing required option 'root'"):
        FAMILIES.create("image_folder", where="data.options")


def _omniglot(root: Path, background: int = 3, evaluation: int = 2, drawings: int = 3) -> None:
    """``images_{background,evaluation}/alpha<a>/character<c>/<i>.png``: 2 characters per alphabet, each drawing
    an asymmetric 12×12 pattern (so rotations differ) with a level unique to the character."""
    level = 0
    for folder, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for a in range(alphabets):
            for c in range(2):
                level += 1
                pixels = np.zeros((12, 12), dtype=np.uint8)
                pixels[:6, :3] = 10 * level
                for i in range(drawings):
                    path = root / folder / f"alpha{a}" / f"character{c:02d}" / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(path)


def test_omniglot_splits_by_alphabet_and_rotates(tmp_path: Path) -> None:
    _omniglot(tmp_path)
    src = omniglot(root=str(tmp_path), image_size=12, val_alphabets=1, ways=2, shots=1, query_shots=2)
    assert src.input_shape == (1, 12, 12)
    assert [len(getattr(src, s).classes) for s in ("train", "val", "test")] == [4, 2, 4]
    turned = omniglot(root=str(tmp_path), image_size=12, val_alphabets=1, rotations=True, ways=2, shots=1,
                      query_shots=2)
    assert [len(getattr(turned, s).classes) for s in ("train", "val", "test")] == [16, 8, 16]
    x, y = turned.test.x, turned.test.y
    base = x[y == int(turned.test.classes[0])][0]
    for k in range(1, 4):
        assert torch.equal(x[y == int(turned.test.classes[k])][0], torch.rot90(base, k, dims=(1, 2)))
    assert not torch.equal(torch.rot90(base, 1, dims=(1, 2)), base)
    assert omniglot(root=str(tmp_path), val_alphabets=1, ways=2, shots=1, query_shots=2).input_shape == (1, 28, 28)


def test_omniglot_errors(tmp_path: Path) -> None:
    _omniglot(tmp_path)
    with pytest.raises(ConfigError, match=r"`val_alphabets` must be an integer in \[1, 2\].*Got 3"):
        omniglot(root=str(tmp_path), val_alphabets=3)
    evaluation = tmp_path / "images_evaluation"
    evaluation.rename(tmp_path / "images_evaluation_small")
    with pytest.raises(DataError, match=r"'.*images_evaluation' does not exist; rename .*images_evaluation_small"):
        omniglot(root=str(tmp_path))
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"'.*images_evaluation' does not exist; unzip '.*images_evaluation\.zip'"):
        omniglot(root=str(tmp_path))
    with pytest.raises(DataError, match="set `root` to the folder holding images_background/"):
        omniglot(root=str(tmp_path / "images_background"))  # one level too deep
    (tmp_path / "images_evaluation_small").rename(evaluation)
    with pytest.raises(DataError, match=r"holds 3 images, fewer than shots \+ query_shots = 1 \+ 15 = 16"):
        omniglot(root=str(tmp_path), val_alphabets=1)


def test_omniglot_trains_a_protonet_end_to_end(tmp_path: Path) -> None:
    _omniglot(tmp_path / "data", drawings=4)
    cfg = Config.from_dict({
        "name": "omniglot-tiny", "threads": 1,
        "data": {"dataset": "omniglot", "options": {"root": str(tmp_path / "data"), "image_size": 8,
                                                    "val_alphabets": 1, "ways": 2, "shots": 1, "query_shots": 3,
                                                    "meta_batch": 2, "flatten": True}},
        "model": {"trunk_hidden": [16]},
        "training": {"algorithm": "protonet", "max_steps": 4, "eval_every": 2, "meta_val_tasks": 4,
                     "meta_test_tasks": 4},
    })
    run, result = train(cfg, tmp_path / "run")
    summary = json.loads((run.path / "summary.json").read_text())
    assert result.fit.steps == 4 and summary["test"]["omniglot"]["num_tasks"] == 4


def _mini(root: Path, splits: dict[str, list[str]], per_class: int = 3) -> None:
    for split, labels in splits.items():
        rows = ["filename,label"]
        for k, label in enumerate(labels):
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                _image(root / "images" / name, 30 * k + 5, size=(16, 12))
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


SPLIT_LABELS = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}


def test_miniimagenet_reads_split_files(tmp_path: Path) -> None:
    _mini(tmp_path, SPLIT_LABELS)
    src = miniimagenet(root=str(tmp_path), image_size=6, ways=2, shots=1, query_shots=2)
    assert src.input_shape == (3, 6, 6)
    assert [len(getattr(src, s).classes) for s in ("train", "val", "test")] == [3, 2, 2]
    _check_episode_labels(src, "val")
    with pytest.raises(DataError, match=r"class 'n01 \(in train\.csv\)' \(train split\) holds 3 images"):
        miniimagenet(root=str(tmp_path), image_size=6, ways=2, shots=2, query_shots=2)


@pytest.mark.parametrize(("spoil", "match"), [
    (lambda r: (r / "test.csv").unlink(), r"split file '.*test\.csv' does not exist; put train\.csv"),
    (lambda r: (r / "val.csv").write_text("file,class\n"), r"'.*val\.csv' must start with the header "
                                                           r"'filename,label'; found 'file,class'"),
    (lambda r: (r / "val.csv").write_text(""), r"found '\(empty file\)'"),
    (lambda r: (r / "val.csv").write_text("filename,label\n"), r"'.*val\.csv' lists no images"),
    (lambda r: (r / "val.csv").write_text("filename,label\nn0400000000.jpg\n"), r"line 2 is 'n0400000000\.jpg'"),
    (lambda r: (r / "val.csv").write_text("filename,label\nnope.jpg,n04\n"), r"line 2 names 'nope\.jpg', but "
                                                                             r"'.*images/nope\.jpg' does not exist"),
    (lambda r: (r / "test.csv").write_text("filename,label\nn0100000000.jpg,n01\n"),
     r"class 'n01' is listed in both train\.csv and test\.csv"),
    (lambda r: (r / "images").rename(r / "imgs"), r"image folder '.*images' does not exist; put the image files"),
])
def test_miniimagenet_errors(tmp_path: Path, spoil, match: str) -> None:  # type: ignore[no-untyped-def]
    _mini(tmp_path, SPLIT_LABELS)
    spoil(tmp_path)
    with pytest.raises(DataError, match=match):
        miniimagenet(root=str(tmp_path), image_size=6, ways=2, shots=1, query_shots=2)
