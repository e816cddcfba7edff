"""GPUs per trial: ``--gpus-per-trial auto`` and the rule that no trial uses a card Ray does not
account for.

Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone for a trial that asks for no GPU: such a trial
sees every card, and nothing stops several of them from landing on one. So on a cluster with
GPUs every trial that may use CUDA asks Ray for its share:

* ``auto`` with no GPU in the cluster: 0 GPUs.
* ``auto`` with GPUs: one short probe on a GPU measures a trial's peak memory (one training
  step of the image tower at the configuration's batch size and precision, see
  :func:`measure_peak_memory`); ``k = floor(0.85 * card memory / peak)`` trials share one card,
  each asking for ``1/k`` GPU (1 GPU when ``k <= 1``). If the probe cannot run, 1 GPU.
* An explicit number is used as given, except 0 on a cluster with GPUs: configurations with
  ``device: auto`` then run on the CPU (their device becomes ``cpu``, with a note), and a
  configuration with ``device: cuda`` is refused with one line, since it asks for a card Ray
  would not account for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import build_config
from ..errors import UserError

AUTO = "auto"
MEMORY_HEADROOM = 0.85
"""Share of a card's memory that trials sharing it may fill together."""
CUDA_CONTEXT_BYTES = 600 * 2**20
"""Memory a process's CUDA context and kernels take on the card, outside PyTorch's allocator
(so outside ``max_memory_reserved``): about 300-600 MiB depending on the card and libraries."""
PROBE_TIMEOUT_S = 600.0
"""The probe waits for a free GPU, imports torch and builds the model: minutes at most."""


@dataclass(frozen=True)
class ProbeResult:
    """One trial's measured peak GPU memory and the card it was measured on."""

    peak_bytes: int
    card_bytes: int
    gpu_name: str


@dataclass(frozen=True)
class GpuPlan:
    gpus_per_trial: float
    device: str | None = None
    """A device every trial must use instead of its own (``cpu``), or None."""
    note: str = ""
    """One line for the driver's log ('' when there is nothing to say)."""


def parse_gpus_per_trial(text: str) -> float | str:
    """``auto`` or a number >= 0 (``--gpus-per-trial``)."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not valid (valid: auto or a number >= 0)")
    return value


def gpus_from_memory(peak_bytes: int, card_bytes: int,
                     headroom: float = MEMORY_HEADROOM) -> float:
    """GPUs per trial from its peak memory: ``1/k`` with ``k = floor(headroom * card / peak)``
    trials on one card, or 1 when not even two fit."""
    if peak_bytes <= 0 or card_bytes <= 0:
        return 1.0
    fit = math.floor(headroom * card_bytes / peak_bytes)
    return 1.0 if fit <= 1 else 1.0 / fit


def plan_gpus(requested: float | str, cluster_gpus: float, devices: Iterable[str],
              probe: Callable[[], ProbeResult]) -> GpuPlan:
    """GPUs per trial for trials whose configurations ask for ``devices`` (auto/cpu/cuda) on a
    cluster with ``cluster_gpus`` GPUs; ``probe`` measures a trial (called only when needed)."""
    devices = set(devices)
    if requested == AUTO:
        if cluster_gpus <= 0 or devices <= {"cpu"}:
            gpus = 0.0
        else:
            return _probed_plan(probe)
    else:
        gpus = float(requested)
    if gpus > 0 or cluster_gpus <= 0:
        return GpuPlan(gpus)
    # 0 GPUs per trial on a cluster with GPUs: a trial must never use a card Ray does not know of.
    if "cuda" in devices:
        raise UserError(f"--gpus-per-trial 0 with device: cuda: the trials would use the "
                        f"cluster's {cluster_gpus:g} GPUs without Ray accounting for them "
                        f"(give each trial GPUs with --gpus-per-trial auto or a number, or set "
                        f"device: cpu)")
    if "auto" in devices:
        return GpuPlan(0.0, device="cpu", note=(
            f"[tune] --gpus-per-trial 0 on a cluster with {cluster_gpus:g} GPUs: the trials run "
            f"on the CPU (device: cpu), so none uses a card Ray does not account for"))
    return GpuPlan(0.0)


def _probed_plan(probe: Callable[[], ProbeResult]) -> GpuPlan:
    try:
        result = probe()
    except Exception as exc:  # whatever stops the probe (OOM, a driver error, a timeout, a
        # lost node), trials still run, one card each
        cause = getattr(exc, "cause", None) or exc  # a Ray task's own exception
        return GpuPlan(1.0, note=f"[tune] --gpus-per-trial auto: the memory probe failed "
                                 f"({type(cause).__name__}: {_first_line(cause)}); 1 GPU per "
                                 f"trial")
    gpus = gpus_from_memory(result.peak_bytes, result.card_bytes)
    share = "1 GPU" if gpus == 1 else f"1/{round(1 / gpus)} GPU"
    return GpuPlan(gpus, note=(
        f"[tune] --gpus-per-trial auto: {share} per trial (a trial peaks at "
        f"{result.peak_bytes / 2**30:.1f} GiB of the {result.card_bytes / 2**30:.0f} GiB "
        f"{result.gpu_name}; {MEMORY_HEADROOM:.0%} of a card is shared)"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def probe_knob_sets(knob_sets: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One knob set per (model, profile, batch size, precision): the settings that set a
    trial's memory (the probe trains the whole image tower, an upper bound for any
    ``unfreeze_*``)."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for knobs in knob_sets:
        key = tuple(knobs.get(k) for k in ("model", "profile", "batch_size", "amp"))
        chosen.setdefault(key, knobs)
    return list(chosen.values())


def measure_peak_memory(knob_sets: list[dict[str, Any]]) -> ProbeResult:
    """On this process's GPU: the largest peak memory of one training step per knob set.

    The step is what dominates a trial's memory: the backbone on the card, a forward and
    backward pass of the image tower over one batch at the configuration's input size, batch
    size and autocast precision, with every image-tower parameter trainable and AdamW's state
    (:func:`training_step`). Reserved (not only allocated) memory counts, plus
    :data:`CUDA_CONTEXT_BYTES`.
    """
    import torch  # in the Ray task that runs it; the driver needs no CUDA

    device = torch.device("cuda")
    peak = 0
    for knobs in knob_sets:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        training_step(knobs, device)
        torch.cuda.synchronize(device)
        peak = max(peak, torch.cuda.max_memory_reserved(device))
    properties = torch.cuda.get_device_properties(device)
    return ProbeResult(peak + CUDA_CONTEXT_BYTES, properties.total_memory, properties.name)


def training_step(knobs: dict[str, Any], device) -> float:
    """One AdamW step of a freshly built (random-init: the weights' values do not change the
    memory) backbone's whole image tower on one random batch, as a trial of ``knobs`` runs it
    on ``device``; returns the loss."""
    import torch

    from ..model.backbone import configure_visual_trainable, create_backbone
    from ..train.precision import autocast_dtype

    config = build_config(knobs, "GPU memory probe").config
    backbone = create_backbone(config.model, config.profile, "none").to(device)
    if backbone.spec.channels_last and device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    configure_visual_trainable(backbone, backbone.spec.blocks, "all")
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad])
    size = backbone.spec.input_size(config.profile)
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    dtype = autocast_dtype(config.amp, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = backbone.encode_image(images).float().square().mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def ray_probe(knob_sets: list[dict[str, Any]],
              timeout_s: float = PROBE_TIMEOUT_S) -> Callable[[], ProbeResult]:
    """:func:`measure_peak_memory` as a one-GPU Ray task (on a node with a GPU, which Ray
    reserves for it), for :func:`plan_gpus`."""
    import ray  # here, not at the top: the CLI imports this module to parse its options

    def probe() -> ProbeResult:
        task = ray.remote(num_gpus=1, max_retries=0)(measure_peak_memory)
        ref = task.remote(probe_knob_sets(knob_sets))
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise

    return probe
