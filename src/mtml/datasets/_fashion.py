"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70 000 grayscale 28×28 images of 10 clothing categories.

Read from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, the four
original IDX files, gzipped) or from any folder holding them (option ``root``). Two uses:

- :func:`fashion` — multi-task: the 10-category task and a 4-group task on the same images (``GROUP_OF``);
- :func:`fashion_fewshot` — N-way K-shot episodes over the 10 categories, meta-test episodes drawn from the
  official test images. Every split holds all 10 categories (it is the *target* of transfer experiments, not a
  class-disjoint meta-learning benchmark).

Pixels are scaled to [0, 1] (no mean/std normalisation).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtml._checks import check_int
from mtml.datasets._families import EpisodeSource
from mtml.datasets._images import ToFloat, check_flatten
from mtml.errors import ConfigError, DataError
from mtml.sampling import FewShotClassification
from mtml.tasks import Split, Task, TaskKind

__all__ = ["CLASSES", "DEFAULT_ROOT", "GROUPS", "GROUP_OF", "fashion", "fashion_fewshot", "load_fashion_mnist",
           "read_idx"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SIZES = {"train": 60_000, "test": 10_000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
GROUPS = ("tops", "bottoms", "footwear", "bags")
GROUP_OF = (0, 1, 0, 0, 0, 2, 0, 2, 3, 2)
"""Coarse group of each category: dress counts as a top (worn on the upper body, like coat and shirt)."""
_INSTALL = "install it with `sudo apt-get install dataset-fashion-mnist`, or set `root` to a folder holding it"


def _payload(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file '{path}' does not exist; {_INSTALL}.")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file '{path}' is not a readable gzip file ({exc}); the file is truncated or corrupt: "
                        "reinstall it (sudo apt-get install --reinstall dataset-fashion-mnist).") from None


def read_idx(path: str | Path) -> Tensor:
    """An IDX file of unsigned bytes (gzipped or not) as a ``uint8`` tensor shaped by its header.

    Format (LeCun et al.): magic ``00 00 08 <ndim>``, ``ndim`` big-endian uint32 sizes, then the bytes. The magic
    number and the data length are checked; a :class:`DataError` names the file and what is wrong.
    """
    path = Path(path)
    raw = _payload(path)
    fix = "the file is truncated or corrupt: reinstall it (sudo apt-get install --reinstall dataset-fashion-mnist)"
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise DataError(f"IDX file '{path}' starts with {raw[:4].hex() or 'nothing'}, not the magic number "
                        f"000008nn of unsigned-byte IDX data with nn ≥ 1 dimensions; {fix}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file '{path}' holds {len(raw)} bytes, shorter than its {header}-byte header; {fix}.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    want = int(np.prod(dims))
    if len(raw) - header != want:
        raise DataError(f"IDX file '{path}' holds {len(raw) - header} data bytes but its header promises "
                        f"{'×'.join(map(str, dims))} = {want}; {fix}.")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy())


def load_fashion_mnist(root: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (images, labels), "test": (...)}``: images ``uint8 [n, 28, 28]``, labels ``long [n]`` in 0..9."""
    base = Path(root or DEFAULT_ROOT).expanduser()
    out = {}
    for split, names in FILES.items():
        paths = [next((p for p in (base / f"{n}.gz", base / n) if p.is_file()), base / f"{n}.gz") for n in names]
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"'{paths[0]}' holds data of shape {tuple(images.shape)}, not [n, 28, 28] images; "
                            "point `root` at the Fashion-MNIST files.")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"'{paths[1]}' holds labels of shape {tuple(labels.shape)} for {len(images)} images "
                            f"in '{paths[0]}'; the two files must match: reinstall them.")
        if int(labels.max()) > 9:
            raise DataError(f"'{paths[1]}' holds label {int(labels.max())}; Fashion-MNIST labels are 0..9.")
        out[split] = (images, labels.long())
    return out


def _check_size(name: str, value: object, high: int, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigError(f"`{name}` must be an integer in [1, {high}]{extra}. Got {value!r}.")
    return value


def fashion(
    *, root: str | None = None, train_size: int = 10_000, val_size: int = 2_000, test_size: int | None = None,
    seed: int = 0, flatten: bool = True,
) -> list[Task]:
    """Two multiclass tasks on the same images: ``category`` (the 10 classes, ``CLASSES``) and ``group``
    (``GROUPS``: tops, bottoms, footwear, bags; mapping ``GROUP_OF``). Both hold the same ``x`` tensors and form
    the task group ``fashion``.

    Train and val are disjoint random subsets (``seed``) of the 60 000 official training images; test is the
    official test set (all 10 000, or a random ``test_size`` of them). Inputs are pixels in [0, 1]:
    ``[784]`` with ``flatten=True`` (the default, for MLP models), else ``[1, 28, 28]``.
    """
    train_size = _check_size("train_size", train_size, SIZES["train"] - 1)
    val_size = _check_size("val_size", val_size, SIZES["train"] - 1)
    if test_size is not None:
        test_size = _check_size("test_size", test_size, SIZES["test"], " or null (all of them)")
    to_float = ToFloat(check_flatten(flatten))
    data = load_fashion_mnist(root)
    n_train, n_test = len(data["train"][1]), len(data["test"][1])
    if train_size + val_size > n_train:
        raise ConfigError(f"`train_size` + `val_size` must be <= the {n_train} training images. Got {train_size} + "
                          f"{val_size}. Lower one of them.")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_train, generator=gen)
    test_idx = torch.randperm(n_test, generator=gen)[:test_size] if test_size else torch.arange(n_test)
    picks = {"train": ("train", perm[:train_size]), "val": ("train", perm[train_size : train_size + val_size]),
             "test": ("test", test_idx)}
    xs, ys = {}, {}
    for split, (source, idx) in picks.items():
        images, labels = data[source]
        xs[split], ys[split] = to_float(images[idx].unsqueeze(1)), labels[idx]
    group_of = torch.tensor(GROUP_OF)

    def task(name: str, labels: dict[str, Tensor], classes: int) -> Task:
        train, val, test = (Split(xs[s], labels[s]) for s in ("train", "val", "test"))
        return Task(name, TaskKind.MULTICLASS, train, val, test, num_outputs=classes, group="fashion")

    return [task("category", ys, len(CLASSES)), task("group", {s: group_of[y] for s, y in ys.items()}, len(GROUPS))]


def fashion_fewshot(
    *, root: str | None = None, ways: int = 5, shots: int = 1, query_shots: int = 15, meta_batch: int = 4,
    val_size: int = 10_000, seed: int = 0, flatten: bool = False,
) -> EpisodeSource:
    """N-way K-shot episodes over the 10 Fashion-MNIST categories (``ways`` ≤ 10).

    Meta-train episodes come from the official training images minus ``val_size`` of them (drawn by ``seed``),
    meta-validation episodes from those, meta-test episodes from the official test images. All splits share the
    10 categories (they differ in images only). Inputs ``[1, 28, 28]`` in [0, 1], or ``[784]`` with ``flatten``.
    """
    val_size = _check_size("val_size", val_size, SIZES["train"] - 1)
    check_int("ways", ways, 2, "An N-way task needs at least 2 classes.")
    if ways > len(CLASSES):
        raise ConfigError(f"`ways` must be <= 10 (Fashion-MNIST has 10 categories). Got {ways}.")
    to_float = ToFloat(check_flatten(flatten))
    data = load_fashion_mnist(root)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    if val_size >= len(train_y):
        raise ConfigError(f"`val_size` must be < the {len(train_y)} training images. Got {val_size}.")
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": (train_x[perm[val_size:]], train_y[perm[val_size:]]),
             "val": (train_x[perm[:val_size]], train_y[perm[:val_size]]), "test": (test_x, test_y)}
    samplers = {split: FewShotClassification(x.unsqueeze(1), y, ways=ways, shots=shots, query_shots=query_shots,
                                             meta_batch=meta_batch, transform=to_float)
                for split, (x, y) in parts.items()}
    return EpisodeSource(samplers["train"], samplers["val"], samplers["test"], to_float.shape((1, 28, 28)), ways,
                         "classification")
