"""Per-identity learnable prompts and their CLIP text features (CLIP-ReID stage 1).

Each identity owns ``n_ctx`` learnable token embeddings that take the place of the ``{ctx}``
placeholder in a template, e.g. ``"A photo of a {ctx} {aspect} hand."`` becomes
``<SOS> a photo of a [c1] .. [cn] dorsal right hand . <EOT> <pad>...``. Because the context
sits inside the template, the EOT token survives (upstream overwrote it: B3), and the text
feature is read at the EOT position and mapped by ``text_projection`` (B2), as in CLIP-ReID.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tune_clipfh.model.backbone import ClipBackbone
from tune_clipfh.names import ASPECT_PHRASES, CTX_PLACEHOLDER, TEXT_POOLS

DEFAULT_TEMPLATE = "A photo of a {ctx} {aspect} hand."
_PLACEHOLDER_WORD = "X"
_PLACEHOLDER_FIELDS = {"ctx", "aspect"}


def aspect_phrase(aspect: str | None) -> str:
    """Readable words for a hand aspect: ``dorsal_r`` -> ``dorsal right``; other text as is."""
    if aspect is None:
        return ""
    return ASPECT_PHRASES.get(aspect, aspect.replace("_", " "))


class PromptLearner(nn.Module):
    """Learnable per-identity context inside one or more prompt templates.

    The backbone is referenced, not owned: its parameters are not this module's parameters, so
    optimizer groups stay separate (move both to the same device). With several templates
    (``template`` plus ``templates``) each template's features are L2-normalised and then
    averaged; with one template the features are returned as CLIP computes them (unnormalised).

    ``pool`` picks the token whose output becomes the feature: ``eot`` (CLIP, CLIP-ReID), or
    ``sos`` / ``mean`` only to reproduce upstream (B2): under the causal mask the SOS output
    does not depend on the context, so every identity gets the same feature.
    """

    def __init__(self, backbone: ClipBackbone, identity_count: int, n_ctx: int = 4,
                 template: str = DEFAULT_TEMPLATE, templates: Sequence[str] | None = None,
                 ctx_init: str | None = None, aspect: str | None = None,
                 pool: str = "eot") -> None:
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ValueError(f"text_pool: {pool!r} is not valid "
                             f"(valid: {', '.join(TEXT_POOLS)})")
        if identity_count < 1 or n_ctx < 1:
            raise ValueError(f"identity_count ({identity_count}) and n_ctx ({n_ctx}) must be >= 1")
        self._backbone = (backbone,)  # a tuple keeps the backbone out of this module's children
        self.identity_count = identity_count
        self.n_ctx = n_ctx
        self.pool = pool
        self.templates = [template, *(templates or [])]

        keys = ["prompt_template"] + ["prompt_template_list"] * len(templates or [])
        tokenized = [self._tokenize(t, key, aspect)
                     for t, key in zip(self.templates, keys, strict=True)]
        self.ctx_starts = [start for _, start in tokenized]
        ids = torch.stack([ids for ids, _ in tokenized]).to(self._token_embedding.weight.device)
        with torch.no_grad():
            embeddings = self._token_embedding(ids)
        # the template tokens around the context are frozen (CLIP-ReID); rebuilt, never saved
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_embeddings", embeddings, persistent=False)
        # CLIP convention: the EOT token has the largest id in the vocabulary
        self.register_buffer("eot_index", ids.argmax(dim=-1), persistent=False)

        context = torch.empty(identity_count, n_ctx, backbone.text_width,
                              device=embeddings.device, dtype=embeddings.dtype)
        if ctx_init is None:
            nn.init.normal_(context, std=0.02)
        else:
            context.copy_(self._ctx_init_embeddings(ctx_init))
        self.context = nn.Parameter(context)

    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone[0]

    @property
    def _token_embedding(self) -> nn.Embedding:
        return self.backbone.clip.token_embedding

    def _tokenize(self, template: str, key: str, aspect: str | None) -> tuple[torch.Tensor, int]:
        """Token ids of the template with ``n_ctx`` placeholder words, and where they start.

        The placeholders always stand as words of their own (``a{ctx}hand`` reads ``a X .. X hand``).
        """
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"{key}: {template!r} is not a valid template ({exc})") from exc
        if template.count(CTX_PLACEHOLDER) != 1:
            raise ValueError(f"{key}: {template!r} must contain the identity placeholder "
                             f"{CTX_PLACEHOLDER} exactly once")
        if unknown := fields - _PLACEHOLDER_FIELDS:
            raise ValueError(f"{key}: {template!r} has unknown placeholders "
                             f"{sorted(unknown)} (valid: {{ctx}}, {{aspect}})")
        tokenizer = self.backbone.tokenizer
        words = template.replace("{aspect}", aspect_phrase(aspect))
        before, after = words.split(CTX_PLACEHOLDER)
        text = " ".join(f"{before} {' '.join([_PLACEHOLDER_WORD] * self.n_ctx)} {after}".split())
        length = len(tokenizer.encode(text)) + 2  # with SOS and EOT
        if length > self.backbone.context_length:
            raise ValueError(f"{key}: {template!r} with n_ctx={self.n_ctx} needs {length} tokens "
                             f"but the text encoder holds {self.backbone.context_length}: "
                             f"shorten the template or lower n_ctx")
        # CLIP's BPE works word by word, so the words before the placeholders tokenize alike
        # alone and in the prompt; the context starts after them and SOS
        return tokenizer([text])[0], 1 + len(tokenizer.encode(before))

    def _ctx_init_embeddings(self, ctx_init: str) -> torch.Tensor:
        ids = self.backbone.tokenizer.encode(ctx_init)
        if len(ids) != self.n_ctx:
            raise ValueError(f"ctx_init: {ctx_init!r} is {len(ids)} tokens but n_ctx is "
                             f"{self.n_ctx}; they must match")
        with torch.no_grad():
            return self._token_embedding(
                torch.tensor(ids, device=self._token_embedding.weight.device))

    def prompt_embeddings(self, labels: torch.Tensor, template_index: int = 0) -> torch.Tensor:
        """Token embeddings [B, context_length, width] of one template for ``labels``."""
        start = self.ctx_starts[template_index]
        template = self.token_embeddings[template_index].expand(labels.shape[0], -1, -1)
        return torch.cat([template[:, :start], self.context[labels],
                          template[:, start + self.n_ctx:]], dim=1)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Text features [B, embed_dim] of the identities ``labels``."""
        features = [self._encode(self.prompt_embeddings(labels, t), self.eot_index[t])
                    for t in range(len(self.templates))]
        if len(features) == 1:
            return features[0]
        return torch.stack([F.normalize(f, dim=-1) for f in features]).mean(dim=0)

    def _encode(self, prompts: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """``CLIP.encode_text`` with given token embeddings (open_clip's batch-first text
        transformer and its causal mask), pooled per ``self.pool``, then ``text_projection``."""
        clip = self.backbone.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = prompts.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        if self.pool == "eot":
            x = x[:, eot_index]
        elif self.pool == "sos":
            x = x[:, 0]
        else:  # mean over every position, padding included, as upstream's prompt stage did
            x = x.mean(dim=1)
        if isinstance(clip.text_projection, nn.Linear):
            return clip.text_projection(x)
        return x @ clip.text_projection

    @torch.no_grad()
    def all_identity_features(self, batch_size: int = 256) -> torch.Tensor:
        """Text features [identity_count, embed_dim] of every identity, without gradients
        (stage 2 uses them frozen)."""
        labels = torch.arange(self.identity_count, device=self.context.device)
        return torch.cat([self(chunk) for chunk in labels.split(batch_size)])
