"""The trained parts of one run, built from its config: backbone, prompts, heads, and the
parameters of the stateful losses (the centres)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..loss_table import stateful_terms
from ..model.backbone import ClipBackbone, configure_text_trainable, create_backbone
from ..model.heads import LinearHead, ReIDHead
from ..model.prompt import PromptLearner


class ReIDModel(nn.Module):
    """CLIP backbone + per-identity prompts + BNNeck/ID head + one part per stateful loss row
    (``center``: the centre loss's centres), named after the row.

    ``loss_head`` exists only to reproduce upstream v3+, whose ID loss came from an extra
    linear classifier while the ArcFace head only logged (B4).
    """

    def __init__(self, config: RunConfig, identity_count: int, aspect: str):
        super().__init__()
        self.backbone: ClipBackbone = create_backbone(
            config.model, config.profile, config.resolved_pretrained, cache_dir=config.cache_dir)
        self.prompts = PromptLearner(
            self.backbone, identity_count, n_ctx=config.n_ctx, template=config.prompt_template,
            templates=config.prompt_template_list, ctx_init=config.ctx_init, aspect=aspect)
        dim = self.backbone.embed_dim
        self.head = ReIDHead(dim, identity_count, id_head=config.id_head,
                             arcface_scale=config.arcface_scale,
                             arcface_margin=config.arcface_margin)
        self.loss_state_names = tuple(term.name for term in stateful_terms())
        for term in stateful_terms():
            if hasattr(self, term.name) or term.name == "loss_head":  # loss_head comes next
                raise ValueError(f"loss row {term.name!r}: the model has a part of that name "
                                 f"already; rename the row")
            self.add_module(term.name, term.state(identity_count, dim))
        self.loss_head = (LinearHead(dim, identity_count)
                          if config.id_loss_head == "linear" and config.id_head == "arcface"
                          else None)
        configure_text_trainable(self.backbone, not config.freeze_text_encoder)
        # Frozen CLIP temperature: the scale CLIP itself compares images and texts at.
        self.logit_scale = float(self.backbone.clip.logit_scale.detach().exp().clamp(max=100))

    @property
    def part_names(self) -> tuple[str, ...]:
        """The parts a checkpoint holds, each with its own state dict."""
        return ("backbone", "prompts", "head", *self.loss_state_names, "loss_head")

    def loss_states(self) -> dict[str, nn.Module]:
        """Stateful loss row name -> the module holding its parameters."""
        return {name: getattr(self, name) for name in self.loss_state_names}

    def text_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.clip.named_parameters()
                if not n.startswith("visual.") and n != "logit_scale"]

    def head_parameters(self) -> list[nn.Parameter]:
        heads = list(self.head.parameters())
        if self.loss_head is not None:
            heads += list(self.loss_head.parameters())
        return heads

    def id_logits(self, bn_features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The logits the ID loss sees: the ID head's, or upstream's extra linear head's (B4)."""
        return logits if self.loss_head is None else self.loss_head(bn_features)

    def embed(self, images: torch.Tensor, feature: str) -> torch.Tensor:
        """Retrieval features in fp32, not normalised (``concat`` normalises each half)."""
        if feature == "concat":
            pre, projected = self.backbone.encode_image_parts(images)
            return torch.cat([F.normalize(pre.float(), dim=1),
                              F.normalize(projected.float(), dim=1)], dim=1)
        features = self.backbone.encode_image(images).float()
        if feature == "post_bn":
            with torch.autocast(device_type=features.device.type, enabled=False):
                features = self.head.bnneck(features)
        return features

    def part_state(self, copy_tensors: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """One state dict per part (the checkpoint format); ``copy_tensors`` takes a real
        snapshot, not views of the live weights (B9)."""
        state = {name: getattr(self, name).state_dict() for name in self.part_names
                 if getattr(self, name) is not None}
        if copy_tensors:
            state = {k: {n: t.detach().clone() for n, t in v.items()} for k, v in state.items()}
        return state

    def load_part_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in self.part_names:
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])
