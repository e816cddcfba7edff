"""Where a backbone's weights come from, and loading them into an open_clip model.

``pretrained`` names the weights: ``none`` (random init), ``openai`` (full profile only; taken
from the local open_clip / Hugging Face cache, downloaded only when the hub is reachable),
``synthetic`` (tiny profile only; contrastive pretraining on synthetic captioned hands, shipped
or built under the tune-clipfh cache on first use, see :mod:`.pretrain`) or the path of a
weights file that open_clip loads (a state dict, a checkpoint with a ``state_dict`` key, or an
OpenAI TorchScript ``.pt``). A file that does not fit the architecture is refused in one line
naming the file, the architecture and a few mismatched keys or shapes.
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
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import download_pretrained, get_pretrained_cfg

from . import open_clip_configs  # noqa: F401  (registers the tiny configs with open_clip)
from .errors import ModelLoadError
from .pretrain import synthetic_weights
from .registry import BackboneSpec

_HUB_PROBE_TIMEOUT_S = 3.0
_TRUE_ENV_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads HF_HUB_OFFLINE


def weights_file(spec: BackboneSpec, profile: str, pretrained: str,
                 cache_dir: str | os.PathLike | None = None) -> str | Path | None:
    """The local file ``pretrained`` names for this backbone and profile (None: random init)."""
    if pretrained == "none":
        return None
    if pretrained == "openai":
        if profile == "tiny":
            raise ModelLoadError("pretrained: openai exists only for the full profile; the tiny "
                                 "profile takes synthetic, none or a path to a weights file")
        return _openai_weights_file(spec.architecture(profile), cache_dir)
    if pretrained == "synthetic":
        if profile != "tiny":
            raise ModelLoadError("pretrained: synthetic exists only for the tiny profile; the "
                                 "full profile takes openai, none or a path to a weights file")
        return synthetic_weights(spec.key, cache_dir)
    path = Path(pretrained).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"pretrained: weights file {path} does not exist (valid: "
                             f"openai, synthetic, none or the path of a weights file)")
    return path


def create_clip(arch: str, weights: str | Path | None) -> open_clip.CLIP:
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
