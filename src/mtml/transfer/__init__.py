"""Knowledge transfer: transferability estimates, task affinity (TAG), task grouping and transfer strategies.

Pure torch, no I/O."""

from mtml.transfer._adaptation import ADAPTERS, Adapter, supervised_target
from mtml.transfer._affinity import AffinityAccumulator, TagRecorder, lookahead_affinity, negative_transfer
from mtml.transfer._estimators import (
    ESTIMATORS,
    Estimator,
    estimate_all,
    head_probs,
    hscore,
    leep,
    logme,
    nce,
    spearman,
    transrate,
    weighted_tau,
)
from mtml.transfer._grouping import Grouping, group_tasks, grouping_score
from mtml.transfer._strategies import STRATEGIES, Source, Strategy, trunk_blocks

__all__ = [
    "ADAPTERS",
    "ESTIMATORS",
    "STRATEGIES",
    "Adapter",
    "AffinityAccumulator",
    "Estimator",
    "Grouping",
    "Source",
    "Strategy",
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
    "spearman",
    "supervised_target",
    "transrate",
    "trunk_blocks",
    "weighted_tau",
]
