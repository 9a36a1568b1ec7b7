"""Knowledge transfer: transferability estimates, task affinity (TAG) and task grouping. Pure torch, no I/O."""

from mtml.transfer.affinity import AffinityAccumulator, TagRecorder, lookahead_affinity, negative_transfer
from mtml.transfer.estimators import ESTIMATORS, Estimator, hscore, leep, logme, nce
from mtml.transfer.grouping import Grouping, group_tasks, grouping_score

__all__ = [
    "ESTIMATORS",
    "AffinityAccumulator",
    "Estimator",
    "Grouping",
    "TagRecorder",
    "group_tasks",
    "grouping_score",
    "hscore",
    "leep",
    "logme",
    "lookahead_affinity",
    "nce",
    "negative_transfer",
]
