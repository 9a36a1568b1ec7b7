"""Multi-Fashion: on a small fake Fashion-MNIST (IDX files written here, every item tagged with its index) the
canvas is rebuilt by hand from the two tagged items (placement + pixel-wise max), the labels are the two items'
classes, train/val/test items come from the right pools; determinism by seed, bad options, the real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mtml.config import load_config
from mtml.datasets import DATASETS
from mtml.datasets._fashion import DEFAULT_ROOT
from mtml.datasets._multi_fashion import multi_fashion, overlay_pairs
from mtml.errors import ConfigError
from mtml.groups import task_groups
from mtml.workflows import build, train

REAL = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_real = pytest.mark.skipif(not REAL, reason="sudo apt-get install dataset-fashion-mnist")
CONFIG = Path(__file__).parents[2] / "src" / "mtml" / "configs" / "multi_fashion.yaml"
N_TRAIN, N_TEST, TEST_TAG = 120, 30, 150  # tags: train item k → k + 1, test item k → k + 1 + TEST_TAG


def _write_idx(path: Path, data: np.ndarray) -> None:
    head = bytes([0, 0, 8, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    path.write_bytes(gzip.compress(head + data.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Items with a random 0/255 texture inside rows/columns 2..25 and a tag naming the item at pixels (0, 0)
    and (27, 27): on a canvas, (0, 0) shows only the left item and (shift+27, shift+27) only the right one."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for split, n, offset, prefix in (("train", N_TRAIN, 0, "train"), ("test", N_TEST, TEST_TAG, "t10k")):
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        x[:, 2:26, 2:26] = 255 * (rng.random((n, 24, 24)) < 0.2)
        tags = np.arange(n) + 1 + offset
        x[:, 0, 0] = tags
        x[:, 27, 27] = tags
        y = rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
        images[split], labels[split] = x, y
    return root, images, labels


def _by_hand(left: np.ndarray, right: np.ndarray, canvas: int, shift: int) -> np.ndarray:
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    for r in range(28):
        for c in range(28):
            out[r, c] = max(out[r, c], left[r, c])
            out[shift + r, shift + c] = max(out[shift + r, shift + c], right[r, c])
    return out


@pytest.mark.parametrize(("canvas", "shift"), [(36, 6), (40, 12)])
def test_canvas_labels_and_pools(fake_root: tuple, canvas: int, shift: int) -> None:
    root, images, labels = fake_root
    left, right = multi_fashion(root=str(root), train_size=40, val_size=20, test_size=25, seed=3, flatten=False,
                                canvas=canvas, shift=shift)
    assert (left.name, right.name, left.num_outputs, right.num_outputs) == ("left", "right", 10, 10)
    assert left.group == right.group == "multi_fashion"
    assert len(task_groups([left, right])) == 1  # shared rows: the same x in every split
    used: dict[str, set[int]] = {}
    for split, n in (("train", 40), ("val", 20), ("test", 25)):
        a, b = getattr(left, split), getattr(right, split)
        assert a.x is b.x or torch.equal(a.x, b.x)
        assert tuple(a.x.shape) == (n, 1, canvas, canvas) and a.x.dtype == torch.float32
        pix = (a.x[:, 0] * 255).round().to(torch.uint8).numpy()
        source = "test" if split == "test" else "train"
        offset = TEST_TAG if split == "test" else 0
        ids_l = pix[:, 0, 0].astype(int) - 1 - offset
        ids_r = pix[:, shift + 27, shift + 27].astype(int) - 1 - offset
        assert ((ids_l >= 0) & (ids_l < len(images[source])) & (ids_r >= 0) & (ids_r < len(images[source]))).all()
        for i in range(n):
            np.testing.assert_array_equal(pix[i], _by_hand(images[source][ids_l[i]], images[source][ids_r[i]],
                                                           canvas, shift))
        np.testing.assert_array_equal(a.y.numpy(), labels[source][ids_l])
        np.testing.assert_array_equal(b.y.numpy(), labels[source][ids_r])
        used[split] = set(ids_l) | set(ids_r)
    assert not used["train"] & used["val"]  # val items are held out of training


def test_overlay_is_pixelwise_max() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (5, 28, 28), generator=gen, dtype=torch.uint8) for _ in range(2))
    out = overlay_pairs(a, b, canvas=36, shift=6)
    want = np.stack([_by_hand(a[i].numpy(), b[i].numpy(), 36, 6) for i in range(5)])
    np.testing.assert_array_equal(out.numpy(), want)
    assert torch.equal(out[:, 6:28, 6:28], torch.maximum(a[:, 6:, 6:], b[:, :22, :22]))


def test_seed_determinism_and_flatten(fake_root: tuple) -> None:
    root = str(fake_root[0])
    one = multi_fashion(root=root, train_size=30, val_size=10, test_size=10, seed=1)
    two = multi_fashion(root=root, train_size=30, val_size=10, test_size=10, seed=1)
    other = multi_fashion(root=root, train_size=30, val_size=10, test_size=10, seed=2)
    assert tuple(one[0].train.x.shape) == (30, 36 * 36)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(one[0], split).x, getattr(two[0], split).x)
        assert torch.equal(getattr(one[1], split).y, getattr(two[1], split).y)
    assert not torch.equal(one[0].train.x, other[0].train.x)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"train_size": 0}, "`train_size` must be an integer in [1, 200000]"),
    ({"val_size": 2.5}, "`val_size`"),
    ({"test_size": True}, "`test_size`"),
    ({"canvas": 27}, "`canvas` must be an integer in [28, 56]"),
    ({"canvas": 36, "shift": 9}, "`shift` must be an integer in [0, canvas - 28] = [0, 8]"),
    ({"shift": -1}, "`shift`"),
    ({"flatten": "yes"}, "`flatten` must be true"),
    ({"seed": -3}, "`seed` must be an integer >= 0"),
])
def test_bad_options(fake_root: tuple, options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        multi_fashion(root=str(fake_root[0]), **options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@needs_real
def test_real_files_through_registry() -> None:
    left, right = DATASETS.create("multi_fashion", train_size=200, val_size=50, test_size=100, seed=0)
    assert tuple(left.train.x.shape) == (200, 1296) and tuple(left.test.x.shape) == (100, 1296)
    assert float(left.train.x.min()) >= 0.0 and float(left.train.x.max()) <= 1.0
    assert set(left.train.y.tolist()) <= set(range(10)) and len(set(right.train.y.tolist())) > 5
    # left and right labels are drawn independently: not a copy of each other
    assert not torch.equal(left.train.y, right.train.y)


@needs_real
def test_shipped_config_builds_and_trains(tmp_path: Path) -> None:
    config = load_config(CONFIG)
    assert config.data.dataset == "multi_fashion"
    config.data.options.update(train_size=64, val_size=32, test_size=32)
    config.training.max_steps, config.training.eval_every = 4, 2
    built = build(config)
    assert [t.name for t in built.tasks] == ["left", "right"] and tuple(built.tasks[0].train.x.shape) == (64, 1296)
    _, result = train(config, tmp_path / "run")
    assert set(result.test) == {"left", "right"} and 0.0 <= result.test["left"]["accuracy"] <= 1.0
