"""Knowledge transfer: transferability estimates, task affinity (TAG) and task grouping. Pure torch, no I/O."""

from mtml.transfer.affinity import AffinityAccumulator, TagRecorder, lookahead_affinity, negative_transfer
from mtml.transfer.estimators import ESTIMATORS, Estimator, estimate_all, head_probs, hscore, leep, logme, nce
from mtml.transfer.grouping import Grouping, group_tasks, grouping_score

__all__ = [
    "ESTIMATORS",
    "AffinityAccumulator",
    "Estimator",
    "Grouping",
    "TagRecorder",
    "estimate_all",
    "group_tasks",
    "grouping_score",
    "head_probs",
    "hscore",
    "leep",
    "logme",
    "lookahead_affinity",
    "nce",
    "negative_transfer",
]
