"""Palmer penguins: species (multiclass) and body mass (regression) from the same measurements.

Data: Horst, Hill & Gorman (2020), palmerpenguins, via the ``palmerpenguins`` package (offline).
"""

from __future__ import annotations

import numpy as np
import torch

from mtml.datasets._util import make_task, require_for, split_indices, standardize
from mtml.tasks import Task


def penguins(*, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> list[Task]:
    """Two tasks on the 333 complete rows: ``species`` (Adelie/Chinstrap/Gentoo) and ``body_mass``.

    Features (standardised with train statistics): bill length, bill depth, flipper length, sex, island
    (one-hot) and year. Body mass is standardised too (metrics are in units of its train standard deviation).
    Both tasks share the same rows (the same ``x`` tensors, task group ``penguins``) and train/val/test split.
    """
    pp = require_for("palmerpenguins", "penguins")
    df = pp.load_penguins().dropna().reset_index(drop=True)
    numeric = df[["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "year"]].to_numpy(np.float32)
    sex = (df["sex"] == "male").to_numpy(np.float32)[:, None]
    islands = sorted(df["island"].unique())
    island = np.stack([(df["island"] == i).to_numpy(np.float32) for i in islands], 1)
    x = torch.from_numpy(np.concatenate([numeric, sex, island], 1))
    species_names = sorted(df["species"].unique())
    species = torch.tensor([species_names.index(s) for s in df["species"]])
    mass = torch.from_numpy(df["body_mass_g"].to_numpy(np.float32))[:, None]
    gen = torch.Generator().manual_seed(seed)
    tr, va, te = split_indices(len(df), (1 - val_fraction - test_fraction, val_fraction, test_fraction), gen)
    xs = standardize(x[tr], x[va], x[te])
    ms = standardize(mass[tr], mass[va], mass[te])
    return [
        make_task("species", "multiclass", xs, [species[i] for i in (tr, va, te)], num_outputs=len(species_names),
                  group="penguins"),
        make_task("body_mass", "regression", xs, ms, group="penguins"),
    ]
