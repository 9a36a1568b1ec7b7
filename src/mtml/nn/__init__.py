"""Neural-network pieces: the multi-task model, builders for trunks, heads and stems, and architectures."""

from mtml.nn.architectures import ColumnModel, CrossStitchTrunk, ExtractionTrunk, MMoETrunk
from mtml.nn.backbones import BACKBONES, build_backbone, check_backbone_options, feature_dim
from mtml.nn.builders import build_multitask_model, mlp
from mtml.nn.conv import Conv4, ResNet12
from mtml.nn.factory import build_cgc, build_cross_stitch, build_hps, build_mmoe, build_model, build_ple
from mtml.nn.model import MultiTaskModel
from mtml.nn.text import SentenceEncoder, build_text_model
from mtml.registry import Registry

ARCHITECTURES: Registry[MultiTaskModel] = Registry("architecture")
ARCHITECTURES.register("hps", build_hps, help="hard parameter sharing: shared MLP trunk + a head per task "
                       "(Caruana 1997)")
ARCHITECTURES.register("mmoe", build_mmoe, help="multi-gate mixture of experts (Ma et al. KDD 2018)")
ARCHITECTURES.register("cgc", build_cgc, help="customized gate control: shared + task experts (Tang et al. 2020)")
ARCHITECTURES.register("ple", build_ple, help="progressive layered extraction: stacked CGC levels (Tang et al. 2020)")
ARCHITECTURES.register("cross_stitch", build_cross_stitch, help="a column per task mixed by learned cross-stitch "
                       "units (Misra et al. CVPR 2016)")

__all__ = [
    "ARCHITECTURES", "BACKBONES", "ColumnModel", "Conv4", "CrossStitchTrunk", "ExtractionTrunk", "MMoETrunk",
    "MultiTaskModel", "ResNet12", "SentenceEncoder", "build_backbone", "build_cgc", "build_cross_stitch",
    "build_hps", "build_mmoe", "build_model", "build_multitask_model", "build_ple", "build_text_model",
    "check_backbone_options", "feature_dim", "mlp",
]
