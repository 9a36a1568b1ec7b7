"""Neural-network pieces: the multi-task model, builders for trunks, heads and stems, and architectures."""

from mtml.nn._architectures import ColumnModel, CrossStitchTrunk, ExtractionTrunk, MMoETrunk
from mtml.nn._backbones import BACKBONES, build_backbone, check_backbone_options, feature_dim
from mtml.nn._builders import build_multitask_model
from mtml.nn._conv import Conv4, ResNet12
from mtml.nn._dselect_k import DSelectKTrunk
from mtml.nn._factory import (
    ARCHITECTURES,
    build_cgc,
    build_cross_stitch,
    build_dselect_k,
    build_hps,
    build_mmoe,
    build_model,
    build_mtan,
    build_ple,
)
from mtml.nn._hierarchical import HierarchicalHeads, HierarchicalModel, build_hierarchical
from mtml.nn._keras import KerasModule, from_keras
from mtml.nn._minilm import load_sentence_encoder, minilm_dir, minilm_model
from mtml.nn._mlp import ACTIVATIONS, mlp
from mtml.nn._model import MultiTaskModel
from mtml.nn._mtan import MTANMLPTrunk, MTANTrunk
from mtml.nn._text import SentenceEncoder, build_text_model

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "BACKBONES",
    "ColumnModel",
    "Conv4",
    "CrossStitchTrunk",
    "DSelectKTrunk",
    "ExtractionTrunk",
    "HierarchicalHeads",
    "HierarchicalModel",
    "KerasModule",
    "MMoETrunk",
    "MTANMLPTrunk",
    "MTANTrunk",
    "MultiTaskModel",
    "ResNet12",
    "SentenceEncoder",
    "build_backbone",
    "build_cgc",
    "build_cross_stitch",
    "build_dselect_k",
    "build_hierarchical",
    "build_hps",
    "build_mmoe",
    "build_model",
    "build_mtan",
    "build_multitask_model",
    "build_ple",
    "build_text_model",
    "check_backbone_options",
    "feature_dim",
    "from_keras",
    "load_sentence_encoder",
    "minilm_dir",
    "minilm_model",
    "mlp",
]
