"""Faces versus non-faces: the 200 grayscale 25×25 crops bundled with scikit-image (``skimage.data.lfw_subset``).

The first 100 images are faces from Labeled Faces in the Wild (Huang et al. 2012), the last 100 are crops of the
same photographs' backgrounds (checked by eye: some background crops hold part of a face). Offline: the file
ships inside the scikit-image wheel (``pip install 'mtml[vision]'``).
"""

from __future__ import annotations

import numpy as np
import torch

from mtml.datasets._images import check_flatten, require_vision
from mtml.datasets._util import split_indices
from mtml.errors import ConfigError, DataError
from mtml.tasks import Split, Task, TaskKind

__all__ = ["lfw_faces"]

FACES = 100  # the first FACES images are faces, the rest non-faces


def _pixels() -> np.ndarray:
    """``float32 [200, 25, 25]`` in [0, 1] (scikit-image 0.26 returns float64 in [0, 1] though its docstring
    says uint8; both are accepted)."""
    images = np.asarray(require_vision("skimage.data", "faces").lfw_subset())
    if images.shape != (2 * FACES, 25, 25):
        raise DataError(f"skimage.data.lfw_subset() returned shape {images.shape}, not (200, 25, 25); this "
                        "scikit-image version changed the bundled data: install scikit-image>=0.22 as pinned by "
                        "the vision extra.")
    pixels = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    if not (pixels.min() >= 0.0 and pixels.max() <= 1.0):
        raise DataError(f"skimage.data.lfw_subset() pixels span [{pixels.min()}, {pixels.max()}], not [0, 1].")
    return pixels


def lfw_faces(
    *, name: str = "faces", seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
    flatten: bool = False,
) -> Task:
    """A binary task ``name``: is the 25×25 crop a face (1) or not (0)?

    Inputs ``x: [n, 1, 25, 25]`` in [0, 1] (``[n, 625]`` with ``flatten``). Faces and non-faces are split
    separately (stratified), so each of train/val/test holds both in equal shares: 120/40/40 at the defaults.
    """
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ConfigError(f"`val_fraction` and `test_fraction` must be > 0 with a sum < 1. Got {val_fraction} and "
                          f"{test_fraction}.")
    x = torch.from_numpy(_pixels()).unsqueeze(1)
    x = x.flatten(1) if check_flatten(flatten) else x
    y = (torch.arange(2 * FACES) < FACES).float()
    gen = torch.Generator().manual_seed(seed)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    parts = [split_indices(FACES, fractions, gen), split_indices(FACES, fractions, gen)]
    idx = [torch.cat([parts[0][i], parts[1][i] + FACES]) for i in range(3)]
    train, val, test = (Split(x[i], y[i]) for i in idx)
    return Task(name, TaskKind.BINARY, train, val, test)
