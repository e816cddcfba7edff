"""Losses of the two CLIP-ReID stages, as small functions (and one module with parameters).

Stage 1 (prompts): :func:`supcon_loss` image->text and text->image.
Stage 2 (image encoder): :func:`id_loss` on the ID head, :func:`batch_hard_triplet`,
:func:`image_to_text_ce` against the frozen per-identity text features, :class:`CenterLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supcon_loss(anchors: torch.Tensor, contrasts: torch.Tensor, anchor_labels: torch.Tensor,
                contrast_labels: torch.Tensor, logit_scale: float,
                exclude_own_pair: bool = False) -> torch.Tensor:
    """Cross-modal supervised contrastive loss (CLIP-ReID stage 1).

    With a = normalize(anchors), c = normalize(contrasts), z_ij = logit_scale * a_i . c_j and
    P(i) = {j : y_j = y_i}, which includes the anchor's own image-text pair (B7):

        log p_ij = z_ij - log sum_k exp z_ik        (max-subtracted log-softmax over contrasts)
        l_i      = -(1 / |P(i)|) sum_{j in P(i)} log p_ij
        L        = mean of l_i over the anchors with |P(i)| > 0

    ``exclude_own_pair=True`` reproduces upstream (square batches where contrast i is anchor
    i's pair): the diagonal leaves both P(i) and the denominator, and anchors left without a
    positive contribute 0 but still count in the mean.
    """
    logits = logit_scale * F.normalize(anchors, dim=-1) @ F.normalize(contrasts, dim=-1).T
    positives = anchor_labels[:, None] == contrast_labels[None, :]
    if exclude_own_pair:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError("exclude_own_pair needs as many contrasts as anchors "
                             f"(got {logits.shape[0]} anchors, {logits.shape[1]} contrasts)")
        own_pair = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        positives = positives & ~own_pair
        logits = logits.masked_fill(own_pair, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~positives, 0.0)
    positive_count = positives.sum(dim=1)
    per_anchor = -log_prob.sum(dim=1) / positive_count.clamp(min=1)
    if exclude_own_pair:
        return per_anchor.mean()
    has_positive = positive_count > 0
    if not bool(has_positive.any()):
        return logits.sum() * 0.0  # no signal, but keep the graph so backward() still works
    return per_anchor[has_positive].mean()


def image_to_text_ce(image_features: torch.Tensor, identity_text_features: torch.Tensor,
                     labels: torch.Tensor, logit_scale: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP-ReID stage-2 image-to-text loss: cross-entropy over every identity,

        logits = logit_scale * normalize(f) @ normalize(T_all).T,   L = CE(logits, y)

    with T_all [identities, dim] the frozen text feature of each identity.
    """
    logits = (logit_scale * F.normalize(image_features, dim=-1)
              @ F.normalize(identity_text_features, dim=-1).T)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def id_loss(logits: torch.Tensor, labels: torch.Tensor,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Identity classification loss: CE(logits, y), optionally label-smoothed."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                       normalize: bool = True) -> torch.Tensor:
    """Batch-hard triplet loss on Euclidean distances (features L2-normalised first by default).

    For each anchor i: d_ap = max over positives j != i of d_ij (the anchor is never its own
    positive), d_an = min over negatives of d_ij, and

        L = mean_i relu(d_ap - d_an + margin)

    over the anchors that have both a positive and a negative in the batch (0 if none does).
    """
    if normalize:
        features = F.normalize(features, dim=-1)
    squared = features.square().sum(dim=1)
    # the floor keeps sqrt's gradient finite for identical features
    distances = (squared[:, None] + squared[None, :] - 2 * features @ features.T)
    distances = distances.clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    own = torch.eye(len(labels), dtype=torch.bool, device=distances.device)
    positives, negatives = same & ~own, ~same
    hardest_positive = distances.masked_fill(~positives, float("-inf")).max(dim=1).values
    hardest_negative = distances.masked_fill(~negatives, float("inf")).min(dim=1).values
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not bool(valid.any()):
        return features.sum() * 0.0  # no triplet, but keep the graph so backward() still works
    return F.relu(hardest_positive[valid] - hardest_negative[valid] + margin).mean()


class CenterLoss(nn.Module):
    """Center loss: one learnable centre per class (randn init),

        L = sum_i ||f_i - c_{y_i}||^2 / 2 / B

    The centres train with their own SGD at ``center_lr``; since the loss enters the total
    weighted by ``center_loss_weight``, call :func:`rescale_center_grads` before that step so
    the centre update does not depend on the weight (BoT / CLIP-ReID; upstream never stepped it:
    B6).
    """

    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(classes, dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (features - self.centers[labels]).square().sum() / 2 / features.shape[0]


def rescale_center_grads(center_loss: CenterLoss, weight: float) -> None:
    """Divide the centres' gradients by the center-loss weight (see :class:`CenterLoss`)."""
    if not weight > 0:
        raise ValueError(f"center_loss_weight: {weight!r} must be > 0 to rescale the centre "
                         f"gradients")
    for param in center_loss.parameters():
        if param.grad is not None:
            param.grad.div_(weight)
