"""Neural-network pieces: the multi-task model, builders for trunks, heads and stems, and architectures."""

from mtml.nn._mlp import mlp
from mtml.nn.architectures import ColumnModel, CrossStitchTrunk, ExtractionTrunk, MMoETrunk
from mtml.nn.backbones import BACKBONES, build_backbone, check_backbone_options, feature_dim
from mtml.nn.builders import build_multitask_model
from mtml.nn.conv import Conv4, ResNet12
from mtml.nn.factory import ARCHITECTURES, build_cgc, build_cross_stitch, build_hps, build_mmoe, build_model, build_ple
from mtml.nn.model import MultiTaskModel
from mtml.nn.text import SentenceEncoder, build_text_model

__all__ = [
    "ARCHITECTURES", "BACKBONES", "ColumnModel", "Conv4", "CrossStitchTrunk", "ExtractionTrunk", "MMoETrunk",
    "MultiTaskModel", "ResNet12", "SentenceEncoder", "build_backbone", "build_cgc", "build_cross_stitch",
    "build_hps", "build_mmoe", "build_model", "build_multitask_model", "build_ple", "build_text_model",
    "check_backbone_options", "feature_dim", "mlp",
]
