"""mtml — multi-task learning, meta-learning and knowledge transfer on PyTorch."""

from mtml._version import __version__
from mtml.engine import Run, StopRule, TrainResult, evaluate, fit, joint_step, train_multitask
from mtml.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergedError,
    MtmlError,
    RunExistsError,
    ShapeError,
    UnknownNameError,
)
from mtml.nn import MultiTaskModel, build_multitask_model, mlp
from mtml.tasks import Split, Task, TaskKind
from mtml.weighting import WEIGHTINGS, Weighting

__all__ = [
    "WEIGHTINGS", "CheckpointError", "ConfigError", "DataError", "DivergedError", "MtmlError", "MultiTaskModel", "Run",
    "RunExistsError", "ShapeError", "Split", "StopRule", "Task", "TaskKind", "TrainResult", "UnknownNameError",
    "Weighting", "__version__", "build_multitask_model", "evaluate", "fit", "joint_step", "mlp",
    "train_multitask",
]
