"""The engine: step functions, the fit loop, checkpoints and run directories."""

from mtml.engine._checkpoint import Checkpoint, load_checkpoint, restore, save_checkpoint
from mtml.engine._dist_launch import OPTIMIZER_IMPORTS, launch
from mtml.engine._dist_steps import sharded_joint_step, sharded_meta_step
from mtml.engine._distributed import (
    DistributedError,
    broadcast_from_main,
    is_distributed,
    is_main,
    local_device,
    map_ranks,
    session,
)
from mtml.engine._fit import FitResult, ProgressHook, StopRule, fit
from mtml.engine._joint import TaskBatcher, evaluate, joint_step, objective, predict
from mtml.engine._precision import PRECISIONS, LossScaler, autocast, check_precision
from mtml.engine._preempt import Terminated, last_terminated, request_stop
from mtml.engine._run import Run
from mtml.engine._trainer import TrainResult, check_stop_per_task, make_optimizer, train_multitask
from mtml.engine._updates import SCHEDULES, LRSchedule, Updater

__all__ = [
    "OPTIMIZER_IMPORTS",
    "PRECISIONS",
    "SCHEDULES",
    "Checkpoint",
    "DistributedError",
    "FitResult",
    "LRSchedule",
    "LossScaler",
    "ProgressHook",
    "Run",
    "StopRule",
    "TaskBatcher",
    "Terminated",
    "TrainResult",
    "Updater",
    "autocast",
    "broadcast_from_main",
    "check_precision",
    "check_stop_per_task",
    "evaluate",
    "fit",
    "is_distributed",
    "is_main",
    "joint_step",
    "last_terminated",
    "launch",
    "load_checkpoint",
    "local_device",
    "make_optimizer",
    "map_ranks",
    "objective",
    "predict",
    "request_stop",
    "restore",
    "save_checkpoint",
    "session",
    "sharded_joint_step",
    "sharded_meta_step",
    "train_multitask",
]
