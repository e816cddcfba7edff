"""The backbones, one entry each: the only place a new backbone is added.

Torch-free on purpose: the config schema, the CLI's choices and the experiment's error messages
read it without importing torch. The model factory, the trainer and the bench read the same
entries.

Each backbone exists in two profiles: ``full`` is the open_clip architecture at its own input
size (OpenAI weights or a local file); ``tiny`` is a narrow config (``configs/<tiny_arch>.json``)
with the same block count, so ``unfreeze_blocks`` means the same in both profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

PROFILES = ("full", "tiny")
TINY_IMAGE_SIZE = 64


@dataclass(frozen=True)
class BackboneSpec:
    key: str
    """Our name, used in configs, versions and trial labels."""
    arch: str
    """open_clip architecture of the full profile."""
    tiny_arch: str
    """open_clip architecture of the tiny profile (a JSON under ``model/configs/``)."""
    blocks: int
    """Image-tower blocks that ``unfreeze_blocks`` counts (ViT resblocks, ResNet stages)."""
    image_size: int
    """Input size of the full profile (square: CLIP's ModifiedResNet accepts nothing else)."""
    channels_last: bool
    """Convolutional towers run faster in channels-last memory format on CUDA."""
    label: str
    """How papers and reports write it."""
    tiny_lr_scale: float
    """The tiny profile trains the pretrained towers (image, text) at the stated rate times this.
    Measured, never tuned: the full model's relative weight change per epoch over the tiny
    one's at an equal rate (AdamW, 11k dorsal-right's 28 steps per epoch against the embedded
    dataset's 20; ``tune-clipfh bench --only 9``), so a version's rate moves the tiny weights
    as far, relatively, as it moves the full ones."""
    thesis: bool
    """The CLIP-FH thesis trained it (``THESIS_BACKBONES``)."""

    def architecture(self, profile: str) -> str:
        return self.arch if profile == "full" else self.tiny_arch

    def input_size(self, profile: str) -> int:
        return self.image_size if profile == "full" else TINY_IMAGE_SIZE


BACKBONES: dict[str, BackboneSpec] = {spec.key: spec for spec in (
    BackboneSpec("vitb16", "ViT-B-16", "tiny-vit", blocks=12, image_size=224,
                 channels_last=False, label="ViT-B/16", tiny_lr_scale=4.5, thesis=True),
    BackboneSpec("rn50", "RN50", "tiny-rn", blocks=4, image_size=224,
                 channels_last=True, label="RN50", tiny_lr_scale=2.3, thesis=True),
    # not measured (no synthetic recipe yet): the ViT-B/16 factor
    BackboneSpec("vitl14", "ViT-L-14", "tiny-vit-l", blocks=24, image_size=224,
                 channels_last=False, label="ViT-L/14", tiny_lr_scale=4.5, thesis=False),
)}
THESIS_BACKBONES = tuple(key for key, spec in BACKBONES.items() if spec.thesis)
"""What ``pretrain --backbone all``, the report's colours and the bench's per-backbone lines
cover."""


class UnknownBackbone(ValueError):
    """A backbone or profile name that is not in the registry."""


def backbone_spec(key: str) -> BackboneSpec:
    if key not in BACKBONES:
        raise UnknownBackbone(f"{key!r} is not a backbone (valid: {', '.join(BACKBONES)})")
    return BACKBONES[key]


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise UnknownBackbone(f"profile {profile!r} is not valid (valid: {', '.join(PROFILES)})")
    return profile
