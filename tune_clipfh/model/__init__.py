"""CLIP backbones, per-identity prompt learner and re-identification heads."""

from tune_clipfh.model.backbone import (
    BACKBONES,
    PROFILES,
    ClipBackbone,
    ModelLoadError,
    configure_text_trainable,
    configure_visual_trainable,
    create_backbone,
    image_size_for,
    trainable_parameters_report,
)
from tune_clipfh.model.heads import ArcFaceHead, BNNeck, LinearHead, ReIDHead
from tune_clipfh.model.prompt import DEFAULT_TEMPLATE, PromptLearner

__all__ = [
    "BACKBONES",
    "DEFAULT_TEMPLATE",
    "PROFILES",
    "ArcFaceHead",
    "BNNeck",
    "ClipBackbone",
    "LinearHead",
    "ModelLoadError",
    "PromptLearner",
    "ReIDHead",
    "configure_text_trainable",
    "configure_visual_trainable",
    "create_backbone",
    "image_size_for",
    "trainable_parameters_report",
]
