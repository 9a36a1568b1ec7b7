"""scikit-image's bundled faces vs non-faces as a binary task: shapes, balanced splits, the label order."""

from __future__ import annotations

import pytest
import torch

from mtml.datasets import lfw_faces
from mtml.datasets._faces import FACES, _pixels
from mtml.errors import ConfigError
from mtml.tasks import TaskKind


def test_first_hundred_are_faces() -> None:
    """A face has its eyes in a darker band (rows 7-9 of 25) between a lighter forehead and lighter cheeks; a
    background crop rarely does. Measured: 93 of the first 100 images, 6 of the last 100."""
    x = torch.from_numpy(_pixels())
    assert x.shape == (200, 25, 25) and FACES == 100

    def band(rows: slice) -> torch.Tensor:
        return x[:, rows, 5:20].mean((1, 2))

    eyes = band(slice(7, 10))
    dip = ((eyes < band(slice(1, 5))) & (eyes < band(slice(10, 13)))).float()
    assert dip[:FACES].mean() > 0.85 and dip[FACES:].mean() < 0.15


def test_binary_task_with_balanced_splits() -> None:
    task = lfw_faces()
    assert task.name == "faces" and task.kind is TaskKind.BINARY and task.input_shape == (1, 25, 25)
    assert (len(task.train), len(task.val), len(task.test)) == (120, 40, 40)
    for split in (task.train, task.val, task.test):
        assert float(split.y.mean()) == 0.5 and split.x.dtype == torch.float32
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    pixels = torch.from_numpy(_pixels())
    for x, y in zip(task.test.x, task.test.y, strict=True):  # each row's label follows the image's position
        rows = (pixels == x[0]).flatten(1).all(1).nonzero().flatten()
        assert len(rows) >= 1 and all((int(r) < FACES) == bool(y) for r in rows)
    assert not torch.equal(lfw_faces(seed=1).train.x, task.train.x)
    flat = lfw_faces(name="lfw", flatten=True, val_fraction=0.1, test_fraction=0.3)
    assert flat.name == "lfw" and flat.input_shape == (625,) and (len(flat.val), len(flat.test)) == (20, 60)


@pytest.mark.parametrize("options", [{"val_fraction": 0.0}, {"test_fraction": 0.6, "val_fraction": 0.4},
                                     {"flatten": "no"}])
def test_bad_options(options: dict) -> None:
    with pytest.raises(ConfigError):
        lfw_faces(**options)
