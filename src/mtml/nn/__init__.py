"""Neural-network pieces: the multi-task model and builders for trunks, heads and stems."""

from mtml.nn.builders import build_multitask_model, mlp
from mtml.nn.model import MultiTaskModel

__all__ = ["MultiTaskModel", "build_multitask_model", "mlp"]
