"""Task weightings behind one registry: ``WEIGHTINGS.create(name, task_names, **options)``."""

from mtml.registry import Registry
from mtml.weighting.base import Weighting
from mtml.weighting.dwa import DWA
from mtml.weighting.equal import Equal
from mtml.weighting.fixed import Fixed
from mtml.weighting.gramian import task_gramian
from mtml.weighting.uncertainty import Uncertainty

WEIGHTINGS: Registry[Weighting] = Registry("weighting")
WEIGHTINGS.register("equal", Equal, help="w_i = 1: plain sum of task losses")
WEIGHTINGS.register("fixed", Fixed, help="constant user-given weights per task")
WEIGHTINGS.register("uncertainty", Uncertainty, help="learned homoscedastic uncertainty (Kendall et al. 2018)")
WEIGHTINGS.register("dwa", DWA, help="Dynamic Weight Average of loss ratios (Liu et al. 2019)")

__all__ = ["DWA", "WEIGHTINGS", "Equal", "Fixed", "Uncertainty", "Weighting", "task_gramian"]
