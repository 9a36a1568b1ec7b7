"""Multi-Fashion: two Fashion-MNIST items on one canvas, one task per item (``left``, ``right``).

The construction of Multi-MNIST by Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
2018 (their loader in intel-isl/MultiObjectiveOptimization), applied to Fashion-MNIST items as in Lin, Zhen, Li,
Zhang & Kwong, "Pareto Multi-Task Learning", NeurIPS 2019: on a 36×36 black canvas the *left* item's 28×28 image
is placed at the top-left corner (rows and columns 0..27) and the *right* item's at offset 6 (rows and columns
6..33, toward the bottom-right); where they overlap, the pixel is the maximum of the two. Sener & Koltun then
resize the canvas to 28×28 (nearest neighbour); Lin et al.'s released Multi-Fashion holds 36×36 images (120 000
train, 20 000 test) fed to a LeNet as they are. This module keeps the 36×36 canvas (no resizing), like Lin et al.;
``canvas`` and ``shift`` change the canvas side and the right item's offset.

Each image pairs a random left item with an independent random right item (labels may coincide, as in both
papers). Train and validation pairs are drawn from disjoint parts of the official 60 000 training images, test
pairs from the official 10 000 test images, so no item of a test image was seen in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtml.datasets._fashion import CLASSES, SIZES, load_fashion_mnist
from mtml.datasets._images import ToFloat, check_flatten
from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["multi_fashion", "overlay_pairs"]

ITEM = 28


def _check_count(name: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigError(f"`{name}` must be an integer in [1, {high}] (images drawn for that split). Got {value!r}.")
    return value


def overlay_pairs(left: Tensor, right: Tensor, *, canvas: int = 36, shift: int = 6) -> Tensor:
    """``uint8 [n, canvas, canvas]``: each ``left[i]`` (``[n, 28, 28]``) at the top-left corner and ``right[i]``
    at offset ``(shift, shift)``, combined by the pixel-wise maximum (black elsewhere)."""
    n = left.shape[0]
    a = left.new_zeros(n, canvas, canvas)
    b = left.new_zeros(n, canvas, canvas)
    a[:, :ITEM, :ITEM] = left
    b[:, shift : shift + ITEM, shift : shift + ITEM] = right
    return torch.maximum(a, b)


def multi_fashion(
    *, root: str | None = None, train_size: int = 10_000, val_size: int = 2_000, test_size: int = 5_000,
    seed: int = 0, flatten: bool = True, canvas: int = 36, shift: int = 6,
) -> list[Task]:
    """Two 10-class tasks on the same overlaid images: ``left`` (the top-left item's category, ``CLASSES`` of
    Fashion-MNIST) and ``right`` (the bottom-right item's), task group ``multi_fashion``.

    ``train_size``/``val_size``/``test_size`` images are generated per split (``seed`` draws the pairs and the
    train/val partition of the official training images). Inputs are pixels in [0, 1]: ``[canvas²]`` with
    ``flatten=True`` (for MLP trunks), else ``[1, canvas, canvas]`` (for ``backbone: conv4``).
    """
    if isinstance(canvas, bool) or not isinstance(canvas, int) or not ITEM <= canvas <= 2 * ITEM:
        raise ConfigError(f"`canvas` must be an integer in [28, 56] (the side of the square image; both items are "
                          f"28×28). Got {canvas!r}.")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= canvas - ITEM:
        raise ConfigError(f"`shift` must be an integer in [0, canvas - 28] = [0, {canvas - ITEM}] (the right item's "
                          f"offset inside the canvas). Got {shift!r}.")
    train_size = _check_count("train_size", train_size, 200_000)
    val_size = _check_count("val_size", val_size, 200_000)
    test_size = _check_count("test_size", test_size, 200_000)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"`seed` must be an integer >= 0. Got {seed!r}.")
    to_float = ToFloat(check_flatten(flatten))
    data = load_fashion_mnist(root)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(data["train"][1])
    # items of val images come from a held-out 1/6 of the official training images (10 000 of 60 000)
    perm = torch.randperm(n_train, generator=gen)
    n_val_pool = SIZES["test"] if n_train == SIZES["train"] else max(1, n_train // 6)
    pools = {"train": ("train", perm[n_val_pool:]), "val": ("train", perm[:n_val_pool]),
             "test": ("test", torch.arange(len(data["test"][1])))}
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    xs: dict[str, Tensor] = {}
    labels: dict[str, dict[str, Tensor]] = {"left": {}, "right": {}}
    for split, (source, pool) in pools.items():
        images, ys = data[source]
        pick = pool[torch.randint(len(pool), (2, sizes[split]), generator=gen)]
        xs[split] = to_float(overlay_pairs(images[pick[0]], images[pick[1]], canvas=canvas, shift=shift).unsqueeze(1))
        labels["left"][split], labels["right"][split] = ys[pick[0]], ys[pick[1]]

    def task(name: str) -> Task:
        train, val, test = (Split(xs[s], labels[name][s]) for s in ("train", "val", "test"))
        return Task(name, TaskKind.MULTICLASS, train, val, test, num_outputs=len(CLASSES), group="multi_fashion")

    return [task("left"), task("right")]
