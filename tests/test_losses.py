import os

os.environ["HF_HUB_OFFLINE"] = "1"  # weights can never be downloaded in tests

import math

import pytest
import torch
import torch.nn.functional as F

from tune_clipfh.losses import (
    CenterLoss,
    batch_hard_triplet,
    id_loss,
    image_to_text_ce,
    rescale_center_grads,
    supcon_loss,
)
from tune_clipfh.model.heads import ArcFaceHead

SCALE = 1 / 0.07


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# --- SupCon ---------------------------------------------------------------------------------


def test_supcon_is_positive_and_falls_when_anchors_align_with_their_positives():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    prototypes = F.one_hot(labels, 8).float()
    random_images = torch.randn(6, 8)
    aligned_images = prototypes + 0.01 * torch.randn(6, 8)
    random_loss = supcon_loss(random_images, prototypes, labels, labels, SCALE)
    aligned_loss = supcon_loss(aligned_images, prototypes, labels, labels, SCALE)
    assert random_loss > 0
    assert aligned_loss < random_loss


def test_supcon_keeps_the_own_pair_as_a_positive():
    # every identity once: the own image-text pair is the only positive
    anchors, contrasts, labels = torch.randn(4, 8), torch.randn(4, 8), torch.arange(4)
    loss = supcon_loss(anchors, contrasts, labels, labels, SCALE)
    logits = SCALE * F.normalize(anchors, dim=-1) @ F.normalize(contrasts, dim=-1).T
    assert loss > 0
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    upstream = supcon_loss(anchors, contrasts, labels, labels, SCALE, exclude_own_pair=True)
    assert upstream == 0


def test_supcon_upstream_mode_matches_its_formula():
    anchors, contrasts = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([0, 0, 1])
    loss = supcon_loss(anchors, contrasts, labels, labels, SCALE, exclude_own_pair=True)
    z = SCALE * F.normalize(anchors, dim=-1) @ F.normalize(contrasts, dim=-1).T
    # anchor 0: positive 1, denominator {1, 2}; anchor 1: positive 0, denominator {0, 2};
    # anchor 2: no positive, contributes 0 but counts
    first = -(z[0, 1] - torch.logsumexp(z[0, [1, 2]], dim=0))
    second = -(z[1, 0] - torch.logsumexp(z[1, [0, 2]], dim=0))
    assert torch.allclose(loss, (first + second) / 3)


def test_supcon_averages_only_over_anchors_with_positives():
    anchors, contrasts = torch.randn(2, 5), torch.randn(3, 5)
    anchor_labels, contrast_labels = torch.tensor([0, 7]), torch.tensor([0, 0, 1])
    loss = supcon_loss(anchors, contrasts, anchor_labels, contrast_labels, SCALE)
    z = SCALE * F.normalize(anchors, dim=-1) @ F.normalize(contrasts, dim=-1).T
    log_prob = z[0] - torch.logsumexp(z[0], dim=0)
    assert torch.allclose(loss, -(log_prob[0] + log_prob[1]) / 2)


def test_supcon_without_any_positive_is_zero_and_backpropagates():
    anchors = torch.randn(2, 4, requires_grad=True)
    loss = supcon_loss(anchors, torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([2, 3]),
                       SCALE)
    loss.backward()
    assert loss == 0 and anchors.grad is not None


# --- stage-2 cross-entropies ----------------------------------------------------------------


def test_image_to_text_ce_matches_cross_entropy_on_hand_built_logits():
    images, texts = torch.randn(5, 8), torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3, 1])
    logits = torch.stack([
        torch.stack([SCALE * torch.dot(i / i.norm(), t / t.norm()) for t in texts])
        for i in images])
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        actual = image_to_text_ce(images, texts, labels, SCALE, label_smoothing=smoothing)
        assert torch.allclose(actual, expected, atol=1e-5)


def test_label_smoothing_raises_the_id_loss_of_confident_correct_logits():
    logits, labels = 20 * torch.eye(4), torch.arange(4)
    assert id_loss(logits, labels, label_smoothing=0.1) > id_loss(logits, labels)
    assert torch.allclose(id_loss(logits, labels), F.cross_entropy(logits, labels))


# --- triplet --------------------------------------------------------------------------------


def test_triplet_is_zero_for_classes_separated_beyond_the_margin():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(features, labels, margin=0.3, normalize=False) == 0


def test_triplet_is_positive_for_overlapping_classes():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.1], [1.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(features, labels, margin=0.3, normalize=False) > 0
    assert batch_hard_triplet(torch.randn(8, 16), labels.repeat(2)) > 0


def test_triplet_never_takes_the_anchor_as_its_own_positive():
    # anchor 0 is alone in its class: with itself as positive (d_ap = 0) it would add
    # relu(0 - 0.2 + 0.3) = 0.1; it must be skipped instead
    features = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.3, 0.0]])
    labels = torch.tensor([0, 1, 1])
    # anchors 1 and 2: d_ap = 0.1, d_an = 0.2 and 0.3
    expected = (F.relu(torch.tensor(0.1 - 0.2 + 0.3)) + F.relu(torch.tensor(0.1 - 0.3 + 0.3))) / 2
    loss = batch_hard_triplet(features, labels, margin=0.3, normalize=False)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_triplet_without_a_valid_anchor_is_zero_and_backpropagates():
    features = torch.randn(3, 4, requires_grad=True)
    loss = batch_hard_triplet(features, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss == 0 and features.grad is not None


# --- center loss ----------------------------------------------------------------------------


def test_center_loss_is_zero_at_the_centres_and_its_centres_learn():
    center = CenterLoss(classes=3, dim=4)
    labels = torch.tensor([0, 2])
    assert center(center.centers[labels].detach(), labels) == 0

    features = torch.randn(2, 4)
    expected = ((features - center.centers[labels]) ** 2).sum() / 2 / 2
    loss = center(features, labels)
    assert torch.allclose(loss, expected)
    weight = 0.0005
    (weight * loss).backward()
    rescale_center_grads(center, weight)
    assert torch.allclose(center.centers.grad[labels], (center.centers[labels] - features) / 2)
    before = center.centers.detach().clone()
    torch.optim.SGD(center.parameters(), lr=0.5).step()
    assert not torch.equal(center.centers[labels], before[labels])
    assert torch.equal(center.centers[1], before[1])
    assert center(features, labels) < loss


def test_rescale_center_grads_needs_a_positive_weight():
    with pytest.raises(ValueError, match="center_loss_weight"):
        rescale_center_grads(CenterLoss(2, 2), 0.0)


# --- ArcFace --------------------------------------------------------------------------------


def arcface_loss(scale, margin, features, labels, weight):
    head = ArcFaceHead(features.shape[1], weight.shape[0], scale=scale, margin=margin)
    with torch.no_grad():
        head.weight.copy_(weight)
    return F.cross_entropy(head(features, labels), labels)


def test_arcface_margin_penalises_the_target_logit():
    features, labels, weight = torch.randn(8, 16), torch.arange(8) % 4, torch.randn(4, 16)
    without = arcface_loss(30.0, 0.0, features, labels, weight)
    with_margin = arcface_loss(30.0, 0.5, features, labels, weight)
    assert with_margin > without
    assert arcface_loss(30.0, 0.3, features, labels, weight) != with_margin
    assert arcface_loss(20.0, 0.5, features, labels, weight) != with_margin


def test_arcface_logits_follow_the_formula():
    head = ArcFaceHead(2, 3, scale=10.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.1]]))
    features = torch.tensor([[1.0, 1.0], [1.0, 0.05]])
    cosine = F.normalize(features, dim=-1) @ F.normalize(head.weight, dim=-1).T
    assert torch.allclose(head(features), 10 * cosine)  # evaluation: no margin
    logits = head(features, torch.tensor([0, 2]))
    # sample 0, target 0 (t = 45 degrees): cos(t + m)
    assert torch.isclose(logits[0, 0], 10 * torch.cos(torch.tensor(math.pi / 4 + 0.5)))
    # sample 1, target 2 (cos t ~ -1 < cos(pi - m)): fallback cos t - m sin(pi - m)
    fallback = cosine[1, 2] - math.sin(math.pi - 0.5) * 0.5
    assert torch.isclose(logits[1, 2], 10 * fallback)
    # non-target logits are the plain scaled cosines
    assert torch.allclose(logits[0, 1:], 10 * cosine[0, 1:])
    assert torch.allclose(logits[1, :2], 10 * cosine[1, :2])


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"margin": math.pi / 2}, "arcface_margin"),
    ({"margin": -0.1}, "arcface_margin"),
    ({"scale": 0.0}, "arcface_scale"),
])
def test_arcface_rejects_invalid_settings(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ArcFaceHead(4, 2, **kwargs)


# --- the loss table ---------------------------------------------------------------------------

def test_loss_table_rows_name_real_knobs_and_unique_columns():
    from tune_clipfh.config import FIELDS, RunConfig
    from tune_clipfh.loss_table import LOSS_TABLE, loss_columns

    defaults = RunConfig()
    for term in LOSS_TABLE:
        assert term.toggle in FIELDS and isinstance(getattr(defaults, term.toggle), bool)
        assert term.weight in FIELDS and isinstance(getattr(defaults, term.weight), float)
    columns = [column for column, _, _ in loss_columns()]
    assert len(columns) == len(set(columns)) == len(LOSS_TABLE) + 2


def test_weighted_terms_are_the_active_rows_times_their_weights():
    from tune_clipfh.config import build_config
    from tune_clipfh.loss_table import LossInputs, weighted_terms
    from tune_clipfh.losses import CenterLoss

    config = build_config({"loss_use_triplet": False, "loss_use_center": True,
                           "weight_id": 2.0, "center_loss_weight": 0.5}, "test").config
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1])
    features = torch.randn(4, 8)
    inputs = LossInputs(config, labels, 10.0, features=features, bn_features=features,
                        logits=torch.randn(4, 2), identity_text=torch.randn(2, 8),
                        states={"center": CenterLoss(2, 8)})
    terms = weighted_terms(config, "image", inputs)
    assert set(terms) == {"loss_id", "loss_center", "loss_i2t"}
    assert float(terms["loss_id"].detach()) == pytest.approx(2.0 * float(F.cross_entropy(inputs.logits, labels)))
    assert float(terms["loss_center"].detach()) == pytest.approx(
        0.5 * float(inputs.states["center"](features, labels).detach()))
    image_only = build_config({"stage_mode": "image_only"}, "test").config
    assert "loss_i2t" not in weighted_terms(image_only, "image", inputs)  # needs stage-1 prompts


def test_a_stage_with_every_loss_off_is_refused_naming_the_toggles():
    from tune_clipfh.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="loss_use_id.*every image-stage loss is off "
                       r"\(loss_use_id, loss_use_triplet, loss_use_center, loss_use_i2t\)"):
        build_config({"loss_use_id": False, "loss_use_triplet": False,
                      "loss_use_center": False, "loss_use_i2t": False}, "test")
