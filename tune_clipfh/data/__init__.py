"""Data layer: synthetic data, dataset preparation (manifests), image store, samplers."""

from .errors import DataError
from .hands11k import prepare_11k
from .hd import prepare_hd
from .manifest import (
    IDENTITY_SETS,
    UPSTREAM_ALL_TRAIN,
    VAL_HELD_OUT,
    Manifest,
    Sample,
    Split,
    load_manifest,
    save_manifest,
    upstream_training_view,
)
from .sampler import PKSampler, RandomBatchSampler
from .store import CLIP_MEAN, CLIP_STD, Augment, ImageStore, augment, normalize
from .synth import synthesize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IDENTITY_SETS",
    "UPSTREAM_ALL_TRAIN",
    "VAL_HELD_OUT",
    "Augment",
    "DataError",
    "ImageStore",
    "Manifest",
    "PKSampler",
    "RandomBatchSampler",
    "Sample",
    "Split",
    "augment",
    "load_manifest",
    "normalize",
    "prepare_11k",
    "prepare_hd",
    "save_manifest",
    "synthesize",
    "upstream_training_view",
]
