"""Re-identification heads on top of the image features: BNNeck, then an ID classifier.

Every parameter here is meant to be optimised and every head output to enter the loss
(upstream left them out of the optimizer and used ArcFace only for logging: B4, B5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..names import ID_HEADS


class BNNeck(nn.BatchNorm1d):
    """BatchNorm1d with weight 1, bias 0 and the bias frozen (BoT / CLIP-ReID)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.bias.requires_grad_(False)


class LinearHead(nn.Linear):
    """Bias-free linear classifier with weights ~ N(0, 0.001) (BoT / CLIP-ReID)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__(dim, classes, bias=False)
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; ``labels`` is ignored (the signature is shared with :class:`ArcFaceHead`)."""
        return super().forward(features)


class ArcFaceHead(nn.Module):
    """Additive angular margin (ArcFace, easy_margin off).

    cos t = normalize(f) . normalize(W_j); for the target class, where cos t > cos(pi - m), the
    logit uses cos(t + m) = cos t cos m - sin t sin m, elsewhere the fallback cos t - m sin(pi - m)
    that keeps it monotonic in t. logits = s * (target ? margin term : cos t). Without labels
    (evaluation) the logits are the plain scaled cosines s * cos t.
    """

    def __init__(self, dim: int, classes: int, scale: float = 30.0, margin: float = 0.5) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"arcface_scale: {scale!r} must be > 0")
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"arcface_margin: {margin!r} is out of range (valid: [0, pi/2))")
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self._cos_m = math.cos(margin)
        self._sin_m = math.sin(margin)
        self._threshold = math.cos(math.pi - margin)
        self._fallback = math.sin(math.pi - margin) * margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))
        if labels is None:
            return self.scale * cosine
        # the floor keeps the sqrt's gradient finite where cos t reaches +-1
        sine = (1.0 - cosine.square()).clamp(min=1e-12, max=1.0).sqrt()
        with_margin = cosine * self._cos_m - sine * self._sin_m
        with_margin = torch.where(cosine > self._threshold, with_margin,
                                  cosine - self._fallback)
        target = F.one_hot(labels, cosine.shape[1]).bool()
        return self.scale * torch.where(target, with_margin, cosine)


class ReIDHead(nn.Module):
    """BNNeck followed by the ID head; ``forward`` -> (BN features, logits)."""

    def __init__(self, dim: int, classes: int, id_head: str = "linear",
                 arcface_scale: float = 30.0, arcface_margin: float = 0.5) -> None:
        super().__init__()
        if id_head not in ID_HEADS:
            raise ValueError(f"id_head: {id_head!r} is not valid (valid: {', '.join(ID_HEADS)})")
        self.bnneck = BNNeck(dim)
        self.classifier: LinearHead | ArcFaceHead = (
            LinearHead(dim, classes) if id_head == "linear"
            else ArcFaceHead(dim, classes, scale=arcface_scale, margin=arcface_margin))

    def forward(self, features: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bn_features = self.bnneck(features)
        return bn_features, self.classifier(bn_features, labels)
