"""The engine: step functions, the fit loop, checkpoints and run directories."""

from mtml.engine.checkpoint import Checkpoint, load_checkpoint, restore, save_checkpoint
from mtml.engine.dist_steps import sharded_joint_step, sharded_meta_step
from mtml.engine.distributed import DistributedError, map_ranks
from mtml.engine.fit import FitResult, ProgressHook, StopRule, fit
from mtml.engine.joint import TaskBatcher, evaluate, joint_step, objective, predict
from mtml.engine.run import Run
from mtml.engine.trainer import TrainResult, make_optimizer, train_multitask

__all__ = [
    "Checkpoint", "DistributedError", "FitResult", "ProgressHook", "Run", "StopRule", "TaskBatcher", "TrainResult",
    "evaluate", "fit", "joint_step", "load_checkpoint", "make_optimizer", "map_ranks", "objective", "predict",
    "restore", "save_checkpoint", "sharded_joint_step", "sharded_meta_step", "train_multitask",
]
