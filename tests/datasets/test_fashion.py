"""Fashion-MNIST: IDX parsing (valid, corrupt and short files written here), the real files from the Debian
package, the category/group tasks, few-shot episodes and a short ``mtml train`` of the shipped config."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtml.datasets import DATASETS, FAMILIES
from mtml.datasets._fashion import (
    CLASSES,
    DEFAULT_ROOT,
    GROUP_OF,
    GROUPS,
    fashion,
    fashion_fewshot,
    load_fashion_mnist,
    read_idx,
)
from mtml.errors import ConfigError, DataError

REAL = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_real = pytest.mark.skipif(not REAL, reason="sudo apt-get install dataset-fashion-mnist")
CONFIG = Path(__file__).parents[2] / "src" / "mtml" / "configs" / "fashion.yaml"


def _idx(data: torch.Tensor, *, magic: bytes | None = None) -> bytes:
    dims = tuple(data.shape)
    head = magic if magic is not None else bytes([0, 0, 8, len(dims)])
    return head + struct.pack(f">{len(dims)}I", *dims) + data.to(torch.uint8).numpy().tobytes()


def _fake_root(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """IDX files in the Fashion-MNIST names: image ``i`` is filled with its label ``i % 10`` times 20."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (labels * 20).view(n, 1, 1).expand(n, 28, 28)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))  # plain (not gzipped) works too
    return root


def test_read_idx_plain_and_gzipped(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (3, 4, 5), generator=torch.Generator().manual_seed(0))
    (tmp_path / "a").write_bytes(_idx(data))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(data)))
    for name in ("a", "a.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == torch.uint8 and torch.equal(out, data.to(torch.uint8))


@pytest.mark.parametrize(("content", "match"), [
    (_idx(torch.zeros(2, 3), magic=b"\x00\x00\x0d\x02"), r"starts with 00000d02, not the magic number 000008nn"),
    (_idx(torch.zeros(2, 3), magic=b"\x08\x03\x00\x00"), r"starts with 08030000, not the magic number"),
    (b"\x00\x00", r"starts with 0000, not the magic"),
    (b"", r"starts with nothing"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"holds 8 bytes, shorter than its 16-byte header"),
    (_idx(torch.zeros(2, 3))[:-1], r"holds 5 data bytes but its header promises 2×3 = 6"),
    (_idx(torch.zeros(2, 3)) + b"\x00", r"holds 7 data bytes but its header promises 2×3 = 6"),
    (gzip.compress(_idx(torch.zeros(50, 50)), mtime=0)[:30], r"is not a readable gzip file"),
])
def test_corrupt_idx_files_are_named(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"IDX file '.*bad-idx3-ubyte' {match}.*(reinstall|corrupt)"):
        read_idx(path)


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*train-images-idx3-ubyte\.gz' does not exist; install it with "
                                        r"`sudo apt-get install dataset-fashion-mnist`, or set `root`"):
        load_fashion_mnist(str(tmp_path))


def test_files_that_do_not_match_are_rejected(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(torch.arange(19) % 10))
    with pytest.raises(DataError, match=r"labels of shape \(19,\) for 20 images"):
        load_fashion_mnist(str(root))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(torch.full((20,), 12)))
    with pytest.raises(DataError, match=r"holds label 12; Fashion-MNIST labels are 0\.\.9"):
        load_fashion_mnist(str(root))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(torch.zeros(20, 32, 32))))
    with pytest.raises(DataError, match=r"shape \(20, 32, 32\), not \[n, 28, 28\]"):
        load_fashion_mnist(str(root))


def test_group_mapping() -> None:
    named = {CLASSES[c]: GROUPS[g] for c, g in enumerate(GROUP_OF)}
    assert named == {"T-shirt/top": "tops", "Pullover": "tops", "Dress": "tops", "Coat": "tops", "Shirt": "tops",
                     "Trouser": "bottoms", "Sandal": "footwear", "Sneaker": "footwear", "Ankle boot": "footwear",
                     "Bag": "bags"}


def test_tasks_from_a_small_root(tmp_path: Path) -> None:
    root = str(_fake_root(tmp_path))
    category, group = fashion(root=root, train_size=20, val_size=10, flatten=False)
    assert (category.name, category.num_outputs, group.name, group.num_outputs) == ("category", 10, "group", 4)
    assert category.input_shape == (1, 28, 28) and (len(category.train), len(category.val), len(category.test)) \
        == (20, 10, 20)
    for split in ("train", "val", "test"):
        c, g = category.split(split), group.split(split)
        assert c.x is g.x  # the same images, stored once
        assert torch.equal(c.x[:, 0, 0, 0] * 255, (c.y * 20).float())  # pixels scaled to [0, 1], rows aligned
        assert torch.equal(g.y, torch.tensor(GROUP_OF)[c.y])
    flat = fashion(root=root, train_size=20, val_size=10, test_size=5)
    assert flat[0].input_shape == (784,) and len(flat[0].test) == 5
    with pytest.raises(ConfigError, match=r"`train_size` \+ `val_size` must be <= the 40 training images"):
        fashion(root=root, train_size=35, val_size=10)
    for bad in ({"train_size": 0}, {"val_size": True}, {"test_size": 10_001}, {"flatten": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            fashion(root=root, **bad)  # type: ignore[arg-type]


@needs_real
def test_real_files_and_default_tasks() -> None:
    data = load_fashion_mnist()
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 1000))
    category, group = DATASETS.create("fashion", train_size=3000, val_size=1000)
    assert category.input_shape == (784,) and (len(category.train), len(category.val), len(category.test)) \
        == (3000, 1000, 10_000)
    assert abs(float(category.train.x.mean()) - 0.286) < 0.01  # the published Fashion-MNIST pixel mean
    rows = {hash(r.numpy().tobytes()) for r in (category.train.x * 255).to(torch.uint8)}
    assert not any(hash(r.numpy().tobytes()) in rows for r in (category.val.x * 255).to(torch.uint8))
    assert torch.equal(torch.bincount(group.test.y), torch.tensor([5000, 1000, 3000, 1000]))


@needs_real
def test_fewshot_episodes_draw_test_tasks_from_the_test_images() -> None:
    source = FAMILIES.create("fashion_fewshot", ways=10, shots=2, query_shots=3, meta_batch=2, val_size=500)
    assert source.input_shape == (1, 28, 28) and source.num_outputs == 10 and source.kind == "classification"
    assert [len(getattr(source, s).x) for s in ("train", "val", "test")] == [59_500, 500, 10_000]
    assert all(len(getattr(source, s).classes) == 10 for s in ("train", "val", "test"))  # shared categories
    ep = source.test.sample(torch.Generator().manual_seed(0))
    assert ep.support.x.shape == (2, 20, 1, 28, 28) and ep.query.x.shape == (2, 30, 1, 28, 28)
    assert ep.support.x.dtype == torch.float32 and float(ep.support.x.max()) <= 1.0
    test_rows = {hash(r.numpy().tobytes()) for r in source.test.x}
    drawn = (ep.query.x * 255).round().to(torch.uint8).flatten(0, 1)
    assert all(hash(r.numpy().tobytes()) in test_rows for r in drawn)
    flat = fashion_fewshot(flatten=True, ways=3, shots=1, query_shots=1, val_size=100)
    assert flat.input_shape == (784,) and flat.val.sample(torch.Generator()).support.x.shape == (4, 3, 784)
    with pytest.raises(ConfigError, match=r"`ways` must be <= 10 \(Fashion-MNIST has 10 categories\)\. Got 11"):
        fashion_fewshot(ways=11)


@needs_real
def test_mtml_train_runs_the_shipped_config(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mtml", "train", str(CONFIG), "--out", str(out), "--quiet",
         "--set", "training.max_steps=30", "--set", "training.eval_every=10", "--set", "data.options.train_size=600",
         "--set", "data.options.val_size=200", "--set", "data.options.test_size=1000"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "category" in proc.stdout and "group" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tasks"]["group"]["kind"] == "multiclass"
    test = summary["test"]
    assert test["category"]["accuracy"] > 0.3 and test["group"]["accuracy"] > 0.6  # chance: 0.1 and 0.5
