"""``tables``: the tabular tasks of mtml's datasets gathered into one multi-task suite.

- **penguins** (:func:`~mtml.datasets._penguins.penguins`): ``species`` (3 classes) and ``body_mass``
  (regression) from 9 measurements of 333 penguins;
- **movies** (:func:`~mtml.datasets._movies.movies`): ``rating`` (regression) and seven binary genre flags
  ``genre_<name>`` from 9 metadata columns of IMDb films (ggplot2movies);
- optionally a few **schools** (:func:`~mtml.datasets._schools.schools`): one maths-score regression per school.

The sources describe different things with different columns, so a model must not feed them to one first
layer: use per-task stems (``model.stem_width``; the builder then gives every task a ``Linear → act`` stem into
the shared trunk). Tasks come source by source (penguins, movies, schools); the sources' columns are documented
in their own modules.
"""

from __future__ import annotations

from mtml.datasets._movies import movies
from mtml.datasets._penguins import penguins
from mtml.datasets._schools import schools as schools_tasks
from mtml.errors import ConfigError
from mtml.tasks import Task

__all__ = ["tables"]


def tables(*, seed: int = 0, movies_n: int = 8000, schools: int = 0) -> list[Task]:
    """Penguins' 2 tasks, movies' 8 (rating + 7 genres, binary) and the first ``schools`` schools' tasks.

    Every source is split by ``seed`` on its own (rows never cross sources). Task names must be unique across
    sources; they are (``species``, ``body_mass``, ``rating``, ``genre_*``, ``school_*``).
    """
    if isinstance(schools, bool) or not isinstance(schools, int) or not 0 <= schools <= 160:
        raise ConfigError(f"`schools` must be an integer in [0, 160] (schools added to the suite). Got {schools!r}.")
    tasks = penguins(seed=seed) + movies(seed=seed, n=movies_n, genres_as="binary")
    if schools:
        tasks += schools_tasks(seed=seed, max_schools=schools)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):  # a guard for future sources
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"tables: task names {twice} occur in two sources; rename the tasks of one source.")
    return tasks
