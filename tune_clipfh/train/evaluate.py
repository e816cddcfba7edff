"""Validation and test of a run's model: features extracted once per set, ranked per split.

Selection metrics come from held-out training identities (or, as upstream did, from test split
1: the B11 switch); the test ranks image features only over the 10 query/gallery splits (or, as
upstream did, image and constant text fused: the B12 switch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data.loader import BatchLoader
from ..data.prepared import PreparedData
from ..evaluation import (
    evaluate_splits,
    expected_rank1,
    flip_average,
    rank_metrics_from_features,
)
from .parts import ReIDModel
from .precision import Precision

SELECTION_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
EXPECTED_METRICS = ("rank1_expected", "rank1_at_test_size")
"""Rank-1 over every gallery draw of the validation identities, and the same read at the test
gallery's identity count (``evaluation.expected_rank1``): one 16-identity split's Rank-1 moves
about 4 points with the draw of its gallery images alone, and saturates near 90 %."""


class Evaluator:
    def __init__(self, config: RunConfig, data: PreparedData, model: ReIDModel,
                 loader: BatchLoader, precision: Precision):
        self.config = config
        self.data = data
        self.model = model
        self.loader = loader
        self.precision = precision

    @torch.no_grad()
    def extract(self, rows: np.ndarray, feature: str | None = None,
                normalized: bool = True) -> torch.Tensor:
        """L2-normalised features of store rows in eval mode: "raw", "pre_bn", "post_bn" or
        "concat"; ``normalized=False`` feeds [0,1] pixels (upstream train/val inputs, B1)."""
        feature = feature or self.config.eval_feature
        model = self.model
        was_training = model.backbone.training
        model.backbone.eval()
        model.head.eval()
        outputs = []
        batch_size = max(self.config.batch_size, 64)
        for images in self.loader.evaluation(rows, batch_size, normalize=normalized):
            with self.precision.autocast():
                if self.config.eval_flip and feature != "raw":
                    features = flip_average(lambda batch: model.embed(batch, feature), images)
                else:
                    features = model.embed(images, feature)
            outputs.append(features.float())
        model.backbone.train(was_training)
        return F.normalize(torch.cat(outputs), dim=1)

    def validate(self) -> dict[str, float]:
        """Selection metrics: held-out training identities, or test split 1 (B11 switch)."""
        data, cfg = self.data, self.config
        if cfg.select_on == "test_split0":
            rows, ids, split = data.test_rows, data.test_ids, data.test_splits[0]
        else:
            rows, ids, split = data.val_rows, data.val_ids, data.val_split
        features = self.extract(rows, normalized=cfg.train_normalize).cpu()
        result = rank_metrics_from_features(
            features[split.query], features[split.gallery], ids[split.query],
            ids[split.gallery], metric=cfg.eval_metric, ap=cfg.eval_ap)
        metrics = {k: float(result[k]) for k in SELECTION_METRICS}
        val_identities = len(set(ids[split.gallery].tolist()))
        test_identities = len(data.test_splits[0].gallery) if data.test_splits else 0
        for name, size in zip(EXPECTED_METRICS, (val_identities, test_identities), strict=True):
            metrics[name] = expected_rank1(features, ids, size, cfg.eval_metric) \
                if size >= 2 and val_identities >= 2 else float("nan")
        return metrics

    def test(self) -> dict[str, Any]:
        """The 10-split test: features of every test image extracted once, ranked per split."""
        cfg = self.config
        features = self.extract(self.data.test_rows).cpu()
        metric = cfg.eval_metric
        if cfg.eval_fusion == "sos_text":
            features, metric = self._fuse_sos_text(features), "dot"
        return self.rank_test(features, metric)

    def rank_test(self, features: torch.Tensor, metric: str) -> dict[str, Any]:
        """The 10 splits ranked on given features of the test images (one row each)."""
        splits = [(s.query, s.gallery) for s in self.data.test_splits]
        return evaluate_splits(features, self.data.test_ids, splits, metric=metric,
                               ap=self.config.eval_ap)

    @torch.no_grad()
    def _fuse_sos_text(self, features: torch.Tensor) -> torch.Tensor:
        """Upstream's test features (B12): (image + SOS text feature) / 2, not re-normalised.
        The SOS output of the causal text transformer is the same for every identity."""
        prompts = self.model.prompts
        pool = prompts.pool
        prompts.pool = "sos"
        device = next(prompts.parameters()).device
        text = prompts(torch.zeros(1, dtype=torch.long, device=device)).float().cpu()
        prompts.pool = pool
        return (features + F.normalize(text, dim=1)) / 2
