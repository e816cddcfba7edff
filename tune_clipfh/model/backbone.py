"""CLIP backbones from open_clip: one factory, architectures as data; freezing and unfreezing.

The backbones and their two profiles (``full``: the open_clip architecture at 224 px; ``tiny``:
a narrow config with the same block count, for CPUs) are entries of :mod:`.registry`, which
also says each image tower's kind; where the weights come from is :mod:`.weights`.

Every model is built with QuickGELU, the activation the OpenAI weights were trained with, so a
model is the same architecture whether it starts from random init, ``openai`` or a weights file.

A freshly created backbone is entirely frozen; :func:`configure_visual_trainable` and
:func:`configure_text_trainable` opt parts of it into training.
"""

from __future__ import annotations

import os

import open_clip
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..names import UNFREEZE_MODES
from . import open_clip_configs  # noqa: F401  (registers the tiny configs with open_clip)
from .errors import ModelLoadError
from .registry import BackboneSpec, UnknownBackbone, backbone_spec, check_profile
from .weights import create_clip, weights_file

TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final",
              "text_projection")
"""Attributes of open_clip's ``CLIP`` that make up the text tower."""
TOWER_BLOCKS = {"resnet": "ResNet stages layer1..layer4", "vit": "ViT resblocks"}
"""What ``unfreeze_blocks`` counts in each kind of image tower, as error messages say it."""


class ClipBackbone(nn.Module):
    """An open_clip ``CLIP`` model with what the rest of the project needs to know about it.

    Frozen BatchNorm layers (all their parameters frozen) stay in eval mode under ``train()``,
    so their running statistics keep the pretrained values (upstream let them drift, B13).
    """

    def __init__(self, clip: open_clip.CLIP, spec: BackboneSpec, profile: str) -> None:
        super().__init__()
        self.clip = clip
        self.spec = spec
        self.name = spec.key
        self.arch = spec.architecture(profile)
        self.profile = profile
        config = open_clip.get_model_config(self.arch)
        self.image_size: int = config["vision_cfg"]["image_size"]
        self.embed_dim: int = config["embed_dim"]
        # open_clip sizes the tokenizer from the config, so it pads to the model's context length
        self.tokenizer = open_clip.get_tokenizer(self.arch)

    @property
    def visual_blocks(self) -> list[nn.Module]:
        """The blocks ``unfreeze_blocks`` counts: ViT resblocks, or ResNet layer1..layer4."""
        visual = self.clip.visual
        if self.spec.tower == "resnet":
            return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        return list(visual.transformer.resblocks)

    @property
    def visual_head_parameters(self) -> list[nn.Parameter]:
        """The image-tower layers after the last block: ViT ln_post and proj, RN50 attnpool."""
        visual = self.clip.visual
        if self.spec.tower == "resnet":
            return list(visual.attnpool.parameters())
        return [*visual.ln_post.parameters(), visual.proj]

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def text_width(self) -> int:
        return self.clip.transformer.width

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, embed_dim], not normalised."""
        return self.clip.encode_image(images)

    def encode_image_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-projection, projected) image features, not normalised: ViT's pooled token
        after ln_post and after proj; RN50's spatially averaged layer4 map and the attention
        pool's output (CLIP-ReID's two test features)."""
        visual = self.clip.visual
        if self.spec.tower == "resnet":
            x = visual.stem(images)
            for block in self.visual_blocks:
                x = block(x)
            return x.mean(dim=(2, 3)), visual.attnpool(x)
        # open_clip's own forward without the projection: embed, transformer, pool
        pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
        return pooled, pooled @ visual.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def train(self, mode: bool = True) -> ClipBackbone:
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, _BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def _spec(model: str, profile: str) -> BackboneSpec:
    try:
        check_profile(profile)
        return backbone_spec(model)
    except UnknownBackbone as exc:
        raise ModelLoadError(f"model: {exc}") from None


def create_backbone(model: str, profile: str = "full", pretrained: str = "none",
                    cache_dir: str | os.PathLike | None = None) -> ClipBackbone:
    """Build a frozen backbone from the weights ``pretrained`` names (see :mod:`.weights`:
    ``none``, ``openai``, ``synthetic`` or a file path; ``cache_dir`` is where ``openai`` and
    ``synthetic`` weights are looked up and ``synthetic`` ones built)."""
    spec = _spec(model, profile)
    weights = weights_file(spec, profile, pretrained, cache_dir)
    clip = create_clip(spec.architecture(profile), weights)
    clip.requires_grad_(False)
    return ClipBackbone(clip, spec, profile)


def configure_visual_trainable(backbone: ClipBackbone, unfreeze_blocks: int,
                               mode: str = "last_n") -> list[str]:
    """Freeze the image tower, then make trainable:

    * ``last_n``: the last ``unfreeze_blocks`` blocks (ViT resblocks 0..12, ResNet stages 0..4)
      and, when that is at least one, every layer after them (ViT ln_post and proj, RN50
      attnpool): what "unfreeze the top N" means;
    * ``last_n_blocks``: the blocks alone, under a frozen projection (upstream v6+, B13);
    * ``all``: every image-tower parameter, stem and positional embedding included (upstream
      v1-v5).

    Returns the trainable image-tower parameter names (as in ``backbone.clip``).
    """
    if mode not in UNFREEZE_MODES:
        raise ValueError(f"unfreeze_mode: {mode!r} is not valid "
                         f"(valid: {', '.join(UNFREEZE_MODES)})")
    blocks = backbone.visual_blocks
    if not 0 <= unfreeze_blocks <= len(blocks):
        raise ValueError(f"unfreeze_blocks: {unfreeze_blocks} is out of range for "
                         f"{backbone.name} (valid: 0..{len(blocks)} "
                         f"{TOWER_BLOCKS[backbone.spec.tower]})")
    visual = backbone.clip.visual
    visual.requires_grad_(mode == "all")
    if mode != "all":
        for block in blocks[len(blocks) - unfreeze_blocks:]:
            block.requires_grad_(True)
    if mode == "last_n" and unfreeze_blocks > 0:
        for param in backbone.visual_head_parameters:
            param.requires_grad_(True)
    backbone.train(backbone.training)  # BatchNorm layers just frozen go to eval mode
    return [f"visual.{name}" for name, p in visual.named_parameters() if p.requires_grad]


def configure_text_trainable(backbone: ClipBackbone, trainable: bool) -> list[str]:
    """Freeze (default, CLIP-ReID; B10) or train the whole text tower; ``logit_scale`` stays
    frozen. Returns the trainable text-tower parameter names."""
    names = []
    for name, param in backbone.clip.named_parameters():
        if name.split(".")[0] in TEXT_TOWER:
            param.requires_grad_(trainable)
            if trainable:
                names.append(name)
    return names
