"""Line 9, learning-rate transfer: the measurement behind each backbone's ``tiny_lr_scale``.

A version states rates for an 86 M-parameter pretrained model. The tiny profile keeps them and
multiplies the pretrained towers' rates by one factor per backbone, chosen so that fine-tuning
moves the tiny weights by the same relative amount per epoch as the full ones:

    scale = (full change per step x full steps per epoch) / (tiny change per step x tiny steps)

where a "change per step" is ``||w_t - w_(t-1)|| / ||w_0||`` over the image tower's weight
matrices (gains and biases left out: they start at 1 and 0), measured with AdamW at one rate
on real synthetic hand images with an ID loss. Under Adam every weight moves by about the rate
per step whatever its size, so the change is about ``rate / rms(w)``: narrow towers have larger
weights and move less, relatively. Steps per epoch: 11k dorsal-right trains on 890 images in
batches of 32 (28 steps); the embedded dataset on 640 (20 steps).

The full model comes with the weights ``pretrained: openai`` finds offline, else random init
(open_clip's CLIP initialisation); the row says which, since trained weights may have another
scale.
"""

from __future__ import annotations

import math
import statistics

from ..model.registry import THESIS_BACKBONES
from .harness import Context, Row, make_row

FULL_STEPS_PER_EPOCH = math.ceil(890 / 32)  # spec 1.1: 11k dorsal-right, 890 training images
TINY_STEPS_PER_EPOCH = math.ceil(64 * 10 / 32)  # the embedded dataset: 64 x 10 images
MEASURED_RATE = 1e-5
TOLERANCE_PERCENT = 25.0  # the registry holds the measurement, rounded; steps add noise


def relative_change_per_step(backbone_key: str, profile: str, pretrained: str, steps: int,
                             batch_size: int = 16, rate: float = MEASURED_RATE) -> float:
    """Mean ``||w_t - w_(t-1)|| / ||w_0||`` of the image tower's matrices over ``steps`` AdamW
    steps at ``rate`` (ID cross-entropy of 8 synthetic identities, seeded)."""
    import torch
    import torch.nn.functional as F

    from ..data.store import to_float
    from ..model.backbone import create_backbone
    from ..model.pretrain import Recipe, build_corpus

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = create_backbone(backbone_key, profile, pretrained)
        size = backbone.spec.input_size(profile)
        # identities of the pretraining namespace, seed 1: not the pretraining corpus itself
        corpus = build_corpus(Recipe(identities=8, images_per_identity=4), seed=1,
                              image_size=size)
        labels = torch.unique(torch.from_numpy(corpus.identities.astype(int)),
                              return_inverse=True)[1]
        visual = backbone.clip.visual.requires_grad_(True).train()
        matrices = [p for p in visual.parameters() if p.ndim >= 2]
        head = torch.nn.Linear(backbone.encode_image(to_float(corpus.pixels[:2])).shape[1], 8)
        optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=rate,
                                      weight_decay=0.0)
        start = torch.cat([p.detach().flatten() for p in matrices])
        previous, changes = start.clone(), []
        order = torch.Generator().manual_seed(0)
        for _ in range(steps):
            rows = torch.randperm(len(labels), generator=order)[:batch_size]
            features = F.normalize(backbone.encode_image(to_float(corpus.pixels[rows])), dim=-1)
            loss = F.cross_entropy(head(features * 10), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            now = torch.cat([p.detach().flatten() for p in matrices])
            changes.append(((now - previous).norm() / start.norm()).item())
            previous = now
    return statistics.mean(changes)


def line_lr_transfer(ctx: Context, backbones: tuple[str, ...] = THESIS_BACKBONES) -> list[Row]:
    """Per backbone: the measured scale against the registry's ``tiny_lr_scale``."""
    from ..model.backbone import ModelLoadError
    from ..model.registry import backbone_spec

    steps = ctx.settings.lr_transfer_steps
    rows = []
    for key in backbones:
        try:
            full = relative_change_per_step(key, "full", "openai", steps)
            weights = "OpenAI weights"
        except ModelLoadError:  # offline: CLIP's initialisation stands in for them
            full = relative_change_per_step(key, "full", "none", steps)
            weights = "random init (no OpenAI weights here)"
        tiny = relative_change_per_step(key, "tiny", "synthetic", steps)
        measured = (full * FULL_STEPS_PER_EPOCH) / (tiny * TINY_STEPS_PER_EPOCH)
        registered = backbone_spec(key).tiny_lr_scale
        rows.append(make_row(
            9, f"{key}_scale", f"tiny_lr_scale {key}: registry off the measurement by",
            abs(registered / measured - 1) * 100, "%", ("<=", TOLERANCE_PERCENT),
            f"measured {measured:.2f}, registry {registered}; change per step at "
            f"{MEASURED_RATE:g}: full {full:.2e} ({weights}), tiny {tiny:.2e} (synthetic); "
            f"{FULL_STEPS_PER_EPOCH} vs {TINY_STEPS_PER_EPOCH} steps per epoch; {steps} steps",
            {"measured": measured, "registered": registered, "full_change_per_step": full,
             "tiny_change_per_step": tiny}))
    return rows
