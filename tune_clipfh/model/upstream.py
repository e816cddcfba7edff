"""The thesis's own Stage-2 checkpoints (babupallam/CLIP-FH), read without running its code.

Upstream's ``utils/save_load_models.py::save_checkpoint`` writes ``{"model_state_dict": ...,
"epoch": ..., "config": ..., ...}``: the state dict is the OpenAI-layout CLIP model (the key
names open_clip's CLIP uses too) plus the heads ``register_bnneck_and_arcface`` attached to it
(``bottleneck.*``, ``arcface.weight``, ``classifier.*``). A sibling ``<name>_prompt.pth`` holds
the prompt learner (``cls_ctx``, ``token_prefix``, ``token_suffix``; ``proj.*`` for RN50).

Files load with ``weights_only=True``. Upstream's ``config`` pickles its loss object (B16),
which that loader refuses; such objects are read as inert placeholders (:class:`Unread`: no
upstream code is imported or run, the tensors load as usual) and named in the one-line
description.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from .backbone import ClipBackbone
from .errors import ModelLoadError
from .registry import BACKBONES

HEAD_PREFIXES = ("bottleneck.", "arcface.", "classifier.")
"""The modules upstream registered on its CLIP model (spec 2.4); only the BNNeck has a
counterpart at test (``eval_feature: post_bn``), the ID heads serve training only."""
EXPECTED = ("expected upstream's Stage-2 checkpoint: a torch.save'd dict with "
            "'model_state_dict' (utils/save_load_models.py)")


class Unread:
    """What a pickled object of a class weights-only loading does not allow becomes: its
    pickled arguments and state are kept as data, its class is never imported or called."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _placeholders(names: list[str]) -> list[tuple[type, str]]:
    """One :class:`Unread` subclass per refused global, allowed under that global's name."""
    return [(type(f"Unread[{name}]", (Unread,), {"qualified_name": name}), name)
            for name in names]


@dataclass
class UpstreamCheckpoint:
    path: Path
    backbone: str  # our registry key
    epoch: object  # as stored (upstream stored epochs_image: B16)
    clip_state: dict[str, torch.Tensor]
    bottleneck: dict[str, torch.Tensor]  # BatchNorm1d keys, without the prefix
    ignored: list[str]  # head modules with no use at test
    prompt_path: Path
    prompt: dict[str, torch.Tensor] | None  # None: no prompt file beside the checkpoint
    # pickled classes read as placeholders (upstream's loss object: B16)
    unread: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what was found and what of it is used."""
        parts = [f"upstream checkpoint {self.path}: {self.backbone} "
                 f"({BACKBONES[self.backbone].arch}), epoch {self.epoch} as stored, "
                 f"{len(self.clip_state)} CLIP tensors"]
        if self.bottleneck:
            parts.append("bottleneck -> BNNeck (used by eval_feature: post_bn)")
        if self.ignored:
            parts.append(f"{', '.join(self.ignored)} ignored (ID heads, not used at test)")
        parts.append(f"prompt file {self.prompt_path.name}" if self.prompt is not None
                     else f"no prompt file ({self.prompt_path.name} absent)")
        if self.unread:
            parts.append(f"pickled {', '.join(self.unread)} not run (placeholders)")
        return "; ".join(parts)


def prompt_file_for(path: Path) -> Path:
    """Where upstream saved the prompt learner beside a checkpoint (``.pth`` -> ``_prompt.pth``)."""
    return path.with_name(path.name.replace(".pth", "_prompt.pth")) if ".pth" in path.name \
        else path.with_name(f"{path.name}_prompt.pth")


def load_weights_only(path: Path, what: str) -> tuple[object, list[str]]:
    """``torch.load(weights_only=True)`` with every refusal as one line naming the file; also
    the names of the pickled classes read as :class:`Unread` placeholders."""
    if not path.is_file():
        raise ModelLoadError(f"{what} {path}: file not found ({EXPECTED})")
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl")
                                        for n in zipfile.ZipFile(path).namelist()):
        raise ModelLoadError(f"{what} {path}: a TorchScript archive, not a checkpoint "
                             f"({EXPECTED}; an OpenAI .pt is a `pretrained:` weights file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise ModelLoadError(f"{what} {path}: not a torch checkpoint ({_first_line(exc)})") \
                from None
    except Exception as exc:  # torch raises many types for a file that is no checkpoint
        raise ModelLoadError(f"{what} {path}: not a torch checkpoint ({_first_line(exc)}; "
                             f"{EXPECTED})") from None
    try:
        with torch.serialization.safe_globals(_placeholders(unsafe)):
            return torch.load(path, map_location="cpu", weights_only=True), unsafe
    except Exception as exc:  # an opcode weights-only loading never allows
        raise ModelLoadError(f"{what} {path}: holds pickled objects weights-only loading "
                             f"refuses ({', '.join(unsafe[:3])}): {_first_line(exc)}") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an old-format or damaged file: the caller says it is no checkpoint
        return []


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def read_upstream_checkpoint(path: str | Path, model: str) -> UpstreamCheckpoint:
    """Read an upstream checkpoint (and its prompt file, when present) for backbone ``model``;
    floating tensors come back in fp32 (upstream checkpoints may hold fp16)."""
    path = Path(path).expanduser()
    loaded, unread = load_weights_only(path, "checkpoint")
    state = loaded.get("model_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        found = f"a dict with keys {sorted(map(str, loaded))[:4]}" if isinstance(loaded, dict) \
            else f"a {type(loaded).__name__}"
        hint = " (a bare CLIP state dict is a weights file: set pretrained: FILE)" \
            if isinstance(loaded, dict) and "visual.conv1.weight" in loaded else ""
        raise ModelLoadError(f"checkpoint {path}: holds {found}, {EXPECTED}{hint}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    found = detect_backbone(state, path)
    if found != model:
        raise ModelLoadError(f"checkpoint {path}: holds a {found} backbone but the config says "
                             f"model: {model} (set model: {found})")
    heads = {k for k in state if k.startswith(HEAD_PREFIXES)}
    prompt_path = prompt_file_for(path)
    prompt = load_weights_only(prompt_path, "prompt file")[0] if prompt_path.is_file() \
        else None
    if prompt is not None:
        _check_prompt(prompt, prompt_path)
    return UpstreamCheckpoint(
        path=path, backbone=found, epoch=loaded.get("epoch"),
        clip_state={k: v for k, v in state.items() if k not in heads},
        bottleneck={k.removeprefix("bottleneck."): v for k, v in state.items()
                    if k.startswith("bottleneck.")},
        ignored=sorted({k.split(".")[0] for k in heads} - {"bottleneck"}),
        prompt_path=prompt_path, prompt=prompt, unread=unread)


def _signature(arch: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``visual.conv1.weight`` and ``text_projection`` an architecture has."""
    config = open_clip.get_model_config(arch)
    vision, text = config["vision_cfg"], config["text_cfg"]
    if isinstance(vision["layers"], (list, tuple)):  # ModifiedResNet: a 3x3 stem of width / 2
        conv1 = (vision["width"] // 2, 3, 3, 3)
    else:
        conv1 = (vision["width"], 3, vision["patch_size"], vision["patch_size"])
    return conv1, (text["width"], config["embed_dim"])


def detect_backbone(state: dict[str, torch.Tensor], path: Path) -> str:
    """The registry backbone whose full architecture the state dict's stem and text
    projection fit (the strict load later checks every other tensor)."""
    if "visual.conv1.weight" not in state or "text_projection" not in state:
        raise ModelLoadError(f"checkpoint {path}: its model_state_dict holds no CLIP model "
                             f"(no visual.conv1.weight or text_projection; {EXPECTED})")
    found = (tuple(state["visual.conv1.weight"].shape), tuple(state["text_projection"].shape))
    for key, spec in BACKBONES.items():
        if _signature(spec.arch) == found:
            return key
    raise ModelLoadError(f"checkpoint {path}: its CLIP model (visual.conv1.weight "
                         f"{list(found[0])}) is none of the known backbones "
                         f"({', '.join(BACKBONES)})")


def _check_prompt(prompt: object, path: Path) -> None:
    prefix = prompt.get("token_prefix") if isinstance(prompt, dict) else None
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 3:
        raise ModelLoadError(f"prompt file {path}: expected upstream's prompt learner state "
                             f"(cls_ctx, token_prefix [1, n_ctx + 1, width], token_suffix)")


def load_into(checkpoint: UpstreamCheckpoint, backbone: ClipBackbone,
              bnneck: torch.nn.BatchNorm1d) -> None:
    """Load the CLIP tensors (strict: every key, every shape) and the bottleneck, if any."""
    missing, unexpected = _key_differences(backbone.clip.state_dict(), checkpoint.clip_state)
    if missing or unexpected:
        parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                 if keys]
        raise ModelLoadError(f"checkpoint {checkpoint.path}: does not fit the "
                             f"{backbone.arch} architecture: {'; '.join(parts)}")
    backbone.clip.load_state_dict(checkpoint.clip_state)
    if checkpoint.bottleneck:
        bnneck.load_state_dict(checkpoint.bottleneck)


def _key_differences(expected: dict, found: dict) -> tuple[list[str], list[str]]:
    shapes = [f"{k} {list(found[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in found and found[k].shape != v.shape]
    return ([k for k in expected if k not in found] + shapes,
            [k for k in found if k not in expected])


@torch.no_grad()
def sos_text_feature(checkpoint: UpstreamCheckpoint, backbone: ClipBackbone) -> torch.Tensor | None:
    """Upstream's constant test-time text vector (spec 4.1, B12): the text tower's output at
    the SOS position, ``ln_final``, normalised, then (RN50) the prompt learner's ``proj`` and
    normalised again. Under the causal mask that output depends on the SOS embedding alone, so
    a one-token sequence gives it. None when it cannot be rebuilt: RN50 without the prompt
    file, whose ``proj`` only that file holds."""
    clip = backbone.clip
    prompt = checkpoint.prompt
    needs_proj = backbone.text_width != backbone.embed_dim  # upstream: proj only then
    if needs_proj and (prompt is None or "proj.weight" not in prompt):
        return None
    device = clip.token_embedding.weight.device
    if prompt is not None:  # the SOS embedding upstream's prompt learner saved
        sos = prompt["token_prefix"][0, 0].float().to(device)
    else:  # what a fresh prompt learner takes: the SOS token's embedding
        sos = clip.token_embedding.weight[backbone.tokenizer.sot_token_id]
    x = (sos + clip.positional_embedding[0]).reshape(1, 1, -1)
    text = F.normalize(clip.ln_final(clip.transformer(x))[:, 0], dim=-1)
    if needs_proj:
        weight, bias = prompt["proj.weight"].float(), prompt["proj.bias"].float()
        text = F.normalize(F.linear(text, weight.to(device), bias.to(device)), dim=-1)
    return text.cpu()
