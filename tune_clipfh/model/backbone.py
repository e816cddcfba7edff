"""CLIP backbones from open_clip: one factory, architectures as data.

The backbones and their two profiles (``full``: the open_clip architecture at 224 px; ``tiny``:
a narrow config with the same block count, for CPUs) are entries of :mod:`.registry`.

Every model is built with QuickGELU, the activation the OpenAI weights were trained with, so a
model is the same architecture whether it starts from random init, ``openai`` or a weights file.

A freshly created backbone is entirely frozen; :func:`configure_visual_trainable` and
:func:`configure_text_trainable` opt parts of it into training.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import open_clip
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.modified_resnet import ModifiedResNet
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError
from ..names import UNFREEZE_MODES
from .registry import BackboneSpec, UnknownBackbone, backbone_spec, check_profile

TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final",
              "text_projection")
"""Attributes of open_clip's ``CLIP`` that make up the text tower."""

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

_HUB_PROBE_TIMEOUT_S = 3.0
_TRUE_ENV_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads HF_HUB_OFFLINE


class ModelLoadError(UserError):
    """A backbone that cannot be built or loaded, explained in one user-facing line."""


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
        if isinstance(visual, ModifiedResNet):
            return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        return list(visual.transformer.resblocks)

    @property
    def visual_head_parameters(self) -> list[nn.Parameter]:
        """The image-tower layers after the last block: ViT ln_post and proj, RN50 attnpool."""
        visual = self.clip.visual
        if isinstance(visual, ModifiedResNet):
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
        if isinstance(visual, ModifiedResNet):
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
    """Build a frozen backbone.

    ``pretrained``: ``none`` (random init), ``openai`` (full profile only; taken from the local
    open_clip / Hugging Face cache, downloaded only when the hub is reachable), ``synthetic``
    (tiny profile only; contrastive pretraining on synthetic captioned hands, built under the
    tune-clipfh cache ``cache_dir`` on first use, see :mod:`.pretrain`) or the path of a
    weights file that open_clip loads (a state dict, a checkpoint with a ``state_dict`` key, or
    an OpenAI TorchScript ``.pt``).
    """
    spec = _spec(model, profile)
    arch = spec.architecture(profile)
    if pretrained == "none":
        weights = None
    elif pretrained == "openai":
        if profile == "tiny":
            raise ModelLoadError("pretrained: openai exists only for the full profile; the tiny "
                                 "profile takes synthetic, none or a path to a weights file")
        weights = _openai_weights_file(arch, cache_dir)
    elif pretrained == "synthetic":
        if profile != "tiny":
            raise ModelLoadError("pretrained: synthetic exists only for the tiny profile; the "
                                 "full profile takes openai, none or a path to a weights file")
        from .pretrain import synthetic_weights  # it imports this module

        weights = synthetic_weights(model, cache_dir)
    else:
        weights = Path(pretrained).expanduser().resolve()
        if not weights.is_file():
            raise ModelLoadError(f"pretrained: weights file {weights} does not exist (valid: "
                                 f"openai, synthetic, none or the path of a weights file)")
    clip = _create_clip(arch, weights)
    clip.requires_grad_(False)
    return ClipBackbone(clip, spec, profile)


def _create_clip(arch: str, weights: Path | None) -> open_clip.CLIP:
    if weights is None:
        return open_clip.create_model(arch, force_quick_gelu=True)
    torchscript = _is_torchscript(weights)
    try:
        with _quiet_torchscript_load():
            # a TorchScript archive cannot be read with weights_only; it is OpenAI's own format
            return open_clip.create_model(arch, pretrained=str(weights), force_quick_gelu=True,
                                          weights_only=not torchscript)
    except Exception as exc:  # open_clip and torch raise many types for a file that does not fit
        raise ModelLoadError(_describe_unfit_weights(weights, arch, torchscript, exc)) from exc


@contextlib.contextmanager
def _quiet_torchscript_load() -> Iterator[None]:
    """Silence torch's notes that it hands a TorchScript archive to the deprecated jit loader."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive")
        warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated")
        yield


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a ``constants.pkl`` record (as torch checks)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _describe_unfit_weights(path: Path, arch: str, torchscript: bool, exc: Exception) -> str:
    """One line naming the file, the architecture and a few mismatched keys or shapes."""
    reason = _first_line(exc)
    try:
        with _quiet_torchscript_load():
            found = open_clip.factory.load_state_dict(str(path), weights_only=not torchscript)
    except Exception:  # the file itself is unreadable: the loader's own error says why
        return f"pretrained: {path} is not a weights file open_clip can read ({reason})"
    expected = open_clip.create_model(arch, force_quick_gelu=True).state_dict()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} file {list(found[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in found and hasattr(found[k], "shape")
              and found[k].shape != expected[k].shape]
    parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
             for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if keys]
    details = "; ".join(parts) or reason
    return f"pretrained: {path} does not fit the {arch} architecture: {details}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _openai_weights_file(arch: str, cache_dir: str | os.PathLike | None) -> str:
    """The local file of the OpenAI weights: cached, or downloaded when the hub is reachable."""
    config = get_pretrained_cfg(arch, "openai")
    cached = _cached_openai_file(config, cache_dir)
    if cached is not None:
        return cached
    how = (f"Download them on a connected machine (open_clip.create_model('{arch}', "
           f"pretrained='openai') caches them) or set pretrained: /path/to/{arch}.pt")
    unavailable = (f"pretrained: openai needs the {arch} OpenAI weights, which are not cached "
                   f"and cannot be downloaded")
    if _hub_offline():
        raise ModelLoadError(f"{unavailable} (offline: HF_HUB_OFFLINE is set). {how}")
    host, port = _hub_address()
    if not _reachable(host, port, _HUB_PROBE_TIMEOUT_S):
        raise ModelLoadError(f"{unavailable} (offline: {host}:{port} is unreachable). {how}")
    try:
        return download_pretrained(config, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # network and hub errors come in many types
        raise ModelLoadError(f"pretrained: downloading the {arch} OpenAI weights failed "
                             f"({_first_line(exc)}). {how}") from exc


def _cached_openai_file(config: dict, cache_dir: str | os.PathLike | None) -> str | None:
    """Where open_clip's downloader would have left the weights: the Hugging Face cache, or the
    OpenAI ``clip`` package's ``~/.cache/clip/<arch>.pt`` (also used by CLIP-ReID and upstream)."""
    repo_id, filename = os.path.split(config["hf_hub"])
    for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    url_file = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(config["url"])
    return str(url_file) if url_file.is_file() else None


def _hub_offline() -> bool:
    # huggingface_hub reads the variable once at import; a later setting must count too
    return (os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_ENV_VALUES
            or hub_constants.HF_HUB_OFFLINE)


def _hub_address() -> tuple[str, int]:
    endpoint = urlsplit(hub_constants.ENDPOINT)
    return endpoint.hostname or "huggingface.co", endpoint.port or 443


def _reachable(host: str, port: int, timeout: float) -> bool:
    """A TCP connection within ``timeout`` seconds; run in a thread because name resolution
    ignores socket timeouts and can hang far longer on a machine without a network."""
    connected = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return connected.is_set()


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
        raise ValueError(f"unfreeze_mode: {mode!r} is not valid (valid: {', '.join(UNFREEZE_MODES)})")
    blocks = backbone.visual_blocks
    if not 0 <= unfreeze_blocks <= len(blocks):
        kind = ("ResNet stages layer1..layer4" if isinstance(backbone.clip.visual, ModifiedResNet)
                else "ViT resblocks")
        raise ValueError(f"unfreeze_blocks: {unfreeze_blocks} is out of range for "
                         f"{backbone.name} (valid: 0..{len(blocks)} {kind})")
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
